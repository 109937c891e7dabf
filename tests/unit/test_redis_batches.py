"""Redis store batches: concurrent calls of one tenant and operation run as one script call, in order,
each operation as if alone; a refusal or a script error reaches only the caller it belongs to."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cycles_ledger import (
    IdempotencyMismatchError,
    NotFoundError,
    ReservationFinalizedError,
    StoreUnavailableError,
    open_ledger,
)
from tests.conftest import RedisTarget
from tests.support.script_calls import count_script_calls

pytestmark = pytest.mark.redis

ACTION = {"kind": "llm.completion", "name": "openai:gpt-4o"}


async def test_a_tick_of_commits_is_one_script_call_and_each_refusal_stays_with_its_caller(
    redis_server: RedisTarget,
) -> None:
    """Ten commits in one tick, one of them for a finalized reservation and one for an unknown one, are one
    script call; the two callers get their own errors and the other eight are charged."""
    async with open_ledger(redis_server.url()) as led:
        await led.set_budget("tenant:a", "1usd")
        rs = [await led.reserve({"tenant": "a"}, ACTION, "0.05usd") for _ in range(9)]
        ids = [str(r.reservation_id) for r in rs]
        await led.release(ids[0])
        seen = count_script_calls(led.store)
        unknown = "rsv_" + "0" * 26 + "@tenant:a"
        results = await asyncio.gather(*(led.commit(i, "0.04usd") for i in [*ids, unknown]), return_exceptions=True)
        assert seen == [10]
        assert isinstance(results[0], ReservationFinalizedError)
        assert isinstance(results[9], NotFoundError)
        assert [getattr(c, "charged", None) and c.charged.amount for c in results[1:9]] == [4_000_000] * 8
        b = await led.balance("tenant:a")
        assert (b.spent, b.reserved) == (32_000_000, 0)
        assert await led.verify() == []


async def test_same_key_twice_in_one_batch_is_one_reservation(redis_server: RedisTarget) -> None:
    """Two reserves with one idempotency key in one batch: the second replays the first; a different
    payload under that key in the same batch is a mismatch for its caller only."""
    async with open_ledger(redis_server.url()) as led:
        await led.set_budget("tenant:a", "1usd")
        seen = count_script_calls(led.store)
        a, b, c, d = await asyncio.gather(
            led.reserve({"tenant": "a"}, ACTION, "0.1usd", idempotency_key="k"),
            led.reserve({"tenant": "a"}, ACTION, "0.1usd", idempotency_key="k"),
            led.reserve({"tenant": "a"}, ACTION, "0.2usd", idempotency_key="k"),
            led.reserve({"tenant": "a"}, ACTION, "0.1usd", idempotency_key="other"),
            return_exceptions=True,
        )
        assert seen == [4]
        assert not isinstance(a, BaseException) and not isinstance(b, BaseException)
        assert a.reservation_id == b.reservation_id
        assert isinstance(c, IdempotencyMismatchError)
        assert not isinstance(d, BaseException) and d.reservation_id != a.reservation_id
        assert (await led.balance("tenant:a")).reserved == 20_000_000


async def test_tenants_and_operations_split_a_tick_into_script_calls(redis_server: RedisTarget) -> None:
    """One tick with reserves on two tenants and commits on one: three script calls, every answer right."""
    async with open_ledger(redis_server.url()) as led:
        for t in ("a", "b"):
            await led.set_budget(f"tenant:{t}", "1usd")
        held = [await led.reserve({"tenant": "a"}, ACTION, "0.1usd") for _ in range(2)]
        seen = count_script_calls(led.store)
        out = await asyncio.gather(
            led.reserve({"tenant": "a"}, ACTION, "0.1usd"),
            led.reserve({"tenant": "b"}, ACTION, "0.2usd"),
            *(led.commit(str(r.reservation_id), "0.05usd") for r in held),
            led.reserve({"tenant": "b"}, ACTION, "0.2usd"),
        )
        assert sorted(seen) == [1, 2, 2]
        assert [b.reserved for b in await led.balances()] == [10_000_000, 40_000_000]
        assert (await led.balance("tenant:a")).spent == 10_000_000
        assert out[1].reservation_id is not None and str(out[1].reservation_id).endswith("@tenant:b")
        assert await led.verify() == []


async def test_a_script_error_reaches_only_its_caller(redis_server: RedisTarget) -> None:
    """An operation that makes the script fail (a field it cannot read) is "unavailable" for its caller;
    the operations batched with it are applied and answered."""
    async with open_ledger(redis_server.url()) as led:
        await led.set_budget("tenant:a", "1usd")
        store: Any = led.store
        real = store._call

        async def corrupt(op: tuple[str, ...]) -> Any:
            if op[4] == "boom":  # the idempotency key: make the estimate field unreadable
                fields = op[5].split("\x1f")
                fields[3] = "not-a-number"
                op = (*op[:5], "\x1f".join(fields), op[6])
            return await real(op)

        store._call = corrupt
        seen = count_script_calls(store)
        out = await asyncio.gather(
            led.reserve({"tenant": "a"}, ACTION, "0.1usd", idempotency_key="x"),
            led.reserve({"tenant": "a"}, ACTION, "0.1usd", idempotency_key="boom"),
            led.reserve({"tenant": "a"}, ACTION, "0.1usd", idempotency_key="y"),
            return_exceptions=True,
        )
        assert seen == [3]
        assert isinstance(out[1], StoreUnavailableError) and "script error" in str(out[1])
        assert not isinstance(out[0], BaseException) and out[0].allowed
        assert not isinstance(out[2], BaseException) and out[2].allowed
        assert (await led.balance("tenant:a")).reserved == 20_000_000
        assert await led.verify() == []


def test_the_store_runs_on_uvloop(redis_server: RedisTarget) -> None:
    """Under uvloop (uvicorn's loop, so the LiteLLM proxy's) the store's own connection works the same."""
    uvloop = pytest.importorskip("uvloop")

    async def pairs() -> int:
        async with open_ledger(redis_server.url()) as led:
            await led.set_budget("tenant:a", "1usd")
            rs = await asyncio.gather(*(led.reserve({"tenant": "a"}, ACTION, "0.1usd") for _ in range(3)))
            await asyncio.gather(*(led.commit(str(r.reservation_id), "0.05usd") for r in rs))
            return (await led.balance("tenant:a")).spent

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(pairs()) == 15_000_000


async def test_a_batch_after_script_flush_loads_the_script_and_runs_once(redis_server: RedisTarget) -> None:
    """Scripts flushed under a connected store: the next batch answers NOSCRIPT, is loaded and run once."""
    async with open_ledger(redis_server.url()) as led:
        await led.set_budget("tenant:a", "1usd")
        await led.reserve({"tenant": "a"}, ACTION, "0.1usd")  # connected, reserve script loaded
        with redis_server.client() as sync:
            sync.script_flush()
        rs = await asyncio.gather(
            *(led.reserve({"tenant": "a"}, ACTION, "0.1usd", idempotency_key=f"k{i}") for i in range(4))
        )
        assert all(r.allowed for r in rs) and len({r.reservation_id for r in rs}) == 4
        assert (await led.balance("tenant:a")).reserved == 50_000_000
        assert await led.verify() == []
