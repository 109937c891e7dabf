"""The Redis scripts' per-batch write-back: a script call reads the budgets and reservations hashes through a
cache and writes them (and the zsets) back once at the end. Every operation of a batch must still answer,
and leave the books, exactly as if it ran alone: refusals leave no trace, later operations see earlier
ones, reads of the due zset see the batch's own changes, and an operation that fails loses nothing of
the others."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from cycles_ledger import (
    BudgetExceededError,
    IdempotencyMismatchError,
    ReservationFinalizedError,
    StoreUnavailableError,
    open_ledger,
)
from tests.conftest import FakeClock, RedisTarget
from tests.support.script_calls import count_script_calls

pytestmark = pytest.mark.redis

ACTION = {"kind": "llm.completion", "name": "openai:gpt-4o"}
A = {"tenant": "a"}


def _outcome(result: Any, tenant: str) -> Any:
    """What a caller saw, comparable across tenants: the error type, or the result without its id and
    with the tenant's name taken out."""
    if isinstance(result, BaseException):
        return type(result).__name__
    body = result.model_dump(mode="json")
    body.pop("reservation_id", None)
    return json.loads(json.dumps(body).replace(f"tenant:{tenant}", "tenant:?"))


async def test_refusals_inside_batches_leave_no_trace(redis_server: RedisTarget) -> None:
    """A commit over its hold under REJECT, an event past the budget and a reserve that does not fit are
    refused in the middle of their batches; the operations around them see the books as if the refused
    ones never ran, and each answer carries the balances right after its own operation."""
    async with open_ledger(redis_server.url()) as led:
        await led.set_budget("tenant:a", "1usd")
        rs = [await led.reserve(A, ACTION, "0.05usd", overage_policy="REJECT") for _ in range(3)]
        ids = [str(r.reservation_id) for r in rs]
        seen = count_script_calls(led.store)
        out = await asyncio.gather(
            led.commit(ids[0], "0.04usd"),
            led.commit(ids[1], "0.2usd"),  # more than held: refused, after the batch loaded its budgets
            led.commit(ids[2], "0.05usd"),
            return_exceptions=True,
        )
        assert seen == [3]
        assert isinstance(out[1], BudgetExceededError)
        assert not isinstance(out[0], BaseException) and not isinstance(out[2], BaseException)
        assert [(b.spent, b.reserved) for b in out[0].balances] == [(4_000_000, 10_000_000)]
        assert [(b.spent, b.reserved) for b in out[2].balances] == [(9_000_000, 5_000_000)]
        assert (await led.get_reservation(ids[1])).status.value == "ACTIVE"

        seen.clear()
        events = await asyncio.gather(
            led.record_event(A, ACTION, "0.1usd", overage_policy="REJECT"),
            led.record_event(A, ACTION, "5usd", overage_policy="REJECT"),  # past the budget: refused
            led.record_event(A, ACTION, "0.1usd", overage_policy="REJECT"),
            led.record_event(A, ACTION, "5usd", overage_policy="REJECT"),  # refused last: the batch is still kept
            return_exceptions=True,
        )
        assert seen == [4]
        assert isinstance(events[1], BudgetExceededError) and isinstance(events[3], BudgetExceededError)
        assert [e.balances[0].spent for e in events if not isinstance(e, BaseException)] == [19_000_000, 29_000_000]

        seen.clear()
        held = await asyncio.gather(
            led.reserve(A, ACTION, "0.3usd"),
            led.reserve(A, ACTION, "0.5usd"),  # 0.66 left minus 0.3: does not fit, a DENY
            led.reserve(A, ACTION, "0.3usd"),
        )
        assert seen == [3]
        assert [r.decision.value for r in held] == ["ALLOW", "DENY", "ALLOW"]
        assert [r.balances[0].reserved for r in held] == [35_000_000, 35_000_000, 65_000_000]
        b = await led.balance("tenant:a")
        assert (b.spent, b.reserved, b.remaining) == (29_000_000, 65_000_000, 6_000_000)
        assert await led.verify() == []


async def _settle_twice(led: Any, rid: str) -> list[Any]:
    return list(
        await asyncio.gather(
            led.commit(rid, "0.04usd"),
            led.commit(rid, "0.04usd"),  # the same request again: a replay
            led.commit(rid, "0.03usd"),  # the same (default) key, another amount: a mismatch
            led.commit(rid, "0.04usd", idempotency_key="other"),  # another key: already committed
            return_exceptions=True,
        )
    )


async def test_settling_one_reservation_twice_in_a_batch_answers_like_separate_calls(
    redis_server: RedisTarget,
) -> None:
    """Four commits of one reservation in one batch get the answers four separate calls get."""
    async with open_ledger(redis_server.url()) as led:
        for t in ("a", "b"):
            await led.set_budget(f"tenant:{t}", "1usd")
        batched_rid = str((await led.reserve(A, ACTION, "0.05usd")).reservation_id)
        alone_rid = str((await led.reserve({"tenant": "b"}, ACTION, "0.05usd")).reservation_id)
        seen = count_script_calls(led.store)
        batched = await _settle_twice(led, batched_rid)
        assert seen == [4]
        alone = []
        for call in (
            led.commit(alone_rid, "0.04usd"),
            led.commit(alone_rid, "0.04usd"),
            led.commit(alone_rid, "0.03usd"),
            led.commit(alone_rid, "0.04usd", idempotency_key="other"),
        ):
            try:
                alone.append(await call)
            except Exception as exc:  # noqa: BLE001 - compared below
                alone.append(exc)
        assert isinstance(batched[2], IdempotencyMismatchError)
        assert isinstance(batched[3], ReservationFinalizedError)
        assert [_outcome(r, "a") for r in batched] == [_outcome(r, "b") for r in alone]
        for t in ("a", "b"):
            b = await led.balance(f"tenant:{t}")
            assert (b.spent, b.reserved) == (4_000_000, 0)
        assert await led.verify() == []


async def test_overdue_holds_are_expired_one_per_operation_across_a_batch(redis_server: RedisTarget) -> None:
    """With one expiry per operation, each reserve of a batch expires the next overdue hold: the due zset
    each one reads has the changes of the operations before it (expired holds gone, new holds added)."""
    clock = FakeClock()
    async with open_ledger(redis_server.url(sweep_per_call=1), clock=clock) as led:
        await led.set_budget("tenant:a", "1usd")
        old = [await led.reserve(A, ACTION, "0.1usd", ttl_ms=1_000 * (i + 1), grace_period_ms=0) for i in range(3)]
        clock.advance(10_000)
        seen = count_script_calls(led.store)
        new = await asyncio.gather(*(led.reserve(A, ACTION, "0.01usd", ttl_ms=60_000) for _ in range(3)))
        assert seen == [3]
        assert all(r.allowed for r in new)
        statuses = [(await led.get_reservation(str(r.reservation_id))).status.value for r in old]
        assert statuses == ["EXPIRED"] * 3
        assert [r.balances[0].reserved for r in new] == [21_000_000, 12_000_000, 3_000_000]
        assert (await led.balance("tenant:a")).reserved == 3_000_000
        assert len([e for e in await led.events(limit=1000) if e.type == "expired"]) == 3
        assert await led.verify() == []


async def test_a_reserve_that_does_not_fit_expires_overdue_holds_seeing_the_batch_so_far(
    redis_server: RedisTarget,
) -> None:
    """No expiry per operation: a reserve that does not fit expires every overdue hold and looks again;
    a later one in the same batch finds those holds gone and this batch's new ones in place."""
    clock = FakeClock()
    async with open_ledger(redis_server.url(sweep_per_call=0), clock=clock) as led:
        await led.set_budget("tenant:a", "0.3usd")
        for _ in range(2):
            await led.reserve(A, ACTION, "0.1usd", ttl_ms=1_000, grace_period_ms=0)
        await led.reserve(A, ACTION, "0.1usd", ttl_ms=3_600_000)
        clock.advance(5_000)
        seen = count_script_calls(led.store)
        out = await asyncio.gather(*(led.reserve(A, ACTION, "0.1usd", ttl_ms=60_000) for _ in range(3)))
        assert seen == [3]
        assert [r.decision.value for r in out] == ["ALLOW", "ALLOW", "DENY"]
        b = await led.balance("tenant:a")
        assert (b.reserved, b.remaining) == (30_000_000, 0)
        assert len([e for e in await led.events(limit=1000) if e.type == "expired"]) == 2
        assert await led.verify() == []


async def test_a_script_error_in_a_commit_batch_loses_none_of_the_others(redis_server: RedisTarget) -> None:
    """The second and the last of five commits fail inside the script (their records are unreadable); the
    others are applied and stay applied, before, between and after them in the batch."""
    url = redis_server.url()
    prefix = url.rsplit("prefix=", 1)[1]
    async with open_ledger(url) as led:
        await led.set_budget("tenant:a", "1usd")
        ids = [str((await led.reserve(A, ACTION, "0.05usd")).reservation_id) for _ in range(5)]
        client = redis_server.client()
        for i in (1, 4):
            client.hset(f"{prefix}:{{tenant:a}}:r", ids[i], "garbage")
        seen = count_script_calls(led.store)
        out = await asyncio.gather(*(led.commit(i, "0.04usd") for i in ids), return_exceptions=True)
        assert seen == [5]
        for i in (1, 4):
            assert isinstance(out[i], StoreUnavailableError) and "script error" in str(out[i])
        charged = [getattr(r, "charged", None) and r.charged.amount for r in out]
        assert charged == [4_000_000, None, 4_000_000, 4_000_000, None]
        for i in (0, 2, 3):
            assert (await led.get_reservation(ids[i])).status.value == "COMMITTED"
        b = await led.balance("tenant:a")
        assert (b.spent, b.reserved) == (12_000_000, 10_000_000)  # the broken ones still hold their 0.05


async def test_budget_changes_in_one_batch_apply_in_order(redis_server: RedisTarget) -> None:
    """Funding, freezing, closing and a refused funding of a closed budget, all in one tick."""
    async with open_ledger(redis_server.url()) as led:
        await led.set_budget("tenant:a", "1usd")
        store: Any = led.store

        async def registered(tag: str, *, always: bool = False) -> None:
            return None  # the tag is known: skip the round trip that would split the tick

        store._register = registered
        seen = count_script_calls(store)
        out = await asyncio.gather(
            led.fund("tenant:a", "1usd"),
            led.freeze("tenant:a"),
            led.fund("tenant:a", "2usd"),
            led.close("tenant:a"),
            led.fund("tenant:a", "4usd"),
            return_exceptions=True,
        )
        assert seen == [5]
        assert [getattr(b, "allocated", type(b).__name__) for b in out] == [
            200_000_000,
            200_000_000,
            400_000_000,
            400_000_000,
            "BudgetClosedError",
        ]
        assert [getattr(b, "status", None) for b in out[:4]] == ["ACTIVE", "FROZEN", "FROZEN", "CLOSED"]
        b = await led.balance("tenant:a")
        assert (b.allocated, b.status.value) == (400_000_000, "CLOSED")


async def test_extensions_in_one_batch_and_a_commit_after(redis_server: RedisTarget) -> None:
    """Two extensions of one hold in a batch both count; the commit after keeps them in the record."""
    clock = FakeClock()
    async with open_ledger(redis_server.url(), clock=clock) as led:
        await led.set_budget("tenant:a", "1usd")
        r = await led.reserve(A, ACTION, "0.05usd", ttl_ms=10_000)
        rid = str(r.reservation_id)
        assert r.expires_at_ms == clock.now + 10_000
        seen = count_script_calls(led.store)
        out = await asyncio.gather(led.extend(rid, 1_000), led.extend(rid, 2_000))
        assert seen == [2]
        assert [e.expires_at_ms for e in out] == [clock.now + 11_000, clock.now + 13_000]
        clock.advance(12_000)  # past the first expiry, before the extended one
        await led.commit(rid, "0.01usd")
        res = await led.get_reservation(rid)
        assert (res.status.value, res.extension_count, res.expires_at_ms) == ("COMMITTED", 2, clock.now + 1_000)
        assert res.committed is not None and res.committed.amount == 1_000_000
        assert res.finalized_at_ms == clock.now
        assert await led.verify() == []


async def test_a_sweep_writes_back_more_than_one_command_holds(redis_server: RedisTarget) -> None:
    """A sweep expiring 1,100 holds writes their records, budgets and zsets back in several commands."""
    clock = FakeClock()
    async with open_ledger(redis_server.url(sweep_per_call=0), clock=clock) as led:
        await led.set_budget("tenant:a", "100usd")
        for _ in range(11):
            await asyncio.gather(*(led.reserve(A, ACTION, "0.01usd", ttl_ms=1_000) for _ in range(100)))
        assert (await led.balance("tenant:a")).reserved == 1_100 * 1_000_000
        clock.advance(3_600_000)
        assert await led.sweep(limit=2_000) == 1_100
        assert (await led.balance("tenant:a")).reserved == 0
        assert {r.status.value for r in await led.list_reservations(limit=2_000)} == {"EXPIRED"}
        assert await led.sweep(limit=2_000) == 0
        assert await led.verify() == []


async def test_a_failed_write_back_fails_every_operation_of_the_batch(redis_server: RedisTarget) -> None:
    """When the write at the end of a script call fails (here the ids zset is not a zset), no operation of
    the batch may stand: each caller gets the error, the one refused for a reused key included."""
    url = redis_server.url()
    prefix = url.rsplit("prefix=", 1)[1]
    async with open_ledger(url) as led:
        await led.set_budget("tenant:a", "1usd")
        await led.reserve(A, ACTION, "0.01usd")  # the tenant's keys and scripts are in place
        redis_server.client().set(f"{prefix}:{{tenant:a}}:ids", "not a zset")
        seen = count_script_calls(led.store)
        out = await asyncio.gather(
            led.reserve(A, ACTION, "0.05usd", idempotency_key="k"),
            led.reserve(A, ACTION, "0.06usd", idempotency_key="k"),  # alone: a mismatch
            return_exceptions=True,
        )
        assert seen == [2]
        assert all(isinstance(r, StoreUnavailableError) and "script error" in str(r) for r in out), out
