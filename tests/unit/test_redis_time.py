"""What only the Redis store does for time policies: calendar boundaries the client computes and stores, a
spend log per rate-limited budget with its sums kept in the budget, the notifier's compare-and-set, and
resets and windows exact under concurrent clients.

The rules themselves are checked against the Python engine by the rule vectors
(tests/integration/test_rule_vectors.py) and tests/unit/test_time_budgets.py runs on Redis too.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cycles_ledger import Ledger, StoreUnavailableError, open_ledger
from cycles_ledger.stores.redis import RedisStore, calendar_bounds
from cycles_ledger.timing import period_bounds
from tests.conftest import FakeClock, RedisTarget

pytestmark = pytest.mark.redis

SUBJ = {"tenant": "t", "agent": "a"}
ACT = {"kind": "tool.search", "name": "web"}
DAY = 86_400_000
E = 1_000_000  # one cent in microcents
PARIS = {"every": "daily", "tz": "Europe/Paris"}


def _keys(led: Ledger) -> tuple[Any, list[str]]:
    store = led.store
    assert isinstance(store, RedisStore)
    return store, store._keys("tenant:t")


async def test_calendar_boundaries_are_stored_months_ahead_and_fetched_again_past_them(
    redis_server: RedisTarget, clock: FakeClock
) -> None:
    """A daily period in Paris keeps ~120 boundaries in the tenant's hash; a write a year later (no sweep in
    between) has the script ask for new ones and rolls the period over once, to the day around now."""
    async with open_ledger(redis_server.url(), clock=clock) as led:
        await led.set_budget("tenant:t", "1usd", period="daily")
        await led.set_budget("tenant:t/agent:a", "1usd", period=PARIS)
        store, keys = _keys(led)
        stored = await store._client.hgetall(keys[7])
        assert set(stored) == {"daily:UTC", "daily:Europe/Paris"}
        paris = [int(b) for b in stored["daily:Europe/Paris"].split(",")]
        assert paris == calendar_bounds(PARIS, clock.now) and sum(b > clock.now for b in paris) == 120
        r = await led.reserve(SUBJ, ACT, "0.3usd")
        await led.commit(r.reservation_id or "", "0.3usd")

        clock.advance(365 * DAY + 5)
        r = await led.reserve(SUBJ, ACT, "0.2usd")
        assert r.allowed
        resets = [e for e in await led.events() if e.type == "period_reset"]
        assert [(e.scope, e.amount) for e in resets] == [("tenant:t", 30 * E), ("tenant:t/agent:a", 30 * E)]
        for scope, spec in (("tenant:t", {"every": "daily", "tz": "UTC"}), ("tenant:t/agent:a", PARIS)):
            bal = await led.balance(scope)
            assert (bal.period_start_ms, bal.period_end_ms) == period_bounds(spec, clock.now)
            assert (bal.spent, bal.reserved) == (0, 20 * E)
        paris = [int(b) for b in (await store._client.hget(keys[7], "daily:Europe/Paris")).split(",")]
        assert paris[0] < clock.now < paris[-1]
        assert await led.verify() == []


async def test_a_client_whose_clock_is_far_from_the_server_cannot_roll_calendar_periods(
    redis_server: RedisTarget, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Boundaries computed around a clock months behind Redis's never reach its now: unavailable, said so."""
    async with open_ledger(redis_server.url(), clock=clock) as led:
        await led.set_budget("tenant:t", "1usd", period=PARIS)
        store, _ = _keys(led)
        clock.advance(300 * DAY)
        monkeypatch.setattr(store, "_now_ms", lambda: clock.now - 300 * DAY)
        with pytest.raises(StoreUnavailableError, match="clocks of this host and the server"):
            await led.reserve(SUBJ, ACT, "0.1usd")
        assert [e.type for e in await led.events()] == ["budget_set"]


async def test_the_spend_log_keeps_one_entry_per_hold_or_charge_inside_the_longest_window(
    redis_server: RedisTarget, clock: FakeClock
) -> None:
    """Memory per rate-limited budget: one zset entry per hold or debit of the last (longest) window; the sums
    the budget keeps are what the log holds."""
    async with open_ledger(redis_server.url(), clock=clock) as led:
        limits = [{"amount": "10usd", "window": "1m"}, {"amount": "50usd", "window": "10m"}]
        await led.set_budget("tenant:t", "1000usd", rate_limits=limits)
        store, keys = _keys(led)
        log = keys[0][:-1] + "w:tenant:t|USD_MICROCENTS"
        for i in range(40):
            r = await led.reserve(SUBJ, ACT, "0.1usd")
            if i % 3:
                await led.commit(r.reservation_id or "", "0.05usd")
            else:
                await led.release(r.reservation_id or "")
            await led.record_event(SUBJ, ACT, "0.01usd")
            clock.advance(30_000)  # 40 x 30 s = 20 min: the first half has left the 10-minute window
        entries = await store._client.zrange(log, 0, -1, withscores=True)
        assert all(ts > clock.now - 30_000 - 600_000 for _, ts in entries)  # pruned at the last add
        # the last 20 rounds (10 minutes): a debit each, and the holds not released
        assert len(entries) == 20 + sum(1 for i in range(20, 40) if i % 3)
        text = await store._client.hget(keys[0], "tenant:t|USD_MICROCENTS")
        as_of, *sums = (int(n) for n in text.split("~", 1)[1].split(" ")[0].rsplit(";", 1)[1].split(":"))
        for window, kept in zip((60_000, 600_000), sums, strict=True):
            assert kept == sum(int(m.split()[1]) for m, ts in entries if ts > as_of - window)
        [bal] = await led.balances("tenant:t")
        assert bal.burn == [
            sum(int(m.split()[1]) for m, ts in entries if ts > clock.now - w) for w in (60_000, 600_000)
        ]


async def test_the_period_resets_once_with_many_clients_racing_the_boundary(
    redis_server: RedisTarget, clock: FakeClock
) -> None:
    """Four clients x 20 tasks write at the first instant of a new period: one period_reset."""
    url = redis_server.url()
    async with open_ledger(url, clock=clock) as admin:
        b = await admin.set_budget("tenant:t", "100usd", period={"every": "1h"})
        r = await admin.reserve(SUBJ, ACT, "1usd")
        await admin.commit(r.reservation_id or "", "1usd")
        clock.now = b.period_end_ms or 0
        clients = [open_ledger(url, clock=clock) for _ in range(4)]
        try:
            leds = [await c.__aenter__() for c in clients]
            results = await asyncio.gather(
                *(led.reserve(SUBJ, ACT, "0.5usd") if i % 2 else led.record_event(SUBJ, ACT, "0.1usd")
                  for led in leds for i in range(20))
            )  # fmt: skip
        finally:
            for c in clients:
                await c.__aexit__(None, None, None)
        assert len(results) == 80
        resets = [e for e in await admin.events(limit=1000) if e.type == "period_reset"]
        assert len(resets) == 1 and resets[0].amount == 100 * E
        bal = await admin.balance("tenant:t")
        assert (bal.spent, bal.reserved, bal.period_start_ms) == (40 * 10 * E, 40 * 50 * E, b.period_end_ms)
        assert await admin.verify() == []


async def test_a_rate_limit_is_exact_under_concurrent_clients(redis_server: RedisTarget, clock: FakeClock) -> None:
    """Four clients x 30 tasks reserve at once against a 10-cent window: exactly 10 one-cent holds pass; a
    second later (still inside the window) none does, and each denial says when the window has room."""
    url = redis_server.url()
    async with open_ledger(url, clock=clock) as admin:
        await admin.set_budget("tenant:t", "100usd", rate_limits=[{"amount": "0.1usd", "window": "1m"}])
        clients = [open_ledger(url, clock=clock) for _ in range(4)]
        try:
            leds = [await c.__aenter__() for c in clients]
            first = await asyncio.gather(*(led.reserve(SUBJ, ACT, "0.01usd") for led in leds for _ in range(30)))
            clock.advance(1_000)
            later = await asyncio.gather(*(led.reserve(SUBJ, ACT, "0.01usd") for led in leds for _ in range(5)))
        finally:
            for c in clients:
                await c.__aexit__(None, None, None)
        assert sum(r.allowed for r in first) == 10
        assert not any(r.allowed for r in later)
        assert {(r.reason_code, r.retry_after_ms) for r in later} == {("RATE_EXCEEDED", 59_000)}
        [bal] = await admin.balances("tenant:t")
        assert bal.burn == [10 * E]


async def test_notifier_state_is_compare_and_set(redis_server: RedisTarget) -> None:
    """Forty tasks race to take one record from the same expected value: exactly one wins; records list by
    prefix and are deleted by compare-and-set too."""
    async with open_ledger(redis_server.url()) as led:
        store, _ = _keys(led)
        assert await store.state_put("n:lease", "a", None)
        wins = await asyncio.gather(*(store.state_put("n:lease", f"t{i}", "a") for i in range(40)))
        assert sum(wins) == 1
        winner = await store.state_get("n:lease")
        assert winner == f"t{wins.index(True)}"
        assert not await store.state_put("n:lease", None, "a")
        await store.state_put("n:dead:2", "x", None)
        await store.state_put("n:dead:1", "y", None)
        assert await store.state_list("n:dead:") == {"n:dead:1": "y", "n:dead:2": "x"}
        assert await store.state_put("n:lease", None, winner)
        assert await store.state_get("n:lease") is None
