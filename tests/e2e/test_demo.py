"""The README's main command: the runaway agent is stopped within budget, and shadow mode names the stop."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_demo(*args: str) -> dict[str, str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "runaway_agent.py"), "--quick", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return dict(re.findall(r"(\w+)=(\S+)", line))


def test_runaway_agent_is_stopped_within_budget_and_shadow_names_the_same_call() -> None:
    """Enforce stops the loop before the budget is exceeded; shadow runs on past it and names the exact call
    at which enforcement stopped."""
    enforced = run_demo("--mode", "enforce")
    assert float(enforced["spent_usd"]) <= float(enforced["budget_usd"])
    assert enforced["reason"] == "BUDGET_EXCEEDED"
    assert int(enforced["calls"]) == int(enforced["stopped_at_call"]) - 1 > 1
    shadow = run_demo("--mode", "shadow")
    assert shadow["stopped_at_call"] == enforced["stopped_at_call"]
    assert int(shadow["calls"]) > int(shadow["stopped_at_call"])  # nothing was blocked
