"""A settle the ledger cannot take within its retries is kept and made when the ledger answers again: a Redis
ledger killed between a call and its settle (a failover, a restart longer than the ~1.4 s of retries) loses no
spend while the process lives. Real redis-server processes, killed with SIGKILL and started again on their AOF."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from cycles_ledger import Amount, Unit, open_ledger
from cycles_ledger.lifecycle import HoldState, Lifecycle
from cycles_ledger.redis_server import RedisServer
from tests.conftest import need_redis

SUBJECT = {"tenant": "kept"}
ACTION = {"kind": "llm.completion", "name": "m"}
USD = 10**8


def usd(cents: int) -> Amount:
    return Amount(unit=Unit.USD_MICROCENTS, amount=cents * USD // 100)


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
