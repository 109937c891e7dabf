"""Budgets that know about time (issue 14): periods that reset, burn-rate limits that throttle or freeze,
alert thresholds once per period, debt events, on every store's clock."""

from __future__ import annotations

import random

import pytest

from cycles_ledger import Decision, InvalidRequestError, Ledger, RateLimit, ReservationStatus
from tests.conftest import FakeClock

SUBJ = {"tenant": "t", "agent": "a"}
ACT = {"kind": "tool.search", "name": "web"}
TOP = "tenant:t"
MIN = 60_000
DAY = 86_400_000
E = 1_000_000  # one cent in microcents


@pytest.fixture(autouse=True)
def _store_keeps_time(request: pytest.FixtureRequest) -> None:
    if "ledger" in request.fixturenames and not request.getfixturevalue("ledger").store.time_policies:
        pytest.skip("this store does not keep periods, rate limits and alerts yet")


def types(events: list[object]) -> list[str]:
    return [e.type for e in events]  # type: ignore[attr-defined]


async def test_daily_period_resets_spent_once_and_keeps_holds_and_debt(ledger: Ledger, clock: FakeClock) -> None:
    b = await ledger.set_budget(TOP, "1usd", period="daily", overdraft_limit="1usd")
    assert b.period == {"every": "daily", "tz": "UTC"}
    assert b.period_start_ms is not None and b.period_end_ms is not None
    assert b.period_start_ms <= clock.now < b.period_end_ms and b.period_end_ms - b.period_start_ms == DAY
    r = await ledger.reserve(SUBJ, ACT, "0.6usd")
    await ledger.commit(r.reservation_id or "", "0.6usd")
    held = await ledger.reserve(SUBJ, ACT, "0.3usd", ttl_ms=DAY)
    assert not (await ledger.reserve(SUBJ, ACT, "0.2usd")).allowed

    clock.now = b.period_end_ms + 5  # the next day
    shown = await ledger.balance(TOP)  # a read already shows the new period
    assert (shown.spent, shown.reserved, shown.period_start_ms) == (0, 30 * E, b.period_end_ms)
    r2 = await ledger.reserve(SUBJ, ACT, "0.5usd")
    assert r2.allowed
    await ledger.commit(r2.reservation_id or "", "0.5usd")
    resets = [e for e in await ledger.events() if e.type == "period_reset"]
    assert len(resets) == 1, "exactly one reset per period, however many writes follow"
    assert resets[0].data["spent"] == 60 * E and resets[0].data["period_end_ms"] == b.period_end_ms
    bal = await ledger.balance(TOP)
    assert (bal.spent, bal.reserved) == (50 * E, 30 * E)  # the old hold kept its amount
    await ledger.commit(held.reservation_id or "", "0.3usd")
    assert await ledger.verify() == []


async def test_debt_carries_over_a_period_and_still_blocks(ledger: Ledger, clock: FakeClock) -> None:
    b = await ledger.set_budget(TOP, "1usd", period={"every": "1h"}, overdraft_limit="1usd")
    r = await ledger.reserve(SUBJ, ACT, "1usd", overage_policy="ALLOW_WITH_OVERDRAFT")
    await ledger.commit(r.reservation_id or "", "1.4usd")
    assert (await ledger.balance(TOP)).debt == 40 * E
    debt = [e for e in await ledger.events() if e.type == "debt"]
    assert debt and debt[0].amount == 40 * E
    clock.now = (b.period_end_ms or 0) + 1
    after = await ledger.reserve(SUBJ, ACT, "0.1usd")
    assert (after.decision, after.reason_code) == (Decision.DENY, "DEBT_OUTSTANDING")
    bal = await ledger.balance(TOP)
    assert (bal.spent, bal.debt) == (0, 40 * E)
    await ledger.fund(TOP, "0.4usd")
    assert (await ledger.reserve(SUBJ, ACT, "0.1usd")).allowed
    assert await ledger.verify() == []


async def test_the_sweeper_rolls_periods_nobody_touches(ledger: Ledger, clock: FakeClock) -> None:
    b = await ledger.set_budget(TOP, "1usd", period={"every": "10m"})
    r = await ledger.reserve(SUBJ, ACT, "0.2usd")
    await ledger.commit(r.reservation_id or "", "0.2usd")
    clock.now = (b.period_end_ms or 0) + 1
    await ledger.sweep()
    await ledger.sweep()
    assert types(await ledger.events()).count("period_reset") == 1
    assert (await ledger.balance(TOP)).spent == 0


async def test_burn_rate_throttle_denies_until_the_window_has_room(ledger: Ledger, clock: FakeClock) -> None:
    await ledger.set_budget(TOP, "100usd", rate_limits=[{"amount": "0.05usd", "window": "10m"}])
    first = await ledger.reserve(SUBJ, ACT, "0.02usd")
    t0 = clock.now
    clock.advance(MIN)
    await ledger.commit(first.reservation_id or "", "0.01usd")  # the window counts what was charged
    second = await ledger.reserve(SUBJ, ACT, "0.02usd")
    await ledger.commit(second.reservation_id or "", "0.02usd")
    clock.advance(MIN)
    released = await ledger.reserve(SUBJ, ACT, "0.02usd")
    await ledger.release(released.reservation_id or "")  # a returned hold no longer counts
    third = await ledger.reserve(SUBJ, ACT, "0.02usd", ttl_ms=DAY)  # a live hold counts
    assert third.allowed
    clock.advance(MIN)
    denied = await ledger.reserve(SUBJ, ACT, "0.02usd")
    assert (denied.decision, denied.reason_code, denied.scope, denied.remaining) == (
        Decision.DENY,
        "RATE_EXCEEDED",
        TOP,
        0,
    )
    # 5 cents in the window and 2 more asked: room once 2 cents have left it, i.e. after the first (1 cent,
    # at t0) and the second (2 cents, at t0 + 1 min) entries.
    assert denied.retry_after_ms == t0 + MIN + 10 * MIN - clock.now
    clock.advance((denied.retry_after_ms or 0) - 1)
    assert not (await ledger.reserve(SUBJ, ACT, "0.02usd")).allowed
    clock.advance(1)
    assert (await ledger.reserve(SUBJ, ACT, "0.02usd")).allowed
    bal = (await ledger.balances(TOP))[0]
    assert bal.burn == [4 * E]
    too_big = await ledger.reserve(SUBJ, ACT, "0.06usd")
    assert (too_big.reason_code, too_big.retry_after_ms) == ("RATE_EXCEEDED", None)
    assert (await ledger.balance(TOP)).status.value == "ACTIVE"


async def test_burn_rate_freeze_is_a_circuit_breaker(ledger: Ledger, clock: FakeClock) -> None:
    await ledger.set_budget(TOP, "100usd", rate_limits=[{"amount": "0.05usd", "window": "1m", "on_exceed": "freeze"}])
    shadow = await ledger.reserve(SUBJ, ACT, "0.06usd", dry_run=True)
    assert shadow.reason_code == "RATE_EXCEEDED"
    assert (await ledger.balance(TOP)).status.value == "ACTIVE", "shadow evaluates, never freezes"
    for _ in range(2):
        r = await ledger.reserve(SUBJ, ACT, "0.02usd")
        await ledger.commit(r.reservation_id or "", "0.02usd")
    tripped = await ledger.reserve(SUBJ, ACT, "0.02usd")
    assert tripped.reason_code == "RATE_EXCEEDED"
    assert (await ledger.balance(TOP)).status.value == "FROZEN"
    frozen = [e for e in await ledger.events() if e.type == "frozen"]
    assert frozen and frozen[-1].reason_code == "RATE_EXCEEDED"
    clock.advance(10 * MIN)  # the window is empty again, yet the breaker stays open
    assert (await ledger.reserve(SUBJ, ACT, "0.01usd")).reason_code == "BUDGET_FROZEN"
    await ledger.unfreeze(TOP)
    assert (await ledger.reserve(SUBJ, ACT, "0.01usd")).allowed


async def test_debits_count_in_the_window(ledger: Ledger, clock: FakeClock) -> None:
    await ledger.set_budget(TOP, "100usd", rate_limits=[{"amount": "0.05usd", "window": "1m"}])
    await ledger.record_event(SUBJ, ACT, "0.04usd")
    assert (await ledger.reserve(SUBJ, ACT, "0.02usd")).reason_code == "RATE_EXCEEDED"
    clock.advance(MIN + 1)
    assert (await ledger.reserve(SUBJ, ACT, "0.02usd")).allowed


async def test_rate_limit_is_exact_under_a_random_schedule(ledger: Ledger, clock: FakeClock) -> None:
    """Whatever the schedule, no 10-minute window ever holds more than the limit."""
    limit, window = 10 * E, 10 * MIN
    await ledger.set_budget(TOP, "1000usd", rate_limits=[{"amount": limit, "window_ms": window}])
    rng = random.Random(7)
    admitted: list[tuple[int, int]] = []
    for _ in range(150):
        clock.advance(rng.randrange(0, 40_000))
        amount = rng.randrange(1, 4) * E
        r = await ledger.reserve(SUBJ, ACT, f"{amount}microcents")
        if r.allowed:
            admitted.append((clock.now, amount))
            await ledger.commit(r.reservation_id or "", f"{amount}microcents")
    for t, _ in admitted:
        inside = sum(a for ts, a in admitted if t - window < ts <= t)
        assert inside <= limit
    assert len(admitted) > 20  # it throttled, it did not stop


async def test_alert_thresholds_fire_once_per_period(ledger: Ledger, clock: FakeClock) -> None:
    b = await ledger.set_budget(TOP, "1usd", period={"every": "1h"}, alerts=["50%", 80, 100])
    assert b.alerts == [50, 80, 100]
    for hold, actual in ((30, 30), (25, 25), (10, 10), (10, 10), (25, 30)):  # 30, 55, 65, 75, then 100 (over)
        r = await ledger.reserve(SUBJ, ACT, f"0.{hold:02d}usd")
        await ledger.commit(r.reservation_id or "", f"0.{actual:02d}usd")
    crossed = [e.data["threshold"] for e in await ledger.events() if e.type == "threshold_crossed"]
    assert crossed == [50, 80, 100]
    clock.now = (b.period_end_ms or 0) + 1
    r = await ledger.reserve(SUBJ, ACT, "0.6usd")
    await ledger.commit(r.reservation_id or "", "0.6usd")
    crossed = [e.data["threshold"] for e in await ledger.events() if e.type == "threshold_crossed"]
    assert crossed == [50, 80, 100, 50]
    assert await ledger.verify() == []


def burn_alerts(events: list[object]) -> list[dict[str, object]]:
    return [e.data for e in events if e.type == "threshold_crossed" and e.data.get("kind") == "burn_rate"]  # type: ignore[attr-defined]


async def test_burn_rate_alert_fires_once_per_window_and_again_after_it(ledger: Ledger, clock: FakeClock) -> None:
    b = await ledger.set_budget(
        TOP, "100usd", rate_limits=[{"amount": "0.05usd", "window": "10m", "on_exceed": "freeze", "alert_at": "80%"}]
    )
    assert b.rate_limits and b.rate_limits[0].alert_at == 80
    for amount in ("0.02usd", "0.02usd", "0.01usd"):  # 2, 4 (80%: fires), 5 cents
        assert (await ledger.reserve(SUBJ, ACT, amount)).allowed
    fired = [e for e in await ledger.events() if e.type == "threshold_crossed"]
    assert [e.data for e in fired] == [
        {"kind": "burn_rate", "threshold": 80, "window_ms": 10 * MIN, "limit": 5 * E, "used": 4 * E}
    ]
    assert fired[0].amount == 4 * E and fired[0].scope == TOP and fired[0].reservation_id
    clock.advance(10 * MIN)  # the window has emptied and a window length has passed since it fired
    for _ in range(2):
        await ledger.record_event(SUBJ, ACT, "0.02usd")  # debits count and fire too
    assert [d["used"] for d in burn_alerts(await ledger.events())] == [4 * E, 4 * E]
    assert (await ledger.balance(TOP)).status.value == "ACTIVE"  # an alert is not a denial
    assert await ledger.verify() == []


async def test_burn_rate_alert_never_fires_on_a_denied_reserve(ledger: Ledger, clock: FakeClock) -> None:
    await ledger.set_budget(TOP, "100usd", rate_limits=[RateLimit(amount=5 * E, window_ms=MIN, alert_at=90)])
    assert (await ledger.reserve(SUBJ, ACT, "0.04usd")).allowed  # 80%: below the alert
    denied = await ledger.reserve(SUBJ, ACT, "0.02usd")  # would be 120%: denied, holds nothing
    assert denied.reason_code == "RATE_EXCEEDED"
    assert burn_alerts(await ledger.events()) == []
    assert (await ledger.reserve(SUBJ, ACT, "0.01usd")).allowed  # 100%
    assert [d["used"] for d in burn_alerts(await ledger.events())] == [5 * E]


async def test_burn_rate_alert_in_shadow_fires_from_the_recorded_debit(ledger: Ledger, clock: FakeClock) -> None:
    await ledger.set_budget(TOP, "100usd", rate_limits=[{"amount": "0.05usd", "window": "1m", "alert_at": 50}])
    would = await ledger.reserve(SUBJ, ACT, "0.04usd", dry_run=True)
    assert would.allowed and burn_alerts(await ledger.events()) == [], "a dry run holds nothing, so fires nothing"
    await ledger.record_event(SUBJ, ACT, "0.04usd", overage_policy="RECORD_ALL")  # what shadow mode records
    assert [d["used"] for d in burn_alerts(await ledger.events())] == [4 * E]


async def test_changed_rate_limits_rearm_their_alerts(ledger: Ledger, clock: FakeClock) -> None:
    await ledger.set_budget(TOP, "100usd", rate_limits=[{"amount": "0.05usd", "window": "1h", "alert_at": 50}])
    await ledger.record_event(SUBJ, ACT, "0.03usd")
    await ledger.set_budget(TOP, "100usd", rate_limits=[{"amount": "0.05usd", "window": "1h", "alert_at": 50}])
    await ledger.record_event(SUBJ, ACT, "0.001usd")
    assert len(burn_alerts(await ledger.events())) == 1, "the same limits set again keep when they fired"
    await ledger.set_budget(TOP, "100usd", rate_limits=[{"amount": "0.05usd", "window": "1h", "alert_at": 60}])
    await ledger.record_event(SUBJ, ACT, "0.001usd")
    assert [d["threshold"] for d in burn_alerts(await ledger.events())] == [50, 60]


async def test_expired_holds_leave_the_window(ledger: Ledger, clock: FakeClock) -> None:
    await ledger.set_budget(TOP, "100usd", rate_limits=[{"amount": "0.05usd", "window": "10m"}])
    r = await ledger.reserve(SUBJ, ACT, "0.05usd", ttl_ms=1_000, grace_period_ms=0)
    clock.advance(2_000)
    assert (await ledger.reserve(SUBJ, ACT, "0.05usd")).allowed  # the crashed caller's hold expired
    assert (await ledger.get_reservation(r.reservation_id or "")).status is ReservationStatus.EXPIRED


@pytest.mark.parametrize(
    "kwargs",
    [
        {"period": {"every": "daily", "tz": "Mars/Olympus"}},
        {"period": "fortnightly"},
        {"period": {"every": "0d"}},
        {"rate_limits": [{"amount": "5usd"}]},
        {"rate_limits": [{"amount": "5usd", "window": "10 parsecs"}]},
        {"rate_limits": [{"amount": "500tokens", "window": "1m"}]},
        {"rate_limits": [{"amount": "5usd", "window": "1m", "on_exceed": "explode"}]},
        {"rate_limits": [{"amount": "5usd", "window": "100d"}]},
        {"rate_limits": [{"amount": "5usd", "window": "1m", "alert_at": 0}]},
        {"rate_limits": [{"amount": "5usd", "window": "1m", "alert_at": "101%"}]},
        {"rate_limits": [{"amount": "5usd", "window": "1m", "alert_at": "most"}]},
        {"rate_limits": [{"amount": "5usd", "window": "1m", "alert_at": True}]},
        {"alerts": [0]},
        {"alerts": ["eighty"]},
        {"alerts": "80%"},
    ],
)
async def test_bad_time_settings_are_typed_errors_and_change_nothing(ledger: Ledger, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError):
        await ledger.set_budget(TOP, "1usd", **kwargs)  # type: ignore[arg-type]
    assert await ledger.balances() == []


async def test_a_store_without_time_policies_refuses_them_clearly() -> None:
    """Every store here keeps them; a store class that does not (a third-party one, say) gets a clear refusal
    from the Ledger, and nothing is written."""
    from cycles_ledger import ConfigError, Ledger
    from cycles_ledger.stores.memory import MemoryStore

    class Untimed(MemoryStore):
        time_policies = False

    led = Ledger(Untimed())
    for kwargs in ({"period": "daily"}, {"rate_limits": [{"amount": "1usd", "window": "1m"}]}, {"alerts": [50]}):
        with pytest.raises(ConfigError, match="does not keep"):
            await led.set_budget(TOP, "1usd", **kwargs)  # type: ignore[arg-type]
    assert await led.balances() == []
    await led.set_budget(TOP, "1usd")  # a plain budget is fine
    await led.aclose()


def test_redis_time_texts_written_before_burn_rate_alerts_still_read() -> None:
    """The Redis store reads a budget's time text with or without the burn-rate alert part, and alert_at."""
    from cycles_ledger.stores import redis_format as fmt

    field = "tenant:t|USD_MICROCENTS"
    old = fmt.balance(field, "100 0 0 0 0 0 ACTIVE ~;;;5:60000:t;;;1000:5")
    new = fmt.balance(field, "100 0 0 0 0 0 ACTIVE ~;;;5:60000:t:80,9:1000:f;;;1000,;1000:5:0")
    assert old["rate_limits"] == [{"amount": 5, "window_ms": 60000, "on_exceed": "throttle"}]
    assert new["rate_limits"] == [
        {"amount": 5, "window_ms": 60000, "on_exceed": "throttle", "alert_at": 80},
        {"amount": 9, "window_ms": 1000, "on_exceed": "freeze"},
    ]
    assert fmt.limits_text(new["rate_limits"]) == "5:60000:t:80,9:1000:f"
