"""A spy on the Redis store's script calls, for tests of how calls are batched."""

from __future__ import annotations

from typing import Any


def count_script_calls(store: Any) -> list[int]:
    """Spy on the store's script calls; returns a list that gets the number of operations of each call."""
    seen: list[int] = []
    real = store._script

    def spy(ops: list[Any]) -> Any:
        seen.append(len(ops))
        return real(ops)

    store._script = spy
    return seen
