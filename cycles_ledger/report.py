"""Spend reports from the event log: what each scope spent, on which model and route, per day.

Spend is what the log's `committed` events (enforced: a reservation held it first) and `debited` events
(shadow calls and direct debits: nothing held it) charged, in the event's unit and in the other units of
`data.also` (e.g. the call's TOKENS). Sums stay integers of their unit. A report can only cover what the
store still keeps (SQLite forgets events older than its retention window), so it says which window that is.
Days are UTC calendar days.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import textwrap
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequestError
from .ledger import Ledger
from .models import LedgerEvent, Unit, format_amount
from .stores.sqlite import SqliteStore

__all__ = [
    "KEYS",
    "Charge",
    "Report",
    "Sums",
    "build_report",
    "charges",
    "row_charges",
    "day_of",
    "duration_text",
    "parse_by",
    "parse_time",
    "render_csv",
    "render_json",
    "render_table",
    "show",
]

KEYS = ("scope", "model", "route", "day")
DAY_MS = 86_400_000
_PAGE = 5_000
_SKEW_MS = 300_000  # writers' clocks may disagree a little: read this far past --until before stopping
_UNIT_ORDER = {u: i for i, u in enumerate(Unit)}


@dataclass(frozen=True, slots=True)
class Charge:
    """What one call spent in one unit; `enforced` for a commit (held first), else a debit (shadow/direct)."""

    ts_ms: int
    scope: str
    model: str
    route: str
    unit: Unit
    amount: int
    enforced: bool


def charges(event: LedgerEvent) -> list[Charge]:
    """The spend one event records: none unless it is `committed` or `debited`."""
    if event.unit is None:
        return []
    base = (event.ts_ms, event.scope or "", event.model or "", event.route or "")
    return _charges(event.type, base, event.unit, event.amount, event.data)


def row_charges(row: Mapping[str, Any]) -> list[Charge]:
    """`charges` of an event as the store returns it (`Ledger.event_rows`), with no model or route: for
    readers that only add amounts up, such as a burn rate, at a third of the cost of reading `LedgerEvent`s."""
    unit = row.get("unit")
    if not isinstance(unit, str) or unit not in Unit.__members__:
        return []
    base = (row["ts_ms"], row.get("scope") or "", "", "")
    return _charges(row["type"], base, Unit(unit), row.get("amount"), row.get("data") or {})


def _charges(
    type_: str, base: tuple[int, str, str, str], unit: Unit, amount: int | None, data: Mapping[str, Any]
) -> list[Charge]:
    if type_ not in ("committed", "debited"):
        return []
    enforced = type_ == "committed"
    out = [Charge(*base, unit, amount or 0, enforced)]
    also = data.get("also")
    for other, value in (also if isinstance(also, dict) else {}).items():
        # a commit logs {unit: charged}, a debit {unit: {"charged": n, "scopes": [...]}}
        charged = value.get("charged", 0) if isinstance(value, dict) else value
        if isinstance(charged, int) and charged and other in Unit.__members__:
            out.append(Charge(*base, Unit(other), charged, enforced))
    return out


@dataclass(slots=True)
class Sums:
    """Calls and spend of one group, split by how the spend was recorded."""

    calls: int = 0
    enforced: int = 0
    debited: int = 0

    @property
    def total(self) -> int:
        return self.enforced + self.debited

    def add(self, c: Charge) -> None:
        self.calls += 1
        if c.enforced:
            self.enforced += c.amount
        else:
            self.debited += c.amount

    def as_dict(self) -> dict[str, int]:
        return {"calls": self.calls, "enforced": self.enforced, "debited": self.debited, "total": self.total}


def day_of(ts_ms: int) -> str:
    return dt.datetime.fromtimestamp(ts_ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d")


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def duration_text(ms: int) -> str:
    for unit, size in (("d", DAY_MS), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def parse_time(text: str | None, *, end: bool = False) -> int | None:
    """`2026-12-01` (a whole UTC day: its start, or with `end` the start of the next day) or an ISO
    date-time (naive means UTC), in epoch ms."""
    if text is None:
        return None
    try:
        if len(text) == 10:
            day = dt.datetime.combine(dt.date.fromisoformat(text), dt.time(), tzinfo=dt.UTC)
            return int(day.timestamp() * 1000) + (DAY_MS if end else 0)
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequestError(f"{text!r} is not a date (2026-12-01) or an ISO date-time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


def parse_by(values: Sequence[str] | None) -> tuple[str, ...]:
    """Group keys from `--by scope,model --by day` (default: scope, model), in the order given."""
    keys: list[str] = []
    for value in values or ["scope,model"]:
        for key in (k.strip() for k in value.split(",")):
            if key not in KEYS:
                raise InvalidRequestError(f"cannot group by {key!r}; choose from {', '.join(KEYS)}")
            if key not in keys:
                keys.append(key)
    return tuple(keys)


@dataclass
class Report:
    """Spend grouped by `by` (and per day by model and by scope, for charts), with the window it covers."""

    by: tuple[str, ...]
    scope: str | None = None
    depth: int | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    log_keeps: str = ""
    oldest_kept_ms: int | None = None
    first_ms: int | None = None
    last_ms: int | None = None
    groups: dict[tuple[tuple[str, ...], Unit], Sums] = field(default_factory=dict)
    daily: dict[tuple[str, Unit, str, str], Sums] = field(default_factory=dict)  # (day, unit, "model"|"scope", name)

    def scope_of(self, scope: str) -> str:
        return scope if self.depth is None else "/".join(scope.split("/")[: self.depth])

    def add(self, c: Charge) -> None:
        values = {"scope": self.scope_of(c.scope), "model": c.model, "route": c.route, "day": day_of(c.ts_ms)}
        self.groups.setdefault((tuple(values[k] for k in self.by), c.unit), Sums()).add(c)
        for kind in ("model", "scope"):
            self.daily.setdefault((values["day"], c.unit, kind, values[kind]), Sums()).add(c)
        self.first_ms = c.ts_ms if self.first_ms is None else min(self.first_ms, c.ts_ms)
        self.last_ms = c.ts_ms if self.last_ms is None else max(self.last_ms, c.ts_ms)

    def units(self) -> list[Unit]:
        return sorted({u for _, u in self.groups}, key=_UNIT_ORDER.__getitem__)

    def rows(self) -> list[tuple[tuple[str, ...], Unit, Sums]]:
        """Per unit (USD first); by key when grouped by day first, else the biggest spend first."""
        rows = [(key, unit, s) for (key, unit), s in self.groups.items()]
        if self.by[:1] == ("day",):
            rows.sort(key=lambda r: (_UNIT_ORDER[r[1]], r[0]))
        else:
            rows.sort(key=lambda r: (_UNIT_ORDER[r[1]], -r[2].total, r[0]))
        return rows

    def totals(self) -> dict[Unit, Sums]:
        out: dict[Unit, Sums] = {}
        for (_, unit), s in self.groups.items():
            t = out.setdefault(unit, Sums())
            t.calls, t.enforced, t.debited = t.calls + s.calls, t.enforced + s.enforced, t.debited + s.debited
        return {u: out[u] for u in sorted(out, key=_UNIT_ORDER.__getitem__)}

    def window(self) -> dict[str, Any]:
        """What the report covers: the asked range, the spend found, and what the log still keeps."""
        return {
            "since": _iso(self.since_ms),
            "until": _iso(self.until_ms),
            "first_spend": _iso(self.first_ms),
            "last_spend": _iso(self.last_ms),
            "oldest_event_kept": _iso(self.oldest_kept_ms),
            "log_keeps": self.log_keeps,
            "days": "UTC",
        }

    def window_text(self) -> str:
        asked = f"{_iso(self.since_ms) or 'the start of the log'} to {_iso(self.until_ms) or 'now'}"
        found = (
            f"spend found from {_iso(self.first_ms)} to {_iso(self.last_ms)}"
            if self.first_ms is not None
            else "no spend found"
        )
        kept = f"The log keeps {self.log_keeps}"
        if self.oldest_kept_ms is not None:
            kept += f"; its oldest event is from {_iso(self.oldest_kept_ms)}"
            if self.since_ms is None or self.since_ms < self.oldest_kept_ms:
                kept += " (spend before it, if any, is not in this report)"
        return f"Asked: {asked}; {found}. {kept}. Days are UTC."


def _log_keeps(ledger: Ledger) -> str:
    store = ledger.store
    if isinstance(store, SqliteStore):
        if store.retention_ms is None:
            return "every event (SQLite, retention=forever)"
        return f"events of the last {duration_text(store.retention_ms)} (SQLite retention)"
    if "redis" in store.schemes:
        return "about the newest event_retention events per stream (Redis; default 1,000,000)"
    return "every event since the store was opened"


async def build_report(
    ledger: Ledger,
    *,
    by: Sequence[str] = ("scope", "model"),
    scope: str | None = None,
    since: str | None = None,
    until: str | None = None,
    depth: int | None = None,
) -> Report:
    """Read the log page by page (never all at once) and sum the spend in [since, until) under `scope`."""
    if depth is not None and depth < 1:
        raise InvalidRequestError("depth must be at least 1")
    report = Report(
        by=tuple(by),
        scope=scope,
        depth=depth,
        since_ms=parse_time(since),
        until_ms=parse_time(until, end=True),
        log_keeps=_log_keeps(ledger),
    )
    async for event in _read_log(ledger, report):
        for c in charges(event):
            report.add(c)
    return report


async def _read_log(ledger: Ledger, report: Report) -> AsyncIterator[LedgerEvent]:
    """The in-range spend events, one page at a time; notes the oldest event the log keeps on the way."""
    after = 0
    while True:
        page = await ledger.events(after=after, limit=_PAGE, scope=report.scope)
        for e in page:
            if report.oldest_kept_ms is None and e.type != "period_reset":  # resets are never pruned
                report.oldest_kept_ms = e.ts_ms
            if e.type not in ("committed", "debited"):
                continue
            if report.since_ms is not None and e.ts_ms < report.since_ms:
                continue
            if report.until_ms is not None and e.ts_ms >= report.until_ms:
                if e.ts_ms >= report.until_ms + _SKEW_MS:
                    return
                continue
            yield e
        if len(page) < _PAGE:
            return
        after = page[-1].event_id


# --- renderings -------------------------------------------------------------------------------------


def show(n: int, unit: Unit) -> str:
    """An amount for people: dollars for money, a grouped number otherwise (the unit is in its own column)."""
    return format_amount(n, unit) if unit is Unit.USD_MICROCENTS else f"{n:,}"


def unit_name(unit: Unit) -> str:
    return "USD" if unit is Unit.USD_MICROCENTS else unit.value


_MONEY_COLUMNS = ("calls", "enforced", "shadow/debit", "total")


def render_table(report: Report) -> str:
    """The grouped spend with a total per unit, under a line saying what it covers."""

    def cells(key: Sequence[str], unit: Unit, s: Sums) -> list[str]:
        return [*key, unit_name(unit), str(s.calls), show(s.enforced, unit), show(s.debited, unit), show(s.total, unit)]

    headers = [*report.by, "unit", *_MONEY_COLUMNS]
    body = [cells(key, unit, s) for key, unit, s in report.rows()]
    foot = [cells(["total", *[""] * (len(report.by) - 1)], unit, s) for unit, s in report.totals().items()]
    widths = [max(len(r[i]) for r in [headers, *body, *foot]) for i in range(len(headers))]
    numeric = len(report.by) + 1  # right-aligned from here

    def line(row: list[str]) -> str:
        padded = (c.rjust(w) if i >= numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        return "  ".join(padded).rstrip()

    rule = line(["-" * w for w in widths])
    return "\n".join(
        [
            f"Spend by {', '.join(report.by)}" + (f" under {report.scope}" if report.scope else ""),
            textwrap.fill(report.window_text(), 110),
            textwrap.fill(
                "enforced: committed reservations (held before the call); shadow/debit: debited without a hold "
                "(shadow mode, direct debits, expired holds).",
                110,
            ),
            "",
            line(headers),
            rule,
            *(line(r) for r in body),
            rule,
            *(line(r) for r in foot),
        ]
    )


def render_csv(report: Report) -> str:
    """One row per group; amounts are integers of `unit` (USD_MICROCENTS: 1 USD = 10^8)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*report.by, "unit", "calls", "enforced", "debited", "total"])
    for key, unit, s in report.rows():
        w.writerow([*key, unit.value, s.calls, s.enforced, s.debited, s.total])
    return buf.getvalue().rstrip("\n")


def render_json(report: Report) -> str:
    """The groups, totals and window; amounts are integers of `unit` (USD_MICROCENTS: 1 USD = 10^8)."""
    return json.dumps(
        {
            "by": list(report.by),
            "scope": report.scope,
            "window": report.window(),
            "rows": [
                {**dict(zip(report.by, key, strict=True)), "unit": unit.value, **s.as_dict()}
                for key, unit, s in report.rows()
            ],
            "totals": [{"unit": unit.value, **s.as_dict()} for unit, s in report.totals().items()],
        },
        indent=2,
    )
