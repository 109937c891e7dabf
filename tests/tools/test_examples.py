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


_NO_TEST_IMPORTS = """
import runpy, sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"pytest", "_pytest", "hypothesis", "tests"}:
            raise ImportError("imported " + name)

sys.meta_path.insert(0, Refuse())
import cycles_ledger.redis_server, cycles_litellm.fake_provider, cycles_litellm.launch
demo, *benches = sys.argv[1:]
runpy.run_path(demo, run_name="not_main")
assert "litellm" not in sys.modules, "the demo's own process imported litellm"
for script in benches:
    runpy.run_path(script, run_name="not_main")
"""


def test_demo_and_benches_need_neither_pytest_nor_the_tests_tree() -> None:
    """The launchers, the demo and the benches import without pytest, hypothesis or tests/ (a plain install),
    and the demo's own process does not import litellm (only the proxy it starts does)."""
    scripts = [ROOT / "examples" / "runaway_agent.py", *sorted((ROOT / "bench").glob("*.py"))]
    out = subprocess.run(
        [sys.executable, "-c", _NO_TEST_IMPORTS, *map(str, scripts)],
        cwd=ROOT.parent,  # not the checkout: `tests` must not be importable from the working directory
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
