"""`rules.py` on its own: every rule as a pure function, tested without a store (the stores' conformance
suite and the Redis rule vectors test the same rules once more, through the operations)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cycles_ledger import rules
from cycles_ledger.errors import (
    BudgetClosedError,
    BudgetExceededError,
    BudgetFrozenError,
    IdempotencyMismatchError,
    MaxExtensionsExceededError,
    OverdraftLimitExceededError,
    ReservationExpiredError,
    ReservationFinalizedError,
    UnitMismatchError,
)
from cycles_ledger.models import Decision, OveragePolicy, SoftLanding
from cycles_ledger.rules import BudgetState, ReservationState

USD, TOK = "USD_MICROCENTS", "TOKENS"


def b(scope: str, allocated: int, unit: str = USD, **kw: Any) -> BudgetState:
    return BudgetState(scope, unit, allocated, **kw)


def res(**kw: object) -> ReservationState:
    base: dict[str, object] = dict(
        reservation_id="r1",
        status="ACTIVE",
        idempotency_key="k",
        subject_json="{}",
        action_json="{}",
        unit=USD,
        estimate=100,
        overage_policy="ALLOW_IF_AVAILABLE",
        created_at_ms=0,
        expires_at_ms=1_000,
        grace_ms=500,
        scope_path="tenant:t",
        affected_json='["tenant:t"]',
        budgeted_scopes=["tenant:t"],
    )
    base.update(kw)
    return ReservationState(**base)  # type: ignore[arg-type]


# --- evaluation -----------------------------------------------------------------------------------


def test_the_tightest_scope_decides_and_hard_denials_come_first() -> None:
    top, low = b("tenant:t", 1_000), b("tenant:t/agent:a", 300, spent=100)
    ev = rules.evaluate_reserve([top, low], 150)
    assert (ev.decision, ev.scope, ev.remaining) == (Decision.ALLOW, "tenant:t/agent:a", 200)
    ev = rules.evaluate_reserve([top, low], 250)
    assert (ev.decision, ev.reason_code, ev.scope) == (Decision.DENY, "BUDGET_EXCEEDED", "tenant:t/agent:a")
    cases: list[tuple[str, Any, str]] = [
        ("status", "CLOSED", "BUDGET_CLOSED"),
        ("status", "FROZEN", "BUDGET_FROZEN"),
        ("is_over_limit", True, "OVERDRAFT_LIMIT_EXCEEDED"),
        ("debt", 1, "DEBT_OUTSTANDING"),
    ]
    for field, value, code in cases:
        bad = dataclasses.replace(top, **{field: value})
        assert rules.evaluate_reserve([bad, low], 1).reason_code == code


def test_soft_landing_reserves_what_is_left_and_caps_tokens() -> None:
    soft = SoftLanding(min_amount=50, fixed_amount=20, amount_per_million_tokens=1_000_000)
    ev = rules.evaluate_reserve([b("tenant:t", 120)], 500, soft)
    assert (ev.decision, ev.amount, ev.caps) == (Decision.ALLOW_WITH_CAPS, 120, {"max_tokens": 100})
    assert rules.evaluate_reserve([b("tenant:t", 40)], 500, soft).decision is Decision.DENY


def test_operator_caps_merge_strictest() -> None:
    caps = rules.merge_cap_dicts(
        [
            {"max_tokens": 500, "tool_denylist": ["a"], "tool_allowlist": ["x", "y"], "cooldown_ms": 10},
            {"max_tokens": 200, "tool_denylist": ["b"], "tool_allowlist": ["y", "z"], "cooldown_ms": 30},
            None,
        ]
    )
    assert caps == {"max_tokens": 200, "tool_denylist": ["a", "b"], "tool_allowlist": ["y"], "cooldown_ms": 30}


def test_budgets_by_unit_not_found_mismatch_and_unbudgeted() -> None:
    scopes = ["tenant:t", "tenant:t/agent:a"]
    assert rules.budgets_by_unit([], scopes, [USD], False) is None
    assert rules.budgets_by_unit([], scopes, [USD], True) == {USD: []}
    tokens = b("tenant:t/agent:a", 10, TOK)
    with pytest.raises(UnitMismatchError):
        rules.budgets_by_unit([tokens], scopes, [USD], False)
    assert rules.budgets_by_unit([tokens], scopes, [USD, TOK], False) == {USD: [], TOK: [tokens]}


def test_evaluate_units_any_unit_denies_and_names_itself() -> None:
    by_unit = {USD: [b("tenant:t", 1_000)], TOK: [b("tenant:t/agent:a", 50, TOK, caps={"max_tokens": 40})]}
    ev = rules.evaluate_units(by_unit, USD, 100, None, {TOK: 30, "CREDITS": 5})
    assert (ev.decision, ev.also, ev.caps) == (Decision.ALLOW_WITH_CAPS, {TOK: 30}, {"max_tokens": 40})
    ev = rules.evaluate_units(by_unit, USD, 100, None, {TOK: 60})
    assert (ev.decision, ev.unit, ev.scope, ev.remaining) == (Decision.DENY, TOK, "tenant:t/agent:a", 50)
    ev = rules.evaluate_units(by_unit, USD, 5_000, None, {TOK: 60})
    assert (ev.decision, ev.unit) == (Decision.DENY, USD)


# --- settling -------------------------------------------------------------------------------------


def test_settle_under_each_policy() -> None:
    def held(alloc: int, **kw: Any) -> BudgetState:
        x = b("tenant:t", alloc, **kw)
        x.reserved = 100
        return x

    x = held(1_000)
    assert rules.settle([x], 100, 60, OveragePolicy.REJECT) == (60, [])
    assert (x.spent, x.reserved) == (60, 0)
    with pytest.raises(BudgetExceededError):
        rules.settle([held(1_000)], 100, 160, OveragePolicy.REJECT)
    x = held(130)
    assert rules.settle([x], 100, 160, OveragePolicy.ALLOW_IF_AVAILABLE) == (130, ["tenant:t"])
    assert (x.spent, x.debt, x.is_over_limit) == (130, 0, True)
    x = held(130, overdraft_limit=50)
    assert rules.settle([x], 100, 160, OveragePolicy.ALLOW_WITH_OVERDRAFT) == (160, [])
    assert (x.spent, x.debt) == (130, 30)
    with pytest.raises(OverdraftLimitExceededError):
        rules.settle([held(130, overdraft_limit=10)], 100, 160, OveragePolicy.ALLOW_WITH_OVERDRAFT)
    x = held(130)
    assert rules.settle([x], 100, 1_000, OveragePolicy.RECORD_ALL) == (1_000, ["tenant:t"])
    assert (x.spent + x.debt, x.is_over_limit) == (1_000, True)


@given(
    alloc=st.integers(0, 10_000),
    spent=st.integers(0, 10_000),
    hold=st.integers(0, 5_000),
    actual=st.integers(0, 20_000),
    limit=st.integers(0, 5_000),
    policy=st.sampled_from(list(OveragePolicy)),
)
def test_settle_keeps_the_invariant_and_never_spends_past_allocation(
    alloc: int, spent: int, hold: int, actual: int, limit: int, policy: OveragePolicy
) -> None:
    spent = min(spent, alloc)
    hold = min(hold, alloc - spent)  # a hold only ever takes what was remaining
    x = b("tenant:t", alloc, spent=spent, reserved=hold, overdraft_limit=limit)
    before = dataclasses.replace(x)
    try:
        charged, _ = rules.settle([x], hold, actual, policy)
    except (BudgetExceededError, OverdraftLimitExceededError):
        assert x == before  # a refusal changes nothing
        return
    assert x.reserved == 0
    assert x.spent + x.debt - before.spent == charged
    assert x.spent <= max(x.allocated, before.spent)  # overage beyond the allocation is debt, never spend
    if policy is OveragePolicy.ALLOW_WITH_OVERDRAFT:
        assert x.debt <= limit
    if policy in (OveragePolicy.REJECT, OveragePolicy.ALLOW_IF_AVAILABLE):
        assert x.debt == 0
    if policy is OveragePolicy.RECORD_ALL:
        assert charged == actual


def test_fund_repays_debt_first_and_clears_over_limit() -> None:
    x = b("tenant:t", 100, spent=100, debt=30, is_over_limit=True)
    assert rules.fund(x, 50) == 30
    assert (x.allocated, x.spent, x.debt, x.is_over_limit) == (150, 130, 0, False)


# --- reservation state machines -------------------------------------------------------------------


def test_settle_verdicts() -> None:
    assert rules.settle_verdict(res(), 1_200, "commit", "c", "h") == "live"  # in the grace period
    assert rules.settle_verdict(res(), 1_501, "commit", "c", "h") == "expire"
    done = res(status="COMMITTED", settle_op="commit", settle_key="c", settle_hash="h")
    assert rules.settle_verdict(done, 9_999, "commit", "c", "h") == "replay"
    with pytest.raises(IdempotencyMismatchError):
        rules.settle_verdict(done, 0, "commit", "c", "other")
    with pytest.raises(IdempotencyMismatchError):
        rules.settle_verdict(done, 0, "release", "c", "h")
    with pytest.raises(ReservationFinalizedError):
        rules.settle_verdict(done, 0, "release", "another-key", "h")
    with pytest.raises(ReservationExpiredError):
        rules.settle_verdict(res(status="EXPIRED"), 0, "commit", "c", "h")


def test_extend_verdicts() -> None:
    assert rules.extend_verdict(res(), 900, 3) == "live"
    with pytest.raises(ReservationExpiredError):
        rules.extend_verdict(res(), 1_200, 3)  # grace: commit or release only
    assert rules.extend_verdict(res(), 1_600, 3) == "expire"
    with pytest.raises(MaxExtensionsExceededError):
        rules.extend_verdict(res(extension_count=3), 900, 3)
    with pytest.raises(ReservationFinalizedError):
        rules.extend_verdict(res(status="RELEASED"), 900, 3)


def test_holds_list_every_unit() -> None:
    r = res(extra={TOK: {"amount": 40, "scopes": ["tenant:t/agent:a"], "charged": None}})
    assert r.holds() == [(USD, 100, ["tenant:t"]), (TOK, 40, ["tenant:t/agent:a"])]
    assert r.deadline_ms == 1_500


# --- admin ----------------------------------------------------------------------------------------


def test_set_allocation_recomputes_over_limit() -> None:
    x = b("tenant:t", 100, spent=100, debt=20, overdraft_limit=50)
    assert rules.set_allocation(x, 200, 10, None) == {"previous_allocated": 100}
    assert x.is_over_limit  # the lowered limit leaves the debt above it
    y = b("tenant:t", 100, spent=100, is_over_limit=True)
    rules.set_allocation(y, 300, None, {})
    assert not y.is_over_limit and y.caps is None


def test_status_changes_and_closed_is_final() -> None:
    x = b("tenant:t", 100)
    assert rules.change_status(x, "freeze") == "frozen" and x.status == "FROZEN"
    with pytest.raises(BudgetFrozenError):
        rules.check_debit([x])
    assert rules.change_status(x, "close") == "closed"
    with pytest.raises(BudgetClosedError):
        rules.change_status(x, "unfreeze")
    assert rules.tenant_of("tenant:t/agent:a") == "tenant:t"
    assert rules.retry_after_expiry(rules.Evaluation(Decision.DENY, reason_code="BUDGET_EXCEEDED"))
    assert not rules.retry_after_expiry(rules.Evaluation(Decision.DENY, reason_code="BUDGET_FROZEN"))
