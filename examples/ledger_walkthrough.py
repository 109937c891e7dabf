"""A five-minute walk through the ledger with the `cycles` CLI on a fresh SQLite file.

Run: `make walkthrough` (or `python examples/ledger_walkthrough.py [--store sqlite:///my.db]`).
Each step prints the command it runs and what the CLI answered.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import sys
import tempfile
from pathlib import Path

from cycles_ledger.cli import main as cycles

ROOT = Path(__file__).resolve().parent.parent
SUBJECT = "tenant:acme/workflow:doc-processing"


def run(store: str, *args: str, show: bool = True) -> tuple[int, str]:
    print(f"\n$ cycles {shlex.join(args)}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cycles(["--store", store, *args])
    text = out.getvalue()
    if show:
        print(text, end="")
    if code:
        print(f"(exit {code})")
    return code, text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", help="store URL; default: a new SQLite file in a temp directory")
    args = parser.parse_args()
    store = args.store or f"sqlite:///{tempfile.mkdtemp(prefix='cycles-demo-')}/budgets.db"
    print(f"ledger: {store}")

    print("\n# 1. Budgets live on scopes; a workflow's budget sits inside its tenant's.")
    run(store, "budgets", "apply", str(ROOT / "configs/budgets.yaml"))

    print("\n# 2. Reserve before acting: $12 is held on tenant:acme AND on the workflow, atomically.")
    _, text = run(store, "reserve", SUBJECT, "12usd", "--kind", "llm.completion", "--name", "openai:gpt-4o")
    reservation = text.split(" as ")[1].strip()

    print("\n# 3. Commit what it really cost; the unused $2 returns to both scopes.")
    run(store, "commit", reservation, "10usd")

    print("\n# 4. A $25 call no longer fits the workflow's $20: DENY names the scope and what is left.")
    code, _ = run(store, "reserve", SUBJECT, "25usd", "--kind", "llm.completion", "--name", "openai:gpt-4o")
    assert code == 1, "the over-budget reservation must be denied"

    print("\n# 5. Shadow mode (dry run): evaluated and logged as would_deny, nothing held.")
    run(store, "reserve", SUBJECT, "25usd", "--dry-run")

    print("\n# 6. Balances: remaining = allocated - spent - reserved - debt, on every scope.")
    run(store, "balances", "tenant:acme")

    print("\n# 7. The audit log answers 'why was this call denied?'.")
    run(store, "events")

    print("\n# 8. The books reconcile: balances agree with reservations and the event log.")
    code, _ = run(store, "verify")
    return code


if __name__ == "__main__":
    sys.exit(main())
