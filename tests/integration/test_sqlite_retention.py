"""A SQLite ledger that runs for hours at a steady rate stays the size of its retention window: the sweeper
forgets old events and finished reservations a batch at a time, their pages are reused, the closed periods'
totals stay, and verify() still rebuilds every budget exactly."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cycles_ledger import open_ledger
from cycles_ledger.errors import ConfigError
from cycles_ledger.stores.sqlite import SqliteStore
from tests.conftest import FakeClock

HOUR = 3_600_000
PER_HOUR = 1_500
SUBJ = {"tenant": "t", "agent": "a"}
ACT = {"kind": "tool.search", "name": "web"}


def pages(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return int(conn.execute("PRAGMA page_count").fetchone()[0])
    finally:
        conn.close()


async def test_a_steady_ledger_stays_the_size_of_its_retention_window(tmp_path: Path) -> None:
    path = tmp_path / "steady.db"
    clock = FakeClock()
    sizes = []
    async with open_ledger(f"sqlite:///{path}?retention=1h", clock=clock) as led:
        await led.set_budget("tenant:t", "1000000usd")
        await led.set_budget("tenant:t/agent:a", "1000000usd", period={"every": "1h"})
        for _hour in range(6):
            for i in range(PER_HOUR):
                clock.advance(HOUR // PER_HOUR)
                r = await led.reserve(SUBJ, ACT, "0.01usd")
                await led.commit(r.reservation_id or "", "0.008usd")
                if i % 100 == 0:
                    await led.sweep()
            sizes.append(pages(path))
        events = await led.events(limit=100_000)
        # The last sweep ran 100 pairs (4 minutes) before the end.
        assert all(e.ts_ms >= clock.now - HOUR - 5 * 60_000 for e in events if e.type != "period_reset")
        assert sum(e.type == "period_reset" for e in events) == 6  # every closed period's totals are kept
        assert len(await led.list_reservations(limit=100_000)) < 1.1 * PER_HOUR
        top = await led.balance("tenant:t")
        assert top.spent == 6 * PER_HOUR * 800_000  # nothing charged is lost with the events
        assert await led.verify() == []
    print("pages per hour:", sizes)
    assert sizes[-1] <= sizes[1] * 1.1, f"the file kept growing: {sizes} pages"


def test_retention_setting_in_the_url(tmp_path: Path) -> None:
    store = SqliteStore.from_url(f"sqlite:///{tmp_path / 'a.db'}?retention=30d")
    assert store.retention_ms == 30 * 24 * HOUR
    forever = SqliteStore.from_url(f"sqlite:///{tmp_path / 'b.db'}?retention=forever")
    assert forever.retention_ms is None
    for bad in ("?retention=soon", "?colour=red"):
        try:
            SqliteStore.from_url(f"sqlite:///{tmp_path / 'c.db'}{bad}")
        except ConfigError:
            continue
        raise AssertionError(f"{bad} was accepted")
