"""`cycles replay` and `cycles suggest` from the command line: no store touched, tables and JSON, bad lines
reported, a suggested budgets file that `cycles budgets apply` takes as it is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cycles_ledger.cli import main as cycles

T = 1_795_802_400.0  # 2026-11-27 18:00 UTC
HEADERS = {"x-cycles-tenant": "acme", "x-cycles-workflow": "docs"}


def row(n: int, cost: float, at: float) -> dict[str, Any]:
    return {
        "id": f"c{n}",
        "trace_id": f"run-{n // 10}",
        "call_type": "acompletion",
        "response_cost": cost,
        "startTime": at,
        "endTime": at + 1,
        "model": "gpt-4o-mini",
        "model_group": "gpt-4o-mini",
        "prompt_tokens": 10,
        "completion_tokens": 10,
        "metadata": {"requester_custom_headers": HEADERS},
    }


@pytest.fixture
def spend_log(tmp_path: Path) -> Path:
    """$0.50 calls every 10 minutes from Friday 18:00 to Monday 18:00 (a $1 call at midnight and noon), and two
    bad lines: $18 on Friday, $73 on Saturday and Sunday, $55 on Monday."""
    lines = [json.dumps(row(n, 1.0 if n % 72 == 36 else 0.5, T + n * 600)) for n in range(3 * 144)]
    lines.insert(5, "{broken")
    lines.insert(9, json.dumps({"id": "x", "call_type": "acompletion", "response_cost": 0.1}))
    path = tmp_path / "spend.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def budgets(tmp_path: Path) -> Path:
    path = tmp_path / "budgets.yaml"
    path.write_text("budgets:\n  - {scope: tenant:acme/workflow:docs, allocated: 50usd, period: daily}\n")
    return path


def test_replay_prints_a_table_and_the_bad_lines(
    spend_log: Path, budgets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A daily $50 budget: Saturday's 99th call (#135 of the log) is the first refused; the bad lines are named
    by line; no ledger file is created or needed."""
    monkeypatch.chdir(tmp_path)
    assert cycles(["--store", "sqlite:///never.db", "replay", str(spend_log), "--budgets", str(budgets)]) == 0
    captured = capsys.readouterr()
    assert not (tmp_path / "never.db").exists() and "store:" not in captured.err
    out = captured.out
    assert "read 432 calls, skipped 2 bad lines" in captured.err
    assert "left out: 2 bad lines, 0 duplicates, 0 not paid calls, 0 without a payer" in out
    assert f"{spend_log}:6: not JSON" in out and f"{spend_log}:10: no startTime" in out
    assert "tenant:acme/workflow:docs  $50.00 daily" in out
    assert "first denied call: #135 c134 at 2026-11-28 16:20:00 (gpt-4o-mini): BUDGET_EXCEEDED" in out


def test_replay_json(spend_log: Path, budgets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json: the same report as data; each day's budget starts again at midnight of the log's time."""
    assert cycles(["replay", str(spend_log), "--budgets", str(budgets), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (scope,) = doc["scopes"]
    assert scope["first_denied"]["call_id"] == "c134" and scope["first_denied"]["reason"] == "BUDGET_EXCEEDED"
    # Friday's $18 fits; Saturday, Sunday and Monday stop at $50 each
    assert scope["enforce_spend"] == (18 + 50 + 50 + 50) * 100_000_000 and scope["spend"] == 219 * 100_000_000
    assert [s["where"].rsplit(":", 1)[1] for s in doc["skipped"]] == ["6", "10"]


def test_suggest_writes_a_budgets_file_that_applies_as_is(
    spend_log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cycles suggest -o FILE` writes the YAML and shows the distributions; `cycles budgets apply FILE` takes it."""
    out = tmp_path / "suggested.yaml"
    assert cycles(["suggest", str(spend_log), "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "per day p50/p95/max" in shown and f"wrote {out}" in shown
    text = out.read_text()
    # days: $18, $73, $73, $55 -> p95 (of 4: the largest) $73 x 1.5 = $109.50 -> $110
    assert "allocated: 110usd  # p95 $73.00/day over 4 day(s), max $73.00" in text
    # the 10-minute window ending at a call holds only it (the call 10 minutes earlier has left): six $1 calls
    # of 432, so the p99 (rank 428) is $1 -> $1.50
    assert "rate_limits: [{amount: 1.5usd, window: 10m}]  # p99 $1.00, max $1.00" in text
    db = tmp_path / "ledger.db"
    assert cycles(["--store", f"sqlite:///{db}", "budgets", "apply", str(out)]) == 0
    assert "applied 2 budgets" in capsys.readouterr().out


def test_suggest_prints_yaml_on_stdout_and_json(spend_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --out the YAML is stdout (the table on stderr); --json has the method and the figures."""
    assert cycles(["suggest", str(spend_log), "--scope", "tenant:acme/workflow:docs", "--headroom", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("# cycles suggest: 432 calls") and "daily budget" in captured.err
    assert "  - scope: tenant:acme/workflow:docs" in captured.out and "scope: tenant:acme\n" not in captured.out
    assert cycles(["suggest", str(spend_log), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["method"]["daily_budget"].startswith("p95 of spend per day") and len(doc["scopes"]) == 2


def test_a_langfuse_export_replays_too(tmp_path: Path, budgets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same command on a Langfuse observations export, the payer taken from a field (`--subject-field`)."""
    rows = [
        {
            "id": f"o{n}",
            "trace_id": "t",
            "type": "GENERATION",
            "start_time": f"2026-11-27 18:{n:02d}:00.000000",
            "total_cost": 20.0,
            "trace_name": "docs",
        }
        for n in range(4)
    ]
    path = tmp_path / "observations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["replay", str(path), "--budgets", str(budgets), "--json", "--subject-default", "tenant=acme"]
    assert cycles([*args, "--subject-field", "workflow=trace_name"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["log"]["formats"] == ["langfuse"] and doc["first_denied"]["call_id"] == "o2"
    assert doc["totals"]["saved"] == 40 * 100_000_000


def test_bad_arguments_are_errors_not_tracebacks(
    tmp_path: Path, budgets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing log, a bad --subject-field or a bad budgets file: exit 2 with the reason."""
    assert cycles(["replay", str(tmp_path / "nope.jsonl"), "--budgets", str(budgets)]) == 2
    assert "no such log file or directory" in capsys.readouterr().err
    log = tmp_path / "empty.jsonl"
    log.write_text("")
    assert cycles(["suggest", str(log), "--subject-field", "galaxy=x"]) == 2
    assert "--subject-field 'galaxy=x'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("budgets:\n  - {scope: tenant:acme}\n")
    assert cycles(["replay", str(log), "--budgets", str(bad)]) == 2
    assert f"{bad}:2: missing `allocated`" in capsys.readouterr().err
