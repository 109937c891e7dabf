"""SQLite-store specifics: where WAL checkpoints run, and their settings."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cycles_ledger import ConfigError, open_ledger
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


async def test_each_callers_shape_decodes_to_its_own_subject(tmp_path: Path) -> None:
    """Reservations keep subject, action and scopes in a shared, content-addressed shapes row: many callers
    with client-chosen names (and two stores in one process sharing the decode cache) each read back their
    own subject and budgeted scopes."""
    for n in range(2):
        async with open_ledger(f"sqlite:///{tmp_path / f'l{n}.db'}") as led:
            await led.set_budget("tenant:t", "100usd")
            await led.set_budget(f"tenant:t/agent:a{n}-7", "1usd")
            ids = {}
            for i in range(60):
                subject = {"tenant": "t", "agent": f"a{n}-{i}"}
                r = await led.reserve(subject, {"kind": "tool", "name": f"x{i % 3}"}, "0.01usd")
                assert r.reservation_id
                ids[r.reservation_id] = (f"a{n}-{i}", f"x{i % 3}")
            r = await led.reserve({"tenant": "t", "agent": "fresh"}, {"kind": "tool", "name": "x0"}, "0.01usd")
            ids[r.reservation_id or ""] = ("fresh", "x0")
            for rid, (agent, name) in ids.items():
                res = await led.get_reservation(rid)
                assert (res.subject.agent, res.action.name) == (agent, name)
                expected = ["tenant:t", f"tenant:t/agent:a{n}-7"] if agent == f"a{n}-7" else ["tenant:t"]
                assert res.budgeted_scopes == expected
            assert len(await led.list_reservations(scope=f"tenant:t/agent:a{n}-7")) == 1
            assert await led.verify() == []
