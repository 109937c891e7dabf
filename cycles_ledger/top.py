"""`cycles top`: budgets, burn rates and the last minutes' spend, redrawn in the terminal every second.

A frame is plain text built from `Ledger.balances()` and the tail of the event log (spend as `report`
reads it: committed and debited events). On a terminal each frame replaces the last (ANSI cursor home and
clear) with colour; anywhere else frames are printed one after another, without escapes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from .ledger import Ledger
from .models import Balance, BudgetStatus, Unit
from .report import Charge, charges, duration_text, show, unit_name

__all__ = ["RecentSpend", "frame", "run"]

_BAR = 24
_FIRST_READ = 20_000  # newest events read for the first frame; later frames read only what is new
_PAGE = 5_000
_MINUTE = 60_000
_RED, _YELLOW, _GREEN, _DIM, _RESET = "\x1b[31m", "\x1b[33m", "\x1b[32m", "\x1b[2m", "\x1b[0m"
_HOME_CLEAR = "\x1b[H\x1b[J"


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class RecentSpend:
    """The charges of the last `minutes`, kept up to date from the log with a cursor (each frame reads
    only the events written since the last)."""

    minutes: int
    scope: str | None = None
    items: list[Charge] = field(default_factory=list)
    truncated: bool = False  # the first read stopped at _FIRST_READ events before the window's start
    _after: int | None = None

    def start_ms(self, now_ms: int) -> int:
        return (now_ms // _MINUTE - self.minutes + 1) * _MINUTE

    async def refresh(self, ledger: Ledger, now_ms: int) -> None:
        start = self.start_ms(now_ms)
        if self._after is None:
            newest = await ledger.events(limit=_FIRST_READ, newest=True, scope=self.scope)
            self._after = newest[0].event_id if newest else 0
            self.truncated = len(newest) == _FIRST_READ and newest[-1].ts_ms >= start
            fresh = list(reversed(newest))
        else:
            fresh = []
            while True:
                page = await ledger.events(after=self._after, limit=_PAGE, scope=self.scope)
                fresh += page
                if page:
                    self._after = page[-1].event_id
                if len(page) < _PAGE:
                    break
        self.items = [c for c in self.items if c.ts_ms >= start]
        self.items += [c for e in fresh if e.ts_ms >= start for c in charges(e)]

    def per_minute(self, now_ms: int) -> tuple[list[int], dict[Unit, list[int]]]:
        """The window's minute starts (oldest first) and each unit's spend in each minute."""
        start = self.start_ms(now_ms)
        minutes = [start + i * _MINUTE for i in range(self.minutes)]
        sums: dict[Unit, list[int]] = {}
        for c in self.items:
            i = (c.ts_ms - start) // _MINUTE
            if 0 <= i < self.minutes:
                sums.setdefault(c.unit, [0] * self.minutes)[i] += c.amount
        return minutes, {u: sums[u] for u in Unit if u in sums}

    def top_scopes(self, unit: Unit, n: int = 5) -> list[tuple[str, int]]:
        spent: dict[str, int] = {}
        for c in self.items:
            if c.unit is unit:
                spent[c.scope] = spent.get(c.scope, 0) + c.amount
        return sorted(spent.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def _clock(ms: int, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime(fmt)


def _bar(filled: list[tuple[int, str]], whole: int, width: int = _BAR) -> str:
    """`[###++.....]`: each (amount, mark) takes its share of `whole`; past `whole` the bar is full."""
    cells, used = "", 0
    for amount, mark in filled:
        used += amount
        n = (width if used > 0 else 0) if whole <= 0 else min(width, used * width // whole)
        cells += mark * max(0, n - len(cells))
    return "[" + cells + "." * (width - len(cells)) + "]"


def _percent(part: int, whole: int) -> str:
    if whole <= 0:
        return "  -" if part <= 0 else "100%+"
    return f"{part * 100 // whole:3d}%"


def _paint(text: str, colour: str, on: bool) -> str:
    return f"{colour}{text}{_RESET}" if on and colour else text


def _severity(used: int, whole: int, status: BudgetStatus = BudgetStatus.ACTIVE) -> str:
    if status is not BudgetStatus.ACTIVE or (whole > 0 and used * 100 >= whole * 95) or (whole <= 0 < used):
        return _RED
    return _YELLOW if whole > 0 and used * 100 >= whole * 80 else _GREEN


def _period(b: Balance, now_ms: int) -> str:
    if not b.period:
        return ""
    every = b.period.get("every") or f"every {duration_text(int(b.period['every_ms']))}"
    tz = f" {b.period['tz']}" if b.period.get("tz") and b.period["tz"] != "UTC" else ""
    if not b.period_end_ms:
        return f"{every}{tz}"
    left = max(0, b.period_end_ms - now_ms) // _MINUTE
    return f"{every}{tz}, resets {_clock(b.period_end_ms, '%Y-%m-%d %H:%M')} UTC (in {left // 60}h {left % 60:02d}m)"


_HEADERS = ("scope", "unit", "allocated", "spent", "reserved", "remaining")


def _budgets(balances: list[Balance], now_ms: int, colour: bool) -> list[str]:
    """A row per budget (amounts aligned, then its bar and period), each rate limit's window use under it."""
    rows = [
        [
            b.scope,
            unit_name(b.unit),
            *(show(v, b.unit) for v in (b.allocated, b.spent, b.reserved, b.remaining)),
        ]
        for b in balances
    ]
    widths = [max(len(r[i]) for r in [list(_HEADERS), *rows]) for i in range(len(_HEADERS))]

    def cells(row: list[str] | tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    out = [f"  {cells(_HEADERS)}  used [# spent+debt, + reserved]"]
    for b, row in zip(balances, rows, strict=True):
        used = b.spent + b.debt + b.reserved
        meter = f"{_bar([(b.spent + b.debt, '#'), (b.reserved, '+')], b.allocated)} {_percent(used, b.allocated)}"
        notes = [] if b.status is BudgetStatus.ACTIVE else [b.status.value]
        notes += [f"debt {show(b.debt, b.unit)}"] if b.debt else []
        notes += ["OVER-LIMIT"] if b.is_over_limit else []
        notes += [_period(b, now_ms)] if b.period else []
        out.append(
            f"  {cells(row)}  {_paint(meter, _severity(used, b.allocated, b.status), colour)}  {'  '.join(notes)}"
        )
        for i, lim in enumerate(b.rate_limits or []):
            burn = (b.burn or [])[i] if i < len(b.burn or []) else 0
            bar = f"{_bar([(burn, '#')], lim.amount)} {_percent(burn, lim.amount)}"
            out.append(
                f"    burn {show(burn, b.unit)} / {show(lim.amount, b.unit)} per {duration_text(lim.window_ms)} "
                f"({lim.on_exceed})  {_paint(bar, _severity(burn, lim.amount), colour)}"
            )
    return [line.rstrip() for line in out]


def frame(
    balances: list[Balance], recent: RecentSpend, *, now_ms: int, colour: bool = False, interval: float | None = None
) -> str:
    """One screen: every budget with its bars, then the spend per minute of the last `recent.minutes`."""
    where = f" under {recent.scope}" if recent.scope else ""
    refresh = f", every {interval:g}s, Ctrl-C quits" if interval else ""
    out = [f"cycles top{where} · {_clock(now_ms)} UTC{refresh}", ""]
    out.append(f"BUDGETS ({len(balances)})")
    out += _budgets(balances, now_ms, colour) if balances else ["  no budgets" + where]
    minutes, sums = recent.per_minute(now_ms)
    out += ["", f"SPEND PER MINUTE, last {recent.minutes} min (committed + debited events)"]
    if recent.truncated:
        out.append(f"  (the first read stopped at the newest {_FIRST_READ:,} events: older minutes are short)")
    if not sums:
        out.append("  no spend")
        return "\n".join(out)
    units = list(sums)
    first = units[0]
    peak = max(sums[first])
    cols = [[show(v, u) for v in sums[u]] for u in units]
    widths = [max(len(unit_name(u)), *(len(c) for c in col)) for u, col in zip(units, cols, strict=True)]
    out.append("  minute  " + "  ".join(unit_name(u).rjust(w) for u, w in zip(units, widths, strict=True)))
    for i, m in enumerate(minutes):
        cells = "  ".join(col[i].rjust(w) for col, w in zip(cols, widths, strict=True))
        out.append(f"  {_clock(m, '%H:%M')}   {cells}  {_paint(_bar([(sums[first][i], '#')], peak, 20), _DIM, colour)}")
    for u in units:
        total = sum(sums[u])
        rate = total // recent.minutes
        rate -= rate % 10_000 if u is Unit.USD_MICROCENTS else 0  # to a hundredth of a cent
        out.append(f"  {unit_name(u)}: {show(total, u)} in {recent.minutes} min, {show(rate, u)}/min")
    tops = recent.top_scopes(first)
    if tops:
        out.append(f"  top scopes ({unit_name(first)}): " + ", ".join(f"{s} {show(v, first)}" for s, v in tops))
    return "\n".join(out)


async def run(
    ledger: Ledger,
    *,
    scope: str | None = None,
    minutes: int = 10,
    interval: float = 1.0,
    once: bool = False,
    out: TextIO | None = None,
    clock: Callable[[], int] = _wall_ms,
) -> None:
    """Draw frames until cancelled (Ctrl-C), or one with `once`."""
    stream = out or sys.stdout
    live = stream.isatty() and not once
    recent = RecentSpend(max(1, minutes), scope)
    while True:
        now = clock()
        await recent.refresh(ledger, now)
        text = frame(await ledger.balances(scope), recent, now_ms=now, colour=live, interval=None if once else interval)
        stream.write(f"{_HOME_CLEAR}{text}\n" if live else f"{text}\n\n" if not once else f"{text}\n")
        stream.flush()
        if once:
            return
        await asyncio.sleep(interval)
