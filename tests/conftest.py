"""Shared fixtures: a real SQLite ledger in a temp file, and a clock the test moves by hand."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cycles_ledger import Ledger, open_ledger


class FakeClock:
    """Milliseconds that advance only when the test says so (passed to the store as `clock`)."""

    def __init__(self, start_ms: int = 1_800_000_000_000) -> None:
        self.now = start_ms

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
async def ledger(db_url: str, clock: FakeClock) -> AsyncIterator[Ledger]:
    async with open_ledger(db_url, clock=clock) as led:
        yield led
