"""A settle the ledger cannot take within its retries is kept and made when the ledger answers again: a Redis
ledger killed between a call and its settle (a failover, a restart longer than the ~1.4 s of retries) loses no
spend while the process lives. Real redis-server processes, killed with SIGKILL and started again on their AOF."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from cycles_ledger import Amount, Ledger, Unit, open_ledger, open_ledger_sync
from cycles_ledger.lifecycle import HoldState, Lifecycle, SyncLifecycle
from cycles_ledger.redis_server import RedisServer
from tests.conftest import need_redis

SUBJECT = {"tenant": "kept"}
ACTION = {"kind": "llm.completion", "name": "m"}
USD = 10**8


def usd(n: int) -> Amount:
    return Amount(unit=Unit.USD_MICROCENTS, amount=cents(n))


def cents(n: int) -> int:
    return n * USD // 100


@pytest.fixture
def server() -> Iterator[RedisServer]:
    need_redis()
    srv = RedisServer(appendonly=True, appendfsync="always")
    try:
        yield srv
    finally:
        srv.stop()


def quick(life: Lifecycle) -> Lifecycle:
    life.retries, life.backoff_s = 1, 0.05
    return life


async def until(pred: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_a_settle_the_ledger_could_not_take_is_made_when_it_answers_again(server: RedisServer) -> None:
    """The commit's retries run out while Redis is down: the settle is kept (counted, in the backlog gauge) and
    committed once Redis is back, with nothing left held; the caller never waited for it past its retries."""
    async with open_ledger(server.url()) as led:
        await led.set_budget("tenant:kept", "1usd")
        life = quick(Lifecycle(led))
        hold = await life.reserve(SUBJECT, ACTION, usd(50))
        server.kill()
        started = time.monotonic()
        await life.commit(hold, usd(20))
        assert time.monotonic() - started < 5
        assert life.backlog_size() == 1 and life.counters["settle_failures"] == 1
        assert life.counters["settle_backlog"] == 1 and hold.state is HoldState.HELD
        server.start()

        async def settled() -> bool:
            return life.backlog_size() == 0

        await until(settled)
        b = await led.balance("tenant:kept")
        assert (b.spent, b.reserved) == (20 * USD // 100, 0)
        assert hold.state is HoldState.COMMITTED and life.counters["settle_recovered"] == 1
        assert life.counters["settle_backlog"] == 0


async def test_a_hold_that_expired_during_the_outage_is_debited_once(server: RedisServer) -> None:
    """The outage outlasts the hold (TTL 1 s, no grace): when Redis is back the kept settle finds the reservation
    expired and debits the actual cost instead, under the hold's debit key, so spend is recorded exactly once."""
    async with open_ledger(server.url(), default_grace_period_ms=0) as led:
        await led.set_budget("tenant:kept", "1usd")
        life = quick(Lifecycle(led))
        hold = await life.reserve(SUBJECT, ACTION, usd(50), ttl_ms=1_000, heartbeat=False)
        server.kill()
        await life.commit(hold, usd(30))
        assert life.backlog_size() == 1
        await asyncio.sleep(1.5)  # past the hold's expiry
        server.start()

        async def settled() -> bool:
            return life.backlog_size() == 0

        await until(settled)
        await led.sweep()
        b = await led.balance("tenant:kept")
        assert (b.spent, b.reserved) == (30 * USD // 100, 0)
        assert hold.state is HoldState.DEBITED
        debits = [e for e in await led.events(scope="tenant:kept") if e.type == "debited"]
        assert [e.amount for e in debits] == [30 * USD // 100]


async def test_a_reserve_that_reaches_the_ledger_sends_the_kept_settles_at_once(server: RedisServer) -> None:
    """The backlog waits up to `backlog_wait_s` between tries; a reserve that gets through meanwhile shows the
    ledger is back, and the kept settles go then, not at the end of the wait."""
    async with open_ledger(server.url()) as led:
        await led.set_budget("tenant:kept", "1usd")
        life = quick(Lifecycle(led))
        life.backoff_s = life.backlog_wait_s = 30.0  # the backlog's own timer would wait ~30 s
        life.retries = 0
        hold = await life.reserve(SUBJECT, ACTION, usd(50))
        server.kill()
        await life.commit(hold, usd(10))
        assert life.backlog_size() == 1
        server.start()
        other = await life.reserve(SUBJECT, ACTION, usd(5))

        async def settled() -> bool:
            return life.backlog_size() == 0

        await until(settled, timeout=10)
        await life.release(other, "test")
        b = await led.balance("tenant:kept")
        assert (b.spent, b.reserved) == (10 * USD // 100, 0)


async def test_a_full_backlog_gives_up_its_oldest_settle_and_counts_it(server: RedisServer) -> None:
    """The backlog is bounded (`backlog_max`): past it the oldest kept settle is given up, logged and counted as
    `settle_dropped`; the others are still made when the ledger is back."""
    async with open_ledger(server.url()) as led:
        await led.set_budget("tenant:kept", "1usd")
        life = quick(Lifecycle(led))
        life.backlog_max = 2
        holds = [await life.reserve(SUBJECT, ACTION, usd(10)) for _ in range(3)]
        server.kill()
        for h, cents in zip(holds, (1, 2, 3), strict=True):
            await life.commit(h, usd(cents))
        assert life.backlog_size() == 2 and life.counters["settle_dropped"] == 1
        server.start()

        async def settled() -> bool:
            return life.backlog_size() == 0

        await until(settled)
        b = await led.balance("tenant:kept")
        assert b.spent == 5 * USD // 100  # the 2 and 3 cents; the first, given up, is still held until it expires
        assert b.reserved == 10 * USD // 100


async def test_two_commits_of_one_hold_during_an_outage_charge_it_once(server: RedisServer) -> None:
    """A kept commit leaves its hold HELD; a caller that commits the same hold again (the public API makes a
    second commit a no-op) must not make the second settle debit the work once more: 20 cents, not 40."""
    async with open_ledger(server.url()) as led:
        await led.set_budget("tenant:kept", "1usd")
        life = quick(Lifecycle(led))
        life.retries = 0
        hold = await life.reserve(SUBJECT, ACTION, usd(50), heartbeat=False)
        server.kill()
        await life.commit(hold, usd(20))
        await life.commit(hold, usd(20))
        server.start()

        async def settled() -> bool:
            return life.backlog_size() == 0

        await until(settled)
        b = await led.balance("tenant:kept")
        assert (b.spent, b.reserved) == (cents(20), 0)


async def test_a_kept_commit_does_not_debit_a_hold_committed_meanwhile(server: RedisServer) -> None:
    """The ledger is back and the hold is committed directly before the kept commit's next try: that try then
    finds the hold paid and does nothing (before the fix it debited the same work again)."""
    async with open_ledger(server.url()) as led:
        await led.set_budget("tenant:kept", "1usd")
        life = Lifecycle(led, retries=0)
        life.backoff_s = life.backlog_wait_s = 30.0  # the backlog's own timer would not fire during the test
        hold = await life.reserve(SUBJECT, ACTION, usd(50), heartbeat=False)
        server.kill()
        await life.commit(hold, usd(20))
        assert life.backlog_size() == 1
        server.start()
        await life.commit(hold, usd(20))  # goes through now
        other = await life.reserve(SUBJECT, ACTION, usd(5), heartbeat=False)  # nudges the backlog

        async def settled() -> bool:
            return life.backlog_size() == 0

        await until(settled, timeout=10)
        await life.release(other, "test")
        b = await led.balance("tenant:kept")
        assert (b.spent, b.reserved) == (cents(20), 0)


async def test_closing_a_sync_ledger_makes_or_counts_its_kept_settles(server: RedisServer) -> None:
    """`SyncLedger.close` (a blocking caller's end: the sync Guard, `@metered` on a blocking function) cancels what
    runs on its loop: the backlog tries its settles once more, and counts what is left as given up; the gauge
    goes back to 0. Here the ledger answers again, so the kept commit is made."""
    url = server.url()
    sync = open_ledger_sync(url)
    try:
        sync.set_budget("tenant:kept", "1usd")
        life = SyncLifecycle(sync, retries=0)
        life.lifecycle.backoff_s = life.lifecycle.backlog_wait_s = 30.0  # the kept settle waits for its next try
        hold = life.reserve(SUBJECT, ACTION, usd(50), heartbeat=False)
        server.kill()
        life.commit(hold, usd(20))
        assert life.lifecycle.counters["settle_backlog"] == 1
        server.start()
    finally:
        sync.close()
    counters = life.lifecycle.counters
    async with open_ledger(url) as led:
        b = await led.balance("tenant:kept")
    assert (b.spent, b.reserved, counters["settle_dropped"]) == (cents(20), 0, 0)
    assert counters["settle_backlog"] == 0


async def test_a_lifecycle_that_keeps_nothing_gives_up_and_never_raises(server: RedisServer) -> None:
    """`backlog_max = 0` keeps nothing (the TTL is the last resort, as before the backlog): the settle is given up
    and counted; `commit` still never raises."""
    async with open_ledger(server.url()) as led:
        await led.set_budget("tenant:kept", "1usd")
        life = Lifecycle(led, retries=0)
        life.backlog_max = 0
        hold = await life.reserve(SUBJECT, ACTION, usd(50), heartbeat=False)
        server.kill()
        await life.commit(hold, usd(20))
        assert life.backlog_size() == 0
        assert (life.counters["settle_failures"], life.counters["settle_dropped"]) == (1, 1)


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


async def _size(life: Lifecycle) -> int:
    return life.backlog_size()


async def test_the_backlog_gauge_counts_the_settles_kept_on_every_loop(server: RedisServer) -> None:
    """One Lifecycle on two event loops (an async caller and a blocking one, whose SyncLedger runs its own loop)
    keeps a backlog per loop; `settle_backlog`, the gauge's source, is their sum."""
    url = server.url()
    sync = open_ledger_sync(url)
    try:
        async with open_ledger(url) as led:
            await led.set_budget("tenant:kept", "1usd")
            sync_loop = sync.run(_running_loop())

            async def source() -> Ledger:
                return sync.ledger if asyncio.get_running_loop() is sync_loop else led

            life = Lifecycle(source, retries=0)
            life.backoff_s = life.backlog_wait_s = 30.0
            here = await life.reserve(SUBJECT, ACTION, usd(10), heartbeat=False)
            there = sync.run(life.reserve(SUBJECT, ACTION, usd(10), heartbeat=False))
            server.kill()
            await life.commit(here, usd(1))
            sync.run(life.commit(there, usd(2)))
            assert life.backlog_size() + sync.run(_size(life)) == 2
            assert life.counters["settle_backlog"] == 2
    finally:
        sync.close()


def _quiet(life: Lifecycle) -> Lifecycle:
    """A logger of its own: pytest's log capture keeps each record's arguments (here a ledger error, whose
    traceback holds the loop), which would keep the loop alive for a reason of the test's own."""
    life.log = logging.getLogger(f"tests.quiet.{id(life)}")
    life.log.propagate = False
    return life


@pytest.mark.parametrize("kept", [True, False], ids=["after-a-backlog", "control-nothing-kept"])
def test_a_loop_whose_backlog_drained_is_freed(server: RedisServer, kept: bool) -> None:
    """asyncio.run on a Lifecycle that outlives it (a module-level `@metered` or Guard, one run per job): once its
    kept settle is made, nothing of the backlog keeps that loop alive (the control keeps nothing)."""
    url = server.url()
    ledgers: dict[str, Ledger] = {}

    async def source() -> Ledger:
        return ledgers["led"]

    life = _quiet(Lifecycle(source, retries=0))
    life.backoff_s = 0.05
    loops: list[Any] = []

    async def job() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        async with open_ledger(url) as led:
            ledgers["led"] = led
            await led.set_budget("tenant:kept", "1usd")
            hold = await life.reserve(SUBJECT, ACTION, usd(10), heartbeat=False)
            if kept:
                server.kill()
            await life.commit(hold, usd(1))
            if kept:
                server.start()

            async def settled() -> bool:
                return life.backlog_size() == 0

            await until(settled)
        ledgers.clear()

    asyncio.run(job())
    gc.collect()
    assert loops[0]() is None, "the closed loop is still referenced by the Lifecycle"
