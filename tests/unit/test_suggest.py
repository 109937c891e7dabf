"""`suggest`: budgets and burn-rate limits from nearest-rank percentiles of daily, windowed and per-run spend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cycles_ledger import Subject
from cycles_ledger.config import load_budgets
from cycles_ledger.spendlog import SpendLog, SpendRecord
from cycles_ledger.suggest import nice_up, percentile, render_suggest, suggest

USD = 100_000_000
DAY, MIN = 86_400_000, 60_000
NOON = 1_795_780_800_000  # 2026-11-27 12:00 UTC
W = Subject(tenant="acme", workflow="w")


def test_percentiles_are_nearest_rank() -> None:
    """p = the value at rank ceil(p/100 x n) of the sorted values: always a value that occurred."""
    values = list(range(100, 0, -1))
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99), percentile(values, 100)) == (
        50,
        95,
        99,
        100,
    )
    assert percentile([5, 1, 3], 95) == 5 and percentile([5, 1, 3], 50) == 3 and percentile([], 95) == 0


@pytest.mark.parametrize(
    ("amount", "rounded"),
    [(340_500_000, 350_000_000), (18_720_000_000, 19_000_000_000), (350_000_000, 350_000_000), (5, 1_000_000)],
)
def test_amounts_round_up_to_two_significant_digits(amount: int, rounded: int) -> None:
    """$3.405 -> $3.50, $187.20 -> $190, $3.50 stays, and never below a cent."""
    assert nice_up(amount) == rounded


def distribution() -> SpendLog:
    """20 days; on day d one run `r<d>` of two calls of $d/2, a minute apart, at noon UTC."""
    records = []
    for d in range(1, 21):
        for i in range(2):
            at = NOON + (d - 1) * DAY + i * MIN
            records.append(SpendRecord(f"d{d}-{i}", at, at + 1_000, W, d * USD // 2, run=f"r{d}"))
    other = Subject(tenant="other")
    records.append(SpendRecord("o", NOON, NOON + 1, other, 7 * USD))
    return SpendLog(records, sources=["gen"], formats=["test"])


def test_suggestions_state_and_use_the_percentiles_of_a_known_distribution(tmp_path: Path) -> None:
    """Daily spend $1..$20: p95 is $19, x1.5 = $28.50 -> $29 a day. The 10-minute spend seen at each call is
    $d/2 then $d: its p99 (rank 40 of 40) is $20 -> $30 per 10m. Per run $1..$20: p95 $19 -> $29 a run."""
    s = suggest(distribution(), scope_prefixes=["tenant:acme"])
    assert [x.scope for x in s.scopes] == ["tenant:acme", "tenant:acme/workflow:w"]
    top = s.scopes[0]
    assert (top.calls, top.spend, top.days) == (40, 210 * USD, 20)
    assert (top.daily_p50, top.daily_p, top.daily_max) == (10 * USD, 19 * USD, 20 * USD)
    assert (top.window_p, top.window_max) == (20 * USD, 20 * USD)
    assert (top.runs, top.run_p50, top.run_p, top.run_max, top.calls_without_run) == (
        20,
        10 * USD,
        19 * USD,
        20 * USD,
        0,
    )
    assert (top.daily_budget, top.rate_limit, top.run_budget) == (29 * USD, 30 * USD, 29 * USD)
    path = tmp_path / "suggested.yaml"
    path.write_text(s.yaml())
    entries = load_budgets(path)  # what `cycles budgets apply` reads
    assert [(e.scope, e.allocated.amount) for e in entries] == [
        ("tenant:acme", 29 * USD),
        ("tenant:acme/workflow:w", 29 * USD),
    ]
    assert entries[0].period == {"every": "daily", "tz": "UTC"} and entries[0].alerts == [50, 80, 100]
    assert entries[0].rate_limits == [{"amount": 30 * USD, "window_ms": 10 * MIN, "on_exceed": "throttle"}]
    text = s.yaml()
    assert "# p95 $19.00/day over 20 day(s), max $20.00" in text and "# p99 $20.00, max $20.00" in text
    assert "# run budget 29usd: p95 $19.00 of 20 run(s)" in text
    assert "p95 of spend per day with spend (UTC) x 1.5" in text
    doc = json.loads(json.dumps(s.to_json()))
    assert doc["method"]["percentile"].startswith("nearest rank") and doc["scopes"][0]["daily_p"] == 19 * USD
    assert "tenant:acme/workflow:w" in render_suggest(s)


def test_headroom_percentiles_and_window_are_parameters() -> None:
    """Other percentiles, headroom and window change the figures as stated."""
    s = suggest(distribution(), headroom=1.0, daily_percentile=50, window_percentile=50, window="30s")
    top = next(x for x in s.scopes if x.scope == "tenant:acme")
    assert top.daily_p == 10 * USD and top.daily_budget == 10 * USD
    assert top.window_p == 5 * USD  # a 30 s window never holds both calls of a run: values $0.5..$10
    assert "p50 of the 30s spend at each call x 1" in s.yaml()


def test_days_are_counted_in_the_time_zone_asked() -> None:
    """23:30 and 00:30 UTC are two days in UTC and one (08:30, 09:30) in Tokyo."""
    midnight = NOON + 12 * 3_600_000
    records = [SpendRecord(f"c{i}", midnight + dt, midnight + dt, W, USD) for i, dt in enumerate((-30 * MIN, 30 * MIN))]
    log = SpendLog(records)
    assert suggest(log).scopes[0].days == 2
    tokyo = suggest(log, tz="Asia/Tokyo")
    assert tokyo.scopes[0].days == 1 and "period: {every: daily, tz: Asia/Tokyo}" in tokyo.yaml()
    assert tokyo.scopes[0].run_budget is None and tokyo.scopes[0].calls_without_run == 2
