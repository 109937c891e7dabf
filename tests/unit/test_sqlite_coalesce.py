"""SQLite: a commit nobody waits for (`coalesce=True`, the proxy's background settle) rides in the transaction
of the next operation, or is written alone after `coalesce_ms`; every such commit is answered once on disk."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from cycles_ledger import CommitResult, IdempotencyMismatchError, Ledger, ReservationFinalizedError, open_ledger
from cycles_ledger.stores.sqlite import SqliteStore

from .test_ledger import check_invariant

pytestmark = pytest.mark.sqlite

SUBJECT = {"tenant": "c"}
ACTION = {"kind": "llm.completion", "name": "m"}


def _count_commits(ledger: Ledger) -> list[str]:
    store = ledger.store
    assert isinstance(store, SqliteStore) and store._inline is not None
    seen: list[str] = []
    store._inline.set_trace_callback(lambda sql: seen.append(sql) if sql == "COMMIT" else None)
    return seen


async def _one_held_back(ledger: Ledger) -> asyncio.Future[CommitResult]:
    """A $0.50 hold whose $0.20 commit is held back (the store's window is long in these tests)."""
    await ledger.set_budget("tenant:c", "1usd")
    r = await ledger.reserve(SUBJECT, ACTION, "0.5usd")
    settle = asyncio.ensure_future(ledger.commit(r.reservation_id or "", "0.2usd", coalesce=True))
    await asyncio.sleep(0.01)
    return settle


async def test_background_commits_ride_in_the_next_reserve(tmp_path: Path) -> None:
    """A proxy's calls: reserve, then (after the answer) a commit in the background. With coalescing each call
    costs one transaction, and every amount lands exactly."""
    async with open_ledger(f"sqlite:///{tmp_path / 'c.db'}") as ledger:
        await ledger.set_budget("tenant:c", "100usd")
        commits = _count_commits(ledger)
        settles = []
        for i in range(50):
            r = await ledger.reserve(SUBJECT, ACTION, "0.01usd", idempotency_key=f"k{i}", key_is_unique=True)
            settles.append(asyncio.ensure_future(ledger.commit(r.reservation_id or "", "0.004usd", coalesce=True)))
            await asyncio.sleep(0.001)
        answers = await asyncio.gather(*settles)
        assert all(a.charged.amount == 400_000 for a in answers)
        assert len(commits) <= 52, f"{len(commits)} transactions for 50 calls"  # the last commit alone, or two
        balance = await ledger.balance("tenant:c")
        assert (balance.spent, balance.reserved) == (50 * 400_000, 0)
        await check_invariant(ledger)


async def test_a_lone_commit_is_written_within_coalesce_ms(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    async with open_ledger(f"sqlite:///{db}", coalesce_ms=30) as ledger:
        await ledger.set_budget("tenant:c", "1usd")
        r = await ledger.reserve(SUBJECT, ACTION, "0.5usd")
        started = time.monotonic()
        answer = await ledger.commit(r.reservation_id or "", "0.2usd", coalesce=True)
        waited = time.monotonic() - started
        assert answer.charged.amount == 20_000_000
        assert 0.02 <= waited < 2.0  # held back for the window, then written on its own
        other = sqlite3.connect(db)  # another process's view: it is on disk
        try:
            (status,) = other.execute("SELECT status FROM reservations").fetchone()
        finally:
            other.close()
        assert status == "COMMITTED"


async def test_this_process_reads_its_held_back_commits(tmp_path: Path) -> None:
    async with open_ledger(f"sqlite:///{tmp_path / 'r.db'}", coalesce_ms=5000) as ledger:
        settle = await _one_held_back(ledger)
        assert not settle.done()  # held back (the window is 5 s)
        balance = await ledger.balance("tenant:c")  # a read carries it: read-your-writes
        assert (balance.spent, balance.reserved) == (20_000_000, 0)
        assert (await asyncio.wait_for(settle, 1)).charged.amount == 20_000_000  # answered by that transaction


async def test_a_failing_held_back_commit_fails_alone(tmp_path: Path) -> None:
    """The commit of a reservation released meanwhile gets its own error; the reserve it rode with holds."""
    async with open_ledger(f"sqlite:///{tmp_path / 'f.db'}", coalesce_ms=5000) as ledger:
        await ledger.set_budget("tenant:c", "1usd")
        gone = await ledger.reserve(SUBJECT, ACTION, "0.1usd")
        await ledger.release(gone.reservation_id or "")
        settle = asyncio.ensure_future(ledger.commit(gone.reservation_id or "", "0.1usd", coalesce=True))
        await asyncio.sleep(0.01)
        held = await ledger.reserve(SUBJECT, ACTION, "0.3usd")
        assert held.allowed
        with pytest.raises(ReservationFinalizedError):
            await settle
        balance = await ledger.balance("tenant:c")
        assert (balance.spent, balance.reserved) == (0, 30_000_000)
        await check_invariant(ledger)


async def test_held_back_commits_wait_for_a_write_lock_another_process_holds(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    async with open_ledger(f"sqlite:///{db}", coalesce_ms=5000) as ledger:
        settle = await _one_held_back(ledger)
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process writes: the inline path cannot take the lock
        nxt = asyncio.ensure_future(ledger.reserve(SUBJECT, ACTION, "0.1usd"))
        await asyncio.sleep(0.05)
        assert not settle.done() and not nxt.done()
        other.execute("COMMIT")
        other.close()
        assert (await asyncio.wait_for(settle, 10)).charged.amount == 20_000_000
        assert (await asyncio.wait_for(nxt, 10)).allowed
        balance = await ledger.balance("tenant:c")
        assert (balance.spent, balance.reserved) == (20_000_000, 10_000_000)


async def test_closing_writes_held_back_commits(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    ledger = open_ledger(f"sqlite:///{db}", coalesce_ms=60_000)
    settle = await _one_held_back(ledger)
    await ledger.aclose()
    assert (await settle).charged.amount == 20_000_000
    async with open_ledger(f"sqlite:///{db}") as again:
        assert (await again.balance("tenant:c")).spent == 20_000_000


async def test_a_held_back_commit_lands_when_the_operation_carrying_it_fails(tmp_path: Path) -> None:
    """A client replaying a call id with another payload makes the next reserve fail; the commit it carried is
    written all the same, and the failed reserve holds nothing."""
    async with open_ledger(f"sqlite:///{tmp_path / 'm.db'}", coalesce_ms=5000) as ledger:
        await ledger.set_budget("tenant:c", "1usd")
        await ledger.reserve(SUBJECT, ACTION, "0.1usd", idempotency_key="client-id")
        r = await ledger.reserve(SUBJECT, ACTION, "0.5usd")
        settle = asyncio.ensure_future(ledger.commit(r.reservation_id or "", "0.2usd", coalesce=True))
        await asyncio.sleep(0.01)
        assert not settle.done()
        with pytest.raises(IdempotencyMismatchError):
            await ledger.reserve(SUBJECT, ACTION, "0.3usd", idempotency_key="client-id")
        assert (await asyncio.wait_for(settle, 1)).charged.amount == 20_000_000
        balance = await ledger.balance("tenant:c")
        assert (balance.spent, balance.reserved) == (20_000_000, 10_000_000)
        await check_invariant(ledger)
