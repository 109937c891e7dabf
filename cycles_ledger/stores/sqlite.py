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

A commit nobody waits for (`CommitCommand.coalesce`: the proxy settles in the background) is held
back up to `coalesce_ms` and written in the transaction of the next operation of this process, or on
its own when none comes: a proxy's call then costs one transaction instead of two. Its caller is
answered after that COMMIT like any other; until then the commit is not on disk (a killed process
loses it, and the hold expires with its TTL, as when the process dies before settling).

Why not aiosqlite: it runs one statement per hop to its thread; a reservation is six statements, and
batching whole operations into one transaction is what makes the throughput goal reachable.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import os
import queue
import random
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

from .. import operations, rules
from ..errors import ConfigError, CyclesError, StoreUnavailableError
from ..operations import Failed
from ..timing import duration_ms
from .base import (
    BudgetCommand,
    CommitCommand,
    EventCommand,
    ExtendCommand,
    NoteCommand,
    ReleaseCommand,
    ReserveCommand,
    Store,
    SupportsState,
    SupportsSweep,
    Txn,
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
    timing TEXT,  -- period, its bounds, rate limits, alerts (JSON; NULL for a plain budget)
    period_end_ms INTEGER,  -- copied out of timing for the sweeper's index
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
    settle_response TEXT,
    extra TEXT,  -- holds in other units: {"TOKENS": {"amount": n, "scopes": [...], "charged": m}}
    windowed INTEGER NOT NULL DEFAULT 0,  -- logged in some rate-limited budget's spend window
    shape BLOB,  -- shapes.id: subject, action and scopes, shared by every reservation of the same caller
    actual INTEGER  -- what the commit said it cost
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS shapes (  -- content-addressed: id = the first 16 bytes of sha256(text)
    id BLOB NOT NULL PRIMARY KEY,
    text TEXT NOT NULL,
    scope_path TEXT NOT NULL  -- for listing reservations under a scope
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS shapes_scope ON shapes (scope_path);
CREATE TABLE IF NOT EXISTS pruned_charges (  -- what pruned events charged, so verify() still adds up
    scope TEXT NOT NULL,
    unit TEXT NOT NULL,
    amount INTEGER NOT NULL,
    PRIMARY KEY (scope, unit)
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
CREATE TABLE IF NOT EXISTS spend_window (  -- one row per hold or charge on a rate-limited budget
    scope TEXT NOT NULL,
    unit TEXT NOT NULL,
    ts_ms INTEGER NOT NULL,
    ref TEXT NOT NULL,  -- the reservation id, or e<event id> for a direct debit
    amount INTEGER NOT NULL,
    PRIMARY KEY (scope, unit, ts_ms, ref)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS spend_window_ref ON spend_window (ref);
CREATE TABLE IF NOT EXISTS state (  -- small keyed records: the notifier's cursor, lease, dead letters
    key TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL
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

_BUDGET_COLS = "scope, unit, allocated, spent, reserved, debt, overdraft_limit, is_over_limit, status, caps, timing"
_TIMING = ("period", "period_start_ms", "period_end_ms", "rate_limits", "alerts", "alerts_fired", "rate_fired")
_RES_COLS = (
    "id, status, idempotency_key, subject, action, unit, estimate, charged, overage_policy, created_at_ms,"
    " expires_at_ms, grace_ms, deadline_ms, finalized_at_ms, scope_path, affected_scopes, budgeted_scopes,"
    " extension_count, metadata, caps, settle_op, settle_key, settle_hash, settle_response, extra, windowed, shape,"
    " actual"
)
_RES_INSERT = f"INSERT INTO reservations ({_RES_COLS}) VALUES ({','.join('?' * len(_RES_COLS.split(',')))})"
Row = sqlite3.Row


class _Conn(sqlite3.Connection):
    """A connection that knows which shapes are committed in its database, so a reserve by a known caller
    writes no shape row. A shape inserted by an operation counts as known only once its transaction has
    committed (`_shapes_committed`); an operation or a batch rolled back forgets the ones it inserted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shapes_known: set[bytes] = set()
        self.shapes_pending: list[bytes] = []


def _shapes_committed(conn: sqlite3.Connection) -> None:
    if isinstance(conn, _Conn) and conn.shapes_pending:
        conn.shapes_known.update(conn.shapes_pending)
        conn.shapes_pending.clear()


def _shapes_rolled_back(conn: sqlite3.Connection, mark: int = 0) -> None:
    if isinstance(conn, _Conn):
        del conn.shapes_pending[mark:]


def _shapes_mark(conn: sqlite3.Connection) -> int:
    return len(conn.shapes_pending) if isinstance(conn, _Conn) else 0


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a ledger file written by an older version up to this schema (columns added since)."""
    cols = {r[1] for r in conn.execute("PRAGMA table_info(reservations)")}
    if "extra" not in cols:
        conn.execute("ALTER TABLE reservations ADD COLUMN extra TEXT")
    if "windowed" not in cols:
        conn.execute("ALTER TABLE reservations ADD COLUMN windowed INTEGER NOT NULL DEFAULT 0")
    if "shape" not in cols:
        conn.execute("ALTER TABLE reservations ADD COLUMN shape BLOB")
        conn.execute("ALTER TABLE reservations ADD COLUMN actual INTEGER")
    cols = {r[1] for r in conn.execute("PRAGMA table_info(budgets)")}
    if "timing" not in cols:
        conn.execute("ALTER TABLE budgets ADD COLUMN timing TEXT")
        conn.execute("ALTER TABLE budgets ADD COLUMN period_end_ms INTEGER")
    conn.execute(
        "CREATE INDEX IF NOT EXISTS budgets_period_due ON budgets (period_end_ms) WHERE period_end_ms IS NOT NULL"
    )


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


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


def _hand_back(outcomes: list[tuple[_Job, Any, BaseException | None]], here: asyncio.AbstractEventLoop | None) -> None:
    """Answer each job on its own loop: at once when that is the loop we run on, else with one wake-up."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, Any, BaseException | None]]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].loop, []).append(outcome)
    for loop, items in by_loop.items():
        if loop is here:
            _deliver(items)
        else:
            with contextlib.suppress(RuntimeError):  # the caller's loop is already closed
                loop.call_soon_threadsafe(_deliver, items)


def _run_jobs(
    conn: sqlite3.Connection, now: int, jobs: list[_Job], swept: int
) -> tuple[list[tuple[_Job, Any, BaseException | None]], int]:
    """Run jobs in the open transaction, each in its own SAVEPOINT so a failing one rolls back alone.
    Returns their outcomes and what is left of `swept` (a sweep job reports the lazy pass's expiries)."""
    outcomes: list[tuple[_Job, Any, BaseException | None]] = []
    for j in jobs:
        conn.execute("SAVEPOINT op")
        mark = _shapes_mark(conn)
        try:
            result = j.fn(conn, now, *j.args)
            if j.fn is _op_sweep:  # the lazy pass may already have expired what it was asked to
                result, swept = result + swept, 0
        except BaseException as exc:  # noqa: BLE001 - every error goes back to its caller
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            _shapes_rolled_back(conn, mark)
            if isinstance(exc, sqlite3.Error):
                exc = StoreUnavailableError(f"SQLite error: {exc}")
            outcomes.append((j, None, exc))
            continue
        conn.execute("RELEASE op")
        if isinstance(result, Failed):
            outcomes.append((j, None, result.error))
        else:
            outcomes.append((j, result, None))
    return outcomes, swept


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
                self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False, factory=_Conn
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.row_factory = sqlite3.Row
            conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
            _migrate(conn)
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
            outcomes, _ = _run_jobs(conn, now, batch, swept)
            conn.execute("COMMIT")
            _shapes_committed(conn)
            if not readonly:
                self.wrote()
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            _shapes_rolled_back(conn)
            err = StoreUnavailableError(f"SQLite ledger unavailable: {exc}")
            outcomes = [(j, None, err) for j in batch]
        # Answer only after COMMIT returned, and wake each caller loop once per batch.
        _hand_back(outcomes, None)


class SqliteStore(Store, SupportsSweep, SupportsState):
    """`sqlite:///relative.db`, `sqlite:////absolute.db` or `sqlite:///:memory:`."""

    schemes = ("sqlite",)
    time_policies = True

    def __init__(
        self,
        path: str,
        *,
        clock: Clock | None = None,
        batch_size: int = 256,
        busy_timeout_s: float = 30.0,
        sweep_per_batch: int = 64,
        idempotency_retention_ms: int = 7 * 24 * 3600 * 1000,
        retention_ms: int | None = 7 * 24 * 3600 * 1000,
        inline: bool = True,
        checkpoint_every: int = 200,
        coalesce_ms: float = 20.0,
    ) -> None:
        self.path = path
        self.clock: Clock = clock or _wall_clock_ms
        self.idempotency_retention_ms = idempotency_retention_ms
        # Events and finished reservations older than this are forgotten by the sweeper (None: kept forever).
        self.retention_ms = retention_ms
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
        # Commits nobody waits for, held back to ride in the next transaction (see the module docstring).
        self._coalesce_s = max(float(coalesce_ms), 0.0) / 1000
        self._deferred: list[_Job] = []
        self._deferred_lock = threading.Lock()
        self._flushes: set[asyncio.Task[Any]] = set()
        self._flush_timer: asyncio.TimerHandle | None = None
        if inline and path != ":memory:":
            conn = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False, factory=_Conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=0")
            conn.execute("PRAGMA wal_autocheckpoint=0")  # the writer thread checkpoints
            conn.row_factory = sqlite3.Row
            self._inline = conn

    @classmethod
    def from_url(cls, url: str, **settings: Any) -> SqliteStore:
        """`sqlite:///path.db`, optionally `?retention=30d` (events and finished reservations; `forever` keeps
        them all)."""
        prefix = "sqlite:///"
        url, _, query = url.partition("?")
        if not url.startswith(prefix) or len(url) == len(prefix):
            raise ConfigError(f"SQLite URL must look like sqlite:///path/to/budgets.db, got {url!r}")
        for key, values in urllib.parse.parse_qs(query, keep_blank_values=True).items():
            if key != "retention":
                raise ConfigError(f"unknown SQLite URL parameter {key!r}; known: retention")
            value = values[-1]
            try:
                settings["retention_ms"] = None if value == "forever" else duration_ms(value, "retention")
            except CyclesError as exc:
                raise ConfigError(exc.message) from None
        return cls(url[len(prefix) :], **settings)

    async def _call(self, fn: Callable[..., Any], *args: Any, readonly: bool = False) -> Any:
        if self._closed:
            raise StoreUnavailableError("the SQLite store is closed")
        if readonly and self._deferred:
            readonly = False  # carry the held-back commits, so this process reads its own writes
        if self._inline is not None and await self._alone() and self._inline_lock.acquire(blocking=False):
            carried = [] if readonly else self._take_deferred()
            try:
                outcome = self._run_inline(self._inline, fn, args, readonly, carried)
            finally:
                self._inline_lock.release()
            self._last_end = time.monotonic()
            if outcome is not None:
                result, error = outcome
                if error is not None:
                    raise error
                return result
            for held in carried:  # the write lock was taken: they go to the writer, ahead of this operation
                self._writer.jobs.put(held)
        job = _Job(fn, args, readonly)
        if not readonly:
            for held in self._take_deferred():
                self._writer.jobs.put(held)
        self._writer.jobs.put(job)
        try:
            return await job.future
        finally:
            self._last_end = time.monotonic()

    def _take_deferred(self) -> list[_Job]:
        if not self._deferred:
            return []
        with self._deferred_lock:
            jobs, self._deferred = self._deferred, []
            timer, self._flush_timer = self._flush_timer, None
        if timer is not None:
            timer.cancel()
        return jobs

    async def _defer(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Hold a write back until the next operation's transaction, or `coalesce_ms` at most."""
        if self._closed:
            raise StoreUnavailableError("the SQLite store is closed")
        job = _Job(fn, args, False)
        with self._deferred_lock:
            self._deferred.append(job)
            if self._flush_timer is None:
                self._flush_timer = job.loop.call_later(self._coalesce_s, self._flush_deferred)
        return await job.future

    def _flush_deferred(self) -> None:
        """No operation came along in time: write the held-back commits in a transaction of their own."""
        self._flush_timer = None
        if self._deferred and not self._closed:
            task = asyncio.get_running_loop().create_task(self._flush())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush(self) -> None:
        with contextlib.suppress(CyclesError):  # the commits carried have their own answers
            await self._call(_op_nothing)

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
        self,
        conn: sqlite3.Connection,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        readonly: bool,
        carried: list[_Job] | None = None,
    ) -> tuple[Any, BaseException | None] | None:
        """One operation in its own transaction on the caller's thread, after the held-back commits
        `carried` (answered once COMMIT returned); None if the write lock is taken (nothing ran)."""
        try:
            conn.execute("BEGIN" if readonly else "BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return None
        done: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            now = self.clock()
            swept = _expire_due(conn, now, self._sweep_per_batch) if not readonly and self._sweep_per_batch else 0
            if carried:
                done, swept = _run_jobs(conn, now, carried, swept)
            keep = bool(swept or carried)  # keep those writes even if the operation fails (else: no savepoint)
            if keep:
                conn.execute("SAVEPOINT op")
            mark = _shapes_mark(conn)
            try:
                result = fn(conn, now, *args)
            except BaseException as exc:  # noqa: BLE001 - its writes undone, the expiry pass kept
                _shapes_rolled_back(conn, mark)
                if keep:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    conn.execute("COMMIT")
                    _shapes_committed(conn)
                    self._writer.wrote()
                    _hand_back(done, asyncio.get_running_loop())
                else:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    return None, StoreUnavailableError(f"SQLite error: {exc}")
                return None, exc
            if keep:
                conn.execute("RELEASE op")
            if fn is _op_sweep:
                result += swept
            conn.execute("COMMIT")
            _shapes_committed(conn)
            if not readonly:
                self._writer.wrote()
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            _shapes_rolled_back(conn)
            error = StoreUnavailableError(f"SQLite ledger unavailable: {exc}")
            _hand_back([(j, None, error) for j in carried or []], asyncio.get_running_loop())
            return None, error
        if done:
            _hand_back(done, asyncio.get_running_loop())
        if isinstance(result, Failed):
            return None, result.error
        return result, None

    async def reserve(self, cmd: ReserveCommand) -> dict[str, Any]:
        return await self._call(_op_reserve, cmd)  # type: ignore[no-any-return]

    async def decide(self, cmd: ReserveCommand) -> dict[str, Any]:
        return await self._call(_op_decide, cmd, readonly=True)  # type: ignore[no-any-return]

    async def commit(self, cmd: CommitCommand) -> dict[str, Any]:
        if cmd.coalesce and self._coalesce_s > 0 and self._inline is not None:
            return await self._defer(_op_commit, cmd)  # type: ignore[no-any-return]
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
        if time.monotonic() - self._last_prune > 300:  # a full scan: every few minutes
            self._last_prune = time.monotonic()
            prune = self.idempotency_retention_ms
        # The log is pruned a batch per sweep (each its own short transaction, never stop-the-world).
        return await self._call(_op_sweep, limit, prune, self.retention_ms)  # type: ignore[no-any-return]

    async def verify(self) -> list[str]:
        return await self._call(_op_verify, readonly=True)  # type: ignore[no-any-return]

    async def state_get(self, key: str) -> str | None:
        return await self._call(_op_state_get, key, readonly=True)  # type: ignore[no-any-return]

    async def state_put(self, key: str, value: str | None, expected: str | None) -> bool:
        return await self._call(_op_state_put, key, value, expected)  # type: ignore[no-any-return]

    async def state_list(self, prefix: str) -> dict[str, str]:
        return await self._call(_op_state_list, prefix, readonly=True)  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        if self._closed:
            return
        if self._deferred:
            await self._flush()  # held-back commits are written before the store closes
        self._closed = True
        if self._inline is not None:
            with self._inline_lock:
                self._inline.close()
                self._inline = None
        self._writer.jobs.put(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, self._writer.join)


# --- the transaction the operations run in (on the writer thread, or inline) -------------------------


def _budget(r: Row | tuple[Any, ...]) -> rules.BudgetState:
    b = rules.BudgetState(
        r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]), r[8], json.loads(r[9]) if r[9] else None
    )
    if r[10]:
        timing = json.loads(r[10])
        for key in _TIMING:
            setattr(b, key, timing.get(key))
    return b


def _timing(b: rules.BudgetState) -> str | None:
    if b.period is None and not b.rate_limits and not b.alerts:
        return None
    return _JSON({key: getattr(b, key) for key in _TIMING if getattr(b, key) is not None})


# Ids are content hashes, so neither cache can go stale: id -> decoded shape, and shape parts -> (id, text).
_SHAPES: dict[bytes, tuple[Any, ...]] = {}
_SHAPE_IDS: dict[tuple[Any, ...], tuple[bytes, str]] = {}


def _shape_id(text: str) -> bytes:
    """128 bits: subjects are partly client-chosen, and two texts under one id would decode one caller's
    reservations as another's (64 bits could be forced by brute force; 128 cannot)."""
    return hashlib.sha256(text.encode()).digest()[:16]


def _default_settle_key(op: str | None, rid: str) -> str:
    return f"{op}:{rid}"


def _simple_commit_hash(r: rules.ReservationState) -> str:
    """The payload hash `Ledger.commit` sends for a plain commit (no metrics, metadata or other units)."""
    return f"{r.reservation_id}|{r.unit}|{r.actual}"


class SqliteTxn(Txn):
    """`operations` over one SQLite connection inside an open transaction (or savepoint)."""

    __slots__ = ("conn", "now")

    def __init__(self, conn: sqlite3.Connection, now: int) -> None:
        self.conn = conn
        self.now = now

    def budgets(self, scopes: list[str], unit: str | None = None) -> list[rules.BudgetState]:
        if not scopes:
            return []
        marks = ",".join("?" * len(scopes))
        sql = f"SELECT {_BUDGET_COLS} FROM budgets WHERE scope IN ({marks})"
        params: list[Any] = list(scopes)
        if unit is not None:
            sql += " AND unit = ?"
            params.append(unit)
        order = {s: i for i, s in enumerate(scopes)}
        rows = sorted(self.conn.execute(sql, params).fetchall(), key=lambda r: (order[r[0]], r[1]))
        return [_budget(r) for r in rows]

    def save_budgets(self, budgets: list[rules.BudgetState]) -> None:
        self.conn.executemany(
            "UPDATE budgets SET allocated=?, spent=?, reserved=?, debt=?, overdraft_limit=?, is_over_limit=?,"
            " status=?, caps=?, updated_at_ms=?, timing=?, period_end_ms=? WHERE scope=? AND unit=?",
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
                    self.now,
                    _timing(b),
                    b.period_end_ms,
                    b.scope,
                    b.unit,
                )
                for b in budgets
            ],
        )

    def insert_budget(self, b: rules.BudgetState) -> None:
        self.conn.execute(
            f"INSERT INTO budgets ({_BUDGET_COLS}, period_end_ms, updated_at_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                b.scope,
                b.unit,
                b.allocated,
                b.spent,
                b.reserved,
                b.debt,
                b.overdraft_limit,
                int(b.is_over_limit),
                b.status,
                _JSON(b.caps) if b.caps else None,
                _timing(b),
                b.period_end_ms,
                self.now,
            ),
        )

    def _reservation(self, row: Row) -> rules.ReservationState:
        """A row as the rules see it. Rows written since shapes keep subject, action and scopes in `shapes`
        (one row per caller, not per call) and leave out what can be rebuilt: the settle's answer, and its key
        and hash when they are the defaults."""
        if row[26] is not None:
            shape = _SHAPES.get(row[26])
            if shape is None:
                text = self.conn.execute("SELECT text FROM shapes WHERE id=?", (row[26],)).fetchone()[0]
                subject, action, affected, budgeted, unit, policy, scope_path = json.loads(text)
                shape = (subject, action, affected, json.loads(budgeted), unit, policy, scope_path)
                if len(_SHAPES) > 50_000:
                    _SHAPES.clear()
                _SHAPES[row[26]] = shape
            subject, action, affected, budgeted_scopes, unit, policy, scope_path = shape
            budgeted_scopes = list(budgeted_scopes)
        else:
            subject, action, affected, budgeted_scopes = row[3], row[4], row[15], json.loads(row[16])
            unit, policy, scope_path = row[5], row[8], row[14]
        r = rules.ReservationState(
            reservation_id=row[0],
            status=row[1],
            idempotency_key=row[2],
            subject_json=subject,
            action_json=action,
            unit=unit,
            estimate=row[6],
            charged=row[7],
            overage_policy=policy,
            created_at_ms=row[9],
            expires_at_ms=row[10],
            grace_ms=row[11],
            finalized_at_ms=row[13],
            scope_path=scope_path,
            affected_json=affected,
            budgeted_scopes=budgeted_scopes,
            extension_count=row[17],
            metadata_json=row[18],
            caps=json.loads(row[19]) if row[19] else None,
            settle_op=row[20],
            settle_key=row[21],
            settle_hash=row[22],
            settle_response=json.loads(row[23]) if row[23] else None,
            extra=json.loads(row[24]) if row[24] else None,
            windowed=bool(row[25]),
            actual=row[27],
        )
        if r.settle_op is not None:
            if r.settle_key is None:
                r.settle_key = _default_settle_key(r.settle_op, r.reservation_id)
            if r.settle_hash is None:
                r.settle_hash = _simple_commit_hash(r)
        return r

    def reservation(self, reservation_id: str) -> rules.ReservationState | None:
        row = self.conn.execute(f"SELECT {_RES_COLS} FROM reservations WHERE id=?", (reservation_id,)).fetchone()
        return None if row is None else self._reservation(row)

    def _shape(self, r: rules.ReservationState) -> bytes:
        parts = (
            r.subject_json,
            r.action_json,
            r.affected_json,
            tuple(r.budgeted_scopes),
            r.unit,
            r.overage_policy,
            r.scope_path,
        )
        found = _SHAPE_IDS.get(parts)
        if found is None:
            text = _JSON([*parts[:3], _JSON(r.budgeted_scopes), *parts[4:]])
            found = (_shape_id(text), text)
            if len(_SHAPE_IDS) > 50_000:
                _SHAPE_IDS.clear()
            _SHAPE_IDS[parts] = found
        shape, text = found
        conn = self.conn
        if not isinstance(conn, _Conn) or shape not in conn.shapes_known:
            conn.execute(
                "INSERT OR IGNORE INTO shapes (id, text, scope_path) VALUES (?, ?, ?)", (shape, text, r.scope_path)
            )
            if isinstance(conn, _Conn):
                conn.shapes_pending.append(shape)
        return shape

    def insert_reservation(self, r: rules.ReservationState) -> None:
        self.conn.execute(
            _RES_INSERT,
            (
                r.reservation_id,
                r.status,
                r.idempotency_key,
                "",
                "",
                "",
                r.estimate,
                r.charged,
                "",
                r.created_at_ms,
                r.expires_at_ms,
                r.grace_ms,
                r.deadline_ms,
                r.finalized_at_ms,
                "",
                "",
                "",
                r.extension_count,
                r.metadata_json,
                _JSON(r.caps) if r.caps else None,
                None,
                None,
                None,
                None,
                _JSON(r.extra) if r.extra else None,
                int(r.windowed),
                self._shape(r),
                r.actual,
            ),
        )

    def update_reservation(self, r: rules.ReservationState) -> None:
        self.conn.execute(
            "UPDATE reservations SET status=?, charged=?, finalized_at_ms=?, expires_at_ms=?, deadline_ms=?,"
            " extension_count=?, settle_op=?, settle_key=?, settle_hash=?, settle_response=NULL, extra=?, actual=?"
            " WHERE id=?",
            (
                r.status,
                r.charged,
                r.finalized_at_ms,
                r.expires_at_ms,
                r.deadline_ms,
                r.extension_count,
                r.settle_op,
                # The defaults are rebuilt on reading (see _reservation): ~90 bytes less per settled call.
                None if r.settle_key == _default_settle_key(r.settle_op, r.reservation_id) else r.settle_key,
                None if r.settle_hash == _simple_commit_hash(r) and r.settle_op == "commit" else r.settle_hash,
                _JSON(r.extra) if r.extra else None,
                r.actual,
                r.reservation_id,
            ),
        )

    def due(self, now: int, limit: int) -> list[rules.ReservationState]:
        rows = self.conn.execute(
            f"SELECT {_RES_COLS} FROM reservations WHERE status='ACTIVE' AND deadline_ms < ?"
            " ORDER BY deadline_ms LIMIT ?",
            (now, limit),
        ).fetchall()
        return [self._reservation(r) for r in rows]

    def append_event(
        self,
        now: int,
        type_: str,
        scope: str | None,
        unit: str | None,
        amount: int | None,
        reservation_id: str | None,
        reason_code: str | None,
        data: dict[str, Any] | None,
    ) -> int:
        cur = self.conn.execute(
            "INSERT INTO events (ts_ms, type, scope, unit, amount, reservation_id, reason_code, data)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (
                now,
                type_,
                scope,
                _UNIT_CODES.get(unit or "", unit),
                amount,
                reservation_id,
                reason_code,
                _pack(data, amount),
            ),
        )
        return int(cur.lastrowid or 0)

    def idempotency(self, op: str, key: str) -> tuple[str, dict[str, Any]] | None:
        row = self.conn.execute(
            "SELECT payload_hash, response FROM idempotency WHERE op=? AND key=?", (op, key)
        ).fetchone()
        return None if row is None else (row[0], json.loads(row[1]))

    def remember(self, op: str, key: str, payload_hash: str, response: dict[str, Any]) -> None:
        self.conn.execute(
            "INSERT INTO idempotency (op, key, payload_hash, response, created_at_ms) VALUES (?,?,?,?,?)",
            (op, key, payload_hash, _JSON(response), self.now),
        )

    def prune_idempotency(self, before_ms: int) -> None:
        # A full scan, so the store asks for it only every few minutes.
        self.conn.execute("DELETE FROM idempotency WHERE created_at_ms < ?", (before_ms,))

    def window(self, scope: str, unit: str, since_ms: int) -> list[tuple[int, int]]:
        rows = self.conn.execute(
            "SELECT ts_ms, amount FROM spend_window WHERE scope=? AND unit=? AND ts_ms > ? ORDER BY ts_ms",
            (scope, unit, since_ms),
        )
        return [(r[0], r[1]) for r in rows]

    def window_add(self, scope: str, unit: str, ts_ms: int, ref: str, amount: int) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO spend_window (scope, unit, ts_ms, ref, amount) VALUES (?,?,?,?,?)",
            (scope, unit, ts_ms, ref, amount),
        )

    def window_set(self, ref: str, unit: str, amount: int) -> None:
        self.conn.execute("UPDATE spend_window SET amount=? WHERE ref=? AND unit=?", (amount, ref, unit))

    def window_drop(self, ref: str) -> None:
        self.conn.execute("DELETE FROM spend_window WHERE ref=?", (ref,))

    def window_prune(self, scope: str, unit: str, before_ms: int) -> None:
        self.conn.execute("DELETE FROM spend_window WHERE scope=? AND unit=? AND ts_ms <= ?", (scope, unit, before_ms))

    def old_events(
        self, before_ms: int, limit: int
    ) -> list[tuple[int, str, str, int | None, dict[str, Any], str | None, str | None]]:
        # Oldest first by id (ids follow time), stopping at the first young event: reads at most `limit` rows.
        newest = self.conn.execute("SELECT MAX(event_id) FROM events").fetchone()[0] or 0
        out = []
        for r in self.conn.execute(
            "SELECT event_id, ts_ms, type, unit, amount, data, reservation_id, scope FROM events"
            " WHERE type != 'period_reset' AND event_id < ? ORDER BY event_id LIMIT ?",
            (newest, limit),
        ):
            if r[1] >= before_ms:
                break
            out.append((r[0], r[2], _UNITS.get(r[3], r[3]), r[4], _unpack(r[5], r[4]), r[6], r[7]))
        return out

    def forget_events(self, event_ids: list[int], folded: dict[tuple[str, str], int]) -> None:
        self.conn.executemany(
            "INSERT INTO pruned_charges (scope, unit, amount) VALUES (?,?,?)"
            " ON CONFLICT (scope, unit) DO UPDATE SET amount = amount + excluded.amount",
            [(scope, unit, amount) for (scope, unit), amount in folded.items()],
        )
        self.conn.executemany("DELETE FROM events WHERE event_id=?", [(i,) for i in event_ids])

    def forget_reservations(self, before_ms: int, limit: int) -> None:
        # Ids start with their creation ms (stores/_ids.py), and what finished before the cutoff was created
        # before it: a range scan of the old rows only.
        rows = self.conn.execute(
            "SELECT id FROM reservations WHERE id < ? AND status != 'ACTIVE' AND finalized_at_ms < ?"
            " ORDER BY id LIMIT ?",
            (f"rsv_{before_ms:012x}", before_ms, limit),
        ).fetchall()
        self.conn.executemany("DELETE FROM reservations WHERE id=?", rows)

    def state_get(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM state WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def state_set(self, key: str, value: str | None) -> None:
        if value is None:
            self.conn.execute("DELETE FROM state WHERE key=?", (key,))
        else:
            self.conn.execute(
                "INSERT OR REPLACE INTO state (key, value, updated_at_ms) VALUES (?,?,?)", (key, value, self.now)
            )

    def state_list(self, prefix: str) -> dict[str, str]:
        rows = self.conn.execute(
            "SELECT key, value FROM state WHERE key >= ? AND key < ? ORDER BY key", (prefix, prefix + "\U0010ffff")
        )
        return {r[0]: r[1] for r in rows}

    def period_due(self, now: int, limit: int) -> list[rules.BudgetState]:
        rows = self.conn.execute(
            f"SELECT {_BUDGET_COLS} FROM budgets WHERE period_end_ms IS NOT NULL AND period_end_ms <= ?"
            " ORDER BY period_end_ms, scope, unit LIMIT ?",
            (now, limit),
        )
        return [_budget(r) for r in rows]

    def all_budgets(self, scope_prefix: str | None, unit: str | None) -> list[rules.BudgetState]:
        sql = f"SELECT {_BUDGET_COLS} FROM budgets WHERE 1=1"
        params: list[Any] = []
        if scope_prefix:
            sql += " AND (scope = ? OR scope GLOB ?)"
            params += [scope_prefix, _glob_under(scope_prefix)]
        if unit:
            sql += " AND unit = ?"
            params.append(unit)
        sql += " ORDER BY scope, unit"
        return [_budget(r) for r in self.conn.execute(sql, params)]

    def find_reservations(
        self, status: str | None, scope_prefix: str | None, idempotency_key: str | None, limit: int
    ) -> list[rules.ReservationState]:
        sql = f"SELECT {_RES_COLS} FROM reservations WHERE 1=1"
        params: list[Any] = []
        if status:
            sql += " AND status = ?"
            params.append(status)
        if scope_prefix:
            # Rows of this version keep their scope in their shape; older rows in their own column.
            sql += (
                " AND (shape IN (SELECT id FROM shapes WHERE scope_path = ? OR scope_path GLOB ?)"
                " OR scope_path = ? OR scope_path GLOB ?)"
            )
            params += [scope_prefix, _glob_under(scope_prefix)] * 2
        if idempotency_key:
            sql += " AND idempotency_key = ?"
            params.append(idempotency_key)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        return [self._reservation(r) for r in self.conn.execute(sql, params)]

    def find_events(
        self, after: int, limit: int, reservation_id: str | None, scope_prefix: str | None, newest: bool
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
            params += [scope_prefix, _glob_under(scope_prefix)]
        sql += " ORDER BY event_id DESC LIMIT ?" if newest else " ORDER BY event_id LIMIT ?"
        params.append(limit)
        keys = ("event_id", "ts_ms", "type", "scope", "unit", "amount", "reservation_id", "reason_code")
        out = []
        for r in self.conn.execute(sql, params):
            d = dict(zip(keys, r[:8], strict=True))
            d["unit"] = _UNITS.get(d["unit"], d["unit"])
            d["data"] = _unpack(r[8], d["amount"])
            out.append(d)
        return out

    def active_reservations(self) -> Iterable[rules.ReservationState]:
        for row in self.conn.execute(f"SELECT {_RES_COLS} FROM reservations WHERE status='ACTIVE'"):
            yield self._reservation(row)

    def charges(self) -> Iterable[tuple[str, int, list[str]]]:
        for scope, unit, amount in self.conn.execute("SELECT scope, unit, amount FROM pruned_charges"):
            yield unit, amount, [scope]
        rows = self.conn.execute(
            "SELECT type, unit, amount, data, reservation_id, scope FROM events"
            " WHERE type IN ('committed', 'debited', 'period_reset')"
        )
        for type_, unit, amount, data, rid, scope in rows:
            r = self.reservation(rid) if type_ == "committed" else None
            yield from operations.charges_of(type_, _UNITS.get(unit, unit), amount, _unpack(data, amount), r, scope)


# How events are kept small on disk (the API reads back exactly what was written): a unit is one letter,
# and a commit's usual data {"actual": <its amount>, "released": n} is "~n". ~45 bytes less per call.
_UNIT_CODES = {"USD_MICROCENTS": "U", "TOKENS": "T", "CREDITS": "C", "RISK_POINTS": "R"}
_UNITS = {code: unit for unit, code in _UNIT_CODES.items()}


def _pack(data: dict[str, Any] | None, amount: int | None) -> str | None:
    if not data:
        return None
    if len(data) == 2 and data.get("actual") == amount and isinstance(data.get("released"), int):
        return f"~{data['released']}"
    return _JSON(data)


def _unpack(text: str | None, amount: int | None) -> dict[str, Any]:
    if not text:
        return {}
    if text[0] == "~":
        return {"actual": amount, "released": int(text[1:])}
    return json.loads(text)  # type: ignore[no-any-return]


def _glob_under(scope: str) -> str:
    """GLOB pattern for the scopes below `scope` (scope ids never contain GLOB's special characters)."""
    return scope + "/*"


def _bind(op: Callable[..., Any]) -> Callable[..., Any]:
    """An operation as a writer job: `fn(conn, now, *args)`."""

    def job(conn: sqlite3.Connection, now: int, *args: Any) -> Any:
        return op(SqliteTxn(conn, now), now, *args)

    job.__name__ = op.__name__
    return job


def _expire_due(conn: sqlite3.Connection, now: int, limit: int) -> int:
    return operations.expire_due(SqliteTxn(conn, now), now, limit)


def _op_nothing(conn: sqlite3.Connection, now: int) -> None:
    """A write operation that writes nothing itself: it carries held-back commits."""


_op_reserve = _bind(operations.reserve)
_op_decide = _bind(operations.decide)
_op_commit = _bind(operations.commit)
_op_release = _bind(operations.release)
_op_extend = _bind(operations.extend)
_op_event = _bind(operations.record_event)
_op_note = _bind(operations.note)
_op_budget = _bind(operations.change_budget)
_op_balances = _bind(operations.balances)
_op_get_reservation = _bind(operations.get_reservation)
_op_list_reservations = _bind(operations.list_reservations)
_op_events = _bind(operations.events)
_op_sweep = _bind(operations.sweep)
_op_verify = _bind(operations.verify)
_op_state_get = _bind(operations.state_get)
_op_state_put = _bind(operations.state_put)
_op_state_list = _bind(operations.state_list)
