"""The ledger's arithmetic and policy as pure functions over snapshots of budgets and reservations.

`cycles_ledger.operations` loads what a request touches through a store's transaction, calls these
functions, and writes back what changed; the Redis store runs a Lua copy of them, checked against this
module by rule vectors (tests/integration/test_rule_vectors.py). Nothing here does I/O or reads a
clock (`now` is an argument), so every store applies the same rules and they are tested once.

A `BudgetState` is one (scope, unit) budget. Invariant after every function here:
    remaining = allocated - spent - reserved - debt
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import (
    BudgetClosedError,
    BudgetExceededError,
    BudgetFrozenError,
    IdempotencyMismatchError,
    MaxExtensionsExceededError,
    NotFoundError,
    OverdraftLimitExceededError,
    ReservationExpiredError,
    ReservationFinalizedError,
    UnitMismatchError,
)
from .models import Decision, OveragePolicy, SoftLanding
from .timing import period_bounds

__all__ = [
    "BudgetState",
    "Evaluation",
    "ReservationState",
    "budgets_by_unit",
    "change_status",
    "check_debit",
    "check_open",
    "check_rates",
    "crossed_rates",
    "crossed_thresholds",
    "evaluate_reserve",
    "evaluate_units",
    "expired_error",
    "extend_verdict",
    "found",
    "fund",
    "hold",
    "merge_cap_dicts",
    "merge_caps",
    "retry_after_expiry",
    "roll_period",
    "set_allocation",
    "settle",
    "settle_verdict",
    "start_period",
    "tenant_of",
    "unhold",
    "window_span",
]


@dataclass(slots=True)
class BudgetState:
    scope: str
    unit: str
    allocated: int
    spent: int = 0
    reserved: int = 0
    debt: int = 0
    overdraft_limit: int = 0
    is_over_limit: bool = False
    status: str = "ACTIVE"
    caps: dict[str, Any] | None = None
    period: dict[str, Any] | None = None  # models.Period.spec()
    period_start_ms: int | None = None
    period_end_ms: int | None = None
    rate_limits: list[dict[str, Any]] | None = None  # models.RateLimit dumps
    alerts: list[int] | None = None  # thresholds, percent of the allocation
    alerts_fired: list[int] | None = None  # thresholds crossed in the current period
    rate_fired: list[int | None] | None = None  # per rate limit: when its burn-rate alert last fired (ms)

    @property
    def remaining(self) -> int:
        return self.allocated - self.spent - self.reserved - self.debt

    def as_balance(self) -> dict[str, Any]:
        out = {
            "scope": self.scope,
            "unit": self.unit,
            "allocated": self.allocated,
            "spent": self.spent,
            "reserved": self.reserved,
            "debt": self.debt,
            "overdraft_limit": self.overdraft_limit,
            "remaining": self.remaining,
            "is_over_limit": self.is_over_limit,
            "status": self.status,
            "caps": self.caps,
        }
        if self.period is not None or self.rate_limits or self.alerts:  # most budgets have none of these
            out["period"] = self.period
            out["period_start_ms"] = self.period_start_ms
            out["period_end_ms"] = self.period_end_ms
            out["rate_limits"] = self.rate_limits
            out["alerts"] = self.alerts
        return out


@dataclass(slots=True)
class Evaluation:
    """Outcome of checking a reservation against every budgeted scope (nothing applied yet)."""

    decision: Decision
    amount: int = 0
    reason_code: str | None = None
    scope: str | None = None
    remaining: int | None = None
    caps: dict[str, Any] | None = field(default=None)
    unit: str | None = None  # the unit whose budget decided a DENY (a multi-unit hold can fail on any)
    retry_after_ms: int | None = None  # RATE_EXCEEDED: when the window has room again (None: never)
    freeze: bool = False  # RATE_EXCEEDED by a limit whose on_exceed is freeze
    also: dict[str, int] = field(default_factory=dict)  # other units to hold (those with a budget)


# Hard denials, in the order they are checked on each scope (broadest scope first).
def _hard_denial(b: BudgetState) -> str | None:
    if b.status == "CLOSED":
        return "BUDGET_CLOSED"
    if b.status == "FROZEN":
        return "BUDGET_FROZEN"
    if b.is_over_limit:
        return "OVERDRAFT_LIMIT_EXCEEDED"
    if b.debt > 0:
        return "DEBT_OUTSTANDING"
    return None


def merge_caps(budgets: list[BudgetState]) -> dict[str, Any] | None:
    """Combine operator caps of several scopes: the strictest number wins, deny lists add up,
    allow lists intersect."""
    return merge_cap_dicts([b.caps for b in budgets])


def merge_cap_dicts(cap_sets: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    merged: dict[str, Any] = {}
    for caps in cap_sets:
        for key, val in (caps or {}).items():
            if val is None:
                continue
            if key not in merged:
                merged[key] = list(val) if isinstance(val, list) else val
            elif key == "tool_denylist":
                merged[key] = sorted(set(merged[key]) | set(val))
            elif key == "tool_allowlist":
                merged[key] = sorted(set(merged[key]) & set(val))
            elif key == "cooldown_ms":
                merged[key] = max(merged[key], val)
            else:
                merged[key] = min(merged[key], val)
    return merged or None


def evaluate_reserve(budgets: list[BudgetState], estimate: int, soft_landing: SoftLanding | None = None) -> Evaluation:
    """Decide whether `estimate` may be held on every budget in `budgets` (canonical order).

    ALLOW when it fits everywhere; ALLOW_WITH_CAPS when operator caps apply, or when it does not fit
    but `soft_landing.min_amount` does (then `amount` is what is left on the tightest scope); DENY
    otherwise, naming the scope and its remaining.
    """
    for b in budgets:
        reason = _hard_denial(b)
        if reason:
            return Evaluation(Decision.DENY, reason_code=reason, scope=b.scope, remaining=b.remaining)
    caps = merge_caps(budgets)
    if not budgets:
        return Evaluation(Decision.ALLOW, amount=estimate)
    tight = min(budgets, key=lambda b: b.remaining)  # first of equals = broadest
    if tight.remaining >= estimate:
        decision = Decision.ALLOW_WITH_CAPS if caps else Decision.ALLOW
        return Evaluation(decision, amount=estimate, scope=tight.scope, remaining=tight.remaining, caps=caps)
    if soft_landing is not None and tight.remaining >= max(soft_landing.min_amount, 1):
        amount = tight.remaining
        caps = dict(caps or {})
        if soft_landing.amount_per_million_tokens:
            # What is left after the fixed part pays for this many tokens; none if it does not even cover that.
            tokens = max(0, (amount - soft_landing.fixed_amount) * 1_000_000 // soft_landing.amount_per_million_tokens)
            caps["max_tokens"] = min(tokens, caps.get("max_tokens", tokens))
        return Evaluation(
            Decision.ALLOW_WITH_CAPS, amount=amount, scope=tight.scope, remaining=tight.remaining, caps=caps
        )
    return Evaluation(Decision.DENY, reason_code="BUDGET_EXCEEDED", scope=tight.scope, remaining=tight.remaining)


def hold(budgets: list[BudgetState], amount: int) -> None:
    for b in budgets:
        b.reserved += amount


def unhold(budgets: list[BudgetState], amount: int) -> None:
    for b in budgets:
        b.reserved -= amount


def settle(
    budgets: list[BudgetState], held: int, actual: int, policy: OveragePolicy, *, is_commit: bool = True
) -> tuple[int, list[str]]:
    """Turn a hold of `held` into a charge of `actual` (a direct debit is `held=0`).

    Returns (charged, scopes newly marked over-limit). Raises before changing anything when the policy
    refuses: REJECT on a commit whose actual exceeds the hold, or on a debit that does not fit;
    ALLOW_WITH_OVERDRAFT when a scope's debt would pass its overdraft limit. ALLOW_IF_AVAILABLE never
    refuses: it charges what is available and marks the scopes that could not cover the overage.
    Under ALLOW_WITH_OVERDRAFT debt is only the part the remaining budget could not cover.
    """
    delta = actual - held
    if delta <= 0:
        for b in budgets:
            b.reserved -= held
            b.spent += actual
        return actual, []
    if policy is OveragePolicy.REJECT:
        short = [b for b in budgets if b.remaining < delta]
        if is_commit or short:
            worst = short[0] if short else (budgets[0] if budgets else None)
            raise BudgetExceededError(
                f"actual {actual} exceeds the reserved {held} and the overage policy is REJECT"
                if is_commit
                else f"actual {actual} exceeds the remaining {worst.remaining if worst else 0}",
                scope=worst.scope if worst else None,
                remaining=worst.remaining if worst else None,
            )
        for b in budgets:
            b.reserved -= held
            b.spent += actual
        return actual, []
    if policy is OveragePolicy.ALLOW_IF_AVAILABLE:
        available = min((max(b.remaining, 0) for b in budgets), default=delta)
        extra = min(delta, available)
        flagged = []
        for b in budgets:
            if b.remaining < delta and not b.is_over_limit:
                flagged.append(b.scope)
            if b.remaining < delta:
                b.is_over_limit = True
            b.reserved -= held
            b.spent += held + extra
        return held + extra, flagged
    # ALLOW_WITH_OVERDRAFT (and RECORD_ALL, which knows no limit): check every scope first, then apply.
    plan = []
    flagged = []
    for b in budgets:
        covered = min(delta, max(b.remaining, 0))
        shortfall = delta - covered
        if policy is OveragePolicy.RECORD_ALL:
            if shortfall and not b.is_over_limit:
                flagged.append(b.scope)
        elif shortfall and b.debt + shortfall > b.overdraft_limit:
            raise OverdraftLimitExceededError(
                f"overage of {delta} would take debt on {b.scope} to {b.debt + shortfall}, "
                f"past its overdraft limit {b.overdraft_limit}",
                scope=b.scope,
                remaining=b.remaining,
                debt=b.debt,
                overdraft_limit=b.overdraft_limit,
            )
        plan.append((b, covered, shortfall))
    for b, covered, shortfall in plan:
        b.reserved -= held
        b.spent += held + covered
        b.debt += shortfall
        if shortfall and policy is OveragePolicy.RECORD_ALL:
            b.is_over_limit = True
    return actual, flagged


def fund(b: BudgetState, amount: int) -> int:
    """Add `amount` to the allocation; it repays debt first (that debt becomes spend). Returns the repaid part."""
    repaid = min(b.debt, amount)
    b.debt -= repaid
    b.spent += repaid
    b.allocated += amount
    if b.debt == 0 and b.remaining >= 0:
        b.is_over_limit = False
    return repaid


# --- which budgets a request touches ------------------------------------------------------------


def tenant_of(scope: str) -> str:
    """The effective tenant of a request: its top-level scope. Idempotency keys are per tenant (protocol)."""
    return scope.split("/", 1)[0]


def budgets_by_unit(
    all_budgets: list[BudgetState], scopes: list[str], units: list[str], allow_unbudgeted: bool
) -> dict[str, list[BudgetState]] | None:
    """Split the budgets found on a request's scopes by the units it holds or charges.

    None means no budget at any scope (BUDGET_NOT_FOUND), unless unbudgeted subjects are allowed. Budgets
    only in other units are a UNIT_MISMATCH error: the caller named the wrong unit for this subject.
    """
    if not all_budgets and not allow_unbudgeted:
        return None
    by_unit = {u: [b for b in all_budgets if b.unit == u] for u in units}
    if all_budgets and not any(by_unit.values()) and not allow_unbudgeted:
        found = sorted({b.unit for b in all_budgets})
        raise UnitMismatchError(
            f"no budget in {units[0]} for {scopes[-1]}; budgets there are in " + ", ".join(found),
            scope=all_budgets[-1].scope,
            requested_unit=units[0],
            expected_units=found,
        )
    return by_unit


def evaluate_units(
    by_unit: dict[str, list[BudgetState]],
    unit: str,
    estimate: int,
    soft_landing: SoftLanding | None = None,
    also: dict[str, int] | None = None,
) -> Evaluation:
    """`evaluate_reserve` for a hold in `unit` plus holds in other units (`also`), as one decision.

    The soft landing applies to the main unit only; another unit's hold either fits or denies (its
    `Evaluation.unit` names it). `Evaluation.also` keeps the other units that have a budget to hold on.
    """
    ev = evaluate_reserve(by_unit.get(unit, []), estimate, soft_landing)
    ev.unit = unit
    if ev.decision is Decision.DENY or not also:
        return ev
    cap_sets = [ev.caps]
    for other, amount in also.items():
        budgets = by_unit.get(other, [])
        if not budgets:
            continue
        sub = evaluate_reserve(budgets, amount)
        if sub.decision is Decision.DENY:
            sub.unit = other
            return sub
        ev.also[other] = amount
        cap_sets.append(sub.caps)
    ev.caps = merge_cap_dicts(cap_sets)
    if ev.caps and ev.decision is Decision.ALLOW:
        ev.decision = Decision.ALLOW_WITH_CAPS
    return ev


def check_debit(budgets: list[BudgetState]) -> None:
    """A direct debit needs no headroom (its policy decides) but an open budget."""
    for b in budgets:
        check_open(b)
        if b.status == "FROZEN":
            raise BudgetFrozenError(f"budget {b.scope} is frozen", scope=b.scope)


def check_open(b: BudgetState) -> None:
    if b.status == "CLOSED":
        raise BudgetClosedError(f"budget {b.scope} is closed", scope=b.scope)


# --- admin changes ------------------------------------------------------------------------------


def set_allocation(
    b: BudgetState, amount: int, overdraft_limit: int | None, caps: dict[str, Any] | None
) -> dict[str, Any]:
    """Change an existing budget's allocation (spent, reserved and debt stay); returns the event data."""
    data = {"previous_allocated": b.allocated}
    b.allocated = amount
    if overdraft_limit is not None:
        b.overdraft_limit = overdraft_limit
    if caps is not None:
        b.caps = caps or None
    if b.debt > b.overdraft_limit:  # a lowered limit can leave existing debt above it
        b.is_over_limit = True
    elif b.remaining >= 0:
        b.is_over_limit = False
    return data


_STATUS_CHANGES = {"freeze": ("FROZEN", "frozen"), "unfreeze": ("ACTIVE", "unfrozen"), "close": ("CLOSED", "closed")}


def change_status(b: BudgetState, op: str) -> str:
    """freeze / unfreeze / close; a closed budget stays closed. Returns the event type."""
    check_open(b)
    b.status, kind = _STATUS_CHANGES[op]
    return kind


# --- reservations -------------------------------------------------------------------------------


@dataclass(slots=True)
class ReservationState:
    """One reservation as the rules see it.

    Subject, action, metadata and affected scopes are JSON text the rules never look into; stores keep
    them as written. `extra` holds the other units of a multi-unit hold:
    `{unit: {"amount": held, "scopes": [budgeted scopes], "charged": charged or None}}`.
    """

    reservation_id: str
    status: str
    idempotency_key: str
    subject_json: str
    action_json: str
    unit: str
    estimate: int
    overage_policy: str
    created_at_ms: int
    expires_at_ms: int
    grace_ms: int
    scope_path: str
    affected_json: str
    budgeted_scopes: list[str]
    charged: int | None = None
    finalized_at_ms: int | None = None
    extension_count: int = 0
    metadata_json: str | None = None
    caps: dict[str, Any] | None = None
    settle_op: str | None = None
    settle_key: str | None = None
    settle_hash: str | None = None
    settle_response: dict[str, Any] | None = None
    extra: dict[str, dict[str, Any]] | None = None
    windowed: bool = False  # logged in the spend window of some rate-limited budget
    actual: int | None = None  # what the commit said it cost (charged can be less under the overage policy)

    @property
    def deadline_ms(self) -> int:
        """Commit and release are accepted until here; then the hold is returned (expiry)."""
        return self.expires_at_ms + self.grace_ms

    def holds(self) -> list[tuple[str, int, list[str]]]:
        """(unit, amount held, budgeted scopes) for every unit of the hold, the main unit first."""
        out = [(self.unit, self.estimate, self.budgeted_scopes)]
        for unit, h in (self.extra or {}).items():
            out.append((unit, h["amount"], h["scopes"]))
        return out


def found(r: ReservationState | None, reservation_id: str) -> ReservationState:
    if r is None:
        raise NotFoundError(f"reservation {reservation_id!r} not found", reservation_id=reservation_id)
    return r


def settle_verdict(r: ReservationState, now: int, op: str, key: str, payload_hash: str) -> str:
    """May `op` (commit or release) settle `r` now? "replay": answer the first settle again; "live": go
    on; "expire": the grace is over, expire it and answer RESERVATION_EXPIRED. Raises the other refusals.

    Settlement idempotency lives on the reservation itself: one settle per reservation.
    """
    if r.settle_key is not None and r.settle_key == key:
        if r.settle_op != op or r.settle_hash != payload_hash:
            raise IdempotencyMismatchError(
                f"idempotency key {key!r} was already used for a different {r.settle_op} request",
                idempotency_key=key,
            )
        return "replay"
    if r.status == "EXPIRED":
        raise ReservationExpiredError(f"reservation {r.reservation_id} expired", reservation_id=r.reservation_id)
    if r.status != "ACTIVE":
        raise ReservationFinalizedError(
            f"reservation {r.reservation_id} is already {r.status}", reservation_id=r.reservation_id, status=r.status
        )
    return "expire" if now > r.deadline_ms else "live"


def expired_error(r: ReservationState) -> ReservationExpiredError:
    return ReservationExpiredError(
        f"reservation {r.reservation_id} expired at {r.expires_at_ms} (+{r.grace_ms} ms grace)",
        reservation_id=r.reservation_id,
    )


def extend_verdict(r: ReservationState, now: int, max_extensions: int | None) -> str:
    """May `r` be extended now? "live" or "expire" (past its grace: expire it, answer EXPIRED); raises
    otherwise. In the grace period (past expiry, before the deadline) only commit or release are allowed."""
    if r.status == "EXPIRED" or (r.status == "ACTIVE" and now > r.expires_at_ms):
        if r.status == "ACTIVE" and now > r.deadline_ms:
            return "expire"
        raise ReservationExpiredError(
            f"reservation {r.reservation_id} passed its expiry; in the grace period only commit or release",
            reservation_id=r.reservation_id,
        )
    if r.status != "ACTIVE":
        raise ReservationFinalizedError(
            f"reservation {r.reservation_id} is already {r.status}", reservation_id=r.reservation_id, status=r.status
        )
    if max_extensions is not None and r.extension_count >= max_extensions:
        raise MaxExtensionsExceededError(
            f"reservation {r.reservation_id} was already extended {r.extension_count} times",
            reservation_id=r.reservation_id,
        )
    return "live"


def retry_after_expiry(ev: Evaluation) -> bool:
    """A reserve denied for lack of room looks again after expiring overdue holds (they still counted)."""
    return ev.reason_code in ("BUDGET_EXCEEDED", "RATE_EXCEEDED")


# --- time: periods, burn rate, thresholds -----------------------------------------------------------


def start_period(b: BudgetState, now: int) -> None:
    """Set the bounds of the period containing `now` (a budget given a period, or a new one)."""
    if b.period is None:
        b.period_start_ms = b.period_end_ms = None
    else:
        b.period_start_ms, b.period_end_ms = period_bounds(b.period, now)


def roll_period(b: BudgetState, now: int) -> dict[str, Any] | None:
    """At the first touch after a period boundary: spent starts again from zero, holds keep their amount,
    debt carries over (and still blocks until repaid). Returns the closed period's totals (the data of
    its `period_reset` event), or None when the period has not ended. Applied once: the new bounds are
    written with the reset, so the next touch finds the period current."""
    if b.period is None or b.period_end_ms is None or now < b.period_end_ms:
        return None
    closed = {
        "period_start_ms": b.period_start_ms,
        "period_end_ms": b.period_end_ms,
        "allocated": b.allocated,
        "spent": b.spent,
        "debt": b.debt,
        "reserved": b.reserved,
    }
    b.period_start_ms, b.period_end_ms = period_bounds(b.period, now)
    b.spent = 0
    b.alerts_fired = None
    b.is_over_limit = b.debt > b.overdraft_limit
    return closed


def window_span(b: BudgetState) -> int:
    """The longest rate-limit window of `b` (how far back its spend log must reach), 0 without limits."""
    return max((int(lim["window_ms"]) for lim in b.rate_limits or ()), default=0)


def check_rates(b: BudgetState, amount: int, entries: list[tuple[int, int]], now: int) -> Evaluation | None:
    """Would holding `amount` more on `b` now push what was spent or held in a rate limit's sliding window
    past it? `entries` are (ts_ms, amount) of `b`'s spend log, oldest first, reaching back `window_span`.

    Exact: every hold and charge is one entry at its own millisecond, so no approximation can let more
    through than the limit says. The denial says when the window has room again: after enough of the
    oldest entries leave it (None when `amount` alone is above the limit)."""
    for lim in b.rate_limits or ():
        window, limit = int(lim["window_ms"]), int(lim["amount"])
        inside = [(ts, a) for ts, a in entries if ts > now - window]
        used = sum(a for _, a in inside)
        if used + amount <= limit:
            continue
        retry: int | None = None
        if amount <= limit:
            excess, freed = used + amount - limit, 0
            for ts, a in inside:
                freed += a
                if freed >= excess:
                    retry = ts + window - now  # the entry is out once now - window >= ts
                    break
        return Evaluation(
            Decision.DENY,
            reason_code="RATE_EXCEEDED",
            scope=b.scope,
            remaining=max(limit - used, 0),
            unit=b.unit,
            retry_after_ms=retry,
            freeze=lim.get("on_exceed") == "freeze",
        )
    return None


def crossed_thresholds(b: BudgetState) -> list[int]:
    """Alert thresholds (percent of the allocation) that spent + debt has reached and that have not fired
    in this period; marks them fired, so each fires once per period."""
    if not b.alerts or b.allocated <= 0:
        return []
    used_pct_x100 = (b.spent + b.debt) * 10_000 // b.allocated
    fired = set(b.alerts_fired or ())
    new = [t for t in sorted(b.alerts) if t * 100 <= used_pct_x100 and t not in fired]
    if new:
        b.alerts_fired = sorted(fired | set(new))
    return new


def crossed_rates(b: BudgetState, entries: list[tuple[int, int]], now: int) -> list[dict[str, Any]]:
    """Burn-rate alerts: each rate limit with `alert_at` whose sliding window now holds at least that percent
    of its amount (`entries` as for `check_rates`, the new hold or charge in them), unless it fired less than
    a window length ago. Marks them fired now; returns the data of their `threshold_crossed` events."""
    limits = b.rate_limits or ()
    fired = list(b.rate_fired or ())
    fired += [None] * (len(limits) - len(fired))
    out = []
    for i, lim in enumerate(limits):
        at = lim.get("alert_at")
        if not at:
            continue
        window, limit, last = int(lim["window_ms"]), int(lim["amount"]), fired[i]
        if last is not None and now - last < window:
            continue
        used = sum(a for ts, a in entries if ts > now - window)
        if used * 100 >= at * limit:
            fired[i] = now
            out.append({"kind": "burn_rate", "threshold": at, "window_ms": window, "limit": limit, "used": used})
    if out:
        b.rate_fired = fired
    return out
