"""Pydantic models of the Cycles protocol v0 (JSON field names as in the protocol).

Money is never a float: every amount is an integer in its unit (USD_MICROCENTS: 1 USD = 10^8).
Balances are flat (one unit, integer fields) rather than the protocol's nested Amount objects, since a
balance always lives in exactly one unit.
"""

from __future__ import annotations

import re
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from .errors import InvalidRequestError

__all__ = [
    "INT64_MAX",
    "Action",
    "Amount",
    "Balance",
    "BudgetStatus",
    "Caps",
    "CommitResult",
    "Decision",
    "DecideResult",
    "EventResult",
    "ExtendResult",
    "LedgerEvent",
    "OveragePolicy",
    "Period",
    "RateLimit",
    "ReleaseResult",
    "Reservation",
    "ReservationStatus",
    "ReserveResult",
    "SoftLanding",
    "Subject",
    "Unit",
]

INT64_MAX = 2**63 - 1
USD = 10**8  # USD_MICROCENTS per dollar

NonNegInt = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class Unit(StrEnum):
    USD_MICROCENTS = "USD_MICROCENTS"
    TOKENS = "TOKENS"
    CREDITS = "CREDITS"
    RISK_POINTS = "RISK_POINTS"


class Decision(StrEnum):
    ALLOW = "ALLOW"
    ALLOW_WITH_CAPS = "ALLOW_WITH_CAPS"
    DENY = "DENY"


class OveragePolicy(StrEnum):
    REJECT = "REJECT"
    ALLOW_IF_AVAILABLE = "ALLOW_IF_AVAILABLE"
    ALLOW_WITH_OVERDRAFT = "ALLOW_WITH_OVERDRAFT"
    # Extension to the protocol's three: record every unit of the actual cost, what the budget cannot cover
    # as debt past any overdraft limit (marked over-limit). What shadow mode records, so balances show how
    # far past the budget the traffic would have gone.
    RECORD_ALL = "RECORD_ALL"


class ReservationStatus(StrEnum):
    ACTIVE = "ACTIVE"
    COMMITTED = "COMMITTED"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"


class BudgetStatus(StrEnum):
    ACTIVE = "ACTIVE"
    FROZEN = "FROZEN"
    CLOSED = "CLOSED"


_UNIT_SUFFIXES: dict[str, Unit] = {
    "usd": Unit.USD_MICROCENTS,
    "$": Unit.USD_MICROCENTS,
    "microcents": Unit.USD_MICROCENTS,
    "usd_microcents": Unit.USD_MICROCENTS,
    "tokens": Unit.TOKENS,
    "tok": Unit.TOKENS,
    "credits": Unit.CREDITS,
    "risk_points": Unit.RISK_POINTS,
    "rp": Unit.RISK_POINTS,
}
_AMOUNT_RE = re.compile(r"^\s*(\$)?\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([a-zA-Z_$]*)\s*$")


def usd_to_microcents(value: str | Decimal | int) -> int:
    """Exact dollars → USD_MICROCENTS; a fraction below one microcent is an error, not a rounding."""
    if isinstance(value, (float, bool)):
        raise InvalidRequestError(f"USD amounts must be given as decimal strings, not {type(value).__name__}")
    try:
        dec = Decimal(str(value).strip().replace("_", ""))
    except InvalidOperation as exc:
        raise InvalidRequestError(f"not a decimal USD amount: {value!r}") from exc
    scaled = dec * USD
    if not dec.is_finite() or scaled != scaled.to_integral_value(rounding=ROUND_FLOOR):
        raise InvalidRequestError(f"USD amount {value!r} is finer than one microcent (1e-8 USD)")
    return _check_range(int(scaled), value)


def _check_range(n: int, original: object) -> int:
    if n < 0 or n > INT64_MAX:
        raise InvalidRequestError(f"amount {original!r} is outside 0..{INT64_MAX}")
    return n


class Amount(_Model):
    """An integer quantity in one unit."""

    unit: Unit
    amount: NonNegInt

    @classmethod
    def usd(cls, dollars: str | Decimal | int) -> Amount:
        """`Amount.usd("0.25")` → 25,000,000 USD_MICROCENTS (decimal strings only, never floats)."""
        return cls(unit=Unit.USD_MICROCENTS, amount=usd_to_microcents(dollars))

    @classmethod
    def tokens(cls, n: int) -> Amount:
        return cls(unit=Unit.TOKENS, amount=n)

    @classmethod
    def parse(cls, text: str, default_unit: Unit | None = None) -> Amount:
        """Parse `25usd`, `$0.10`, `100000tokens`, `50credits`, `10rp`, or a bare integer in `default_unit`.

        Dollars (`usd`, `$`) may carry up to 8 decimals; every other unit, including a bare number, is a
        whole count in that unit.
        """
        if not isinstance(text, str):
            raise InvalidRequestError(f"amount must be text such as '25usd', got {type(text).__name__}")
        m = _AMOUNT_RE.match(text)
        if not m:
            raise InvalidRequestError(f"cannot read amount {text!r}; use e.g. 25usd, 100000tokens, 50credits")
        number, suffix = m.group(2).replace("_", ""), m.group(3).lower()
        dollars = bool(m.group(1)) or suffix in ("usd", "$")
        if m.group(1) and suffix not in ("", "usd"):
            raise InvalidRequestError(f"cannot read amount {text!r}")
        if dollars:
            return cls(unit=Unit.USD_MICROCENTS, amount=usd_to_microcents(number))
        if not suffix:
            if default_unit is None:
                raise InvalidRequestError(f"amount {text!r} has no unit; use e.g. 25usd or 100000tokens")
            unit = default_unit
        elif suffix in _UNIT_SUFFIXES:
            unit = _UNIT_SUFFIXES[suffix]
        else:
            raise InvalidRequestError(
                f"unknown unit {suffix!r} in {text!r}; known: usd, microcents, tokens, credits, risk_points"
            )
        if "." in number:
            raise InvalidRequestError(f"{unit.value} amounts are whole numbers, got {text!r}")
        return cls(unit=unit, amount=_check_range(int(number), text))

    def __str__(self) -> str:
        return format_amount(self.amount, self.unit)


def format_amount(n: int, unit: Unit | str) -> str:
    """Human form: `$1.234567` for USD_MICROCENTS (trailing zeros trimmed), `1200 TOKENS` otherwise."""
    if Unit(unit) is Unit.USD_MICROCENTS:
        sign = "-" if n < 0 else ""
        whole, frac = divmod(abs(n), USD)
        text = f"{whole}.{frac:08d}".rstrip("0")
        if text.endswith("."):
            text += "00"
        elif len(text.split(".")[1]) == 1:
            text += "0"
        return f"{sign}${text}"
    return f"{n} {Unit(unit).value}"


# --- subjects and scopes -------------------------------------------------------------------------

SCOPE_LEVELS: tuple[str, ...] = ("tenant", "workspace", "app", "workflow", "agent", "toolset")
_VALUE_RE = re.compile(r"[a-zA-Z0-9_.-]{1,128}")  # used with fullmatch: "$" would let "acme\n" in


def check_scope_value(level: str, value: str) -> str:
    if not isinstance(value, str) or not _VALUE_RE.fullmatch(value):
        raise InvalidRequestError(
            f"{level} {value!r} is not a valid scope value: use 1-128 characters from [a-zA-Z0-9_.-]",
            field=level,
        )
    return value


class Subject(_Model):
    """Who spends: the standard hierarchy levels (at least one) plus free `dimensions`."""

    tenant: str | None = None
    workspace: str | None = None
    app: str | None = None
    workflow: str | None = None
    agent: str | None = None
    toolset: str | None = None
    dimensions: dict[str, str] | None = None

    @field_validator("tenant", "workspace", "app", "workflow", "agent", "toolset")
    @classmethod
    def _level(cls, v: str | None, info: Any) -> str | None:
        return None if v is None else check_scope_value(info.field_name, v)

    @field_validator("dimensions")
    @classmethod
    def _dims(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return None
        if len(v) > 16:
            raise ValueError("at most 16 dimensions")
        for key, val in v.items():
            if not key or len(key) > 64 or len(val) > 256:
                raise ValueError("dimension keys are 1-64 characters and values at most 256")
        return v

    @model_validator(mode="after")
    def _some_level(self) -> Subject:
        if not any(getattr(self, lvl) for lvl in SCOPE_LEVELS):
            raise ValueError("a subject needs at least one of " + ", ".join(SCOPE_LEVELS))
        return self

    def scopes(self) -> list[str]:
        """Canonical scope ids, broadest first; absent levels are skipped, not blank."""
        out: list[str] = []
        path = ""
        for lvl in SCOPE_LEVELS:
            val = getattr(self, lvl)
            if val:
                path = f"{path}/{lvl}:{val}" if path else f"{lvl}:{val}"
                out.append(path)
        return out

    @property
    def scope_path(self) -> str:
        return self.scopes()[-1]

    @classmethod
    def parse(cls, path: str) -> Subject:
        """`tenant:acme/workflow:docs` → Subject(tenant="acme", workflow="docs")."""
        return cls(**parse_scope(path))


def parse_scope(path: str) -> dict[str, str]:
    """Validate a canonical scope id and return its levels; order, duplicates and charset are checked."""
    if not isinstance(path, str) or not path:
        raise InvalidRequestError(f"scope must be a non-empty string like 'tenant:acme', got {path!r}")
    levels: dict[str, str] = {}
    last = -1
    for part in path.split("/"):
        level, sep, value = part.partition(":")
        if not sep or level not in SCOPE_LEVELS:
            raise InvalidRequestError(
                f"malformed scope {path!r}: each part is level:value with level one of {', '.join(SCOPE_LEVELS)}"
            )
        idx = SCOPE_LEVELS.index(level)
        if idx <= last:
            raise InvalidRequestError(
                f"malformed scope {path!r}: levels must appear once, in the order {' → '.join(SCOPE_LEVELS)}"
            )
        last = idx
        levels[level] = check_scope_value(level, value)
    return levels


class Action(_Model):
    """What is being paid for: `kind` like `llm.completion` or `tool.search`, `name` like `openai:gpt-4o`."""

    kind: Annotated[str, Field(min_length=1, max_length=64)]
    name: Annotated[str, Field(min_length=1, max_length=256)]
    tags: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=10)] | None = None


class Caps(_Model):
    """Limits that come with ALLOW_WITH_CAPS; a non-empty allowlist wins over the denylist."""

    max_tokens: NonNegInt | None = None
    max_steps_remaining: NonNegInt | None = None
    tool_allowlist: list[str] | None = None
    tool_denylist: list[str] | None = None
    cooldown_ms: NonNegInt | None = None

    def allows_tool(self, name: str) -> bool:
        if self.tool_allowlist:
            return name in self.tool_allowlist
        return not (self.tool_denylist and name in self.tool_denylist)

    def is_empty(self) -> bool:
        return all(v is None for v in self.model_dump().values())


class SoftLanding(_Model):
    """How to shrink a reservation that does not fit instead of denying it (ALLOW_WITH_CAPS).

    When the full estimate does not fit but at least `min_amount` does, the ledger reserves what is
    left on the tightest scope. If `amount_per_million_tokens` is set, `caps.max_tokens` is what that
    reservation pays for after `fixed_amount` (e.g. the prompt's cost).
    """

    min_amount: NonNegInt
    fixed_amount: NonNegInt = 0
    amount_per_million_tokens: Annotated[StrictInt, Field(gt=0, le=INT64_MAX)] | None = None


# --- results -------------------------------------------------------------------------------------


class Period(_Model):
    """When a budget's spend starts again from zero: `every` daily, weekly (Mondays) or monthly (the 1st) at
    local midnight in `tz`, or a fixed duration (`30d`, `12h`) counted from `anchor_ms` (default: the epoch).

    Unsettled holds keep their amount across a boundary, and debt carries over (it still blocks until repaid).
    """

    every: Annotated[str, Field(min_length=1, max_length=32)]
    tz: Annotated[str, Field(max_length=64)] = "UTC"
    anchor_ms: Annotated[StrictInt, Field(ge=0, le=INT64_MAX)] | None = None

    @field_validator("every")
    @classmethod
    def _every(cls, v: str) -> str:
        from .timing import CALENDAR, duration_ms

        if v not in CALENDAR:
            duration_ms(v, "period")
        return v

    @field_validator("tz")
    @classmethod
    def _tz(cls, v: str) -> str:
        from .timing import time_zone

        time_zone(v)
        return v

    def spec(self) -> dict[str, Any]:
        """The stored form `rules` and the stores read."""
        from .timing import CALENDAR, duration_ms

        if self.every in CALENDAR:
            return {"every": self.every, "tz": self.tz}
        return {"every_ms": duration_ms(self.every), "anchor_ms": self.anchor_ms or 0}


class RateLimit(_Model):
    """At most `amount` (the budget's unit) spent or held in any sliding `window_ms`.

    `throttle` denies (RATE_EXCEEDED, with `retry_after_ms`) only until the window has room, so a loop
    slows to the limit; `freeze` also freezes the budget, a circuit breaker a person resets with
    `cycles budget unfreeze`. `alert_at` (percent of `amount`) logs a burn-rate `threshold_crossed` when a
    reserve or debit leaves the window at or above it, at most once per window length.
    """

    amount: Annotated[StrictInt, Field(gt=0, le=INT64_MAX)]
    window_ms: Annotated[StrictInt, Field(ge=1_000, le=31 * 86_400_000)]
    on_exceed: Literal["throttle", "freeze"] = "throttle"
    alert_at: Annotated[StrictInt, Field(ge=1, le=100)] | None = None


class Balance(_Model):
    """One budget (scope, unit). Invariant: remaining = allocated - spent - reserved - debt."""

    scope: str
    unit: Unit
    allocated: int
    spent: int
    reserved: int
    debt: int
    overdraft_limit: int
    remaining: int
    is_over_limit: bool
    status: BudgetStatus
    caps: Caps | None = None
    period: dict[str, Any] | None = None  # Period.spec()
    period_start_ms: int | None = None
    period_end_ms: int | None = None
    rate_limits: list[RateLimit] | None = None
    alerts: list[int] | None = None  # thresholds in percent of the allocation
    burn: list[int] | None = None  # spent + held in each rate limit's current window (balances reads only)


class ReserveResult(_Model):
    """Answer to reserve (and dry-run reserve). DENY is a result: read `reason_code`, `scope`, `remaining`."""

    decision: Decision
    reservation_id: str | None = None
    reserved: Amount | None = None
    expires_at_ms: int | None = None
    remaining_ttl_ms: int | None = None
    scope_path: str
    affected_scopes: list[str]
    caps: Caps | None = None
    reason_code: str | None = None
    scope: str | None = None
    remaining: int | None = None
    dry_run: bool = False
    balances: list[Balance] = Field(default_factory=list)
    retry_after_ms: int | None = None  # RATE_EXCEEDED: when the window has room again (None: never, too big)
    # holds in other units taken in the same decision (`reserve(also=…)`)
    also_reserved: list[Amount] = Field(default_factory=list)
    unit: Unit | None = None  # on a DENY decided by another unit's budget: the unit `remaining` counts in

    @property
    def allowed(self) -> bool:
        return self.decision is not Decision.DENY


class DecideResult(_Model):
    decision: Decision
    scope_path: str
    caps: Caps | None = None
    reason_code: str | None = None
    scope: str | None = None
    remaining: int | None = None
    affected_scopes: list[str]
    balances: list[Balance] = Field(default_factory=list)
    unit: Unit | None = None
    retry_after_ms: int | None = None


class CommitResult(_Model):
    reservation_id: str
    status: Literal["COMMITTED"] = "COMMITTED"
    charged: Amount
    released: Amount | None = None
    balances: list[Balance] = Field(default_factory=list)
    also_charged: list[Amount] = Field(default_factory=list)


class ReleaseResult(_Model):
    reservation_id: str
    status: Literal["RELEASED"] = "RELEASED"
    released: Amount
    balances: list[Balance] = Field(default_factory=list)
    also_released: list[Amount] = Field(default_factory=list)


class ExtendResult(_Model):
    reservation_id: str
    status: Literal["ACTIVE"] = "ACTIVE"
    expires_at_ms: int
    remaining_ttl_ms: int
    balances: list[Balance] = Field(default_factory=list)


class EventResult(_Model):
    status: Literal["APPLIED"] = "APPLIED"
    event_id: int
    charged: Amount
    balances: list[Balance] = Field(default_factory=list)
    also_charged: list[Amount] = Field(default_factory=list)


class Reservation(_Model):
    reservation_id: str
    status: ReservationStatus
    idempotency_key: str
    subject: Subject
    action: Action
    reserved: Amount
    committed: Amount | None = None
    overage_policy: OveragePolicy
    created_at_ms: int
    expires_at_ms: int
    grace_period_ms: int
    finalized_at_ms: int | None = None
    scope_path: str
    affected_scopes: list[str]
    budgeted_scopes: list[str]
    extension_count: int = 0
    caps: Caps | None = None
    metadata: dict[str, Any] | None = None
    also_reserved: list[Amount] = Field(default_factory=list)
    also_committed: list[Amount] = Field(default_factory=list)


class LedgerEvent(_Model):
    """One row of the append-only audit log (`type` e.g. reserved, committed, denied, would_deny)."""

    event_id: int
    ts_ms: int
    type: str
    scope: str | None = None
    unit: Unit | None = None
    amount: int | None = None
    reservation_id: str | None = None
    reason_code: str | None = None
    data: dict[str, Any] = {}
    # Who spent it on what, from the event or its reservation (`Ledger.events` fills these in): the call
    # id (the idempotency key), the model (metadata `model`, else the action's name) and the route
    # (metadata `route`, else the action's kind).
    call_id: str | None = None
    model: str | None = None
    route: str | None = None
