"""SyncLedger works from plain threads and from inside a running event loop."""

from __future__ import annotations

import asyncio
import threading

from cycles_ledger import Decision, open_ledger_sync


def test_sync_ledger_plain(db_url: str) -> None:
    """The sync twin reserves, commits and reads like the async ledger, on every store."""
    with open_ledger_sync(db_url) as led:
        led.set_budget("tenant:t", "1usd")
        r = led.reserve({"tenant": "t"}, {"kind": "k.x", "name": "n"}, "0.6usd")
        assert r.decision is Decision.ALLOW
        assert led.commit(r.reservation_id or "", "0.5usd").charged.amount == 50_000_000
        assert led.balance("tenant:t").remaining == 50_000_000
        assert led.verify() == []


def test_sync_ledger_inside_running_loop(db_url: str) -> None:
    """Called from a coroutine (a loop is running in this thread), the sync twin still answers, on every store."""

    async def inside() -> int:
        with open_ledger_sync(db_url) as led:
            led.set_budget("tenant:t", "3usd")
            return led.balance("tenant:t").allocated

    assert asyncio.run(inside()) == 3 * 10**8


def test_sync_ledger_from_threads(db_url: str) -> None:
    """Many threads sharing one SyncLedger never overspend, on every store."""
    with open_ledger_sync(db_url) as led:
        led.set_budget("tenant:t", "1usd")
        allowed: list[bool] = []

        def worker() -> None:
            for _ in range(10):
                r = led.reserve({"tenant": "t"}, {"kind": "k.x", "name": "n"}, "0.05usd")
                allowed.append(r.allowed)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert allowed.count(True) == 20
        assert led.balance("tenant:t").reserved == 10**8
