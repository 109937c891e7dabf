"""The minimal @metered example runs and stops before the budget is exceeded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_metered_example_stops_within_budget() -> None:
    """examples/metered_tools.py: 4 rounds fit in $0.10, the 5th search is denied, nothing stays held."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "metered_tools.py")], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "stopped after 4 rounds: BUDGET_EXCEEDED at tenant:acme/workflow:research" in out.stdout
    assert "spent 8800000 of 10000000 USD_MICROCENTS, 0 still held" in out.stdout
