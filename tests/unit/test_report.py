"""`cycles report`: spend by scope, model, route and day from the event log, as a table, CSV, JSON and HTML."""

from __future__ import annotations

import csv
import io
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from cycles_ledger import LedgerEvent, Unit, open_ledger_sync
from cycles_ledger.cli import main
from cycles_ledger.errors import InvalidRequestError
from cycles_ledger.models import format_amount
from cycles_ledger.report import build_report, charges, render_table, row_charges
from tests.conftest import FakeClock

DAY = 86_400_000
START = 1_800_000_000_000  # 2027-01-15 08:00 UTC
DAYS = ["2027-01-15", "2027-01-16", "2027-01-17", "2027-01-18"]
USD = 10**8

# (subject, model, cost in microcents, tokens, enforced): one day's calls; day d costs (d + 1) times these
CALLS = [
    ({"tenant": "acme", "workflow": "docs"}, "gpt-4o", 25 * USD // 100, 900, True),
    ({"tenant": "acme", "workflow": "docs"}, "gpt-4o-mini", 3 * USD // 100, 400, True),
    ({"tenant": "acme", "agent": "bot"}, "claude-3-5-sonnet", 40 * USD // 100, 1_200, True),
    ({"tenant": "acme", "agent": "bot"}, "gpt-4o", 7 * USD // 100, 0, False),  # a shadow call: debited
    ({"tenant": "beta"}, "gpt-4o-mini", 12_345_678, 300, True),
]


@dataclass
class Spend:
    """What the test wrote, summed its own way."""

    by_day: dict[str, int] = field(default_factory=dict)
    by_model: dict[str, int] = field(default_factory=dict)
    debited: int = 0
    tokens: int = 0


def build(url: str) -> Spend:
    """Four days of calls on three scopes and three models, plus spend that is not spend (a release, a deny)."""
    clock = FakeClock(START)
    spend = Spend()
    with open_ledger_sync(url, clock=clock) as led:
        led.set_budget("tenant:acme", "500usd")
        led.set_budget("tenant:acme/workflow:docs", "100usd")
        led.set_budget("tenant:beta", "300usd")
        led.set_budget("tenant:acme", "1000000tokens")
        for d, day in enumerate(DAYS):
            clock.now = START + d * DAY
            for subject, model, cost, tokens, enforced in CALLS:
                amount, toks = cost * (d + 1), tokens * (d + 1)
                action = {"kind": "llm.completion", "name": model}
                meta = {"model": model, "route": "/v1/chat/completions"}
                also = [f"{toks}tokens"] if toks else []
                if enforced:
                    r = led.reserve(subject, action, "20usd", metadata=meta, also=["50000tokens"] if toks else [])
                    led.commit(str(r.reservation_id), f"{amount}microcents", also=also)
                else:
                    led.record_event(subject, action, f"{amount}microcents", overage_policy="RECORD_ALL", metadata=meta)
                    spend.debited += amount
                spend.by_day[day] = spend.by_day.get(day, 0) + amount
                spend.by_model[model] = spend.by_model.get(model, 0) + amount
                spend.tokens += toks if subject["tenant"] == "acme" else 0  # only acme has a TOKENS budget
                clock.advance(600_000)
            r = led.reserve({"tenant": "beta"}, {"kind": "llm.completion", "name": "gpt-4o"}, "1usd")
            led.release(str(r.reservation_id))  # held and given back: no spend
            assert not led.reserve({"tenant": "beta"}, {"kind": "x", "name": "y"}, "1000usd").allowed
    return spend


@pytest.fixture
def store(tmp_path: Path) -> tuple[str, Spend]:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    return url, build(url)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(list(args)) == 0
    return capsys.readouterr().out


def test_scope_sums_equal_balances(db_url: str) -> None:
    """Summing the report's rows under each budget's scope gives that budget's spent, in every unit, on every store."""
    build(db_url)
    with open_ledger_sync(db_url, clock=FakeClock(START + 4 * DAY)) as led:
        report = led.run(build_report(led.ledger, by=["scope"]))
        balances = led.balances()
    assert len(balances) == 4
    for b in balances:
        under = [
            s for (key, unit), s in report.groups.items() if unit is b.unit and (key[0] + "/").startswith(b.scope + "/")
        ]
        assert sum(s.total for s in under) == b.spent + b.debt, b.scope
    table = render_table(report)
    for unit, total in report.totals().items():
        assert (format_amount(total.total, unit) if unit is Unit.USD_MICROCENTS else f"{total.total:,}") in table


def test_cli_table_by_day(store: tuple[str, Spend], capsys: pytest.CaptureFixture[str]) -> None:
    """`--by day` prints a row per day with its total, a grand total, and what the window covers."""
    url, spend = store
    out = cli(capsys, "--store", url, "report", "--by", "day")
    for day in DAYS:
        row = next(line for line in out.splitlines() if line.startswith(day) and "USD" in line)
        assert row.endswith(format_amount(spend.by_day[day], Unit.USD_MICROCENTS)), row
    assert format_amount(sum(spend.by_day.values()), Unit.USD_MICROCENTS) in out.splitlines()[-2]
    assert "SQLite retention" in out and "7d" in out and "Days are UTC" in out
    assert "shadow/debit" in out


def test_csv_and_json_agree(store: tuple[str, Spend], capsys: pytest.CaptureFixture[str]) -> None:
    """CSV and JSON carry the same rows, integers of their unit, adding up to what was spent."""
    url, spend = store
    args = ["--store", url, "report", "--by", "day,model", "--by", "route"]
    rows = list(csv.DictReader(io.StringIO(cli(capsys, *args, "--csv"))))
    doc = json.loads(cli(capsys, *args, "--json"))
    assert doc["by"] == ["day", "model", "route"]
    assert [{k: str(v) for k, v in r.items()} for r in doc["rows"]] == rows
    usd = [r for r in doc["rows"] if r["unit"] == "USD_MICROCENTS"]
    assert sum(r["total"] for r in usd) == sum(spend.by_day.values())
    assert sum(r["debited"] for r in usd) == spend.debited
    assert all(r["route"] == "/v1/chat/completions" for r in usd)
    for model, total in spend.by_model.items():
        assert sum(r["total"] for r in usd if r["model"] == model) == total
    [tokens] = [t for t in doc["totals"] if t["unit"] == "TOKENS"]
    assert tokens["total"] == spend.tokens and tokens["debited"] == 0
    assert doc["window"]["first_spend"] == "2027-01-15 08:00 UTC" and doc["window"]["days"] == "UTC"


def test_scope_since_until(store: tuple[str, Spend], capsys: pytest.CaptureFixture[str]) -> None:
    """--scope keeps a subtree, --since/--until whole UTC days (both included)."""
    url, _ = store
    args = ["--store", url, "report", "--scope", "tenant:acme/agent:bot", "--since", DAYS[1], "--until", DAYS[2]]
    doc = json.loads(cli(capsys, *args, "--by", "day,scope", "--json"))
    usd = [r for r in doc["rows"] if r["unit"] == "USD_MICROCENTS"]
    assert {(r["day"], r["scope"]) for r in usd} == {
        (DAYS[1], "tenant:acme/agent:bot"),
        (DAYS[2], "tenant:acme/agent:bot"),
    }
    bot = [c for c in CALLS if c[0].get("agent") == "bot"]
    assert sum(r["total"] for r in usd) == sum(c[2] for c in bot) * (2 + 3)
    assert doc["window"]["since"] == "2027-01-16 00:00 UTC" and doc["window"]["until"] == "2027-01-18 00:00 UTC"
    depth = json.loads(cli(capsys, "--store", url, "report", "--by", "scope", "--depth", "1", "--json"))
    assert {r["scope"] for r in depth["rows"]} == {"tenant:acme", "tenant:beta"}


def test_bad_options_fail_cleanly(store: tuple[str, Spend], capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown group key or a date that is not one is an error naming it (exit 2), not a traceback."""
    url, _ = store
    assert main(["--store", url, "report", "--by", "colour"]) == 2
    assert "cannot group by 'colour'" in capsys.readouterr().err
    assert main(["--store", url, "report", "--since", "last tuesday"]) == 2
    assert "'last tuesday' is not a date" in capsys.readouterr().err


class _Checked(HTMLParser):
    """Collects tags, src/href values and text; fails on a closing tag that does not match its opening."""

    VOID = frozenset({"meta", "link", "br", "img", "input", "hr", "rect", "line", "path", "circle"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.links: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.links += [v or "" for k, v in attrs if k in ("src", "href", "xlink:href")]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.links += [v or "" for k, v in attrs if k in ("src", "href", "xlink:href")]

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


@pytest.mark.parametrize("stack", ["model", "scope"])
def test_html_report(store: tuple[str, Spend], tmp_path: Path, capsys: pytest.CaptureFixture[str], stack: str) -> None:
    """The HTML file is well formed, fetches nothing, and its charts and tables show each day's total."""
    url, spend = store
    path = tmp_path / "report.html"
    table = cli(capsys, "--store", url, "report", "--by", "day", "--html", str(path), "--stack", stack)
    text = path.read_text(encoding="utf-8")
    parser = _Checked()
    parser.feed(text)
    parser.close()
    assert parser.stack == [] and {"html", "svg", "table", "rect", "title"} <= parser.tags
    assert not [link for link in parser.links if re.match(r"\s*(https?:)?//", link)]
    assert "<script" not in text and "@import" not in text
    svgs = re.findall(r"<svg\b.*?</svg>", text, re.S)
    assert len(svgs) == 2  # USD and TOKENS
    usd_svg = ET.fromstring(svgs[0])
    labels = {"".join(t.itertext()) for t in usd_svg.iter("{http://www.w3.org/2000/svg}text")}
    for day in DAYS:
        total = format_amount(spend.by_day[day], Unit.USD_MICROCENTS)
        assert total in labels  # on top of the day's bar
        assert re.search(rf"<td>{day}</td>.*?<td class=\"n\">{re.escape(total)}</td></tr>", text)  # day total
        assert total in table
    grand = format_amount(sum(spend.by_day.values()), Unit.USD_MICROCENTS)
    assert text.count(grand) >= 2  # the card and the table's total row
    titles = {"".join(t.itertext()) for t in usd_svg.iter("{http://www.w3.org/2000/svg}title")}
    shadow = next(c for c in CALLS if not c[4])
    if stack == "model":
        assert f"{DAYS[0]} · {shadow[1]} · debit {format_amount(shadow[2], Unit.USD_MICROCENTS)}" in titles


def test_raw_event_rows_give_the_charges_of_the_events(db_url: str) -> None:
    """`Ledger.event_rows` (what the proxy's burn rate reads on its event loop, without building models) gives,
    through `row_charges`, the same spend as `events` through `charges` on every store: every unit, commits
    and debits, nothing for reserves, releases or denials. Bad paging arguments are refused."""
    build(db_url)
    with open_ledger_sync(db_url) as led:
        events = led.events(limit=10_000, calls=False)
        rows = led.run(led.ledger.event_rows(limit=10_000))
        for bad in ({"after": -1}, {"limit": 0}, {"newest": "yes"}):
            with pytest.raises(InvalidRequestError):
                led.run(led.ledger.event_rows(**bad))  # type: ignore[arg-type]
        newest = led.run(led.ledger.event_rows(limit=3, newest=True))
    assert [r["event_id"] for r in rows] == [e.event_id for e in events]
    assert [r["event_id"] for r in newest] == [e.event_id for e in events[::-1][:3]]

    def spend(cs: list[Any]) -> list[tuple[int, str, Unit, int, bool]]:
        return [(c.ts_ms, c.scope, c.unit, c.amount, c.enforced) for c in cs]

    assert spend([c for r in rows for c in row_charges(r)]) == spend([c for e in events for c in charges(e)])
    assert {c.unit for r in rows for c in row_charges(r)} == {Unit.USD_MICROCENTS, Unit.TOKENS}


def test_charges_read_both_shapes_of_also() -> None:
    """A commit logs its other units as {unit: n}, a debit as {unit: {charged, scopes}}: both are spend."""
    commit = LedgerEvent(
        event_id=1, ts_ms=START, type="committed", scope="tenant:a", unit=Unit.USD_MICROCENTS, amount=5,
        data={"also": {"TOKENS": 7}}, model="m", route="r",
    )  # fmt: skip
    debit = LedgerEvent(
        event_id=2, ts_ms=START, type="debited", scope="tenant:a", unit=Unit.USD_MICROCENTS, amount=3,
        data={"also": {"TOKENS": {"charged": 2, "scopes": ["tenant:a"]}}},
    )  # fmt: skip
    reserved = LedgerEvent(
        event_id=3, ts_ms=START, type="reserved", scope="tenant:a", unit=Unit.USD_MICROCENTS, amount=9
    )
    assert [(c.unit, c.amount, c.enforced) for c in charges(commit)] == [
        (Unit.USD_MICROCENTS, 5, True),
        (Unit.TOKENS, 7, True),
    ]
    assert [(c.unit, c.amount, c.enforced) for c in charges(debit)] == [
        (Unit.USD_MICROCENTS, 3, False),
        (Unit.TOKENS, 2, False),
    ]
    assert charges(reserved) == []


def test_pruned_log_is_named(tmp_path: Path) -> None:
    """After SQLite's retention window forgets the old days, the report covers what is left and says so."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    build(url)
    clock = FakeClock(START + 9 * DAY)
    with open_ledger_sync(url, clock=clock) as led:
        led.sweep()
        report = led.run(build_report(led.ledger, by=["day"]))
        spent = {b.scope: b.spent for b in led.balances() if b.unit is Unit.USD_MICROCENTS}
    days = {key[0] for key, _ in report.groups}
    assert days and min(days) > DAYS[0]  # the first days are gone from the log ...
    assert spent["tenant:beta"] == sum(c[2] for c in CALLS if c[0]["tenant"] == "beta") * 10  # ... not from spent
    assert report.oldest_kept_ms is not None and report.oldest_kept_ms >= START + 2 * DAY
    assert "spend before it, if any, is not in this report" in report.window_text()
