"""The proof of `cycles replay`: the seed's weekend (examples/weekend_log.py: the demo's loop, unchecked, 4,700
calls logged as LiteLLM's standard logging payload) replayed through a run budget names the call at which the
live demo (examples/runaway_agent.py) stops for that budget."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from litellm.types.utils import StandardLoggingPayload

from cycles_ledger.cli import main as cycles
from cycles_litellm.estimate import estimate_call, soft_landing
from cycles_litellm.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
USD = 100_000_000


def example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def weekend(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weekend") / "weekend.jsonl"
    assert example("weekend_log").main(["--out", str(path)]) == 0
    return path


def run_budget(tmp_path: Path, budget: str) -> Path:
    path = tmp_path / "run-budget.yaml"
    path.write_text(f"budgets:\n  - scope: tenant:acme/workflow:doc-processing\n    allocated: {budget}\n")
    return path


def replayed(capsys: pytest.CaptureFixture[str], log: Path, budgets: Path) -> dict[str, Any]:
    capsys.readouterr()
    assert cycles(["replay", str(log), "--budgets", str(budgets), "--json"]) == 0
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    return doc


def test_the_weekend_log_is_the_demos_loop_as_litellm_logs_it(weekend: Path) -> None:
    """4,700 calls in one run, alternating gpt-4o answers and OCR attempts from Friday 18:00 to Monday 08:00,
    every key a StandardLoggingPayload key."""
    rows = [json.loads(line) for line in weekend.read_text().splitlines()]
    keys = StandardLoggingPayload.__required_keys__ | StandardLoggingPayload.__optional_keys__
    assert len(rows) == 4_700 and all(set(r) <= keys for r in rows)
    assert Counter(r["call_type"] for r in rows) == {"acompletion": 2_350, "call_mcp_tool": 2_350}
    assert {r["trace_id"] for r in rows} == {"runaway-weekend"}
    assert rows[0]["id"] == "weekend-00001-llm" and rows[1]["id"] == "weekend-00002-ocr"
    assert rows[-1]["startTime"] - rows[0]["startTime"] < 62 * 3600
    assert 440 < sum(r["response_cost"] for r in rows) < 480  # the demo's prices: ~$0.10 a call


def stop_by_the_demos_arithmetic(weekend: Path, budget: int) -> tuple[int, int]:
    """(call number, remaining) where the demo's run would be refused: the proxy holds each LLM call's worst
    case (estimate_call) or, when that does not fit, its soft landing's minimum; @metered holds the OCR price
    of the document's pages. The first call whose hold does not fit is refused."""
    remaining = budget
    settings = Settings()
    for n, line in enumerate(weekend.read_text().splitlines(), 1):
        row = json.loads(line)
        cost = round(row["response_cost"] * USD)
        if row["call_type"] == "acompletion":
            body = {"model": row["model"], "messages": row["messages"], **row["model_parameters"]}
            est = estimate_call(row["model"], body, "chat", settings)
            soft = soft_landing(est, settings.min_output_tokens)
            need = est.amount if est.amount <= remaining or soft is None else soft.min_amount
        else:
            need = cost
        if need > remaining:
            return n, remaining
        remaining -= cost
    raise AssertionError("the budget was never exhausted")


@pytest.mark.parametrize("budget", ["30usd", "2usd"])
def test_replay_names_the_call_the_demos_own_arithmetic_stops_at(
    weekend: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], budget: str
) -> None:
    """The replay's first denied call is the one the demo's holds (proxy estimate, OCR page price) stop at."""
    doc = replayed(capsys, weekend, run_budget(tmp_path, budget))
    first = doc["first_denied"]
    call, remaining = stop_by_the_demos_arithmetic(weekend, int(budget.removesuffix("usd")) * USD)
    assert (first["ordinal"], first["remaining"], first["reason"]) == (call, remaining, "BUDGET_EXCEEDED")
    assert first["call_id"] == f"weekend-{call:05d}-{'ocr' if call % 2 == 0 else 'llm'}"
    assert first["scope"] == "tenant:acme/workflow:doc-processing"
    totals = doc["totals"]
    assert totals["saved"] == totals["spend"] - totals["enforce_spend"] > 0
    (scope,) = doc["scopes"]
    assert scope["first_denied"] == first and scope["allowed_only_by_enforce"] > 0  # small LLM calls still fit


@pytest.mark.e2e
@pytest.mark.parametrize("budget", ["30usd", "2usd"])
def test_replay_matches_where_the_live_demo_stops(
    weekend: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], budget: str
) -> None:
    """The live demo (a real LiteLLM proxy with the plugin, @metered OCR) and the replay of the weekend's log
    refuse the same call, for the same reason, with the same spend before it."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "runaway_agent.py"), "--budget", budget],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    live = dict(re.findall(r"(\w+)=(\S+)", line))
    first = replayed(capsys, weekend, run_budget(tmp_path, budget))["first_denied"]
    assert first["ordinal"] == int(live["stopped_at_call"])
    assert first["reason"] == live["reason"]
    allocated = int(budget.removesuffix("usd")) * USD
    assert f"{(allocated - first['remaining']) / USD:.2f}" == live["spent_usd"]
