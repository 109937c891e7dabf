"""Holds in several units in one decision (`reserve(..., also=[...])`): a call's dollars and its tokens
are held, settled, released and expired together, on every store (the conformance suite's `ledger`)."""

from __future__ import annotations

import pytest

from cycles_ledger import (
    BudgetFrozenError,
    Decision,
    IdempotencyMismatchError,
    InvalidRequestError,
    Ledger,
    ReservationStatus,
    UnitMismatchError,
)
from tests.conftest import FakeClock

SUBJ = {"tenant": "t", "agent": "a"}
ACT = {"kind": "llm.completion", "name": "gpt-4o-mini"}
TOP, AGENT = "tenant:t", "tenant:t/agent:a"


@pytest.fixture
async def led(ledger: Ledger) -> Ledger:
    await ledger.set_budget(TOP, "10usd")
    await ledger.set_budget(AGENT, "1000tokens")
    return ledger


async def fields(led: Ledger, scope: str, unit: str) -> tuple[int, int, int]:
    b = await led.balance(scope, unit)
    assert b.remaining == b.allocated - b.spent - b.reserved - b.debt
    return b.spent, b.reserved, b.debt


async def test_both_units_are_held_and_settled_together(led: Ledger) -> None:
    r = await led.reserve(SUBJ, ACT, "1usd", also=["600tokens"])
    assert r.decision is Decision.ALLOW
    assert [(a.unit.value, a.amount) for a in r.also_reserved] == [("TOKENS", 600)]
    assert {(b.scope, b.unit.value) for b in r.balances} == {(TOP, "USD_MICROCENTS"), (AGENT, "TOKENS")}
    assert await fields(led, AGENT, "TOKENS") == (0, 600, 0)
    res = await led.get_reservation(r.reservation_id or "")
    assert [a.amount for a in res.also_reserved] == [600]

    c = await led.commit(r.reservation_id or "", "0.4usd", also=["250tokens"])
    assert [(a.unit.value, a.amount) for a in c.also_charged] == [("TOKENS", 250)]
    assert await fields(led, AGENT, "TOKENS") == (250, 0, 0)
    assert await fields(led, TOP, "USD_MICROCENTS") == (40_000_000, 0, 0)
    res = await led.get_reservation(r.reservation_id or "")
    assert [a.amount for a in res.also_committed] == [250]
    committed = [e for e in await led.events(reservation_id=r.reservation_id) if e.type == "committed"]
    assert committed[0].data["also"] == {"TOKENS": 250}
    assert await led.verify() == []


async def test_a_unit_that_does_not_fit_denies_the_whole_hold(led: Ledger) -> None:
    r = await led.reserve(SUBJ, ACT, "1usd", also=["1200tokens"])
    assert r.decision is Decision.DENY
    assert (r.reason_code, r.scope, r.remaining, r.unit) == ("BUDGET_EXCEEDED", AGENT, 1000, "TOKENS")
    assert await fields(led, TOP, "USD_MICROCENTS") == (0, 0, 0)
    assert await fields(led, AGENT, "TOKENS") == (0, 0, 0)
    denied = [e for e in await led.events() if e.type == "denied"]
    assert (denied[-1].unit, denied[-1].amount, denied[-1].scope) == ("TOKENS", 1200, AGENT)
    d = await led.decide(SUBJ, ACT, "1usd", also=["1200tokens"])
    assert (d.decision, d.unit, d.scope) == (Decision.DENY, "TOKENS", AGENT)
    assert (await led.decide(SUBJ, ACT, "1usd", also=["900tokens"])).decision is Decision.ALLOW


async def test_commit_without_the_unit_charges_the_hold(led: Ledger) -> None:
    r = await led.reserve(SUBJ, ACT, "1usd", also=["300tokens"])
    await led.commit(r.reservation_id or "", "1usd")
    assert await fields(led, AGENT, "TOKENS") == (300, 0, 0)
    assert await led.verify() == []


async def test_release_and_expiry_return_every_unit(led: Ledger, clock: FakeClock) -> None:
    r1 = await led.reserve(SUBJ, ACT, "1usd", also=["300tokens"], ttl_ms=1_000, grace_period_ms=0)
    r2 = await led.reserve(SUBJ, ACT, "1usd", also=["300tokens"])
    rel = await led.release(r2.reservation_id or "")
    assert [a.amount for a in rel.also_released] == [300]
    assert await fields(led, AGENT, "TOKENS") == (0, 300, 0)
    clock.advance(5_000)
    assert await led.sweep() == 1
    assert (await led.get_reservation(r1.reservation_id or "")).status is ReservationStatus.EXPIRED
    assert await fields(led, AGENT, "TOKENS") == (0, 0, 0)
    assert await fields(led, TOP, "USD_MICROCENTS") == (0, 0, 0)
    assert await led.verify() == []


async def test_a_unit_without_any_budget_is_not_held(ledger: Ledger) -> None:
    await ledger.set_budget(TOP, "10usd")
    r = await ledger.reserve(SUBJ, ACT, "1usd", also=["300tokens"])
    assert r.decision is Decision.ALLOW and r.also_reserved == []
    c = await ledger.commit(r.reservation_id or "", "1usd", also=["999tokens"])
    assert c.also_charged == []
    assert await ledger.verify() == []


async def test_tokens_only_subject_is_budgeted_through_also(ledger: Ledger) -> None:
    """A subject with only a TOKENS budget: a dollar hold with tokens `also` is checked on the tokens;
    a dollar hold alone is still a unit mismatch."""
    await ledger.set_budget(AGENT, "1000tokens")
    r = await ledger.reserve(SUBJ, ACT, "1usd", also=["400tokens"])
    assert r.decision is Decision.ALLOW and [a.amount for a in r.also_reserved] == [400]
    with pytest.raises(UnitMismatchError):
        await ledger.reserve(SUBJ, ACT, "1usd")


async def test_idempotent_replay_and_mismatch(led: Ledger) -> None:
    a = await led.reserve(SUBJ, ACT, "1usd", also=["300tokens"], idempotency_key="k1")
    b = await led.reserve(SUBJ, ACT, "1usd", also=["300tokens"], idempotency_key="k1")
    assert a.reservation_id == b.reservation_id and b.also_reserved == a.also_reserved
    assert await fields(led, AGENT, "TOKENS") == (0, 300, 0)
    with pytest.raises(IdempotencyMismatchError):
        await led.reserve(SUBJ, ACT, "1usd", also=["301tokens"], idempotency_key="k1")
    c1 = await led.commit(a.reservation_id or "", "1usd", also=["100tokens"])
    c2 = await led.commit(a.reservation_id or "", "1usd", also=["100tokens"])
    assert c1.also_charged == c2.also_charged
    with pytest.raises(IdempotencyMismatchError):
        await led.commit(a.reservation_id or "", "1usd", also=["101tokens"])
    assert await fields(led, AGENT, "TOKENS") == (100, 0, 0)


async def test_debit_in_two_units_is_all_or_nothing(led: Ledger) -> None:
    e = await led.record_event(SUBJ, ACT, "0.5usd", also=["100tokens"])
    assert [a.amount for a in e.also_charged] == [100]
    assert await fields(led, AGENT, "TOKENS") == (100, 0, 0)
    await led.freeze(AGENT, "TOKENS")
    with pytest.raises(BudgetFrozenError):
        await led.record_event(SUBJ, ACT, "0.5usd", also=["100tokens"])
    assert await fields(led, TOP, "USD_MICROCENTS") == (50_000_000, 0, 0)
    assert await led.verify() == []


@pytest.mark.parametrize(
    "also",
    [["1usd"], ["5tokens", "6tokens"], "100tokens", [-5], ["1.5tokens"], ["10parsecs"]],
)
async def test_bad_also_is_a_typed_error_and_changes_nothing(led: Ledger, also: object) -> None:
    with pytest.raises(InvalidRequestError):
        await led.reserve(SUBJ, ACT, "1usd", also=also)  # type: ignore[arg-type]
    assert await fields(led, AGENT, "TOKENS") == (0, 0, 0)
    assert await fields(led, TOP, "USD_MICROCENTS") == (0, 0, 0)
