"""`replay`: a spend log through a budgets file on private ledgers, on the log's clock, enforce beside shadow."""

from __future__ import annotations

import json
from pathlib import Path

from cycles_ledger import SoftLanding, Subject
from cycles_ledger.config import BudgetEntry, load_budgets
from cycles_ledger.replay import render_replay, replay
from cycles_ledger.spendlog import SpendLog, SpendRecord

USD = 100_000_000
T0 = 1_795_802_400_000  # 2026-11-27 18:00 UTC
MIN, DAY = 60_000, 86_400_000
DOCS = Subject(tenant="acme", workflow="docs")


def budgets(tmp_path: Path, text: str) -> list[BudgetEntry]:
    path = tmp_path / "budgets.yaml"
    path.write_text("budgets:\n" + text)
    return load_budgets(path)


def call(
    n: int, usd: float, at_ms: int, *, lasts_ms: int = 1_000, subject: Subject = DOCS, **kw: object
) -> SpendRecord:
    """Call `c<n>` costing `usd`, starting at `at_ms`."""
    return SpendRecord(f"c{n}", at_ms, at_ms + lasts_ms, subject, round(usd * USD), model="m", **kw)  # type: ignore[arg-type]


def log_of(*records: SpendRecord) -> SpendLog:
    log = SpendLog(list(records), sources=["test"], formats=["test"])
    log.sort()
    return log


async def test_first_denial_savings_and_calls_enforcement_allows_because_denied_calls_did_not_spend(
    tmp_path: Path,
) -> None:
    """$4 + $3 + $2 fit $10; the $5 call is the first denied (saving $5); the two $0.50 calls after it fit
    only because it did not spend: shadow, which spends everything, would deny them."""
    b = budgets(tmp_path, "  - {scope: tenant:acme/workflow:docs, allocated: 10usd}\n")
    costs = [4, 3, 2, 5, 0.5, 0.5]
    report = await replay(log_of(*(call(i, c, T0 + i * MIN) for i, c in enumerate(costs))), b)
    (scope,) = report.scopes
    assert scope.scope == "tenant:acme/workflow:docs" and scope.budget == "$10.00"
    assert report.first_denied is not None and scope.first_denied == report.first_denied
    assert (report.first_denied.ordinal, report.first_denied.call_id) == (4, "c3")
    assert report.first_denied.reason == "BUDGET_EXCEEDED" and report.first_denied.remaining == 1 * USD
    assert report.first_denied.ts_ms == T0 + 3 * MIN and report.first_denied.model == "m"
    assert (scope.denied, scope.saved, scope.enforce_spend, scope.spend) == (1, 5 * USD, 10 * USD, 15 * USD)
    assert scope.would_deny == 3 and scope.first_would_deny is not None and scope.first_would_deny.ordinal == 4
    assert scope.allowed_only_by_enforce == 2 and scope.denied_only_by_enforce == 0
    assert [c.call_id for c in scope.allowed_only_by_enforce_calls] == ["c4", "c5"]
    text = render_replay(report)
    assert "first denied call: #4 c3 at 2026-11-27 18:03:00 (m): BUDGET_EXCEEDED" in text
    assert "1 calls denied, $5.00 saved ($10.00 spent instead of $15.00)" in text
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["first_denied"]["call_id"] == "c3" and doc["first_denied"]["time"] == "2026-11-27T18:03:00.000Z"
    assert doc["totals"]["saved"] == 5 * USD and doc["scopes"][0]["allowed_only_by_enforce"] == 2


async def test_a_frozen_budget_denies_under_enforcement_what_shadow_allows(tmp_path: Path) -> None:
    """A burn-rate limit with on_exceed: freeze freezes the budget when enforcement refuses a call; shadow
    mode only evaluates (a dry run freezes nothing), so the calls after the window are denied only enforcing."""
    b = budgets(
        tmp_path,
        "  - scope: tenant:acme/workflow:docs\n    allocated: 100usd\n"
        "    rate_limits: [{amount: 1usd, window: 10m, on_exceed: freeze}]\n",
    )
    report = await replay(log_of(call(0, 0.8, T0), call(1, 0.8, T0 + MIN), call(2, 0.1, T0 + 30 * MIN)), b)
    (scope,) = report.scopes
    assert scope.first_denied is not None and scope.first_denied.reason == "RATE_EXCEEDED"
    assert scope.denied == 2 and scope.would_deny == 1
    assert scope.denied_only_by_enforce == 1
    assert scope.denied_only_by_enforce_calls[0].call_id == "c2"
    assert scope.denied_only_by_enforce_calls[0].reason == "BUDGET_FROZEN"


async def test_the_logs_clock_rolls_periods_and_slides_rate_windows(tmp_path: Path) -> None:
    """Timestamps decide: a daily budget starts again the next day of the log (not of the machine), and a
    throttle lets a call through once the window has moved past the earlier spend."""
    daily = budgets(tmp_path, "  - {scope: tenant:acme, allocated: 1usd, period: daily}\n")
    report = await replay(log_of(call(0, 0.6, T0), call(1, 0.6, T0 + MIN), call(2, 0.6, T0 + DAY)), daily)
    assert [s.denied for s in report.scopes] == [1] and report.first_denied is not None
    assert report.first_denied.call_id == "c1"  # c2, a day later, fits a fresh period
    throttle = budgets(
        tmp_path, "  - scope: tenant:acme\n    allocated: 100usd\n    rate_limits: [{amount: 1usd, window: 10m}]\n"
    )
    report = await replay(log_of(call(0, 0.6, T0), call(1, 0.6, T0 + 5 * MIN), call(2, 0.6, T0 + 11 * MIN)), throttle)
    (scope,) = report.scopes
    assert scope.denied == 1 and scope.first_denied is not None
    assert (scope.first_denied.call_id, scope.first_denied.reason) == ("c1", "RATE_EXCEEDED")


async def test_overlapping_calls_hold_at_their_start_and_settle_at_their_end(tmp_path: Path) -> None:
    """A call holds its estimate from its start to its end: a call starting while another's $0.60 is held
    does not fit a $1 budget; the same call after the other ended (its actual $0.30 charged) does."""
    b = budgets(tmp_path, "  - {scope: tenant:acme, allocated: 1usd}\n")
    first = call(0, 0.3, T0, lasts_ms=10 * MIN, estimate=60_000_000)
    during = call(1, 0.3, T0 + MIN, estimate=60_000_000)
    after = call(2, 0.3, T0 + 11 * MIN, estimate=60_000_000)
    report = await replay(log_of(first, during, after), b)
    assert report.denied == 1 and report.first_denied is not None and report.first_denied.call_id == "c1"
    assert report.enforce_spend == 60_000_000


async def test_a_soft_landing_clamps_and_charges_at_most_the_hold(tmp_path: Path) -> None:
    """A call whose worst case does not fit but whose soft landing does is let through clamped: it holds
    what is left and, its answer capped, is charged at most that."""
    b = budgets(tmp_path, "  - {scope: tenant:acme, allocated: 0.5usd}\n")
    soft = SoftLanding(min_amount=10_000_000, fixed_amount=1_000_000, amount_per_million_tokens=1_000 * USD)
    report = await replay(log_of(call(0, 0.9, T0, estimate=USD, soft_landing=soft)), b)
    (scope,) = report.scopes
    assert (scope.denied, scope.clamped, scope.enforce_spend, scope.spend) == (0, 1, 50_000_000, 90_000_000)


async def test_calls_nobody_budgets_pass_or_are_denied_as_the_proxy_would(tmp_path: Path) -> None:
    """`unbudgeted="allow"` lets a payer without any budget through (counted apart); "deny" refuses it with
    BUDGET_NOT_FOUND, as the proxy does by default."""
    b = budgets(tmp_path, "  - {scope: tenant:acme, allocated: 10usd}\n")
    stranger = call(1, 2, T0 + MIN, subject=Subject(tenant="other"))
    report = await replay(log_of(call(0, 1, T0), stranger), b)
    assert (report.denied, report.unbudgeted_calls, report.unbudgeted_spend) == (0, 1, 2 * USD)
    assert report.enforce_spend == 3 * USD
    report = await replay(log_of(call(0, 1, T0), stranger), b, unbudgeted="deny")
    assert report.first_denied is not None and report.first_denied.reason == "BUDGET_NOT_FOUND"
    assert [s.scope for s in report.scopes] == ["tenant:acme", "tenant:other"]


async def test_tokens_budgets_hold_and_charge_tokens(tmp_path: Path) -> None:
    """With a TOKENS budget in the file, a call holds its token estimate next to its dollars."""
    b = budgets(tmp_path, "  - {scope: tenant:acme, allocated: 1500, unit: TOKENS}\n")
    calls = [call(i, 0.01, T0 + i * MIN, tokens=400, token_estimate=1_000) for i in range(3)]
    report = await replay(log_of(*calls), b)
    assert report.first_denied is not None and report.first_denied.call_id == "c2"
    assert report.first_denied.reason == "BUDGET_EXCEEDED"


async def test_an_empty_log_replays_to_an_empty_report(tmp_path: Path) -> None:
    """No calls: nothing denied, the budgets still listed."""
    report = await replay(SpendLog(), budgets(tmp_path, "  - {scope: tenant:acme, allocated: 1usd}\n"))
    assert report.first_denied is None and report.denied == 0 and [s.calls for s in report.scopes] == [0]
    assert "first denied call: none" in render_replay(report)
