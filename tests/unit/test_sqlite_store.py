"""SQLite-store specifics: where WAL checkpoints run, deferred commits, and their settings."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

import pytest

from cycles_ledger import ConfigError, Ledger, NotFoundError, ReservationFinalizedError, open_ledger
from cycles_ledger.stores.sqlite import SqliteStore

from .test_ledger import check_invariant

pytestmark = pytest.mark.sqlite

SUBJECT = {"tenant": "w"}
ACTION = {"kind": "tool.search", "name": "web"}


async def _pairs(url: str, n: int, **settings: object) -> None:
    async with open_ledger(url, **settings) as ledger:
        await ledger.set_budget("tenant:w", "1000000usd")
        for i in range(n):
            r = await ledger.reserve(SUBJECT, ACTION, "0.01usd", idempotency_key=f"k{i}")
            await ledger.commit(r.reservation_id or "", "0.004usd")
        await check_invariant(ledger)
        assert (await ledger.balance("tenant:w")).spent == n * 400_000


async def test_wal_stays_bounded_without_autocheckpoint(tmp_path: Path) -> None:
    """Our connections never checkpoint inside a COMMIT; the writer thread does it every
    `checkpoint_every` writes. With autocheckpoint off (checked below) and without our checkpointer,
    the WAL would hold every page ever written: ~10 MB here."""
    db = tmp_path / "w.db"
    await _pairs(f"sqlite:///{db}", 600, checkpoint_every=50)  # 1,200 write transactions (+ budget)
    # Read before close: closing the last connection checkpoints and deletes the WAL on its own.
    store = SqliteStore(str(db), checkpoint_every=50)
    try:
        wal = Path(str(db) + "-wal")
        size = wal.stat().st_size if wal.exists() else 0
        assert size < 2 * 1024 * 1024, f"WAL grew to {size} bytes"
        assert store._inline is not None
        assert store._inline.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    finally:
        await store.aclose()


async def test_checkpoint_every_is_checked(tmp_path: Path) -> None:
    for bad in (0, -1, 1.5, "10"):
        with pytest.raises(ConfigError, match="checkpoint_every"):
            SqliteStore(str(tmp_path / "c.db"), checkpoint_every=bad)  # type: ignore[arg-type]


async def test_committed_data_survives_with_deferred_checkpoints(tmp_path: Path) -> None:
    """Everything answered is in the database file set (db + WAL) for a fresh reader."""
    db = tmp_path / "d.db"
    await _pairs(f"sqlite:///{db}", 120, checkpoint_every=1000)
    conn = sqlite3.connect(db)
    try:
        (committed,) = conn.execute("SELECT count(*) FROM reservations WHERE status='COMMITTED'").fetchone()
    finally:
        conn.close()
    assert committed == 120


# --- deferred commits: `commit(..., defer=True)` rides along in the next transaction -----------------


async def _ledger_on(path: Path, **settings: object) -> tuple[Ledger, SqliteStore]:
    store = SqliteStore(str(path), checkpoint_every=10**9, **settings)  # type: ignore[arg-type]
    ledger = Ledger(store)
    await ledger.set_budget("tenant:w", "10usd")
    return ledger, store


async def test_a_deferred_commit_shares_the_next_operations_transaction(tmp_path: Path) -> None:
    ledger, store = await _ledger_on(tmp_path / "r.db", defer_ms=1000)
    try:
        first = await ledger.reserve(SUBJECT, ACTION, "1usd")
        writes = store._writer.writes
        commit = asyncio.ensure_future(ledger.commit(first.reservation_id or "", "0.5usd", defer=True))
        await asyncio.sleep(0.05)
        assert not commit.done()  # waiting for a ride (the timer is 1 s)
        second = await ledger.reserve(SUBJECT, ACTION, "1usd")
        assert (await asyncio.wait_for(commit, 0.5)).charged.amount == 50_000_000  # long before its timer
        assert store._writer.writes == writes + 1  # one transaction for both
        # The reserve ran after the commit in that transaction: it saw the released half dollar.
        assert second.balances[0].spent == 50_000_000 and second.balances[0].reserved == 100_000_000
        await check_invariant(ledger)
    finally:
        await ledger.aclose()


async def test_a_lone_deferred_commit_lands_after_defer_ms_and_is_durable(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    ledger, _ = await _ledger_on(db, defer_ms=30)
    try:
        r = await ledger.reserve(SUBJECT, ACTION, "1usd")
        t0 = asyncio.get_running_loop().time()
        result = await ledger.commit(r.reservation_id or "", "0.25usd", defer=True)
        waited = asyncio.get_running_loop().time() - t0
        assert result.charged.amount == 25_000_000 and 0.025 <= waited < 5
        conn = sqlite3.connect(db)  # answered means committed: a fresh reader sees it
        try:
            (status,) = conn.execute("SELECT status FROM reservations WHERE id=?", (r.reservation_id,)).fetchone()
        finally:
            conn.close()
        assert status == "COMMITTED"
    finally:
        await ledger.aclose()


async def test_deferred_failures_stay_with_their_own_caller(tmp_path: Path) -> None:
    """A rider that fails gets its typed error; the operation it rode with, and the other riders,
    are unaffected; and an operation that fails does not undo the riders."""
    ledger, _ = await _ledger_on(tmp_path / "f.db", defer_ms=1000)
    try:
        a = await ledger.reserve(SUBJECT, ACTION, "1usd")
        b = await ledger.reserve(SUBJECT, ACTION, "1usd")
        await ledger.commit(a.reservation_id or "", "1usd")
        unknown = asyncio.ensure_future(ledger.commit("rsv_00000000000000000000000000", "0.1usd", defer=True))
        good = asyncio.ensure_future(ledger.commit(b.reservation_id or "", "0.5usd", defer=True))
        await asyncio.sleep(0.01)
        with pytest.raises(ReservationFinalizedError):
            await ledger.release(a.reservation_id or "")  # fails itself; the riders still land
        with pytest.raises(NotFoundError):
            await unknown
        assert (await good).charged.amount == 50_000_000
        balance = await ledger.balance("tenant:w")
        assert (balance.spent, balance.reserved) == (150_000_000, 0)
        await check_invariant(ledger)
    finally:
        await ledger.aclose()


async def test_close_answers_deferred_commits(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    ledger, _ = await _ledger_on(db, defer_ms=1000)
    r = await ledger.reserve(SUBJECT, ACTION, "1usd")
    commit = asyncio.ensure_future(ledger.commit(r.reservation_id or "", "0.3usd", defer=True))
    await asyncio.sleep(0.01)
    await ledger.aclose()
    assert (await commit).charged.amount == 30_000_000
    async with open_ledger(f"sqlite:///{db}") as again:
        assert (await again.balance("tenant:w")).spent == 30_000_000


async def test_deferred_commits_under_concurrency_keep_the_books(tmp_path: Path) -> None:
    """40 tasks reserve and commit with defer=True at random moments (some inline riders, some on
    the writer thread, some by the timer): every commit lands once and the books agree."""
    ledger, _ = await _ledger_on(tmp_path / "k.db", defer_ms=5)
    rng = random.Random(7)

    async def worker(i: int) -> int:
        total = 0
        for j in range(10):
            r = await ledger.reserve(SUBJECT, ACTION, "0.01usd", idempotency_key=f"{i}-{j}")
            await asyncio.sleep(rng.random() * 0.004)
            actual = rng.randrange(0, 1_000_001)
            await ledger.commit(r.reservation_id or "", {"unit": "USD_MICROCENTS", "amount": actual}, defer=True)
            total += actual
        return total

    try:
        totals = await asyncio.gather(*(worker(i) for i in range(40)))
        balance = await ledger.balance("tenant:w")
        assert (balance.spent, balance.reserved) == (sum(totals), 0)
        await check_invariant(ledger)
    finally:
        await ledger.aclose()


async def test_defer_ms_is_checked(tmp_path: Path) -> None:
    for bad in (-1, 1001, 0.5, "5"):
        with pytest.raises(ConfigError, match="defer_ms"):
            SqliteStore(str(tmp_path / "d.db"), defer_ms=bad)  # type: ignore[arg-type]
