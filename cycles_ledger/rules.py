"""The ledger's arithmetic and policy as pure functions over a snapshot of budgets.

Stores load the budgets a request touches, call these functions inside their own atomic section, and
write back what changed. Nothing here does I/O or reads a clock, so every store applies the same rules
and the rules are tested once.

A `BudgetState` is one (scope, unit) budget. Invariant after every function here:
    remaining = allocated - spent - reserved - debt
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import BudgetExceededError, OverdraftLimitExceededError
from .models import Decision, OveragePolicy, SoftLanding

__all__ = [
    "BudgetState",
    "Evaluation",
    "evaluate_reserve",
    "fund",
    "hold",
    "merge_caps",
    "settle",
    "unhold",
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

    @property
    def remaining(self) -> int:
        return self.allocated - self.spent - self.reserved - self.debt

    def as_balance(self) -> dict[str, Any]:
        return {
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


@dataclass(slots=True)
class Evaluation:
    """Outcome of checking a reservation against every budgeted scope (nothing applied yet)."""

    decision: Decision
    amount: int = 0
    reason_code: str | None = None
    scope: str | None = None
    remaining: int | None = None
    caps: dict[str, Any] | None = field(default=None)


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
    merged: dict[str, Any] = {}
    for b in budgets:
        for key, val in (b.caps or {}).items():
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
