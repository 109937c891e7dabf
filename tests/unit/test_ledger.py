"""Ledger semantics on a real SQLite file: every rule and every error code."""

from __future__ import annotations

from typing import Any

import pytest

from cycles_ledger import (
    Amount,
    BudgetClosedError,
    BudgetExceededError,
    BudgetFrozenError,
    Caps,
    CyclesError,
    Decision,
    IdempotencyMismatchError,
    InvalidRequestError,
    Ledger,
    MaxExtensionsExceededError,
    NotFoundError,
    OverdraftLimitExceededError,
    ReservationExpiredError,
    ReservationFinalizedError,
    ReservationStatus,
    UnitMismatchError,
    open_ledger,
)
from tests.conftest import FakeClock

T = {"tenant": "t"}
TW = {"tenant": "t", "workflow": "w"}
ACT = {"kind": "tool.search", "name": "web"}
USD = 100_000_000


def usd(n: float | str) -> Amount:
    return Amount.usd(str(n))


async def snapshot(ledger: Ledger) -> list[tuple[Any, ...]]:
    return [
        (b.scope, b.unit, b.allocated, b.spent, b.reserved, b.debt, b.is_over_limit, b.status)
        for b in await ledger.balances()
    ]


async def check_invariant(ledger: Ledger) -> None:
    for b in await ledger.balances():
        assert b.remaining == b.allocated - b.spent - b.reserved - b.debt
    assert await ledger.verify() == []


@pytest.fixture
async def two_level(ledger: Ledger) -> Ledger:
    await ledger.set_budget("tenant:t", "10usd")
    await ledger.set_budget("tenant:t/workflow:w", "4usd")
    return ledger


# --- reserve ------------------------------------------------------------------------------------


async def test_reserve_holds_on_every_budgeted_scope(two_level: Ledger) -> None:
    """A reservation holds its estimate on each derived scope with a budget, and only those."""
    r = await two_level.reserve({**TW, "agent": "a"}, ACT, "1usd")
    assert r.decision is Decision.ALLOW
    assert r.affected_scopes == ["tenant:t", "tenant:t/workflow:w", "tenant:t/workflow:w/agent:a"]
    res = await two_level.get_reservation(r.reservation_id or "")
    assert res.budgeted_scopes == ["tenant:t", "tenant:t/workflow:w"]
    assert [(b.scope, b.reserved) for b in await two_level.balances()] == [
        ("tenant:t", USD),
        ("tenant:t/workflow:w", USD),
    ]
    await check_invariant(two_level)


async def test_deny_is_all_or_nothing(two_level: Ledger) -> None:
    """When the tightest scope cannot pay, nothing is held anywhere and DENY names that scope."""
    before = await snapshot(two_level)
    r = await two_level.reserve(TW, ACT, "5usd")
    assert r.decision is Decision.DENY
    assert (r.reason_code, r.scope, r.remaining) == ("BUDGET_EXCEEDED", "tenant:t/workflow:w", 4 * USD)
    assert r.reservation_id is None
    assert await snapshot(two_level) == before
    [ev] = [e for e in await two_level.events() if e.type == "denied"]
    assert ev.reason_code == "BUDGET_EXCEEDED"
    assert ev.data["subject"] == TW


async def test_exact_fit_allowed_then_denied(two_level: Ledger) -> None:
    """Remaining equal to the estimate fits; one microcent more does not."""
    assert (await two_level.reserve(TW, ACT, "4usd")).decision is Decision.ALLOW
    assert (await two_level.reserve(TW, ACT, {"unit": "USD_MICROCENTS", "amount": 1})).decision is Decision.DENY


async def test_no_budget_is_not_found_unless_allowed(db_url: str, clock: FakeClock) -> None:
    """A subject with no budget anywhere is denied BUDGET_NOT_FOUND, unless unbudgeted subjects are allowed."""
    async with open_ledger(db_url, clock=clock) as led:
        r = await led.reserve({"tenant": "ghost"}, ACT, "1usd")
        assert (r.decision, r.reason_code) == (Decision.DENY, "BUDGET_NOT_FOUND")
    async with open_ledger(db_url, clock=clock, allow_unbudgeted=True) as led:
        r = await led.reserve({"tenant": "ghost"}, ACT, "1usd")
        assert r.decision is Decision.ALLOW
        c = await led.commit(r.reservation_id or "", "0.5usd")
        assert c.charged.amount == USD // 2
        assert await led.balances() == []


async def test_a_note_is_a_decision_event_that_changes_nothing(db_url: str, clock: FakeClock) -> None:
    """A refusal decided before any budget was read (unknown payer, unpriced model, unmetered route) is in the
    log as denied / would_deny with its reason and data, on every store; balances do not move; bad input is
    a typed error."""
    async with open_ledger(db_url, clock=clock) as led:
        await led.set_budget("tenant:n", "1usd")
        first = await led.note("tenant:n/agent:a", "PRICE_UNKNOWN", data={"model": "m", "call_id": "c1"})
        second = await led.note("tenant:n", "ROUTE_NOT_METERED", would=True)
        assert second > first
        notes = [e for e in await led.events(scope="tenant:n") if e.type in ("denied", "would_deny")]
        assert [(e.type, e.scope, e.reason_code, e.data) for e in notes] == [
            ("denied", "tenant:n/agent:a", "PRICE_UNKNOWN", {"model": "m", "call_id": "c1"}),
            ("would_deny", "tenant:n", "ROUTE_NOT_METERED", {}),
        ]
        assert notes[0].ts_ms == clock.now
        b = await led.balance("tenant:n")
        assert (b.spent, b.reserved, b.remaining) == (0, 0, USD)
        for scope, reason, data in (
            ("acme", "X", None),
            ("tenant:n", "not upper", None),
            ("tenant:n", "X", {1: object()}),
        ):
            with pytest.raises(InvalidRequestError):
                await led.note(scope, reason, data=data)  # type: ignore[arg-type]


async def test_the_newest_events_first(db_url: str, clock: FakeClock) -> None:
    """`events(newest=True, limit=N)`: the last N events (of a scope, if given), newest first, on every store."""
    async with open_ledger(db_url, clock=clock) as led:
        await led.set_budget("tenant:o", "1usd")
        await led.set_budget("tenant:p", "1usd")
        for i in range(5):
            await led.note("tenant:o", f"R{i}")
            clock.now += 1
        await led.note("tenant:p", "OTHER")
        everything = await led.events(limit=100)
        newest = await led.events(limit=3, newest=True)
        assert [e.event_id for e in newest] == [e.event_id for e in everything][::-1][:3]
        mine = await led.events(limit=2, newest=True, scope="tenant:o")
        assert [e.reason_code for e in mine] == ["R4", "R3"]


async def test_record_all_keeps_every_unit_of_the_actual(db_url: str, clock: FakeClock) -> None:
    """RECORD_ALL (what shadow mode records): the budget's remainder is spent, the rest is debt past any
    overdraft limit, the scope is over-limit, and the books still balance, on every store."""
    async with open_ledger(db_url, clock=clock) as led:
        await led.set_budget("tenant:r", "1usd")
        await led.set_budget("tenant:r/agent:a", "5usd")
        res = await led.record_event({"tenant": "r", "agent": "a"}, ACT, "3usd", overage_policy="RECORD_ALL")
        assert res.charged.amount == 3 * USD
        top = await led.balance("tenant:r")
        assert (top.spent, top.debt, top.remaining, top.is_over_limit) == (USD, 2 * USD, -2 * USD, True)
        agent = await led.balance("tenant:r/agent:a")
        assert (agent.spent, agent.debt, agent.is_over_limit) == (3 * USD, 0, False)
        r = await led.reserve({"tenant": "r"}, ACT, "0.01usd")
        assert r.decision is Decision.DENY
        assert await led.verify() == []


async def test_unit_mismatch(two_level: Ledger) -> None:
    """Budgets that exist only in another unit give UNIT_MISMATCH naming the units."""
    with pytest.raises(UnitMismatchError) as info:
        await two_level.reserve(TW, ACT, "100tokens")
    assert info.value.code == "UNIT_MISMATCH"
    assert info.value.details["expected_units"] == ["USD_MICROCENTS"]


async def test_units_are_separate_budgets(two_level: Ledger) -> None:
    """A TOKENS budget on the same scope is charged independently of the USD one."""
    await two_level.set_budget("tenant:t/workflow:w", "1000tokens")
    r = await two_level.reserve(TW, ACT, "600tokens")
    assert r.decision is Decision.ALLOW
    assert [b.scope for b in r.balances] == ["tenant:t/workflow:w"]
    assert (await two_level.balance("tenant:t/workflow:w", "TOKENS")).reserved == 600
    assert (await two_level.balance("tenant:t/workflow:w")).reserved == 0


@pytest.mark.parametrize(("op", "reason"), [("freeze", "BUDGET_FROZEN"), ("close", "BUDGET_CLOSED")])
async def test_frozen_and_closed_deny(two_level: Ledger, op: str, reason: str) -> None:
    """FROZEN and CLOSED budgets deny reservations with their reason; unfreeze restores."""
    await getattr(two_level, op)("tenant:t")
    r = await two_level.reserve(TW, ACT, "1usd")
    assert (r.decision, r.reason_code, r.scope) == (Decision.DENY, reason, "tenant:t")
    if op == "freeze":
        await two_level.unfreeze("tenant:t")
        assert (await two_level.reserve(TW, ACT, "1usd")).decision is Decision.ALLOW
    else:
        with pytest.raises(BudgetClosedError):
            await two_level.unfreeze("tenant:t")
        with pytest.raises(BudgetClosedError):
            await two_level.fund("tenant:t", "1usd")


async def test_frozen_budget_still_settles(two_level: Ledger) -> None:
    """Freezing blocks new reservations but live ones can still commit."""
    r = await two_level.reserve(TW, ACT, "1usd")
    await two_level.freeze("tenant:t/workflow:w")
    c = await two_level.commit(r.reservation_id or "", "1usd")
    assert c.charged.amount == USD


# --- commit and overage ---------------------------------------------------------------------------


async def test_commit_returns_unused(two_level: Ledger) -> None:
    """Committing less than the estimate charges actual and releases the rest on every scope."""
    r = await two_level.reserve(TW, ACT, "2usd")
    c = await two_level.commit(r.reservation_id or "", "0.5usd")
    assert c.charged.amount == USD // 2
    assert c.released is not None and c.released.amount == 3 * USD // 2
    for b in await two_level.balances():
        assert (b.spent, b.reserved) == (USD // 2, 0)
    assert (await two_level.get_reservation(r.reservation_id or "")).status is ReservationStatus.COMMITTED
    await check_invariant(two_level)


async def test_overage_reject(two_level: Ledger) -> None:
    """REJECT refuses a commit above the estimate and changes nothing; the hold stays live."""
    r = await two_level.reserve(TW, ACT, "1usd", overage_policy="REJECT")
    before = await snapshot(two_level)
    with pytest.raises(BudgetExceededError) as info:
        await two_level.commit(r.reservation_id or "", "1.5usd")
    assert info.value.code == "BUDGET_EXCEEDED"
    assert await snapshot(two_level) == before
    assert (await two_level.commit(r.reservation_id or "", "1usd", idempotency_key="k2")).charged.amount == USD


async def test_overage_allow_if_available_caps_and_flags(two_level: Ledger) -> None:
    """ALLOW_IF_AVAILABLE charges what is available, marks the short scope over-limit, never creates debt."""
    r = await two_level.reserve(TW, ACT, "3usd")
    c = await two_level.commit(r.reservation_id or "", "6usd")  # 1usd extra available on the workflow
    assert c.charged.amount == 4 * USD
    wf = await two_level.balance("tenant:t/workflow:w")
    t = await two_level.balance("tenant:t")
    assert (wf.spent, wf.debt, wf.is_over_limit, wf.remaining) == (4 * USD, 0, True, 0)
    assert (t.spent, t.is_over_limit) == (4 * USD, False)
    nxt = await two_level.reserve(TW, ACT, "0.01usd")
    assert (nxt.reason_code, nxt.scope) == ("OVERDRAFT_LIMIT_EXCEEDED", "tenant:t/workflow:w")
    assert any(e.type == "over_limit" and e.scope == "tenant:t/workflow:w" for e in await two_level.events())
    await two_level.fund("tenant:t/workflow:w", "1usd")
    assert (await two_level.reserve(TW, ACT, "0.5usd")).decision is Decision.ALLOW
    await check_invariant(two_level)


async def test_overage_overdraft_creates_debt_within_limit(ledger: Ledger) -> None:
    """ALLOW_WITH_OVERDRAFT puts the uncovered part into debt up to the limit; beyond it, nothing changes."""
    await ledger.set_budget("tenant:t", "1usd", overdraft_limit="0.5usd")
    r = await ledger.reserve(T, ACT, "0.8usd", overage_policy="ALLOW_WITH_OVERDRAFT")
    c = await ledger.commit(r.reservation_id or "", "1.1usd")
    assert c.charged.amount == 110_000_000
    b = await ledger.balance("tenant:t")
    assert (b.spent, b.debt, b.remaining, b.is_over_limit) == (USD, 10_000_000, -10_000_000, False)
    denied = await ledger.reserve(T, ACT, "0.01usd")
    assert denied.reason_code == "DEBT_OUTSTANDING"
    await check_invariant(ledger)


async def test_overdraft_limit_exceeded(ledger: Ledger) -> None:
    """A commit whose debt would pass the overdraft limit is refused with nothing changed."""
    await ledger.set_budget("tenant:t", "1usd", overdraft_limit="0.1usd")
    r = await ledger.reserve(T, ACT, "1usd", overage_policy="ALLOW_WITH_OVERDRAFT")
    before = await snapshot(ledger)
    with pytest.raises(OverdraftLimitExceededError) as info:
        await ledger.commit(r.reservation_id or "", "1.2usd")
    assert info.value.scope == "tenant:t"
    assert await snapshot(ledger) == before


async def test_fund_repays_debt_first(ledger: Ledger) -> None:
    """Funding pays off debt before it adds spendable budget."""
    await ledger.set_budget("tenant:t", "1usd", overdraft_limit="1usd")
    r = await ledger.reserve(T, ACT, "1usd", overage_policy="ALLOW_WITH_OVERDRAFT")
    await ledger.commit(r.reservation_id or "", "1.3usd")
    b = await ledger.fund("tenant:t", "0.5usd")
    assert (b.allocated, b.spent, b.debt, b.remaining) == (150_000_000, 130_000_000, 0, 20_000_000)
    funded = [e for e in await ledger.events() if e.type == "funded"]
    assert funded[-1].data["debt_repaid"] == 30_000_000
    await check_invariant(ledger)


# --- release, expiry, extend ------------------------------------------------------------------------


async def test_release_returns_everything(two_level: Ledger) -> None:
    """Release returns the whole hold and a second finalization is refused."""
    r = await two_level.reserve(TW, ACT, "2usd")
    rel = await two_level.release(r.reservation_id or "", reason="tool failed")
    assert rel.released.amount == 2 * USD
    assert all(b.reserved == 0 and b.spent == 0 for b in await two_level.balances())
    with pytest.raises(ReservationFinalizedError):
        await two_level.commit(r.reservation_id or "", "1usd")
    with pytest.raises(ReservationFinalizedError):
        await two_level.release(r.reservation_id or "", idempotency_key="other")


async def test_commit_within_grace_then_expired(two_level: Ledger, clock: FakeClock) -> None:
    """Commit is accepted until expiry + grace; after that it is RESERVATION_EXPIRED and the hold is back."""
    a = await two_level.reserve(TW, ACT, "1usd", ttl_ms=1_000, grace_period_ms=500)
    b = await two_level.reserve(TW, ACT, "1usd", ttl_ms=1_000, grace_period_ms=500)
    clock.advance(1_400)
    assert (await two_level.commit(a.reservation_id or "", "1usd")).charged.amount == USD
    clock.advance(200)
    before_reserved = (await two_level.balance("tenant:t")).reserved
    assert before_reserved == USD  # b still counted until touched
    with pytest.raises(ReservationExpiredError) as info:
        await two_level.commit(b.reservation_id or "", "1usd")
    assert info.value.http_status == 410
    assert (await two_level.balance("tenant:t")).reserved == 0
    assert (await two_level.get_reservation(b.reservation_id or "")).status is ReservationStatus.EXPIRED
    with pytest.raises(ReservationExpiredError):
        await two_level.release(b.reservation_id or "")
    await check_invariant(two_level)


async def test_sweeper_expires_idle_reservations(two_level: Ledger, clock: FakeClock) -> None:
    """The sweeper returns holds of crashed agents without anyone touching them."""
    for _ in range(3):
        await two_level.reserve(TW, ACT, "1usd", ttl_ms=1_000, grace_period_ms=0)
    clock.advance(999)
    assert await two_level.sweep() == 0
    clock.advance(2)
    assert await two_level.sweep() == 3
    assert all(b.reserved == 0 for b in await two_level.balances())
    assert len([e for e in await two_level.events() if e.type == "expired"]) == 3
    await check_invariant(two_level)


async def test_any_write_expires_overdue_holds(two_level: Ledger, clock: FakeClock) -> None:
    """A new reservation sees budget freed by overdue reservations even without a sweeper."""
    await two_level.reserve(TW, ACT, "4usd", ttl_ms=1_000, grace_period_ms=0)
    assert (await two_level.reserve(TW, ACT, "1usd")).decision is Decision.DENY
    clock.advance(1_001)
    assert (await two_level.reserve(TW, ACT, "4usd")).decision is Decision.ALLOW


async def test_extend(two_level: Ledger, clock: FakeClock) -> None:
    """Extend pushes expiry from the current expiry, not from now; after expiry it is refused."""
    r = await two_level.reserve(TW, ACT, "1usd", ttl_ms=1_000, grace_period_ms=1_000)
    clock.advance(500)
    e = await two_level.extend(r.reservation_id or "", 2_000)
    assert e.expires_at_ms == (r.expires_at_ms or 0) + 2_000
    assert e.remaining_ttl_ms == 2_500
    clock.advance(2_600)  # past new expiry, inside grace
    with pytest.raises(ReservationExpiredError):
        await two_level.extend(r.reservation_id or "", 1_000)
    assert (await two_level.commit(r.reservation_id or "", "1usd")).charged.amount == USD


async def test_max_extensions(db_url: str, clock: FakeClock) -> None:
    """A reservation cannot be extended more often than max_extensions."""
    async with open_ledger(db_url, clock=clock, max_extensions=2) as led:
        await led.set_budget("tenant:t", "1usd")
        r = await led.reserve(T, ACT, "0.1usd")
        await led.extend(r.reservation_id or "", 1_000)
        await led.extend(r.reservation_id or "", 1_000)
        with pytest.raises(MaxExtensionsExceededError):
            await led.extend(r.reservation_id or "", 1_000)


async def test_a_caller_sets_its_own_extension_limit(db_url: str, clock: FakeClock) -> None:
    """`extend(max_extensions=n)` replaces the ledger's limit for that call (the proxy holds a call for up to
    `max_hold_ms`, past the ledger's 10); None lifts it; a limit that is not a non-negative integer is refused
    and changes nothing."""
    async with open_ledger(db_url, clock=clock, max_extensions=1) as led:
        await led.set_budget("tenant:t", "1usd")
        r = await led.reserve(T, ACT, "0.1usd")
        rid = r.reservation_id or ""
        for _ in range(3):
            await led.extend(rid, 1_000, max_extensions=3)
        with pytest.raises(MaxExtensionsExceededError):
            await led.extend(rid, 1_000, max_extensions=3)
        before = await led.get_reservation(rid)
        for bad in (-1, 1.5, "3", True):
            with pytest.raises(InvalidRequestError):
                await led.extend(rid, 1_000, max_extensions=bad)  # type: ignore[arg-type]
        assert await led.get_reservation(rid) == before
        await led.extend(rid, 1_000, max_extensions=None)
        with pytest.raises(MaxExtensionsExceededError):
            await led.extend(rid, 1_000)  # the ledger's own limit (1) again


# --- idempotency -----------------------------------------------------------------------------------


async def test_reserve_replay_and_mismatch(two_level: Ledger, clock: FakeClock) -> None:
    """Same key + same payload replays the first answer (one hold); another payload is a mismatch."""
    a = await two_level.reserve(TW, ACT, "1usd", idempotency_key="k1")
    clock.advance(10_000)
    b = await two_level.reserve(TW, ACT, "1usd", idempotency_key="k1")
    assert b.reservation_id == a.reservation_id
    assert b.remaining_ttl_ms == 50_000
    assert (await two_level.balance("tenant:t")).reserved == USD
    before = await snapshot(two_level)
    with pytest.raises(IdempotencyMismatchError):
        await two_level.reserve(TW, ACT, "2usd", idempotency_key="k1")
    with pytest.raises(IdempotencyMismatchError):
        await two_level.reserve(TW, ACT, "1usd", idempotency_key="k1", dry_run=True)
    assert await snapshot(two_level) == before


async def test_a_key_vouched_unique_labels_the_hold_but_keeps_no_record(two_level: Ledger) -> None:
    """`key_is_unique=True` (the caller just made the key): the reservation carries the key, but no
    replay record is kept, so the key does not guard a repeat (which holds again) and does not
    collide with a later guarded use of the same key."""
    a = await two_level.reserve(TW, ACT, "1usd", idempotency_key="fresh-1", key_is_unique=True)
    assert (await two_level.get_reservation(a.reservation_id or "")).idempotency_key == "fresh-1"
    b = await two_level.reserve(TW, ACT, "1usd", idempotency_key="fresh-1", key_is_unique=True)
    assert b.reservation_id != a.reservation_id
    c = await two_level.reserve(TW, ACT, "2usd", idempotency_key="fresh-1")  # no record: no mismatch
    assert (await two_level.balance("tenant:t")).reserved == 4 * USD
    assert (await two_level.reserve(TW, ACT, "2usd", idempotency_key="fresh-1")).reservation_id == c.reservation_id
    with pytest.raises(InvalidRequestError, match="key_is_unique"):
        await two_level.reserve(TW, ACT, "1usd", idempotency_key="x", key_is_unique="yes")  # type: ignore[arg-type]
    await check_invariant(two_level)


async def test_commit_retry_never_double_charges(two_level: Ledger) -> None:
    """A retried commit (same default key) replays; a different amount on the same reservation is refused."""
    r = await two_level.reserve(TW, ACT, "1usd")
    c1 = await two_level.commit(r.reservation_id or "", "0.7usd")
    c2 = await two_level.commit(r.reservation_id or "", "0.7usd")
    assert c1 == c2
    assert (await two_level.balance("tenant:t")).spent == 70_000_000
    with pytest.raises(IdempotencyMismatchError):
        await two_level.commit(r.reservation_id or "", "0.8usd")
    with pytest.raises(ReservationFinalizedError):
        await two_level.commit(r.reservation_id or "", "0.8usd", idempotency_key="fresh")
    assert len([e for e in await two_level.events() if e.type == "committed"]) == 1


async def test_event_replay(two_level: Ledger) -> None:
    """A direct debit retried with its key is applied once."""
    a = await two_level.record_event(TW, ACT, "0.3usd", idempotency_key="ev1")
    b = await two_level.record_event(TW, ACT, "0.3usd", idempotency_key="ev1")
    assert a == b
    assert (await two_level.balance("tenant:t")).spent == 30_000_000


# --- dry run, decide, caps --------------------------------------------------------------------------


async def test_dry_run_logs_without_holding(two_level: Ledger) -> None:
    """Dry run evaluates and logs would_allow / would_deny but holds nothing."""
    before = await snapshot(two_level)
    ok = await two_level.reserve(TW, ACT, "1usd", dry_run=True)
    no = await two_level.reserve(TW, ACT, "9usd", dry_run=True)
    assert (ok.decision, ok.reservation_id, ok.dry_run) == (Decision.ALLOW, None, True)
    assert (no.decision, no.reason_code) == (Decision.DENY, "BUDGET_EXCEEDED")
    assert await snapshot(two_level) == before
    types = [e.type for e in await two_level.events() if e.type.startswith("would_")]
    assert types == ["would_allow", "would_deny"]


async def test_decide_writes_nothing(two_level: Ledger) -> None:
    """decide answers like reserve but changes no balance and logs nothing."""
    n_events = len(await two_level.events())
    d = await two_level.decide(TW, ACT, "5usd")
    assert (d.decision, d.reason_code, d.scope) == (Decision.DENY, "BUDGET_EXCEEDED", "tenant:t/workflow:w")
    assert (await two_level.decide(TW, ACT, "1usd")).decision is Decision.ALLOW
    assert len(await two_level.events()) == n_events


async def test_operator_caps_come_with_decision(ledger: Ledger) -> None:
    """Caps set on budgets turn ALLOW into ALLOW_WITH_CAPS, merged strictest-first across scopes."""
    await ledger.set_budget("tenant:t", "10usd", caps=Caps(tool_denylist=["deploy"], max_tokens=1000))
    await ledger.set_budget("tenant:t/workflow:w", "10usd", caps={"tool_denylist": ["email"], "max_tokens": 500})
    r = await ledger.reserve(TW, ACT, "1usd")
    assert r.decision is Decision.ALLOW_WITH_CAPS
    assert r.caps is not None
    assert (r.caps.max_tokens, r.caps.tool_denylist) == (500, ["deploy", "email"])
    assert not r.caps.allows_tool("deploy") and r.caps.allows_tool("web")


async def test_soft_landing_caps_max_tokens(two_level: Ledger) -> None:
    """When the worst case does not fit but a useful call does, reserve what is left and cap max_tokens."""
    soft = {"min_amount": USD, "fixed_amount": USD, "amount_per_million_tokens": 10 * USD}
    r = await two_level.reserve(TW, ACT, "6usd", soft_landing=soft)
    assert r.decision is Decision.ALLOW_WITH_CAPS
    assert r.reserved is not None and r.reserved.amount == 4 * USD
    assert r.caps is not None and r.caps.max_tokens == 300_000  # (4 - 1) usd at 10 usd / 1M tokens
    too_small = await two_level.reserve(TW, ACT, "6usd", soft_landing={"min_amount": USD})
    assert too_small.reason_code == "BUDGET_EXCEEDED"


# --- direct debit ------------------------------------------------------------------------------------


async def test_record_event_policies(ledger: Ledger) -> None:
    """Direct debits follow the overage policies and are refused on frozen budgets."""
    await ledger.set_budget("tenant:t", "1usd", overdraft_limit="0.5usd")
    with pytest.raises(BudgetExceededError):
        await ledger.record_event(T, ACT, "2usd", overage_policy="REJECT")
    e = await ledger.record_event(T, ACT, "1.2usd", overage_policy="ALLOW_WITH_OVERDRAFT")
    assert e.charged.amount == 120_000_000
    b = await ledger.balance("tenant:t")
    assert (b.spent, b.debt) == (USD, 20_000_000)
    await ledger.freeze("tenant:t")
    with pytest.raises(BudgetFrozenError):
        await ledger.record_event(T, ACT, "0.1usd")
    with pytest.raises(NotFoundError):
        await ledger.record_event({"tenant": "ghost"}, ACT, "0.1usd")
    await check_invariant(ledger)


# --- bad input changes nothing --------------------------------------------------------------------------


BAD_RESERVES: list[dict[str, Any]] = [
    {"estimate": {"unit": "USD_MICROCENTS", "amount": -1}},
    {"estimate": {"unit": "USD_MICROCENTS", "amount": 1.5}},
    {"estimate": {"unit": "USD_MICROCENTS", "amount": 2**63}},
    {"estimate": {"unit": "EUR", "amount": 1}},
    {"estimate": 5},
    {"estimate": 0.5},
    {"estimate": "-1usd"},
    {"subject": {"tenant": "bad value"}},
    {"subject": {"tenant": "x" * 129}},
    {"subject": "tenant:t/nope:x"},
    {"action": {"kind": "", "name": "x"}},
    {"action": "tool"},
    {"ttl_ms": 10},
    {"ttl_ms": 1.5},
    {"grace_period_ms": -1},
    {"overage_policy": "YOLO"},
    {"idempotency_key": ""},
    {"metadata": {"x": object()}},
]


@pytest.mark.parametrize("override", BAD_RESERVES)
async def test_bad_reserve_input_is_typed_and_harmless(two_level: Ledger, override: dict[str, Any]) -> None:
    """Malformed reserve requests raise InvalidRequestError and leave every balance and the log unchanged."""
    before, n_events = await snapshot(two_level), len(await two_level.events())
    args: dict[str, Any] = {"subject": TW, "action": ACT, "estimate": "1usd", **override}
    with pytest.raises(InvalidRequestError):
        await two_level.reserve(args.pop("subject"), args.pop("action"), args.pop("estimate"), **args)
    assert await snapshot(two_level) == before
    assert len(await two_level.events()) == n_events


async def test_bad_commit_input(two_level: Ledger) -> None:
    """Unknown ids are NOT_FOUND; bad amounts and units are typed errors; nothing changes."""
    r = await two_level.reserve(TW, ACT, "1usd")
    before = await snapshot(two_level)
    with pytest.raises(NotFoundError) as info:
        await two_level.commit("rsv_nope", "1usd")
    assert info.value.code == "NOT_FOUND" and info.value.http_status == 404
    with pytest.raises(InvalidRequestError):
        await two_level.commit(r.reservation_id or "", {"unit": "USD_MICROCENTS", "amount": -5})
    with pytest.raises(UnitMismatchError):
        await two_level.commit(r.reservation_id or "", "5tokens")
    with pytest.raises(InvalidRequestError):
        await two_level.extend(r.reservation_id or "", 0)
    with pytest.raises(NotFoundError):
        await two_level.release("rsv_nope")
    with pytest.raises(NotFoundError):
        await two_level.get_reservation("rsv_nope")
    assert await snapshot(two_level) == before


async def test_admin_bad_input(ledger: Ledger) -> None:
    """Admin calls validate scopes, units and amounts."""
    with pytest.raises(InvalidRequestError):
        await ledger.set_budget("tenant:a b", "1usd")
    with pytest.raises(InvalidRequestError):
        await ledger.set_budget("tenant:t", "1usd", overdraft_limit="5tokens")
    with pytest.raises(InvalidRequestError):
        await ledger.freeze("tenant:t", "EUR")
    with pytest.raises(NotFoundError):
        await ledger.fund("tenant:none", "1usd")
    assert await ledger.balances() == []


def test_error_tree() -> None:
    """Every error carries its protocol code and HTTP status and descends from CyclesError."""
    cases = {
        BudgetExceededError: ("BUDGET_EXCEEDED", 409),
        ReservationExpiredError: ("RESERVATION_EXPIRED", 410),
        NotFoundError: ("NOT_FOUND", 404),
        InvalidRequestError: ("INVALID_REQUEST", 400),
        UnitMismatchError: ("UNIT_MISMATCH", 400),
        IdempotencyMismatchError: ("IDEMPOTENCY_MISMATCH", 409),
    }
    for cls, (code, status) in cases.items():
        err = cls("m", scope="tenant:t")
        assert isinstance(err, CyclesError)
        assert (err.code, err.http_status) == (code, status)
        assert err.to_dict() == {"error": code, "message": "m", "details": {"scope": "tenant:t"}}


async def test_store_url_errors() -> None:
    """Unknown schemes and malformed SQLite URLs are configuration errors naming what is known."""
    from cycles_ledger import ConfigError

    with pytest.raises(ConfigError, match="sqlite"):
        open_ledger("postgres://x")
    with pytest.raises(ConfigError):
        open_ledger("sqlite://relative.db")
    with pytest.raises(ConfigError):
        open_ledger("sqlite:////no/such/dir/x.db")


async def test_reopen_keeps_everything(db_url: str, clock: FakeClock) -> None:
    """Balances, reservations and events survive closing and reopening the file."""
    async with open_ledger(db_url, clock=clock) as led:
        await led.set_budget("tenant:t", "1usd")
        r = await led.reserve(T, ACT, "0.4usd")
    async with open_ledger(db_url, clock=clock) as led:
        assert (await led.balance("tenant:t")).reserved == 40_000_000
        await led.commit(r.reservation_id or "", "0.1usd")
        assert [r.reservation_id for r in await led.list_reservations(status="COMMITTED")] == [r.reservation_id]
        assert await led.verify() == []


async def test_background_sweeper(db_url: str) -> None:
    """start_sweeper expires idle reservations on the wall clock without any other call."""
    import asyncio

    async with open_ledger(db_url) as led:
        await led.set_budget("tenant:t", "1usd")
        await led.reserve(T, ACT, "0.5usd", ttl_ms=1_000, grace_period_ms=0)
        led.start_sweeper(interval_s=0.05)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if (await led.store.balances("tenant:t"))[0]["reserved"] == 0:
                break
        assert (await led.balance("tenant:t")).reserved == 0
        assert [e.type for e in await led.events()][-1] == "expired"


def test_open_ledger_rejects_unknown_settings(db_url: str) -> None:
    """A misspelt setting is a ConfigError, not a silent default."""
    from cycles_ledger import ConfigError

    with pytest.raises(ConfigError, match="colour"):
        open_ledger(db_url, colour="blue")


async def test_scope_values_with_a_trailing_newline_are_refused(two_level: Ledger) -> None:
    with pytest.raises(InvalidRequestError):
        await two_level.reserve({"tenant": "acme\n"}, {"kind": "k", "name": "n"}, "0.01usd")
    with pytest.raises(InvalidRequestError):
        await two_level.set_budget("tenant:acme\n", "1usd")


async def test_soft_landing_never_caps_below_zero_tokens(ledger: Ledger) -> None:
    """A fixed part bigger than what is left pays for no output tokens: max_tokens 0, never negative."""
    await ledger.set_budget("tenant:s", "1usd")
    got = await ledger.reserve(
        {"tenant": "s"},
        {"kind": "llm.completion", "name": "m"},
        "5usd",
        soft_landing={"min_amount": 1, "fixed_amount": 200_000_000, "amount_per_million_tokens": 1_000_000_000},
    )
    assert got.decision.value == "ALLOW_WITH_CAPS"
    assert got.caps is not None and got.caps.max_tokens == 0
