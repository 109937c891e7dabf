"""A spend report as one self-contained HTML file: stacked bars of spend per day (inline SVG drawn here),
the numbers behind them, and the grouped table. No script, font or stylesheet is fetched from anywhere.

Each bar is a day; its segments are models (or scopes), solid for enforced spend and hatched for shadow or
direct debits; hovering a segment names it. The tables under each chart repeat every number it draws.
"""

from __future__ import annotations

import datetime as dt
from html import escape

from .models import Unit
from .report import Report, Sums, show, unit_name

__all__ = ["render_html"]

# Okabe-Ito, readable by the colour-blind; the last colour is for "other"
_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
_OTHER = "#9a9a9a"
_W, _H = 880, 340
_LEFT, _RIGHT, _TOP, _BOTTOM = 88, 16, 28, 44

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d1d1f;margin:2rem auto;max-width:920px;
padding:0 1rem}
h1{font-size:1.5rem;margin:0 0 .25rem}h2{font-size:1.1rem;margin:2rem 0 .5rem}
p.note{color:#555;margin:.25rem 0}
.cards{display:flex;gap:1rem;flex-wrap:wrap;margin:1rem 0}
.card{border:1px solid #ddd;border-radius:8px;padding:.6rem 1rem;min-width:12rem}
.card b{display:block;font-size:1.4rem}
table{border-collapse:collapse;margin:.5rem 0;font-variant-numeric:tabular-nums}
th,td{padding:.2rem .6rem;border-bottom:1px solid #eee;text-align:left}
td.n,th.n{text-align:right}tr.total td{font-weight:600;border-top:2px solid #999}
.legend{display:flex;gap:.9rem;flex-wrap:wrap;margin:.3rem 0}
.legend span::before{content:"";display:inline-block;width:.8rem;height:.8rem;margin-right:.3rem;
background:var(--c);vertical-align:-1px}
svg text{fill:#333}
"""


def render_html(report: Report, *, stack: str = "model", top: int = 7) -> str:
    """The whole document: totals, then per unit a chart of spend per day stacked by `stack` (model or scope;
    the `top` biggest, the rest as "other") with its table, then the grouped table."""
    if stack not in ("model", "scope"):
        raise ValueError(f"stack must be model or scope, not {stack!r}")
    parts = [
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        f"<title>Cycles spend report{escape(' — ' + report.scope) if report.scope else ''}</title>\n",
        f"<style>{_CSS}</style>\n</head>\n<body>\n",
        f"<h1>Spend report{escape(' — ' + report.scope) if report.scope else ''}</h1>\n",
        f'<p class="note">{escape(report.window_text())}</p>\n',
        '<p class="note">Enforced: committed reservations, held before the call. Shadow/debit: debited without a '
        "hold (shadow mode, direct debits, expired holds); hatched in the charts.</p>\n",
        _cards(report),
    ]
    for unit in report.units():
        parts.append(_chart_section(report, unit, stack, top))
    parts.append(f"<h2>By {escape(', '.join(report.by))}</h2>\n{_groups_table(report)}")
    parts.append("</body>\n</html>\n")
    return "".join(parts)


def _cards(report: Report) -> str:
    cards = []
    for unit, s in report.totals().items():
        cards.append(
            f'<div class="card">Total {escape(unit_name(unit))}<b>{escape(show(s.total, unit))}</b>'
            f"enforced {escape(show(s.enforced, unit))} · shadow/debit {escape(show(s.debited, unit))}"
            f" · {s.calls} calls</div>"
        )
    empty = '<div class="card">No spend in this window</div>'
    return f'<div class="cards">{"".join(cards) or empty}</div>\n'


def _days(report: Report, unit: Unit) -> list[str]:
    """Every day from the first to the last with spend in `unit`, gaps included (a chart of time has no holes)."""
    found = sorted({day for day, u, _, _ in report.daily if u is unit})
    if not found:
        return []
    first, last = dt.date.fromisoformat(found[0]), dt.date.fromisoformat(found[-1])
    return [(first + dt.timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def _series(report: Report, unit: Unit, stack: str, top: int) -> tuple[list[str], dict[tuple[str, str], Sums]]:
    """The stacked names, biggest first ("other" last), and each (day, name)'s sums."""
    per_name: dict[str, int] = {}
    for (_, u, kind, name), s in report.daily.items():
        if u is unit and kind == stack:
            per_name[name] = per_name.get(name, 0) + s.total
    ranked = sorted(per_name, key=lambda n: (-per_name[n], n))
    kept = set(ranked[:top]) if len(ranked) > top + 1 else set(ranked)
    cells: dict[tuple[str, str], Sums] = {}
    for (day, u, kind, name), s in report.daily.items():
        if u is unit and kind == stack:
            cell = cells.setdefault((day, name if name in kept else "other"), Sums())
            cell.calls, cell.enforced, cell.debited = (
                cell.calls + s.calls,
                cell.enforced + s.enforced,
                cell.debited + s.debited,
            )
    names = [n for n in ranked if n in kept] + (["other"] if len(kept) < len(ranked) else [])
    return names, cells


def _colour(names: list[str], i: int) -> str:
    return _OTHER if names[i] == "other" and i == len(names) - 1 else _COLOURS[i % len(_COLOURS)]


def _nice_step(peak: int) -> int:
    """A 1-2-5 step giving about five grid lines up to `peak` (integers: amounts stay exact)."""
    rough = max(1, -(-peak // 5))
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale >= rough:
                return m * scale
        scale *= 10


def _chart_section(report: Report, unit: Unit, stack: str, top: int) -> str:
    days = _days(report, unit)
    names, cells = _series(report, unit, stack, top)
    legend = "".join(
        f'<span style="--c:{_colour(names, i)}">{escape(name or "(none)")}</span>' for i, name in enumerate(names)
    )
    title = f"Spend per day by {stack} ({unit_name(unit)})"
    return (
        f"<h2>{escape(title)}</h2>\n{_svg(days, names, cells, unit, title)}\n"
        f'<div class="legend">{legend}</div>\n{_days_table(days, names, cells, unit, stack)}'
    )


def _svg(days: list[str], names: list[str], cells: dict[tuple[str, str], Sums], unit: Unit, title: str) -> str:
    totals = {d: sum(cells[(d, n)].total for n in names if (d, n) in cells) for d in days}
    step = _nice_step(max(totals.values(), default=0))
    top_value = step * max(1, -(-max(totals.values(), default=0) // step))
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    slot = plot_w / max(1, len(days))
    bar = min(56.0, slot * 0.7)

    def y(value: int) -> float:
        return _TOP + plot_h - plot_h * value / top_value

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H}" width="100%" role="img" '
        'font-family="system-ui, sans-serif" font-size="11" '
        f'aria-label="{escape(title)}">',
        "<defs>",
    ]
    for i in range(len(names)):
        c = _colour(names, i)
        out.append(
            f'<pattern id="h{i}" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
            f'<rect width="6" height="6" fill="{c}" fill-opacity="0.25"/>'
            f'<line x1="0" y1="0" x2="0" y2="6" stroke="{c}" stroke-width="3"/></pattern>'
        )
    out.append("</defs>")
    for k in range(0, top_value + 1, step):
        out.append(
            f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y(k):.1f}" y2="{y(k):.1f}" stroke="#e3e3e3"/>'
            f'<text x="{_LEFT - 6}" y="{y(k) + 4:.1f}" text-anchor="end">{escape(show(k, unit))}</text>'
        )
    label_every = max(1, -(-len(days) // 16))
    for j, day in enumerate(days):
        x = _LEFT + slot * j + (slot - bar) / 2
        level = 0
        for i, name in enumerate(names):
            s = cells.get((day, name))
            if s is None:
                continue
            for part, fill, how in ((s.enforced, _colour(names, i), "enforced"), (s.debited, f"url(#h{i})", "debit")):
                if part <= 0:
                    continue
                top_y, bottom_y = y(level + part), y(level)
                tip = f"{day} · {name or '(none)'} · {how} {show(part, unit)}"
                out.append(
                    f'<rect x="{x:.1f}" y="{top_y:.1f}" width="{bar:.1f}" height="{bottom_y - top_y:.2f}" '
                    f'fill="{fill}"><title>{escape(tip)}</title></rect>'
                )
                level += part
        if totals[day]:
            out.append(
                f'<text x="{x + bar / 2:.1f}" y="{y(totals[day]) - 5:.1f}" text-anchor="middle">'
                f"{escape(show(totals[day], unit))}</text>"
            )
        if j % label_every == 0:
            out.append(
                f'<text x="{x + bar / 2:.1f}" y="{_H - _BOTTOM + 16}" text-anchor="middle">{escape(day[5:])}</text>'
            )
    out.append(
        f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#888"/>'
        f'<text x="{_LEFT}" y="{_H - 8}">UTC days{escape(_range_note(days))}</text></svg>'
    )
    return "\n".join(out)


def _range_note(days: list[str]) -> str:
    return f", {days[0]} to {days[-1]}" if days else ", none with spend"


def _days_table(days: list[str], names: list[str], cells: dict[tuple[str, str], Sums], unit: Unit, stack: str) -> str:
    head = "".join(f'<th class="n">{escape(n or "(none)")}</th>' for n in names)
    rows = []
    column_totals = [0] * len(names)
    for day in days:
        values = [cells[(day, n)].total if (day, n) in cells else 0 for n in names]
        column_totals = [a + b for a, b in zip(column_totals, values, strict=True)]
        tds = "".join(f'<td class="n">{escape(show(v, unit)) if v else ""}</td>' for v in values)
        rows.append(f'<tr><td>{day}</td>{tds}<td class="n">{escape(show(sum(values), unit))}</td></tr>')
    tds = "".join(f'<td class="n">{escape(show(v, unit))}</td>' for v in column_totals)
    rows.append(
        f'<tr class="total"><td>total</td>{tds}<td class="n">{escape(show(sum(column_totals), unit))}</td></tr>'
    )
    return (
        f'<table><thead><tr><th>day</th>{head}<th class="n">day total</th></tr></thead>\n'
        f"<tbody>{''.join(rows)}</tbody></table>\n"
        if days
        else f"<p>No {escape(unit_name(unit))} spend by {escape(stack)}.</p>\n"
    )


def _groups_table(report: Report) -> str:
    head = "".join(f"<th>{escape(k)}</th>" for k in report.by)
    head += '<th>unit</th><th class="n">calls</th><th class="n">enforced</th><th class="n">shadow/debit</th>'
    head += '<th class="n">total</th>'

    def row(key: list[str], unit: Unit, s: Sums, css: str = "") -> str:
        tds = "".join(f"<td>{escape(k)}</td>" for k in key)
        nums = (s.enforced, s.debited, s.total)
        money = "".join(f'<td class="n">{escape(show(v, unit))}</td>' for v in nums)
        return f'<tr{css}>{tds}<td>{escape(unit_name(unit))}</td><td class="n">{s.calls}</td>{money}</tr>'

    rows = [row(list(key), unit, s) for key, unit, s in report.rows()]
    blank = [""] * (len(report.by) - 1)
    rows += [row(["total", *blank], unit, s, ' class="total"') for unit, s in report.totals().items()]
    return f"<table><thead><tr>{head}</tr></thead>\n<tbody>{''.join(rows)}</tbody></table>\n"
