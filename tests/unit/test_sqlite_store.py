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
