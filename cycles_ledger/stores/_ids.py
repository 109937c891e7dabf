"""Reservation ids that are time-ordered and unique across processes, forked ones included."""

from __future__ import annotations

import itertools
import os
import secrets

__all__ = ["reservation_id"]

_PREFIX = secrets.token_hex(4)
_COUNTER = itertools.count()


def _reseed() -> None:
    """A forked child draws its own prefix, or two processes could mint the same id in one ms."""
    global _PREFIX, _COUNTER
    _PREFIX = secrets.token_hex(4)
    _COUNTER = itertools.count()


os.register_at_fork(after_in_child=_reseed)


def reservation_id(now_ms: int) -> str:
    """`rsv_` + 26 hex digits: the ms (so inserts land at the end of an index), the process, a counter."""
    return f"rsv_{now_ms:012x}{_PREFIX}{next(_COUNTER) & 0xFFFFFF:06x}"
