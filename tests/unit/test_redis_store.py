"""What only the Redis store has: URLs, Redis time, per-tenant slots, retention, the 2^53 limit, batching.

The ledger semantics themselves are the conformance suite (every `db_url` test runs on Redis too).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from cycles_ledger import (
    Amount,
    ConfigError,
    InvalidRequestError,
    NotFoundError,
    open_ledger,
)
from cycles_ledger.stores import store_from_url
from tests.conftest import FakeClock, RedisTarget

pytestmark = pytest.mark.redis

ACTION = {"kind": "llm.completion", "name": "openai:gpt-4o"}


def _sync(target: RedisTarget) -> redis.Redis:
    return target.client()  # the target's host, port, db and password, not just a port on localhost


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("redis://127.0.0.1:6379/0?colour=blue", "unknown Redis URL parameters"),
        ("redis://127.0.0.1:6379/0?timeout=soon", "bad Redis URL parameter"),
        ("redis:///0", "needs a host"),
        ("redis://127.0.0.1:6379/0?prefix=a{b}", "free of braces"),
        ("redis://127.0.0.1:6379/0?event_retention=many", "bad Redis URL parameter"),
    ],
)
def test_bad_urls_are_config_errors(url: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        store_from_url(url)


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "redis" or m.startswith("redis.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis` now fails as if it were not installed
    with pytest.raises(ConfigError, match=r"cycles-litellm\[redis\]"):
        store_from_url("redis://127.0.0.1:6379/0")


async def test_time_comes_from_redis_not_the_client(redis_server: RedisTarget, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the client's clock an hour off, expiry is still Redis TIME + ttl."""
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() + 3_600 * 10**9)
    async with open_ledger(redis_server.url()) as led:
        await led.set_budget("tenant:a", "1usd")
        r = await led.reserve({"tenant": "a"}, ACTION, "0.1usd", ttl_ms=5_000)
    sec, usec = _sync(redis_server).time()
    server_ms = sec * 1000 + usec // 1000
    assert r.expires_at_ms is not None
    assert abs(r.expires_at_ms - (server_ms + 5_000)) < 2_000


async def test_one_slot_per_tenant_and_ids_name_their_tag(redis_server: RedisTarget) -> None:
    """Every key a tenant's operations write hashes to one slot (time policies' too: the periods index, the
    calendar boundaries, a rate-limited budget's spend log); reservation ids carry the tag."""
    url = redis_server.url()
    prefix = url.rsplit("prefix=", 1)[1]
    async with open_ledger(url) as led:
        for t in ("acme", "beta"):
            await led.set_budget(f"tenant:{t}", "10usd", period="monthly")
            await led.set_budget(f"tenant:{t}/workflow:w", "5usd", rate_limits=[{"amount": "4usd", "window": "1h"}])
            r = await led.reserve({"tenant": t, "workflow": "w"}, ACTION, "1usd", idempotency_key="k")
            assert r.reservation_id is not None and r.reservation_id.endswith(f"@tenant:{t}")
            await led.commit(r.reservation_id, "0.5usd")
            await led.record_event({"tenant": t}, ACTION, "0.1usd", idempotency_key="e")
    client = _sync(redis_server)
    slots: dict[str, set[int]] = {}
    for key in client.scan_iter(match=f"{prefix}:{{*"):
        tag = key.split("{", 1)[1].split("}", 1)[0]
        slots.setdefault(tag, set()).add(key_slot(key.encode()))  # the CRC16 slot Redis Cluster would use
    assert set(slots) == {"tenant:acme", "tenant:beta"}
    assert all(len(s) == 1 for s in slots.values()), slots
    kinds = {key.split("}:", 1)[1].split(":", 1)[0] for key in client.scan_iter(match=f"{prefix}:{{tenant:acme}}*")}
    assert {"pd", "pb", "w"} <= kinds, kinds
    assert slots["tenant:acme"] != slots["tenant:beta"]


async def test_same_key_in_two_tenants_is_two_requests(redis_server: RedisTarget) -> None:
    async with open_ledger(redis_server.url()) as led:
        for t in ("a", "b"):
            await led.set_budget(f"tenant:{t}", "1usd")
        ra = await led.reserve({"tenant": "a"}, ACTION, "0.2usd", idempotency_key="same")
        rb = await led.reserve({"tenant": "b"}, ACTION, "0.3usd", idempotency_key="same")
        assert ra.reservation_id != rb.reservation_id
        assert (await led.balance("tenant:b")).reserved == 30_000_000


async def test_amounts_beyond_2_pow_53_are_refused_and_change_nothing(redis_server: RedisTarget) -> None:
    async with open_ledger(redis_server.url()) as led:
        await led.set_budget("tenant:a", Amount(unit="TOKENS", amount=2**53 - 1))
        before = await led.balances()
        with pytest.raises(InvalidRequestError, match="2\\^53"):
            await led.reserve({"tenant": "a"}, ACTION, Amount(unit="TOKENS", amount=2**53))
        with pytest.raises(InvalidRequestError, match="2\\^53"):
            await led.set_budget("tenant:b", Amount(unit="TOKENS", amount=2**60))
        with pytest.raises(InvalidRequestError, match="2\\^53"):
            await led.fund("tenant:a", Amount(unit="TOKENS", amount=1))
        assert await led.balances() == before
        exact = await led.reserve({"tenant": "a"}, ACTION, Amount(unit="TOKENS", amount=2**53 - 2))
        assert exact.allowed and exact.balances[0].remaining == 1


async def test_foreign_or_malformed_reservation_ids_are_not_found(redis_server: RedisTarget) -> None:
    async with open_ledger(redis_server.url()) as led:
        await led.set_budget("tenant:a", "1usd")
        for rid in ("rsv_0190abcdef", "rsv_01a2263f13367e188d000000@tenant:a", "x@tenant:a", "rsv_\x1f@tenant:a"):
            with pytest.raises(NotFoundError):
                await led.commit(rid, "0.1usd")
            with pytest.raises(NotFoundError):
                await led.get_reservation(rid)


async def test_finalized_reservations_are_pruned_after_the_retention(redis_server: RedisTarget) -> None:
    clock = FakeClock()
    async with open_ledger(redis_server.url(), clock=clock, retention_ms=60_000) as led:
        await led.set_budget("tenant:a", "1usd")
        done = await led.reserve({"tenant": "a"}, ACTION, "0.1usd")
        live = await led.reserve({"tenant": "a"}, ACTION, "0.1usd", ttl_ms=3_600_000)
        assert done.reservation_id and live.reservation_id
        await led.commit(done.reservation_id, "0.1usd")
        clock.advance(59_000)
        await led.sweep()
        assert (await led.get_reservation(done.reservation_id)).status.value == "COMMITTED"
        clock.advance(2_000)
        await led.sweep()
        with pytest.raises(NotFoundError):
            await led.get_reservation(done.reservation_id)
        assert (await led.get_reservation(live.reservation_id)).status.value == "ACTIVE"
        assert [r.reservation_id for r in await led.list_reservations()] == [live.reservation_id]
        b = await led.balance("tenant:a")
        assert (b.spent, b.reserved) == (10_000_000, 10_000_000)  # balances never expire


async def test_idempotency_records_expire_after_the_retention(redis_server: RedisTarget) -> None:
    """Records live `retention_ms` of Redis time (a key TTL); after that the same key is a new request."""
    async with open_ledger(redis_server.url(), retention_ms=300) as led:
        await led.set_budget("tenant:a", "1usd")
        first = await led.reserve({"tenant": "a"}, ACTION, "0.1usd", idempotency_key="k")
        again = await led.reserve({"tenant": "a"}, ACTION, "0.1usd", idempotency_key="k")
        assert again.reservation_id == first.reservation_id
        await asyncio.sleep(0.5)
        later = await led.reserve({"tenant": "a"}, ACTION, "0.1usd", idempotency_key="k")
        assert later.reservation_id != first.reservation_id


async def test_event_stream_is_bounded_and_verify_still_checks_holds(redis_server: RedisTarget) -> None:
    url = redis_server.url()
    prefix = url.rsplit("prefix=", 1)[1]
    async with open_ledger(url, event_retention=50) as led:
        await led.set_budget("tenant:a", "100usd")
        for _ in range(300):
            r = await led.reserve({"tenant": "a"}, ACTION, "0.01usd")
            assert r.reservation_id
            await led.commit(r.reservation_id, "0.01usd")
        length = _sync(redis_server).xlen(f"{prefix}:{{tenant:a}}:e")
        assert length < 601 and length <= 50 + 100  # trimmed to about 50 (whole stream nodes of 100 go)
        assert await led.verify() == []
        await led.reserve({"tenant": "a"}, ACTION, "0.01usd")
        client = _sync(redis_server)
        field = "tenant:a|USD_MICROCENTS"
        text = client.hget(f"{prefix}:{{tenant:a}}:b", field)
        parts = text.split(" ")
        parts[2] = str(int(parts[2]) + 1)  # corrupt `reserved` behind the ledger's back
        client.hset(f"{prefix}:{{tenant:a}}:b", field, " ".join(parts))
        problems = await led.verify()
        assert len(problems) == 1 and "reserved" in problems[0]


async def test_concurrent_calls_share_round_trips_and_stay_exact(redis_server: RedisTarget) -> None:
    """200 concurrent reserves (pipelined per loop tick) admit exactly what the budget pays for."""
    async with open_ledger(redis_server.url()) as led:
        await led.set_budget("tenant:a", "0.5usd")
        results = await asyncio.gather(
            *(led.reserve({"tenant": "a"}, ACTION, "0.01usd") for _ in range(200)), return_exceptions=True
        )
        assert not [r for r in results if isinstance(r, BaseException)]
        allowed = [r for r in results if not isinstance(r, BaseException) and r.allowed]
        assert len(allowed) == 50
        assert len({r.reservation_id for r in allowed}) == 50
        b = await led.balance("tenant:a")
        assert (b.reserved, b.remaining) == (50_000_000, 0)
        assert await led.verify() == []


async def test_sweepers_on_many_replicas_release_each_hold_once(redis_server: RedisTarget) -> None:
    clock = FakeClock()
    url = redis_server.url()
    ledgers: list[Any] = [open_ledger(url, clock=clock) for _ in range(4)]
    try:
        await ledgers[0].set_budget("tenant:a", "1usd")
        await ledgers[0].set_budget("tenant:b", "1usd")
        for t in ("a", "b"):
            for _ in range(20):
                await ledgers[0].reserve({"tenant": t}, ACTION, "0.01usd", ttl_ms=1_000, grace_period_ms=0)
        clock.advance(5_000)
        counts = await asyncio.gather(*(led.sweep() for led in ledgers for _ in range(3)))
        assert sum(counts) == 40
        for t in ("a", "b"):
            assert (await ledgers[0].balance(f"tenant:{t}")).reserved == 0
        expired = [e for e in await ledgers[0].events(limit=1000) if e.type == "expired"]
        assert len(expired) == 40
        assert await ledgers[0].verify() == []
    finally:
        for led in ledgers:
            await led.aclose()


async def test_review_edge_cases_are_refused_before_anything_is_written(redis_server: RedisTarget) -> None:
    """Caps past 2^53, a division without headroom, and text that is not Unicode are typed errors, and text
    that is not Unicode does not take the calls batched with it down."""
    async with open_ledger(redis_server.url()) as led:
        with pytest.raises(InvalidRequestError, match=r"caps\.max_tokens"):
            await led.set_budget("tenant:a", "1usd", caps={"max_tokens": 2**53})
        await led.set_budget("tenant:a", "1usd")
        with pytest.raises(InvalidRequestError, match="amount_per_million_tokens"):
            await led.reserve(
                {"tenant": "a"}, ACTION, "2usd", soft_landing={"min_amount": 1, "amount_per_million_tokens": 2**52}
            )
        good = [await led.reserve({"tenant": "a"}, ACTION, "0.1usd") for _ in range(2)]
        bad = led.release(good[0].reservation_id or "", reason="bad\ud800")
        ok = led.release(good[1].reservation_id or "", reason="fine")
        results = await asyncio.gather(bad, ok, return_exceptions=True)
        assert isinstance(results[0], InvalidRequestError)
        assert not isinstance(results[1], BaseException) and results[1].released.amount == 10_000_000
        assert (await led.balance("tenant:a")).reserved == 10_000_000  # only the good release happened


@pytest.mark.parametrize("param", ["retention_ms=0", "event_retention=0", "sweep_per_call=-1"])
def test_retention_settings_must_be_positive(redis_server: RedisTarget, param: str) -> None:
    with pytest.raises(ConfigError, match="retention_ms >= 1"):
        store_from_url(redis_server.url() + "&" + param)


async def test_verify_after_pruning_does_not_cry_wolf(redis_server: RedisTarget) -> None:
    clock = FakeClock()
    async with open_ledger(redis_server.url(), clock=clock, retention_ms=1_000) as led:
        await led.set_budget("tenant:a", "1usd")
        r = await led.reserve({"tenant": "a"}, ACTION, "0.1usd")
        await led.commit(r.reservation_id or "", "0.07usd")
        clock.advance(5_000)
        await led.sweep()
        assert await led.verify() == []
        assert (await led.balance("tenant:a")).spent == 7_000_000
