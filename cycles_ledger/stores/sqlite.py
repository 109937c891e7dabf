"""Embedded store: one SQLite file (WAL), safe for many processes on one host.

Each process owns one writer thread with one connection. Operations queue up and the thread drains
them into one `BEGIN IMMEDIATE` transaction (group commit), each inside its own SAVEPOINT so a failing
operation rolls back alone. Futures are resolved only after COMMIT returns, so an answer the caller
has seen is on disk (WAL + synchronous=NORMAL survives a killed process; a power cut may lose the last
transactions). Other processes serialise on SQLite's write lock.

WAL checkpoints (copying the log back into the database, with two fsyncs) never run inside a
caller's COMMIT: automatic checkpoints are off on our connections and the writer thread runs a
PASSIVE one every `checkpoint_every` write transactions and when idle (SQLite releases the GIL
meanwhile, so an event loop using the store keeps running). An autocheckpoint inside an inline COMMIT
used to stall the caller's loop for several milliseconds every ~100 operations.

Why not aiosqlite: it runs one statement per hop to its thread; a reservation is six statements, and
batching whole operations into one transaction is what makes the throughput goal reachable.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import rules
from ..errors import (
    BudgetClosedError,
    BudgetFrozenError,
    ConfigError,
    CyclesError,
    IdempotencyMismatchError,
    MaxExtensionsExceededError,
    NotFoundError,
    ReservationExpiredError,
    ReservationFinalizedError,
    StoreUnavailableError,
    UnitMismatchError,
)
from ..models import Decision, OveragePolicy, SoftLanding
from ._ids import reservation_id
from .base import (
    BudgetCommand,
    CommitCommand,
    EventCommand,
    ExtendCommand,
    NoteCommand,
    ReleaseCommand,
    ReserveCommand,
    Store,
    SupportsSweep,
)

__all__ = ["SqliteStore"]

Clock = Callable[[], int]
_JSON = json.JSONEncoder(separators=(",", ":")).encode

_SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    scope TEXT NOT NULL,
    unit TEXT NOT NULL,
    allocated INTEGER NOT NULL,
    spent INTEGER NOT NULL DEFAULT 0,
    reserved INTEGER NOT NULL DEFAULT 0,
    debt INTEGER NOT NULL DEFAULT 0,
    overdraft_limit INTEGER NOT NULL DEFAULT 0,
    is_over_limit INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'ACTIVE',
    caps TEXT,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (scope, unit)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT NOT NULL PRIMARY KEY,
    status TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    subject TEXT NOT NULL,
    action TEXT NOT NULL,
    unit TEXT NOT NULL,
    estimate INTEGER NOT NULL,
    charged INTEGER,
    overage_policy TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    grace_ms INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL,
    finalized_at_ms INTEGER,
    scope_path TEXT NOT NULL,
    affected_scopes TEXT NOT NULL,
    budgeted_scopes TEXT NOT NULL,
    extension_count INTEGER NOT NULL DEFAULT 0,
    metadata TEXT,
    caps TEXT,
    settle_op TEXT,
    settle_key TEXT,
    settle_hash TEXT,
    settle_response TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reservations_due ON reservations (deadline_ms) WHERE status = 'ACTIVE';
CREATE TABLE IF NOT EXISTS idempotency (
    op TEXT NOT NULL,
    key TEXT NOT NULL,
    payload_hash TEXT NOT NULL,
    response TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (op, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    event_id INTEGER PRIMARY KEY,  -- rowid: increasing, since the log is never deleted from
    ts_ms INTEGER NOT NULL,
    type TEXT NOT NULL,
    scope TEXT,
    unit TEXT,
    amount INTEGER,
    reservation_id TEXT,
    reason_code TEXT,
    data TEXT
);
"""

_BUDGET_COLS = "scope, unit, allocated, spent, reserved, debt, overdraft_limit, is_over_limit, status, caps"
_RES_COLS = (
    "id, status, idempotency_key, subject, action, unit, estimate, charged, overage_policy, created_at_ms,"
    " expires_at_ms, grace_ms, deadline_ms, finalized_at_ms, scope_path, affected_scopes, budgeted_scopes,"
    " extension_count, metadata, caps, settle_op, settle_key, settle_hash, settle_response"
)
_RES_INSERT = f"INSERT INTO reservations ({_RES_COLS}) VALUES ({','.join('?' * len(_RES_COLS.split(',')))})"
Row = sqlite3.Row


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class _Fail:
    """An operation outcome that keeps its writes (e.g. a lazy expiry) and still answers with an error."""

    __slots__ = ("error",)

    def __init__(self, error: CyclesError) -> None:
        self.error = error


_STOP = object()
_CHECKPOINT = object()


class _Job:
    """One queued operation and the asyncio future (on its caller's loop) that receives the outcome."""

    __slots__ = ("args", "fn", "future", "loop", "readonly")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], readonly: bool) -> None:
        self.fn = fn
        self.args = args
        self.readonly = readonly
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future[Any] = self.loop.create_future()


def _deliver(outcomes: list[tuple[_Job, Any, BaseException | None]]) -> None:
    """Runs on the caller's loop: settle every future of one batch in one wake-up."""
    for job, result, error in outcomes:
        if job.future.cancelled():
            continue
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)


class _Writer(threading.Thread):
    """The one thread that talks to SQLite for this store; drains queued jobs into one transaction."""

    def __init__(
        self,
        path: str,
        clock: Clock,
        batch_size: int,
        busy_timeout_s: float,
        sweep_per_batch: int,
        checkpoint_every: int,
    ):
        super().__init__(name=f"cycles-sqlite:{os.path.basename(path)}", daemon=True)
        self.path = path
        self.clock = clock
        self.batch_size = batch_size
        self.busy_timeout_s = busy_timeout_s
        self.sweep_per_batch = sweep_per_batch
        self.jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.busy = False
        self.checkpoint_every = checkpoint_every
        self.writes = 0  # write transactions since the last checkpoint (ours and the inline path's)
        self.checkpoint_queued = False

    def wrote(self) -> None:
        """Count one committed write transaction; ask for a checkpoint every `checkpoint_every`."""
        self.writes += 1
        if self.writes >= self.checkpoint_every and not self.checkpoint_queued:
            self.checkpoint_queued = True
            self.jobs.put(_CHECKPOINT)

    def run(self) -> None:
        try:
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.row_factory = sqlite3.Row
            conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
            # From here on we wait for the write lock ourselves (see _begin_write): SQLite's own busy
            # handler sleeps up to 100 ms at a time, leaving the lock idle while processes doze.
            conn.execute("PRAGMA busy_timeout=0")
            conn.execute("PRAGMA wal_autocheckpoint=0")  # see the module docstring
        except sqlite3.Error as exc:
            self.ready.set_exception(StoreUnavailableError(f"cannot open SQLite ledger {self.path!r}: {exc}"))
            return
        self.ready.set_result(None)
        try:
            self._loop(conn)
        finally:
            conn.close()

    def idle(self) -> bool:
        return not self.busy and self.jobs.empty()

    def _loop(self, conn: sqlite3.Connection) -> None:
        while True:
            self.busy = False
            try:
                job = self.jobs.get(timeout=1.0)
            except queue.Empty:  # a quiet second: checkpoint what was written since the last one
                job = _CHECKPOINT if self.writes else None
            if job is None:
                continue
            if job is _CHECKPOINT:
                self._checkpoint(conn)
                continue
            self.busy = True
            if job is _STOP:
                return
            batch: list[_Job] = [job]
            stop = checkpoint = False
            while len(batch) < self.batch_size:
                try:
                    nxt = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                if nxt is _CHECKPOINT:
                    checkpoint = True
                    continue
                batch.append(nxt)
            self._run_batch(conn, batch)
            if stop:
                return
            if checkpoint:
                self._checkpoint(conn)

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """PASSIVE: copies what no reader still needs and never waits for (or blocks) other connections.
        Not `busy` meanwhile, so a lone caller keeps using its inline connection."""
        self.writes = 0
        self.checkpoint_queued = False
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _begin_write(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, polling every 0.1-2 ms (with jitter) while another process holds the lock."""
        deadline = time.monotonic() + self.busy_timeout_s
        delay = 0.0001
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 1.5, 0.002)

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        readonly = all(j.readonly for j in batch)
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            if readonly:
                conn.execute("BEGIN")
            else:
                self._begin_write(conn)
            now = self.clock()
            # Every write first expires overdue holds (one lookup on a partial index), so no write
            # ever counts budget that a crashed caller no longer holds.
            swept = _expire_due(conn, now, self.sweep_per_batch) if not readonly and self.sweep_per_batch else 0
            for j in batch:
                conn.execute("SAVEPOINT op")
                try:
                    result = j.fn(conn, now, *j.args)
                    if j.fn is _op_sweep:  # the lazy pass above may already have expired what it was asked to
                        result, swept = result + swept, 0
                except BaseException as exc:  # noqa: BLE001 - every error goes back to its caller
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    if isinstance(exc, sqlite3.Error):
                        exc = StoreUnavailableError(f"SQLite error: {exc}")
                    outcomes.append((j, None, exc))
                    continue
                conn.execute("RELEASE op")
                if isinstance(result, _Fail):
                    outcomes.append((j, None, result.error))
                else:
                    outcomes.append((j, result, None))
            conn.execute("COMMIT")
            if not readonly:
                self.wrote()
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            err = StoreUnavailableError(f"SQLite ledger unavailable: {exc}")
            outcomes = [(j, None, err) for j in batch]
        # Answer only after COMMIT returned, and wake each caller loop once per batch.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, Any, BaseException | None]]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome[0].loop, []).append(outcome)
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the caller's loop is already closed
                loop.call_soon_threadsafe(_deliver, items)


class SqliteStore(Store, SupportsSweep):
    """`sqlite:///relative.db`, `sqlite:////absolute.db` or `sqlite:///:memory:`."""

    schemes = ("sqlite",)

    def __init__(
        self,
        path: str,
        *,
        clock: Clock | None = None,
        batch_size: int = 256,
        busy_timeout_s: float = 30.0,
        sweep_per_batch: int = 64,
        idempotency_retention_ms: int = 7 * 24 * 3600 * 1000,
        inline: bool = True,
        checkpoint_every: int = 200,
    ) -> None:
        self.path = path
        self.clock: Clock = clock or _wall_clock_ms
        self.idempotency_retention_ms = idempotency_retention_ms
        if path != ":memory:":
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise ConfigError(f"directory {parent!r} for the SQLite ledger does not exist")
        if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
        self._writer = _Writer(path, self.clock, batch_size, busy_timeout_s, sweep_per_batch, checkpoint_every)
        self._writer.start()
        self._writer.ready.result()
        self._closed = False
        self._last_prune = 0.0
        self._sweep_per_batch = sweep_per_batch
        # A second connection for the quiet case: when the writer has nothing queued, run the
        # operation right here on the caller's thread (no thread hop, no GIL hand-off); if the
        # write lock is taken, fall back to the queue at once.
        self._inline: sqlite3.Connection | None = None
        self._inline_lock = threading.Lock()
        self._arrivals = 0
        self._last_end = 0.0
        if inline and path != ":memory:":
            conn = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=0")
            conn.execute("PRAGMA wal_autocheckpoint=0")  # the writer thread checkpoints
            conn.row_factory = sqlite3.Row
            self._inline = conn

    @classmethod
    def from_url(cls, url: str, **settings: Any) -> SqliteStore:
        prefix = "sqlite:///"
        if not url.startswith(prefix) or len(url) == len(prefix):
            raise ConfigError(f"SQLite URL must look like sqlite:///path/to/budgets.db, got {url!r}")
        return cls(url[len(prefix) :], **settings)

    async def _call(self, fn: Callable[..., Any], *args: Any, readonly: bool = False) -> Any:
        if self._closed:
            raise StoreUnavailableError("the SQLite store is closed")
        if self._inline is not None and await self._alone() and self._inline_lock.acquire(blocking=False):
            try:
                outcome = self._run_inline(self._inline, fn, args, readonly)
            finally:
                self._inline_lock.release()
            self._last_end = time.monotonic()
            if outcome is not None:
                result, error = outcome
                if error is not None:
                    raise error
                return result
        job = _Job(fn, args, readonly)
        self._writer.jobs.put(job)
        try:
            return await job.future
        finally:
            self._last_end = time.monotonic()

    async def _alone(self) -> bool:
        """True when this operation has the store to itself: then the inline path is fastest. Under
        concurrency, operations go to the writer and commit as a group.

        After a quiet spell (the usual case for a proxy or an agent) that is decided at once; right
        after another operation, one loop tick tells whether others are arriving alongside."""
        self._arrivals += 1
        mine = self._arrivals
        if time.monotonic() - self._last_end > 0.0005:
            return self._writer.idle()
        await asyncio.sleep(0)
        return self._arrivals == mine and self._writer.idle()

    def _run_inline(
        self, conn: sqlite3.Connection, fn: Callable[..., Any], args: tuple[Any, ...], readonly: bool
    ) -> tuple[Any, BaseException | None] | None:
        """One operation in its own transaction on the caller's thread; None if the write lock is taken."""
        try:
            conn.execute("BEGIN" if readonly else "BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return None
        try:
            now = self.clock()
            swept = _expire_due(conn, now, self._sweep_per_batch) if not readonly and self._sweep_per_batch else 0
            if swept:  # keep those expiries even if the operation fails (rare: no savepoint otherwise)
                conn.execute("SAVEPOINT op")
            try:
                result = fn(conn, now, *args)
            except BaseException as exc:  # noqa: BLE001 - its writes undone, the expiry pass kept
                if swept:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    conn.execute("COMMIT")
                else:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    return None, StoreUnavailableError(f"SQLite error: {exc}")
                return None, exc
            if swept:
                conn.execute("RELEASE op")
            if fn is _op_sweep:
                result += swept
            conn.execute("COMMIT")
            if not readonly:
                self._writer.wrote()
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            return None, StoreUnavailableError(f"SQLite ledger unavailable: {exc}")
        if isinstance(result, _Fail):
            return None, result.error
        return result, None

    async def reserve(self, cmd: ReserveCommand) -> dict[str, Any]:
        return await self._call(_op_reserve, cmd)  # type: ignore[no-any-return]

    async def decide(self, cmd: ReserveCommand) -> dict[str, Any]:
        return await self._call(_op_decide, cmd, readonly=True)  # type: ignore[no-any-return]

    async def commit(self, cmd: CommitCommand) -> dict[str, Any]:
        return await self._call(_op_commit, cmd)  # type: ignore[no-any-return]

    async def release(self, cmd: ReleaseCommand) -> dict[str, Any]:
        return await self._call(_op_release, cmd)  # type: ignore[no-any-return]

    async def extend(self, cmd: ExtendCommand) -> dict[str, Any]:
        return await self._call(_op_extend, cmd)  # type: ignore[no-any-return]

    async def record_event(self, cmd: EventCommand) -> dict[str, Any]:
        return await self._call(_op_event, cmd)  # type: ignore[no-any-return]

    async def note(self, cmd: NoteCommand) -> int:
        return await self._call(_op_note, cmd)  # type: ignore[no-any-return]

    async def change_budget(self, cmd: BudgetCommand) -> dict[str, Any]:
        return await self._call(_op_budget, cmd)  # type: ignore[no-any-return]

    async def balances(self, scope_prefix: str | None = None, unit: str | None = None) -> list[dict[str, Any]]:
        return await self._call(_op_balances, scope_prefix, unit, readonly=True)  # type: ignore[no-any-return]

    async def get_reservation(self, reservation_id: str) -> dict[str, Any] | None:
        return await self._call(_op_get_reservation, reservation_id, readonly=True)  # type: ignore[no-any-return]

    async def list_reservations(
        self,
        *,
        status: str | None = None,
        scope_prefix: str | None = None,
        idempotency_key: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        return await self._call(  # type: ignore[no-any-return]
            _op_list_reservations, status, scope_prefix, idempotency_key, limit, readonly=True
        )

    async def events(
        self,
        *,
        after: int = 0,
        limit: int = 100,
        reservation_id: str | None = None,
        scope_prefix: str | None = None,
        newest: bool = False,
    ) -> list[dict[str, Any]]:
        return await self._call(  # type: ignore[no-any-return]
            _op_events, after, limit, reservation_id, scope_prefix, newest, readonly=True
        )

    async def expire_due(self, limit: int = 1000) -> int:
        prune = None
        if time.monotonic() - self._last_prune > 300:
            self._last_prune = time.monotonic()
            prune = self.idempotency_retention_ms
        return await self._call(_op_sweep, limit, prune)  # type: ignore[no-any-return]

    async def verify(self) -> list[str]:
        return await self._call(_op_verify, readonly=True)  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._inline is not None:
            with self._inline_lock:
                self._inline.close()
                self._inline = None
        self._writer.jobs.put(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, self._writer.join)


# --- helpers run on the writer thread, inside the transaction ---------------------------------------


_new_id = reservation_id  # time-ordered: inserts land on the B-tree's last page


def _load_budgets(conn: sqlite3.Connection, scopes: list[str], unit: str | None = None) -> list[rules.BudgetState]:
    if not scopes:
        return []
    marks = ",".join("?" * len(scopes))
    sql = f"SELECT {_BUDGET_COLS} FROM budgets WHERE scope IN ({marks})"
    params: list[Any] = list(scopes)
    if unit is not None:
        sql += " AND unit = ?"
        params.append(unit)
    order = {s: i for i, s in enumerate(scopes)}
    rows = sorted(conn.execute(sql, params).fetchall(), key=lambda r: (order[r[0]], r[1]))
    return [
        rules.BudgetState(
            r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]), r[8], json.loads(r[9]) if r[9] else None
        )
        for r in rows
    ]


def _save_budgets(conn: sqlite3.Connection, budgets: list[rules.BudgetState], now: int) -> None:
    conn.executemany(
        "UPDATE budgets SET allocated=?, spent=?, reserved=?, debt=?, overdraft_limit=?, is_over_limit=?, status=?,"
        " caps=?, updated_at_ms=? WHERE scope=? AND unit=?",
        [
            (
                b.allocated,
                b.spent,
                b.reserved,
                b.debt,
                b.overdraft_limit,
                int(b.is_over_limit),
                b.status,
                _JSON(b.caps) if b.caps else None,
                now,
                b.scope,
                b.unit,
            )
            for b in budgets
        ],
    )


def _event(
    conn: sqlite3.Connection,
    now: int,
    type_: str,
    *,
    scope: str | None = None,
    unit: str | None = None,
    amount: int | None = None,
    reservation_id: str | None = None,
    reason_code: str | None = None,
    data: dict[str, Any] | None = None,
) -> int:
    cur = conn.execute(
        "INSERT INTO events (ts_ms, type, scope, unit, amount, reservation_id, reason_code, data)"
        " VALUES (?,?,?,?,?,?,?,?)",
        (now, type_, scope, unit, amount, reservation_id, reason_code, _JSON(data) if data else None),
    )
    return int(cur.lastrowid or 0)


def _tenant(scope: str) -> str:
    """The effective tenant of a request: its top-level scope. Idempotency keys are per tenant (protocol)."""
    return scope.split("/", 1)[0]


def _replay(conn: sqlite3.Connection, op: str, tenant: str, key: str, payload_hash: str) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT payload_hash, response FROM idempotency WHERE op=? AND key=?", (op, f"{tenant}|{key}")
    ).fetchone()
    if row is None:
        return None
    if row[0] != payload_hash:
        raise IdempotencyMismatchError(
            f"idempotency key {key!r} was already used for a different {op} request", idempotency_key=key
        )
    return json.loads(row[1])  # type: ignore[no-any-return]


def _remember(
    conn: sqlite3.Connection, op: str, tenant: str, key: str, payload_hash: str, response: dict[str, Any], now: int
) -> None:
    """Keep the answer without balances (they are re-read on replay), so records stay small."""
    slim = {k: v for k, v in response.items() if k != "balances"}
    conn.execute(
        "INSERT INTO idempotency (op, key, payload_hash, response, created_at_ms) VALUES (?,?,?,?,?)",
        (op, f"{tenant}|{key}", payload_hash, _JSON(slim), now),
    )


def _with_balances(conn: sqlite3.Connection, body: dict[str, Any], scopes: list[str], unit: str) -> dict[str, Any]:
    body["balances"] = [b.as_balance() for b in _load_budgets(conn, scopes, unit)]
    return body


def _amount(unit: str, n: int) -> dict[str, Any]:
    return {"unit": unit, "amount": n}


def _res_row(conn: sqlite3.Connection, reservation_id: str) -> Row:
    row: Row | None = conn.execute(f"SELECT {_RES_COLS} FROM reservations WHERE id=?", (reservation_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"reservation {reservation_id!r} not found", reservation_id=reservation_id)
    return row


def _expire_row(conn: sqlite3.Connection, now: int, row: Row) -> None:
    rid, unit, estimate = row["id"], row["unit"], row["estimate"]
    budgets = _load_budgets(conn, json.loads(row["budgeted_scopes"]), unit)
    rules.unhold(budgets, estimate)
    _save_budgets(conn, budgets, now)
    conn.execute("UPDATE reservations SET status='EXPIRED', finalized_at_ms=? WHERE id=?", (now, rid))
    _event(conn, now, "expired", scope=row["scope_path"], unit=unit, amount=estimate, reservation_id=rid)


def _expire_due(conn: sqlite3.Connection, now: int, limit: int) -> int:
    rows = conn.execute(
        f"SELECT {_RES_COLS} FROM reservations WHERE status='ACTIVE' AND deadline_ms < ? ORDER BY deadline_ms LIMIT ?",
        (now, limit),
    ).fetchall()
    for row in rows:
        _expire_row(conn, now, row)
    return len(rows)


def _settle_target(
    conn: sqlite3.Connection, now: int, op: str, reservation_id: str, key: str, payload_hash: str
) -> Row | dict[str, Any] | _Fail:
    """Load a reservation to commit or release: a replay answer, the live row, or an error.

    Settlement idempotency lives on the reservation row itself (one settle per reservation).
    A row whose grace is over is expired here, lazily, and the caller gets RESERVATION_EXPIRED.
    """
    row = _res_row(conn, reservation_id)
    if row["settle_key"] is not None and row["settle_key"] == key:
        if row["settle_op"] != op or row["settle_hash"] != payload_hash:
            raise IdempotencyMismatchError(
                f"idempotency key {key!r} was already used for a different {row['settle_op']} request",
                idempotency_key=key,
            )
        body: dict[str, Any] = json.loads(row["settle_response"])
        return _with_balances(conn, body, json.loads(row["budgeted_scopes"]), row["unit"])
    status = row["status"]
    if status == "EXPIRED":
        raise ReservationExpiredError(f"reservation {reservation_id} expired", reservation_id=reservation_id)
    if status != "ACTIVE":
        raise ReservationFinalizedError(
            f"reservation {reservation_id} is already {status}", reservation_id=reservation_id, status=status
        )
    if now > row["deadline_ms"]:
        _expire_row(conn, now, row)
        return _Fail(
            ReservationExpiredError(
                f"reservation {reservation_id} expired at {row['expires_at_ms']} (+{row['grace_ms']} ms grace)",
                reservation_id=reservation_id,
            )
        )
    return row


def _finalize(
    conn: sqlite3.Connection,
    now: int,
    row: Row,
    status: str,
    charged: int | None,
    op: str,
    key: str,
    h: str,
    body: dict[str, Any],
) -> None:
    slim = {k: v for k, v in body.items() if k != "balances"}
    conn.execute(
        "UPDATE reservations SET status=?, charged=?, finalized_at_ms=?, settle_op=?, settle_key=?, settle_hash=?,"
        " settle_response=? WHERE id=?",
        (status, charged, now, op, key, h, _JSON(slim), row["id"]),
    )


def _scope_details(
    cmd: ReserveCommand | EventCommand, in_unit: list[rules.BudgetState], all_budgets: list[rules.BudgetState]
) -> None:
    if all_budgets and not in_unit and not cmd.allow_unbudgeted:
        raise UnitMismatchError(
            f"no budget in {cmd.unit} for {cmd.scopes[-1]}; budgets there are in "
            + ", ".join(sorted({b.unit for b in all_budgets})),
            scope=all_budgets[-1].scope,
            requested_unit=cmd.unit,
            expected_units=sorted({b.unit for b in all_budgets}),
        )


def _evaluate(conn: sqlite3.Connection, cmd: ReserveCommand) -> tuple[rules.Evaluation, list[rules.BudgetState]]:
    all_budgets = _load_budgets(conn, cmd.scopes)
    in_unit = [b for b in all_budgets if b.unit == cmd.unit]
    if not all_budgets and not cmd.allow_unbudgeted:
        ev = rules.Evaluation(Decision.DENY, reason_code="BUDGET_NOT_FOUND", scope=cmd.scopes[-1])
        return ev, []
    _scope_details(cmd, in_unit, all_budgets)
    soft = SoftLanding(**cmd.soft_landing) if cmd.soft_landing else None
    return rules.evaluate_reserve(in_unit, cmd.estimate, soft), in_unit


def _decision_body(
    cmd: ReserveCommand, ev: rules.Evaluation, budgets: list[rules.BudgetState], with_balances: bool = True
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "decision": ev.decision.value,
        "scope_path": cmd.scopes[-1],
        "affected_scopes": cmd.scopes,
        "caps": ev.caps,
        "reason_code": ev.reason_code,
        "scope": ev.scope,
        "remaining": ev.remaining,
    }
    if with_balances:
        body["balances"] = [b.as_balance() for b in budgets]
    return body


def _op_decide(conn: sqlite3.Connection, now: int, cmd: ReserveCommand) -> dict[str, Any]:
    ev, budgets = _evaluate(conn, cmd)
    return _decision_body(cmd, ev, budgets)


def _op_reserve(conn: sqlite3.Connection, now: int, cmd: ReserveCommand) -> dict[str, Any]:
    # An empty payload_hash marks a fresh key nobody can repeat: no replay lookup, no record.
    prior = (
        _replay(conn, "reserve", _tenant(cmd.scopes[0]), cmd.idempotency_key, cmd.payload_hash)
        if cmd.payload_hash
        else None
    )
    if prior is not None:
        if prior.get("expires_at_ms") is not None:
            prior["remaining_ttl_ms"] = max(0, prior["expires_at_ms"] - now)
        return _with_balances(conn, prior, prior.pop("budgeted_scopes", []), cmd.unit)
    ev, budgets = _evaluate(conn, cmd)
    if ev.reason_code == "BUDGET_EXCEEDED" and _expire_due(conn, now, 1000):
        ev, budgets = _evaluate(conn, cmd)  # overdue holds were still counted; look again without them
    body = _decision_body(cmd, ev, budgets, with_balances=False)
    body["dry_run"] = cmd.dry_run
    if cmd.dry_run or ev.decision is Decision.DENY:
        body["balances"] = [b.as_balance() for b in budgets]
        denied = ev.decision is Decision.DENY
        kind = ("would_deny" if denied else "would_allow") if cmd.dry_run else "denied"
        info = {"subject": cmd.subject, "action": cmd.action, "key": cmd.idempotency_key, "remaining": ev.remaining}
        if ev.caps:
            info["caps"] = ev.caps
        _event(
            conn,
            now,
            kind,
            scope=ev.scope or cmd.scopes[-1],
            unit=cmd.unit,
            amount=cmd.estimate,
            reason_code=ev.reason_code,
            data=info,
        )
        if cmd.dry_run and cmd.payload_hash:
            _remember(conn, "reserve", _tenant(cmd.scopes[0]), cmd.idempotency_key, cmd.payload_hash, body, now)
        return body
    rules.hold(budgets, ev.amount)
    _save_budgets(conn, budgets, now)
    rid = _new_id(now)
    expires = now + cmd.ttl_ms
    budgeted = [b.scope for b in budgets]
    conn.execute(
        _RES_INSERT,
        (
            rid,
            "ACTIVE",
            cmd.idempotency_key,
            _JSON(cmd.subject),
            _JSON(cmd.action),
            cmd.unit,
            ev.amount,
            None,
            cmd.overage_policy,
            now,
            expires,
            cmd.grace_period_ms,
            expires + cmd.grace_period_ms,
            None,
            cmd.scopes[-1],
            _JSON(cmd.scopes),
            _JSON(budgeted),
            0,
            _JSON(cmd.metadata) if cmd.metadata else None,
            _JSON(ev.caps) if ev.caps else None,
            None,
            None,
            None,
            None,
        ),
    )
    # The reservation row holds subject, action and scopes; the event only adds what it decided.
    data = {"decision": ev.decision.value, "caps": ev.caps} if ev.caps else None
    _event(conn, now, "reserved", scope=cmd.scopes[-1], unit=cmd.unit, amount=ev.amount, reservation_id=rid, data=data)
    body["balances"] = [b.as_balance() for b in budgets]
    body.update(reservation_id=rid, reserved=_amount(cmd.unit, ev.amount), expires_at_ms=expires)
    body["remaining_ttl_ms"] = cmd.ttl_ms
    if cmd.payload_hash:
        _remember(
            conn,
            "reserve",
            _tenant(cmd.scopes[0]),
            cmd.idempotency_key,
            cmd.payload_hash,
            {**body, "budgeted_scopes": budgeted},
            now,
        )
    return body


def _op_commit(conn: sqlite3.Connection, now: int, cmd: CommitCommand) -> dict[str, Any] | _Fail:
    row = _settle_target(conn, now, "commit", cmd.reservation_id, cmd.idempotency_key, cmd.payload_hash)
    if not isinstance(row, Row):
        return row
    unit, estimate, policy = row["unit"], row["estimate"], OveragePolicy(row["overage_policy"])
    if cmd.unit != unit:
        raise UnitMismatchError(
            f"commit in {cmd.unit} for a reservation in {unit}", requested_unit=cmd.unit, expected_units=[unit]
        )
    budgets = _load_budgets(conn, json.loads(row["budgeted_scopes"]), unit)
    charged, flagged = rules.settle(budgets, estimate, cmd.actual, policy)
    _save_budgets(conn, budgets, now)
    released = max(estimate - cmd.actual, 0)
    body: dict[str, Any] = {
        "reservation_id": cmd.reservation_id,
        "status": "COMMITTED",
        "charged": _amount(unit, charged),
        "released": _amount(unit, released) if released else None,
        "balances": [b.as_balance() for b in budgets],
    }
    _finalize(conn, now, row, "COMMITTED", charged, "commit", cmd.idempotency_key, cmd.payload_hash, body)
    data: dict[str, Any] = {"actual": cmd.actual, "released": released}
    if flagged:
        data["over_limit"] = flagged
    if cmd.metrics:
        data["metrics"] = cmd.metrics
    if cmd.metadata:
        data["metadata"] = cmd.metadata
    _event(
        conn, now, "committed", scope=row["scope_path"], unit=unit, amount=charged, reservation_id=row["id"], data=data
    )
    for scope in flagged:
        _event(conn, now, "over_limit", scope=scope, unit=unit, reservation_id=row["id"])
    return body


def _op_release(conn: sqlite3.Connection, now: int, cmd: ReleaseCommand) -> dict[str, Any] | _Fail:
    row = _settle_target(conn, now, "release", cmd.reservation_id, cmd.idempotency_key, cmd.payload_hash)
    if not isinstance(row, Row):
        return row
    unit, estimate = row["unit"], row["estimate"]
    budgets = _load_budgets(conn, json.loads(row["budgeted_scopes"]), unit)
    rules.unhold(budgets, estimate)
    _save_budgets(conn, budgets, now)
    body: dict[str, Any] = {
        "reservation_id": cmd.reservation_id,
        "status": "RELEASED",
        "released": _amount(unit, estimate),
        "balances": [b.as_balance() for b in budgets],
    }
    _finalize(conn, now, row, "RELEASED", None, "release", cmd.idempotency_key, cmd.payload_hash, body)
    _event(
        conn,
        now,
        "released",
        scope=row["scope_path"],
        unit=unit,
        amount=estimate,
        reservation_id=row["id"],
        data={"reason": cmd.reason} if cmd.reason else None,
    )
    return body


def _op_extend(conn: sqlite3.Connection, now: int, cmd: ExtendCommand) -> dict[str, Any] | _Fail:
    row = _res_row(conn, cmd.reservation_id)
    tenant = _tenant(row["scope_path"])
    prior = _replay(conn, "extend", tenant, cmd.idempotency_key, cmd.payload_hash)
    if prior is not None:
        prior["remaining_ttl_ms"] = max(0, prior["expires_at_ms"] - now)
        return _with_balances(conn, prior, json.loads(row["budgeted_scopes"]), row["unit"])
    status = row["status"]
    if status == "EXPIRED" or (status == "ACTIVE" and now > row["expires_at_ms"]):
        if status == "ACTIVE" and now > row["deadline_ms"]:
            _expire_row(conn, now, row)
            return _Fail(ReservationExpiredError(f"reservation {cmd.reservation_id} expired"))
        raise ReservationExpiredError(
            f"reservation {cmd.reservation_id} passed its expiry; in the grace period only commit or release",
            reservation_id=cmd.reservation_id,
        )
    if status != "ACTIVE":
        raise ReservationFinalizedError(
            f"reservation {cmd.reservation_id} is already {status}", reservation_id=cmd.reservation_id, status=status
        )
    count = row["extension_count"]
    if cmd.max_extensions is not None and count >= cmd.max_extensions:
        raise MaxExtensionsExceededError(
            f"reservation {cmd.reservation_id} was already extended {count} times", reservation_id=cmd.reservation_id
        )
    new_expiry = row["expires_at_ms"] + cmd.extend_by_ms
    conn.execute(
        "UPDATE reservations SET expires_at_ms=?, deadline_ms=?, extension_count=? WHERE id=?",
        (new_expiry, new_expiry + row["grace_ms"], count + 1, cmd.reservation_id),
    )
    _event(
        conn,
        now,
        "extended",
        scope=row["scope_path"],
        unit=row["unit"],
        reservation_id=cmd.reservation_id,
        data={"expires_at_ms": new_expiry, "extend_by_ms": cmd.extend_by_ms},
    )
    body: dict[str, Any] = {
        "reservation_id": cmd.reservation_id,
        "status": "ACTIVE",
        "expires_at_ms": new_expiry,
        "remaining_ttl_ms": new_expiry - now,
    }
    _remember(conn, "extend", tenant, cmd.idempotency_key, cmd.payload_hash, body, now)
    return _with_balances(conn, body, json.loads(row["budgeted_scopes"]), row["unit"])


def _op_note(conn: sqlite3.Connection, now: int, cmd: NoteCommand) -> int:
    return _event(conn, now, cmd.type, scope=cmd.scope, reason_code=cmd.reason_code, data=cmd.data)


def _op_event(conn: sqlite3.Connection, now: int, cmd: EventCommand) -> dict[str, Any]:
    prior = _replay(conn, "event", _tenant(cmd.scopes[0]), cmd.idempotency_key, cmd.payload_hash)
    if prior is not None:
        return _with_balances(conn, prior, prior.pop("budgeted_scopes", []), cmd.unit)
    all_budgets = _load_budgets(conn, cmd.scopes)
    budgets = [b for b in all_budgets if b.unit == cmd.unit]
    if not all_budgets and not cmd.allow_unbudgeted:
        raise NotFoundError(f"no budget for {cmd.scopes[-1]} or its parents", scope=cmd.scopes[-1])
    _scope_details(cmd, budgets, all_budgets)
    for b in budgets:
        if b.status == "CLOSED":
            raise BudgetClosedError(f"budget {b.scope} is closed", scope=b.scope)
        if b.status == "FROZEN":
            raise BudgetFrozenError(f"budget {b.scope} is frozen", scope=b.scope)
    charged, flagged = rules.settle(budgets, 0, cmd.actual, OveragePolicy(cmd.overage_policy), is_commit=False)
    _save_budgets(conn, budgets, now)
    scopes = [b.scope for b in budgets]
    event_id = _event(
        conn,
        now,
        "debited",
        scope=cmd.scopes[-1],
        unit=cmd.unit,
        amount=charged,
        data={
            "scopes": scopes,
            "actual": cmd.actual,
            "subject": cmd.subject,
            "action": cmd.action,
            "over_limit": flagged,
            "metrics": cmd.metrics,
            "metadata": cmd.metadata,
            "key": cmd.idempotency_key,
        },
    )
    for scope in flagged:
        _event(conn, now, "over_limit", scope=scope, unit=cmd.unit)
    body: dict[str, Any] = {
        "status": "APPLIED",
        "event_id": event_id,
        "charged": _amount(cmd.unit, charged),
        "balances": [b.as_balance() for b in budgets],
    }
    _remember(
        conn,
        "event",
        _tenant(cmd.scopes[0]),
        cmd.idempotency_key,
        cmd.payload_hash,
        {**body, "budgeted_scopes": scopes},
        now,
    )
    return body


def _op_budget(conn: sqlite3.Connection, now: int, cmd: BudgetCommand) -> dict[str, Any]:
    found = _load_budgets(conn, [cmd.scope], cmd.unit)
    data: dict[str, Any] = {}
    if cmd.op == "set":
        assert cmd.amount is not None
        if not found:
            conn.execute(
                "INSERT INTO budgets (scope, unit, allocated, overdraft_limit, caps, updated_at_ms)"
                " VALUES (?,?,?,?,?,?)",
                (cmd.scope, cmd.unit, cmd.amount, cmd.overdraft_limit or 0, _JSON(cmd.caps) if cmd.caps else None, now),
            )
            b = _load_budgets(conn, [cmd.scope], cmd.unit)[0]
        else:
            b = found[0]
            data["previous_allocated"] = b.allocated
            b.allocated = cmd.amount
            if cmd.overdraft_limit is not None:
                b.overdraft_limit = cmd.overdraft_limit
            if cmd.caps is not None:
                b.caps = cmd.caps or None
            if b.debt > b.overdraft_limit:  # a lowered limit can leave existing debt above it
                b.is_over_limit = True
            elif b.remaining >= 0:
                b.is_over_limit = False
            _save_budgets(conn, [b], now)
        _event(conn, now, "budget_set", scope=cmd.scope, unit=cmd.unit, amount=cmd.amount, data=data)
        return b.as_balance()
    if not found:
        raise NotFoundError(f"no {cmd.unit} budget at {cmd.scope}", scope=cmd.scope)
    b = found[0]
    if cmd.op == "fund":
        assert cmd.amount is not None
        if b.status == "CLOSED":
            raise BudgetClosedError(f"budget {b.scope} is closed", scope=b.scope)
        data["debt_repaid"] = rules.fund(b, cmd.amount)
        kind, amount = "funded", cmd.amount
    else:
        if b.status == "CLOSED":
            raise BudgetClosedError(f"budget {b.scope} is closed", scope=b.scope)
        b.status = {"freeze": "FROZEN", "unfreeze": "ACTIVE", "close": "CLOSED"}[cmd.op]
        kind, amount = {"freeze": "frozen", "unfreeze": "unfrozen", "close": "closed"}[cmd.op], None
    _save_budgets(conn, [b], now)
    _event(conn, now, kind, scope=cmd.scope, unit=cmd.unit, amount=amount, data=data)
    return b.as_balance()


def _op_balances(
    conn: sqlite3.Connection, now: int, scope_prefix: str | None, unit: str | None
) -> list[dict[str, Any]]:
    sql = f"SELECT {_BUDGET_COLS} FROM budgets WHERE 1=1"
    params: list[Any] = []
    if scope_prefix:
        sql += " AND (scope = ? OR scope GLOB ?)"
        params += [scope_prefix, scope_prefix + "/*"]
    if unit:
        sql += " AND unit = ?"
        params.append(unit)
    sql += " ORDER BY scope, unit"
    return [
        rules.BudgetState(
            r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]), r[8], json.loads(r[9]) if r[9] else None
        ).as_balance()
        for r in conn.execute(sql, params)
    ]


def _reservation_dict(row: Row) -> dict[str, Any]:
    unit = row["unit"]
    return {
        "reservation_id": row["id"],
        "status": row["status"],
        "idempotency_key": row["idempotency_key"],
        "subject": json.loads(row["subject"]),
        "action": json.loads(row["action"]),
        "reserved": _amount(unit, row["estimate"]),
        "committed": _amount(unit, row["charged"]) if row["charged"] is not None else None,
        "overage_policy": row["overage_policy"],
        "created_at_ms": row["created_at_ms"],
        "expires_at_ms": row["expires_at_ms"],
        "grace_period_ms": row["grace_ms"],
        "finalized_at_ms": row["finalized_at_ms"],
        "scope_path": row["scope_path"],
        "affected_scopes": json.loads(row["affected_scopes"]),
        "budgeted_scopes": json.loads(row["budgeted_scopes"]),
        "extension_count": row["extension_count"],
        "caps": json.loads(row["caps"]) if row["caps"] else None,
        "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
    }


def _op_get_reservation(conn: sqlite3.Connection, now: int, reservation_id: str) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {_RES_COLS} FROM reservations WHERE id=?", (reservation_id,)).fetchone()
    return _reservation_dict(row) if row else None


def _op_list_reservations(
    conn: sqlite3.Connection, now: int, status: str | None, scope_prefix: str | None, key: str | None, limit: int
) -> list[dict[str, Any]]:
    sql = f"SELECT {_RES_COLS} FROM reservations WHERE 1=1"
    params: list[Any] = []
    if status:
        sql += " AND status = ?"
        params.append(status)
    if scope_prefix:
        sql += " AND (scope_path = ? OR scope_path GLOB ?)"
        params += [scope_prefix, scope_prefix + "/*"]
    if key:
        sql += " AND idempotency_key = ?"
        params.append(key)
    sql += " ORDER BY id DESC LIMIT ?"
    params.append(limit)
    return [_reservation_dict(r) for r in conn.execute(sql, params)]


def _op_events(
    conn: sqlite3.Connection,
    now: int,
    after: int,
    limit: int,
    reservation_id: str | None,
    scope_prefix: str | None,
    newest: bool = False,
) -> list[dict[str, Any]]:
    sql = (
        "SELECT event_id, ts_ms, type, scope, unit, amount, reservation_id, reason_code, data"
        " FROM events WHERE event_id > ?"
    )
    params: list[Any] = [after]
    if reservation_id:
        sql += " AND reservation_id = ?"
        params.append(reservation_id)
    if scope_prefix:
        sql += " AND (scope = ? OR scope GLOB ?)"
        params += [scope_prefix, scope_prefix + "/*"]
    sql += " ORDER BY event_id DESC LIMIT ?" if newest else " ORDER BY event_id LIMIT ?"
    params.append(limit)
    keys = ("event_id", "ts_ms", "type", "scope", "unit", "amount", "reservation_id", "reason_code")
    out = []
    for r in conn.execute(sql, params):
        d = dict(zip(keys, r[:8], strict=True))
        d["data"] = json.loads(r[8]) if r[8] else {}
        out.append(d)
    return out


def _op_sweep(conn: sqlite3.Connection, now: int, limit: int, retention_ms: int | None) -> int:
    n = _expire_due(conn, now, limit)
    if retention_ms is not None:  # a full scan, so the store asks for it only every few minutes
        conn.execute("DELETE FROM idempotency WHERE created_at_ms < ?", (now - retention_ms,))
    return n


def _op_verify(conn: sqlite3.Connection, now: int) -> list[str]:
    """Rebuild each budget's reserved and spent+debt from reservations and events, and compare."""
    held: dict[tuple[str, str], int] = {}
    for unit, estimate, scopes in conn.execute(
        "SELECT unit, estimate, budgeted_scopes FROM reservations WHERE status='ACTIVE'"
    ):
        for s in json.loads(scopes):
            held[(s, unit)] = held.get((s, unit), 0) + estimate
    charged: dict[tuple[str, str], int] = {}
    for unit, amount, scopes in conn.execute(
        "SELECT e.unit, e.amount, r.budgeted_scopes FROM events e JOIN reservations r ON r.id = e.reservation_id"
        " WHERE e.type = 'committed'"
        " UNION ALL SELECT unit, amount, json_extract(data, '$.scopes') FROM events WHERE type = 'debited'"
    ):
        for s in json.loads(scopes):
            charged[(s, unit)] = charged.get((s, unit), 0) + amount
    problems = []
    for r in conn.execute(f"SELECT {_BUDGET_COLS} FROM budgets"):
        b = rules.BudgetState(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]), r[8])
        key = (b.scope, b.unit)
        if b.reserved != held.get(key, 0):
            problems.append(
                f"{b.scope} {b.unit}: reserved {b.reserved} but active reservations hold {held.get(key, 0)}"
            )
        if b.spent + b.debt != charged.get(key, 0):
            problems.append(
                f"{b.scope} {b.unit}: spent+debt {b.spent + b.debt} but events charged {charged.get(key, 0)}"
            )
        if min(b.spent, b.reserved, b.debt) < 0:
            problems.append(f"{b.scope} {b.unit}: negative field in {b.as_balance()}")
        if b.debt > b.overdraft_limit and not b.is_over_limit:
            problems.append(f"{b.scope} {b.unit}: debt {b.debt} above overdraft limit {b.overdraft_limit}")
    return problems
