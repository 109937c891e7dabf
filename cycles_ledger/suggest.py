"""Budgets and burn-rate limits proposed from past spend: the percentiles of what each scope spent.

For every scope a call's payer includes (`tenant:acme`, `tenant:acme/workflow:docs`, ...):

- **daily budget** = the p95 of its spend per day (days with any spend, in `tz`) x headroom;
- **rate limit** = the p99 of its spend in the sliding window (10 minutes) ending at each of its calls, i.e.
  the burn a rate limit sees when it checks a call, x headroom;
- **run budget** = the p95 of its spend per run (an agent run, trace or session: `SpendRecord.run`) x
  headroom; a run has its own scope only when it starts, so this one is a comment to act on.

Percentiles are nearest-rank (the smallest value with at least p% of the values at or below it), so each is
a value that occurred; with fewer than 20 days a p95 is the largest day. Amounts are rounded up to two
significant digits. The YAML is what `cycles budgets apply` reads (`cycles_ledger.config`).
"""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

from .replay import table, usd
from .spendlog import SpendLog
from .timing import duration_ms, time_zone

__all__ = ["ScopeSuggestion", "Suggestion", "nice_up", "percentile", "render_suggest", "suggest"]

_USD = 10**8


def percentile(values: Sequence[int], p: float) -> int:
    """Nearest-rank percentile: the value at rank ceil(p/100 x n) of the sorted values (0 for none)."""
    if not values:
        return 0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return int(ordered[min(rank, len(ordered)) - 1])


def nice_up(amount: int) -> int:
    """Round up to two significant digits (at least one cent): $3.405 -> $3.50, $187.2 -> $190."""
    amount = max(amount, _USD // 100)
    unit = int(10 ** max(len(str(amount)) - 2, 0))
    return -(-amount // unit) * unit


def _usd_text(amount: int) -> str:
    """`3.5usd`: what budgets.yaml reads back as exactly `amount` USD_MICROCENTS."""
    text = format(Decimal(amount) / _USD, "f")
    return (text.rstrip("0").rstrip(".") if "." in text else text) + "usd"


@dataclass
class ScopeSuggestion:
    scope: str
    calls: int = 0
    spend: int = 0
    days: int = 0  # days with spend
    daily_p50: int = 0
    daily_p: int = 0  # the daily percentile asked for (p95)
    daily_max: int = 0
    window_p: int = 0  # the window percentile asked for (p99)
    window_max: int = 0
    runs: int = 0
    calls_without_run: int = 0
    run_p50: int = 0
    run_p: int = 0
    run_max: int = 0
    daily_budget: int = 0
    rate_limit: int = 0
    run_budget: int | None = None


@dataclass
class Suggestion:
    log: dict[str, Any]
    headroom: float
    daily_percentile: float
    window_percentile: float
    run_percentile: float
    window: str
    tz: str
    scopes: list[ScopeSuggestion] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "log": self.log,
            "method": {
                "daily_budget": f"p{self.daily_percentile:g} of spend per day (days with spend, {self.tz}) "
                f"x {self.headroom:g}",
                "rate_limit": f"p{self.window_percentile:g} of spend in the {self.window} window ending at each call "
                f"x {self.headroom:g}",
                "run_budget": f"p{self.run_percentile:g} of spend per run x {self.headroom:g}",
                "percentile": "nearest rank; amounts rounded up to two significant digits",
                "unit": "USD_MICROCENTS",
            },
            "scopes": [asdict(s) for s in self.scopes],
            "yaml": self.yaml(),
        }

    def yaml(self) -> str:
        """A budgets file for `cycles budgets apply`, each figure's origin in a comment."""
        h = f"{self.headroom:g}"
        out = [
            f"# cycles suggest: {self.log['calls']:,} calls, {usd(int(self.log['spend']))}, "
            f"{self.log['first'] or '-'} .. {self.log['last'] or '-'}",
            f"# allocated (daily) = p{self.daily_percentile:g} of spend per day with spend ({self.tz}) x {h}; "
            f"rate limit = p{self.window_percentile:g} of the {self.window} spend at each call x {h};",
            f"# run budget = p{self.run_percentile:g} of spend per run x {h}. Nearest-rank percentiles, rounded up "
            "to 2 significant digits.",
            "budgets:",
        ]
        for s in self.scopes:
            out += [
                f"  - scope: {s.scope}",
                f"    allocated: {_usd_text(s.daily_budget)}  # p{self.daily_percentile:g} {usd(s.daily_p)}/day over "
                f"{s.days} day(s), max {usd(s.daily_max)}",
                f"    period: {{every: daily, tz: {self.tz}}}",
                f"    rate_limits: [{{amount: {_usd_text(s.rate_limit)}, window: {self.window}}}]  "
                f"# p{self.window_percentile:g} {usd(s.window_p)}, max {usd(s.window_max)}",
                "    alerts: [50%, 80%, 100%]",
            ]
            if s.run_budget is not None:
                out.append(
                    f"    # run budget {_usd_text(s.run_budget)}: p{self.run_percentile:g} {usd(s.run_p)} of {s.runs} "
                    f"run(s), max {usd(s.run_max)} (set it on a run's own scope when the run starts)"
                )
        return "\n".join(out) + "\n"


def suggest(
    log: SpendLog,
    *,
    headroom: float = 1.5,
    daily_percentile: float = 95,
    window_percentile: float = 99,
    run_percentile: float = 95,
    window: str = "10m",
    tz: str = "UTC",
    scope_prefixes: Sequence[str] = (),
) -> Suggestion:
    """Per-scope spend distributions of `log` and the budgets they suggest (see the module docstring)."""
    if headroom <= 0:
        raise ValueError("headroom must be above zero")
    window_ms = duration_ms(window, "window")
    zone = time_zone(tz)
    days: dict[str, dict[dt.date, int]] = defaultdict(lambda: defaultdict(int))
    runs: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    bursts: dict[str, list[int]] = defaultdict(list)
    recent: dict[str, deque[tuple[int, int]]] = defaultdict(deque)
    sums: dict[str, int] = defaultdict(int)
    stats: dict[str, ScopeSuggestion] = {}
    for rec in sorted(log.records, key=lambda r: r.start_ms):
        day = dt.datetime.fromtimestamp(rec.start_ms / 1000, tz=dt.UTC).astimezone(zone).date()
        for scope in rec.subject.scopes():
            if scope_prefixes and not any(scope == p or scope.startswith(p + "/") for p in scope_prefixes):
                continue
            s = stats.setdefault(scope, ScopeSuggestion(scope))
            s.calls += 1
            s.spend += rec.actual
            days[scope][day] += rec.actual
            if rec.run is None:
                s.calls_without_run += 1
            else:
                runs[scope][rec.run] += rec.actual
            q = recent[scope]  # spend (held at its start, as the ledger counts it) in the window ending now
            q.append((rec.start_ms, rec.actual))
            sums[scope] += rec.actual
            while q and q[0][0] <= rec.start_ms - window_ms:
                sums[scope] -= q.popleft()[1]
            bursts[scope].append(sums[scope])
    result = Suggestion(log.summary(), headroom, daily_percentile, window_percentile, run_percentile, window, tz)
    for scope in sorted(stats):
        s = stats[scope]
        daily = list(days[scope].values())
        s.days = len(daily)
        s.daily_p50, s.daily_p, s.daily_max = percentile(daily, 50), percentile(daily, daily_percentile), max(daily)
        s.window_p, s.window_max = percentile(bursts[scope], window_percentile), max(bursts[scope])
        per_run = list(runs[scope].values())
        s.runs = len(per_run)
        if per_run:
            s.run_p50, s.run_p, s.run_max = percentile(per_run, 50), percentile(per_run, run_percentile), max(per_run)
            s.run_budget = nice_up(math.ceil(s.run_p * headroom))
        s.daily_budget = nice_up(math.ceil(s.daily_p * headroom))
        s.rate_limit = nice_up(math.ceil(s.window_p * headroom))
        result.scopes.append(s)
    return result


def render_suggest(s: Suggestion) -> str:
    """The distributions behind each suggestion, one row per scope."""
    rows = [
        [
            x.scope,
            f"{x.calls:,}",
            usd(x.spend),
            f"{x.days}",
            f"{usd(x.daily_p50)} / {usd(x.daily_p)} / {usd(x.daily_max)}",
            usd(x.daily_budget),
            f"{usd(x.window_p)} / {usd(x.window_max)}",
            usd(x.rate_limit),
            f"{x.runs}: {usd(x.run_p)} / {usd(x.run_max)}" if x.runs else "-",
            usd(x.run_budget) if x.run_budget is not None else "-",
        ]
        for x in s.scopes
    ]
    dp, wp, rp = (f"p{v:g}" for v in (s.daily_percentile, s.window_percentile, s.run_percentile))
    return table(
        [
            "scope",
            "calls",
            "spend",
            "days",
            f"per day p50/{dp}/max",
            "daily budget",
            f"{s.window} {wp}/max",
            "rate limit",
            f"runs: {rp}/max",
            "run budget",
        ],
        rows,
    )
