"""Replay a past spend log through a budgets file, on private in-process ledgers: what would have been denied?

Two `memory://` ledgers get the budgets and then every call in time order, on a clock that reads the log's
timestamps (periods roll over and burn-rate windows slide as they would have):

- **enforce**: reserve the call's estimate at its start (its actual cost when the log has no estimate), commit
  the actual at its end. A denied call is not made, so it spends nothing; a call clamped by the soft landing
  is charged at most what it held (its answer was capped).
- **shadow**: the proxy's shadow mode. A dry-run reserve gives the would-be decision, and the actual cost is
  debited whatever it says (RECORD_ALL), so balances follow the real traffic.

Both see the same traffic until the first denial; after it they differ. Enforce may allow calls that shadow
denies, because earlier denied calls did not spend; it may deny calls that shadow allows, when a burn-rate
limit froze a budget. The report names, per scope, the first denied call, the spend enforcement would have
saved (the actual cost of the calls it denied there) and those differences. Nothing touches a real ledger.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import BudgetEntry, apply_budgets
from .errors import CyclesError, NotFoundError, ReservationExpiredError
from .ledger import Ledger, open_ledger
from .models import Amount, Decision, OveragePolicy, ReserveResult, Unit, format_amount
from .spendlog import SpendLog, SpendRecord, iso_ms

__all__ = ["CallRef", "ReplayReport", "ScopeReplay", "render_replay", "replay", "table"]

_USD = Unit.USD_MICROCENTS
_TTL_MARGIN_MS = 60_000
_MAX_TTL_MS = 86_400_000
_LISTED = 50  # differing calls listed per scope and kind (all are counted)


@dataclass(frozen=True, slots=True)
class CallRef:
    """A call of the log named in a report: where it is, and what the evaluation said of it."""

    ordinal: int  # 1-based position in the log's time order
    call_id: str
    ts_ms: int
    model: str
    reason: str | None = None
    scope: str | None = None
    remaining: int | None = None
    estimate: int | None = None
    actual: int = 0
    line: int = 0
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["time"] = iso_ms(self.ts_ms)
        return out


@dataclass
class ScopeReplay:
    """One scope's story under both evaluations. Denials are counted at the scope that denied them."""

    scope: str
    budget: str = ""  # the budget as written (allocated, period), "" for a scope without one
    calls: int = 0  # calls whose payer includes this scope
    spend: int = 0  # their actual cost: what shadow mode (and the log) spent
    enforce_spend: int = 0  # what was spent under enforcement
    denied: int = 0
    saved: int = 0  # actual cost of the calls enforcement denied at this scope
    clamped: int = 0  # calls enforcement let run with a smaller output cap
    would_deny: int = 0  # calls shadow mode marked would_deny at this scope
    first_denied: CallRef | None = None
    first_would_deny: CallRef | None = None
    allowed_only_by_enforce: int = 0  # shadow would deny, enforce allowed (earlier denied calls did not spend)
    denied_only_by_enforce: int = 0  # shadow would allow, enforce denied (e.g. a budget frozen by a rate limit)
    allowed_only_by_enforce_calls: list[CallRef] = field(default_factory=list)
    denied_only_by_enforce_calls: list[CallRef] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: v for k, v in dataclasses.asdict(self).items() if not isinstance(v, list | dict) and v is not None
        }
        for key in ("first_denied", "first_would_deny"):
            ref = getattr(self, key)
            out[key] = ref.to_json() if ref is not None else None
        out["allowed_only_by_enforce_calls"] = [c.to_json() for c in self.allowed_only_by_enforce_calls]
        out["denied_only_by_enforce_calls"] = [c.to_json() for c in self.denied_only_by_enforce_calls]
        return out


@dataclass
class ReplayReport:
    log: dict[str, Any]
    budgets: list[str]
    scopes: list[ScopeReplay]
    first_denied: CallRef | None = None  # the first call enforcement denies, anywhere
    spend: int = 0
    enforce_spend: int = 0
    saved: int = 0
    denied: int = 0
    would_deny: int = 0
    unbudgeted_calls: int = 0  # calls no budget applies to (let through: `unbudgeted="allow"`)
    unbudgeted_spend: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)  # calls the ledger refused as requests
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "log": self.log,
            "budgets": self.budgets,
            "first_denied": self.first_denied.to_json() if self.first_denied else None,
            "totals": {
                "spend": self.spend,
                "enforce_spend": self.enforce_spend,
                "saved": self.saved,
                "denied": self.denied,
                "would_deny": self.would_deny,
                "unbudgeted_calls": self.unbudgeted_calls,
                "unbudgeted_spend": self.unbudgeted_spend,
                "unit": _USD.value,
            },
            "scopes": [s.to_json() for s in self.scopes],
            "errors": self.errors,
            "skipped": self.skipped,
        }


@dataclass
class _Decision:
    allowed: bool
    result: ReserveResult | None = None
    error: str | None = None


def _budget_text(e: BudgetEntry) -> str:
    text = format_amount(e.allocated.amount, e.allocated.unit)
    period = e.period or {}
    if period.get("every"):
        text += f" {period['every']}"
    elif period.get("every_ms"):
        text += f" every {int(period['every_ms']) // 1000}s"
    if e.rate_limits:
        text += ", " + ", ".join(
            f"{format_amount(int(r['amount']), e.allocated.unit)}/{int(r['window_ms']) // 1000}s" for r in e.rate_limits
        )
    return text


def _action(rec: SpendRecord) -> dict[str, str]:
    """The ledger action of a call, cut to the lengths an Action takes (any log's names are welcome)."""
    return {"kind": (rec.kind or "call")[:64], "name": (rec.name or rec.model or "call")[:256]}


class _Replayer:
    """Drives both ledgers through the log; collects what the report needs."""

    def __init__(self, enforce: Ledger, shadow: Ledger, tokens: bool, overage: OveragePolicy) -> None:
        self.enforce, self.shadow = enforce, shadow
        self.tokens = tokens  # hold and charge TOKENS too (some budget is in tokens)
        self.overage = overage
        self.holds: dict[int, tuple[str, int, bool]] = {}  # ordinal -> (reservation id, held, clamped)

    def _also(self, amount: int | None) -> list[Amount]:
        return [Amount(unit=Unit.TOKENS, amount=amount)] if self.tokens and amount is not None else []

    def _key(self, n: int, rec: SpendRecord) -> str:
        return f"replay:{n}:{rec.call_id}"[:256]

    async def start(self, n: int, rec: SpendRecord) -> tuple[_Decision, _Decision]:
        """Both evaluations of a call at its start; enforce holds what it allows."""
        action = _action(rec)
        estimate = Amount(unit=_USD, amount=rec.estimate if rec.estimate is not None else rec.actual)
        token_hold = rec.token_estimate if rec.token_estimate is not None else rec.tokens
        ttl = min(_MAX_TTL_MS, max(60_000, rec.end_ms - rec.start_ms + _TTL_MARGIN_MS))
        decisions = []
        for ledger, dry in ((self.enforce, False), (self.shadow, True)):
            try:
                r = await ledger.reserve(
                    rec.subject,
                    action,
                    estimate,
                    also=self._also(token_hold),
                    ttl_ms=ttl,
                    dry_run=dry,
                    idempotency_key=self._key(n, rec),
                    key_is_unique=True,
                    soft_landing=rec.soft_landing,
                    overage_policy=self.overage,
                    metadata={"model": rec.model, "call_id": rec.call_id},
                )
            except CyclesError as exc:
                decisions.append(_Decision(False, None, f"{exc.code}: {exc.message}"))
                continue
            decisions.append(_Decision(r.allowed, r))
            if not dry and r.allowed and r.reservation_id is not None:
                held = r.reserved.amount if r.reserved is not None else estimate.amount
                clamped = (
                    r.decision is Decision.ALLOW_WITH_CAPS and r.caps is not None and r.caps.max_tokens is not None
                )
                self.holds[n] = (r.reservation_id, held, clamped)
        return decisions[0], decisions[1]

    async def settle(self, n: int, rec: SpendRecord, enforce_allowed: bool, evaluated: bool) -> int:
        """Settle a call at its end: enforce commits what the provider would have billed (returned); shadow
        debits the actual cost whatever it decided."""
        charged = 0
        hold = self.holds.pop(n, None)
        action = _action(rec)
        if hold is not None:
            rid, held, clamped = hold
            charged = min(rec.actual, held) if clamped else rec.actual
            try:
                await self.enforce.commit(rid, Amount(unit=_USD, amount=charged), also=self._also(rec.tokens))
            except ReservationExpiredError:  # a call longer than a hold lives: debited, as the lifecycle does
                await self.enforce.record_event(
                    rec.subject, action, Amount(unit=_USD, amount=charged), overage_policy=OveragePolicy.RECORD_ALL
                )
        elif enforce_allowed:  # allowed with nothing to hold (no budget applies): the call ran and was paid
            charged = rec.actual
        if evaluated:  # no budget to debit (unbudgeted="deny"): shadow records nothing, like the proxy
            with contextlib.suppress(NotFoundError):
                await self.shadow.record_event(
                    rec.subject,
                    action,
                    Amount(unit=_USD, amount=rec.actual),
                    also=self._also(rec.tokens),
                    overage_policy=OveragePolicy.RECORD_ALL,
                    idempotency_key=f"actual:{self._key(n, rec)}"[:256],
                )
        return charged


async def replay(
    log: SpendLog,
    budgets: Sequence[BudgetEntry],
    *,
    unbudgeted: str = "allow",
    overage_policy: OveragePolicy = OveragePolicy.ALLOW_IF_AVAILABLE,
) -> ReplayReport:
    """Run `log` (records in time order) through `budgets` under enforcement and in shadow mode.

    `unbudgeted`: "allow" lets calls no budget applies to through (counted apart), "deny" refuses them with
    BUDGET_NOT_FOUND as the proxy does by default. `overage_policy`: what a commit above its hold does
    (the proxy's default, ALLOW_IF_AVAILABLE)."""
    if unbudgeted not in ("allow", "deny"):
        raise ValueError("unbudgeted must be 'allow' or 'deny'")
    records = sorted(log.records, key=lambda r: (r.start_ms, r.end_ms))
    now = [records[0].start_ms if records else 0]

    def clock() -> int:
        return now[0]

    allow = unbudgeted == "allow"
    tokens = any(e.allocated.unit is Unit.TOKENS for e in budgets)
    report = ReplayReport(
        log=log.summary(),
        budgets=[f"{e.scope}: {_budget_text(e)}" for e in budgets],
        scopes=[],
        skipped=[{"where": s.where(), "error": s.error} for s in log.skipped],
    )
    scopes: dict[str, ScopeReplay] = {}
    for e in budgets:
        if e.allocated.unit is _USD:
            scopes.setdefault(e.scope, ScopeReplay(e.scope, _budget_text(e)))

    def at(scope: str) -> ScopeReplay:
        if scope not in scopes:
            scopes[scope] = ScopeReplay(scope)
        return scopes[scope]

    enforce = open_ledger("memory://", clock=clock, allow_unbudgeted=allow)
    shadow = open_ledger("memory://", clock=clock, allow_unbudgeted=allow)
    async with enforce, shadow:
        await apply_budgets(enforce, budgets)
        await apply_budgets(shadow, budgets)
        run = _Replayer(enforce, shadow, tokens, overage_policy)
        # Starts and ends in time order; an end at the same instant as a start goes first (its room is free).
        events: list[tuple[int, int, int]] = []
        for n, rec in enumerate(records, 1):
            events.append((rec.start_ms, 1, n))
            events.append((max(rec.end_ms, rec.start_ms), 2 if rec.end_ms <= rec.start_ms else 0, n))
        events.sort()
        outcome: dict[int, tuple[bool, bool]] = {}  # ordinal -> (enforce allowed, evaluated)
        for ts, phase, n in events:
            now[0] = ts
            rec = records[n - 1]
            if phase == 1:
                on_enforce, on_shadow = await run.start(n, rec)
                outcome[n] = (on_enforce.allowed, on_enforce.error is None)
                _tally_start(report, at, n, rec, on_enforce, on_shadow)
            else:
                allowed, evaluated = outcome.pop(n, (False, False))
                charged = await run.settle(n, rec, allowed, evaluated)
                report.enforce_spend += charged
                for scope in rec.subject.scopes():
                    if scope in scopes:
                        scopes[scope].enforce_spend += charged
    for rec in records:
        report.spend += rec.actual
        for scope in rec.subject.scopes():
            if scope in scopes:
                scopes[scope].calls += 1
                scopes[scope].spend += rec.actual
    report.scopes = sorted(scopes.values(), key=lambda s: s.scope)
    return report


def _ref(n: int, rec: SpendRecord, d: _Decision | None) -> CallRef:
    r = d.result if d is not None else None
    return CallRef(
        ordinal=n,
        call_id=rec.call_id,
        ts_ms=rec.start_ms,
        model=rec.model,
        reason=r.reason_code if r is not None else None,
        scope=r.scope if r is not None else None,
        remaining=r.remaining if r is not None else None,
        estimate=rec.estimate if rec.estimate is not None else rec.actual,
        actual=rec.actual,
        line=rec.line,
        source=rec.source,
    )


def _tally_start(
    report: ReplayReport, at: Callable[[str], ScopeReplay], n: int, rec: SpendRecord, e: _Decision, s: _Decision
) -> None:
    if e.error is not None or s.error is not None:
        report.errors.append({"call": _ref(n, rec, None).to_json(), "error": e.error or s.error})
        return
    er, sr = e.result, s.result
    assert er is not None and sr is not None
    if e.allowed and not er.balances:
        report.unbudgeted_calls += 1
        report.unbudgeted_spend += rec.actual
    if not e.allowed:
        report.denied += 1
        report.saved += rec.actual
        ref = _ref(n, rec, e)
        if report.first_denied is None:
            report.first_denied = ref
        sc = at(er.scope or rec.subject.scope_path)
        sc.denied += 1
        sc.saved += rec.actual
        if sc.first_denied is None:
            sc.first_denied = ref
    elif er.decision is Decision.ALLOW_WITH_CAPS and er.caps is not None and er.caps.max_tokens is not None:
        for scope in {b.scope for b in er.balances}:
            at(scope).clamped += 1
    if not s.allowed:
        report.would_deny += 1
        sc = at(sr.scope or rec.subject.scope_path)
        sc.would_deny += 1
        if sc.first_would_deny is None:
            sc.first_would_deny = _ref(n, rec, s)
    if e.allowed and not s.allowed:
        sc = at(sr.scope or rec.subject.scope_path)
        sc.allowed_only_by_enforce += 1
        if len(sc.allowed_only_by_enforce_calls) < _LISTED:
            sc.allowed_only_by_enforce_calls.append(_ref(n, rec, s))
    elif s.allowed and not e.allowed:
        sc = at(er.scope or rec.subject.scope_path)
        sc.denied_only_by_enforce += 1
        if len(sc.denied_only_by_enforce_calls) < _LISTED:
            sc.denied_only_by_enforce_calls.append(_ref(n, rec, e))


# --- text -------------------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns under a dashed rule."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def usd(n: int) -> str:
    """Dollars for people: cents from $1 up, four decimals below."""
    return f"${n / 10**8:,.2f}" if abs(n) >= 10**8 else f"${n / 10**8:.4f}"


def _when(ms: int) -> str:
    return iso_ms(ms)[:19].replace("T", " ")


def _call_text(ref: CallRef | None) -> str:
    if ref is None:
        return "-"
    return f"#{ref.ordinal} {_when(ref.ts_ms)} {ref.call_id} {ref.model} {ref.reason}"


def render_replay(report: ReplayReport) -> str:
    """The report as text: what was read, one row per scope, then where shadow and enforce differ."""
    log = report.log
    out = [
        f"replayed {log['calls']:,} calls ({usd(report.spend)}) from {', '.join(log['sources']) or '-'}"
        f" [{', '.join(log['formats']) or '-'}], {log['first'] or '-'} .. {log['last'] or '-'}",
        f"left out: {log['skipped']} bad lines, {log['duplicates']} duplicates, {log['ignored']} not paid calls, "
        f"{log['unattributed']} without a payer",
        "budgets: " + ("; ".join(report.budgets) or "none"),
        "",
    ]
    if report.first_denied is not None:
        f = report.first_denied
        out.append(
            f"first denied call: #{f.ordinal} {f.call_id} at {_when(f.ts_ms)} ({f.model}): {f.reason} at {f.scope}, "
            f"remaining {usd(f.remaining or 0)}, needed up to {usd(f.estimate or 0)}"
        )
    else:
        out.append("first denied call: none, every call fits the budgets")
    out.append(
        f"enforcement: {report.denied:,} calls denied, {usd(report.saved)} saved "
        f"({usd(report.enforce_spend)} spent instead of {usd(report.spend)}); shadow: {report.would_deny:,} would_deny"
    )
    if report.unbudgeted_calls:
        out.append(
            f"no budget applies to {report.unbudgeted_calls:,} calls ({usd(report.unbudgeted_spend)}): let through"
        )
    out.append("")
    rows = [
        [
            s.scope,
            s.budget or "-",
            f"{s.calls:,}",
            usd(s.spend),
            usd(s.enforce_spend),
            f"{s.denied:,}",
            usd(s.saved),
            _call_text(s.first_denied),
        ]
        for s in report.scopes
    ]
    out.append(
        table(["scope", "budget", "calls", "log spend", "enforced", "denied", "saved", "first denied (enforce)"], rows)
    )
    diff = [
        [
            s.scope,
            f"{s.would_deny:,}",
            f"{s.allowed_only_by_enforce:,}",
            f"{s.denied_only_by_enforce:,}",
            _call_text(s.allowed_only_by_enforce_calls[0] if s.allowed_only_by_enforce_calls else None),
        ]
        for s in report.scopes
        if s.would_deny or s.denied
    ]
    if diff:
        out += [
            "",
            "shadow vs enforce (enforce-only allowed: earlier denied calls did not spend; enforce-only denied: e.g. a "
            "budget a burn-rate limit froze)",
            table(["scope", "would_deny", "allowed only enforcing", "denied only enforcing", "first of them"], diff),
        ]
    if report.errors:
        out += ["", f"{len(report.errors)} calls the ledger refused as requests (first: {report.errors[0]['error']})"]
    if report.skipped:
        out += ["", f"skipped {len(report.skipped)} bad lines:"]
        out += [f"  {s['where']}: {s['error']}" for s in report.skipped[:20]]
        if len(report.skipped) > 20:
            out.append(f"  ... and {len(report.skipped) - 20} more (--json lists them all)")
    return "\n".join(out)
