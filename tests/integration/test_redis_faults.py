"""The Redis store under faults: a server SIGKILLed and restarted mid-load, a stalled server, no server,
and a restart that loses every script and key.

Each test starts its own redis-server (cycles_ledger/redis_server.py), so killing or stopping it touches
nothing else. The crash test runs worker processes (multiprocessing "spawn") doing reserve → settle loops
with explicit idempotency keys; a worker reports a step to the parent only once the ledger has answered
it, and retries a step that raised StoreUnavailableError with the same key until it succeeds. The parent
kills redis-server (appendonly, appendfsync always) on a seeded random schedule, restarts it on the same
port and directory, stops the workers, and checks every acknowledged step against the books.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import queue
import random
import signal
import socket
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis

from cycles_ledger import Ledger, ReservationStatus, StoreUnavailableError, open_ledger
from cycles_ledger.ports import free_port
from cycles_ledger.redis_server import RedisServer, unique_prefix
from tests.conftest import _need_redis

pytestmark = [pytest.mark.redis, pytest.mark.slow]

T = TypeVar("T")
UNIT = "USD_MICROCENTS"
ACTION = {"kind": "llm.completion", "name": "faults"}
TENANT = "tenant:f"
WORKFLOW = "tenant:f/workflow:w"
SUBJECT = {"tenant": "f", "workflow": "w"}  # every hold and charge touches two budget rows
PROCS = 4
TASKS = 2  # reserve → settle loops per worker process


def _amount(n: int) -> dict[str, Any]:
    return {"unit": UNIT, "amount": n}


@pytest.fixture
def server_factory() -> Iterator[Callable[..., RedisServer]]:
    """`server_factory(**kwargs)`: a redis-server of this test's own, stopped at the end."""
    _need_redis()
    servers: list[RedisServer] = []

    def make(**kwargs: Any) -> RedisServer:
        servers.append(RedisServer(**kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


# --- a. SIGKILL mid-load, restart from the append-only file ------------------------------------------


async def _until_done(call: Callable[[], Awaitable[T]], rng: random.Random, retries: Counter[str], what: str) -> T:
    """Retry `call` (which reuses its idempotency key) while the ledger is unavailable."""
    while True:
        try:
            return await call()
        except StoreUnavailableError:
            retries[what] += 1
            await asyncio.sleep(rng.uniform(0.005, 0.03))


async def _loop(ledger: Ledger, index: int, task: int, stop: Any, out: Any, retries: Counter[str]) -> None:
    rng = random.Random(index * 1000 + task)
    i = 0
    while not stop.is_set():
        key = f"w{index}-{task}-{i}"
        i += 1
        est = rng.randint(1, 50) * 1000
        actual = rng.randint(0, est)
        how = rng.choices("ckx", weights=(8, 1, 1))[0]  # commit, keep the hold, release

        def reserve(key: str = key, est: int = est) -> Awaitable[Any]:
            return ledger.reserve(SUBJECT, ACTION, _amount(est), idempotency_key=key)

        r = await _until_done(reserve, rng, retries, "reserve")
        if not r.allowed or r.reservation_id is None:
            raise AssertionError(f"{key}: unexpected {r.decision} {r.reason_code} at {r.scope}")
        rid = r.reservation_id
        out.put(("R", key, rid, est))
        if how == "c":

            def commit(rid: str = rid, key: str = key, actual: int = actual) -> Awaitable[Any]:
                return ledger.commit(rid, _amount(actual), idempotency_key=f"c-{key}")

            c = await _until_done(commit, rng, retries, "commit")
            out.put(("C", key, rid, c.charged.amount))
        elif how == "x":

            def release(rid: str = rid, key: str = key) -> Awaitable[Any]:
                return ledger.release(rid, reason="not needed", idempotency_key=f"x-{key}")

            x = await _until_done(release, rng, retries, "release")
            out.put(("X", key, rid, x.released.amount))
        await asyncio.sleep(rng.uniform(0, 0.004))


async def _crash_worker_main(url: str, index: int, go: Any, stop: Any, out: Any) -> Counter[str]:
    retries: Counter[str] = Counter()
    async with open_ledger(url) as ledger:
        out.put(("ready", index, None, None))
        if not await asyncio.to_thread(go.wait, 60):
            raise RuntimeError("the parent never said go")
        await asyncio.gather(*(_loop(ledger, index, t, stop, out, retries) for t in range(TASKS)))
    return retries


def _crash_worker(url: str, index: int, go: Any, stop: Any, out: Any) -> None:
    try:
        retries = asyncio.run(_crash_worker_main(url, index, go, stop, out))
    except BaseException:  # noqa: BLE001 - the parent turns it into a test failure
        out.put(("error", index, traceback.format_exc(), None))
        return
    out.put(("done", index, dict(retries), None))


class _Inbox:
    """What the workers reported, read off their queue as it arrives."""

    def __init__(self, q: Any) -> None:
        self.q = q
        self.reserved: dict[str, tuple[str, int]] = {}  # key -> (reservation id, estimate)
        self.committed: dict[str, tuple[str, int]] = {}  # key -> (reservation id, charged)
        self.released: dict[str, tuple[str, int]] = {}
        self.ready: set[int] = set()
        self.done: dict[int, dict[str, int]] = {}
        self.steps = 0

    def _take(self, msg: tuple[Any, ...]) -> None:
        kind, a, b, c = msg
        book = {"R": self.reserved, "C": self.committed, "X": self.released}.get(kind)
        if book is not None:
            assert a not in book, f"{kind} {a} acknowledged twice"
            book[a] = (b, c)
            self.steps += 1
        elif kind == "ready":
            self.ready.add(a)
        elif kind == "done":
            self.done[a] = b
        else:
            pytest.fail(f"worker {a} failed:\n{b}")

    def pump(self, until: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"timed out waiting for {what}: {self.steps} steps, {len(self.done)} done")
            try:
                self._take(self.q.get(timeout=min(left, 0.05)))
            except queue.Empty:
                continue

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        self.pump(lambda: time.monotonic() >= end, seconds + 1, "a pause")


@pytest.mark.parametrize("seed", [11, 12])
def test_acknowledged_steps_survive_sigkill_and_retries_never_double_charge(
    server_factory: Callable[..., RedisServer], seed: int
) -> None:
    """SIGKILL mid-load, restart, same-key retries: every acknowledged step is in the books exactly once."""
    server = server_factory(appendonly=True, appendfsync="always")
    url = server.url(timeout=1)
    rng = random.Random(seed)

    async def setup() -> None:
        async with open_ledger(url) as ledger:
            await ledger.set_budget(TENANT, _amount(10**12))
            await ledger.set_budget(WORKFLOW, _amount(10**11))

    asyncio.run(setup())
    ctx = multiprocessing.get_context("spawn")
    out, go, stop = ctx.Queue(), ctx.Event(), ctx.Event()
    inbox = _Inbox(out)
    procs = [ctx.Process(target=_crash_worker, args=(url, i, go, stop, out), daemon=True) for i in range(PROCS)]
    acked_before_kill: list[int] = []
    try:
        for p in procs:
            p.start()
        inbox.pump(lambda: len(inbox.ready) == PROCS, 60, "workers to start")
        go.set()
        for _ in range(2):  # two crashes, each after a random stretch of load
            floor = len(inbox.committed) + 10
            inbox.pump(lambda floor=floor: len(inbox.committed) >= floor, 30, "load before a kill")
            inbox.sleep(rng.uniform(0.05, 0.4))
            server.kill()
            acked_before_kill.append(len(inbox.committed))
            inbox.sleep(rng.uniform(0.05, 0.3))
            server.start()
        floor = len(inbox.committed) + 30  # progress after the last restart
        inbox.pump(lambda: len(inbox.committed) >= floor, 30, "commits after the restart")
        stop.set()
        inbox.pump(lambda: len(inbox.done) == PROCS, 30, "workers to finish")
        for p in procs:
            p.join(timeout=10)
            assert p.exitcode == 0, f"worker pid {p.pid} exited with {p.exitcode}"
    finally:
        stop.set()
        go.set()
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)

    retries = Counter[str]()
    for r in inbox.done.values():
        retries.update(r)
    # Every worker was busy when the server died, so each saw the outage and retried at least once.
    assert all(sum(r.values()) > 0 for r in inbox.done.values()), inbox.done
    assert retries["reserve"] + retries["commit"] > 0
    # Commits were acknowledged before the first kill, between the kills and after the last restart.
    assert 0 < acked_before_kill[0] < acked_before_kill[1] < len(inbox.committed)

    async def check() -> None:
        async with open_ledger(url) as ledger:
            assert await ledger.verify() == []
            found = {r.reservation_id: r for r in await ledger.list_reservations(limit=100_000)}
            # One reservation per reserve key that succeeded: no retry created a second hold.
            assert sorted(r.idempotency_key for r in found.values()) == sorted(inbox.reserved)
            assert set(found) == {rid for rid, _ in inbox.reserved.values()}
            for key, (rid, est) in inbox.reserved.items():
                res = found[rid]
                assert (res.idempotency_key, res.reserved.amount) == (key, est)
                assert res.budgeted_scopes == [TENANT, WORKFLOW]
            for key, (rid, charged) in inbox.committed.items():
                res = found[rid]
                assert res.status is ReservationStatus.COMMITTED, key
                assert res.committed is not None and res.committed.amount == charged, key
                assert charged <= inbox.reserved[key][1]
            for key, (rid, released) in inbox.released.items():
                assert found[rid].status is ReservationStatus.RELEASED, key
                assert released == inbox.reserved[key][1]
            settled = set(inbox.committed) | set(inbox.released)
            kept = {k for k in inbox.reserved if k not in settled}
            assert {found[inbox.reserved[k][0]].status for k in kept} <= {ReservationStatus.ACTIVE}
            spent = sum(charged for _, charged in inbox.committed.values())
            held = sum(inbox.reserved[k][1] for k in kept)
            for scope in (TENANT, WORKFLOW):
                b = await ledger.balance(scope)
                assert (b.spent, b.reserved, b.debt) == (spent, held, 0), scope
                assert b.remaining == b.allocated - spent - held
            kinds = Counter(e.type for e in await ledger.events(limit=100_000))
            books = (inbox.reserved, inbox.committed, inbox.released)
            assert kinds["reserved"] == len(inbox.reserved)
            assert kinds["committed"] == len(inbox.committed)
            assert kinds["released"] == len(inbox.released)
            assert kinds["budget_set"] == 2 and sum(kinds.values()) == sum(map(len, books)) + 2, kinds

    asyncio.run(check())


# --- b. a stalled server: client-side timeout, then a retry with the same key -----------------------


@contextlib.contextmanager
def _stopped(server: RedisServer) -> Iterator[None]:
    """SIGSTOP the server (it holds every connection open but answers nothing) until the block ends."""
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


async def _eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_timeouts_are_unavailable_and_a_same_key_retry_applies_once(
    server_factory: Callable[..., RedisServer],
) -> None:
    """A stalled server makes reserve, commit and record_event fail fast; each same-key retry is a replay."""
    server = server_factory()
    prefix = unique_prefix()
    subject, scope = {"tenant": "p"}, "tenant:p"
    est, actual, debit = 300_000, 120_000, 7_000
    async with open_ledger(server.url(prefix, timeout=0.2)) as led, open_ledger(server.url(prefix)) as obs:
        await led.set_budget(scope, "1usd")
        # Load every script first: a stalled EVALSHA of an unloaded script would only ever answer NOSCRIPT.
        await led.set_budget("tenant:warm", "1usd")
        w = await led.reserve({"tenant": "warm"}, ACTION, "0.01usd")
        assert w.reservation_id is not None
        await led.commit(w.reservation_id, "0.001usd")
        await led.record_event({"tenant": "warm"}, ACTION, "0.001usd")

        async def stalled(call: Callable[[], Awaitable[Any]]) -> float:
            with _stopped(server):
                started = time.monotonic()
                with pytest.raises(StoreUnavailableError, match="Timeout"):
                    await call()
                return time.monotonic() - started

        def reserve() -> Awaitable[Any]:
            return led.reserve(subject, ACTION, _amount(est), idempotency_key="k-reserve")

        assert await stalled(reserve) < 1.0
        # The request reached the server before the client gave up: it runs once the server resumes.

        async def held() -> bool:
            return (await obs.balance(scope)).reserved == est

        await _eventually(held)
        r = await reserve()
        assert r.allowed and r.reservation_id is not None
        [res] = await obs.list_reservations(scope=scope)
        assert (res.reservation_id, res.idempotency_key) == (r.reservation_id, "k-reserve")
        assert (await obs.balance(scope)).reserved == est
        rid = r.reservation_id

        def commit() -> Awaitable[Any]:
            return led.commit(rid, _amount(actual))  # the default key, derived from the reservation id

        assert await stalled(commit) < 1.0

        async def committed() -> bool:
            return (await obs.get_reservation(rid)).status is ReservationStatus.COMMITTED

        await _eventually(committed)
        c = await commit()
        assert c.charged.amount == actual and c.released is not None and c.released.amount == est - actual

        def record() -> Awaitable[Any]:
            return led.record_event(subject, ACTION, _amount(debit), idempotency_key="k-event")

        assert await stalled(record) < 1.0

        async def debited() -> bool:
            return (await obs.balance(scope)).spent == actual + debit

        await _eventually(debited)
        e = await record()
        assert e.charged.amount == debit

        b = await obs.balance(scope)
        assert (b.spent, b.reserved, b.remaining) == (actual + debit, 0, 100_000_000 - actual - debit)
        events = await obs.events(scope=scope)
        assert [(x.type, x.amount) for x in events] == [
            ("budget_set", 100_000_000),
            ("reserved", est),
            ("committed", actual),
            ("debited", debit),
        ]
        assert [x.event_id for x in events if x.type == "debited"] == [e.event_id]
        assert await obs.verify() == []


# --- c. no server at all ------------------------------------------------------------------------------


@contextlib.contextmanager
def _black_hole() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel's backlog) but never answers a byte."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield int(s.getsockname()[1])


LEDGER_CALLS: list[tuple[str, Callable[[Ledger], Awaitable[Any]]]] = [
    ("set_budget", lambda led: led.set_budget("tenant:a", "1usd")),
    ("reserve", lambda led: led.reserve({"tenant": "a"}, ACTION, "0.1usd", idempotency_key="k")),
    ("commit", lambda led: led.commit("rsv_0123456789abcdef0123456789@tenant:a", "0.1usd")),
    ("balances", lambda led: led.balances()),
    ("verify", lambda led: led.verify()),
]


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
@pytest.mark.parametrize("listener", ["refused", "silent"])
async def test_no_server_is_unavailable_at_once(scheme: str, listener: str) -> None:
    """No server (connection refused) or a silent one: every first call is StoreUnavailableError, fast."""
    with contextlib.ExitStack() as stack:
        port = free_port() if listener == "refused" else stack.enter_context(_black_hole())
        path = "/0" if scheme == "redis" else ""
        url = f"{scheme}://127.0.0.1:{port}{path}?timeout=0.3&prefix=nobody"
        for name, call in LEDGER_CALLS:
            async with open_ledger(url) as led:
                started = time.monotonic()
                with pytest.raises(StoreUnavailableError, match="unavailable"):
                    await call(led)
                assert time.monotonic() - started < 2.0, name


# --- d. a restart that loses everything, scripts included -------------------------------------------


async def test_scripts_are_reloaded_after_a_restart_without_persistence(
    server_factory: Callable[..., RedisServer],
) -> None:
    """After a restart with no AOF the scripts are gone; the same ledger reloads them on NOSCRIPT."""
    server = server_factory()
    async with contextlib.AsyncExitStack() as stack:
        led = await stack.enter_async_context(open_ledger(server.url(timeout=1)))
        await led.set_budget("tenant:a", "1usd")
        r = await led.reserve({"tenant": "a"}, ACTION, "0.1usd")
        assert r.allowed
        shas = list(led.store._shas.values())
        server.restart()
        sync = stack.enter_context(redis.Redis(port=server.port, decode_responses=True))
        assert sync.dbsize() == 0 and not any(sync.script_exists(*shas))
        # The pooled connection died with the server: that first call is "unavailable" (never retried
        # behind the caller's back); the next one reconnects.
        with contextlib.suppress(StoreUnavailableError):
            await led.balance("tenant:b")
        b = await led.set_budget("tenant:b", "1usd")  # one call alone: EVALSHA, NOSCRIPT, SCRIPT LOAD, EVALSHA
        assert (b.allocated, b.reserved) == (100_000_000, 0)
        # Concurrent calls go out as one pipeline; each NOSCRIPT in it is reloaded and run.
        rs = await asyncio.gather(
            *(led.reserve({"tenant": "b"}, ACTION, "0.1usd", idempotency_key=f"k{i}") for i in range(5))
        )
        assert all(r.allowed for r in rs) and len({r.reservation_id for r in rs}) == 5
        cs = await asyncio.gather(*(led.commit(str(r.reservation_id), "0.05usd") for r in rs))
        assert [c.charged.amount for c in cs] == [5_000_000] * 5
        assert sum(sync.script_exists(*shas)) == 3  # budget, reserve, commit
        b = await led.balance("tenant:b")
        assert (b.spent, b.reserved) == (25_000_000, 0)
        types = [e.type for e in await led.events(scope="tenant:b")]
        assert types == ["budget_set"] + ["reserved"] * 5 + ["committed"] * 5


async def test_a_tenant_set_up_again_after_data_loss_is_listed(server_factory: Callable[..., RedisServer]) -> None:
    """A tenant whose budget is set again after the server lost its data shows in balances() and the sweep."""
    server = server_factory()
    async with open_ledger(server.url(timeout=1)) as led:
        await led.set_budget("tenant:a", "1usd")
        server.restart()
        with contextlib.suppress(StoreUnavailableError):
            await led.balance("tenant:a")
        await led.set_budget("tenant:a", "1usd")
        assert [b.scope for b in await led.balances()] == ["tenant:a"]
