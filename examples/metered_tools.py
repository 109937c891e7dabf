"""The smallest @metered example: two paid tools on one budget, stopped before they overspend.

Run: `.venv/bin/python examples/metered_tools.py` (a fresh SQLite ledger in a temp directory).
"""

from __future__ import annotations

import asyncio
import tempfile

from cycles_ledger import open_ledger_sync
from cycles_tools import BudgetExceeded, budget_scope, configure, current_caps, metered


@metered(kind="tool.search", name="web-search", estimate="0.02usd", actual=lambda hits: f"{0.004 * len(hits):.3f}usd")
async def search(query: str) -> list[str]:
    """A paid search API: $0.004 per hit, at most $0.02 per query."""
    return [f"{query} result {i}" for i in range(3)]


@metered(kind="tool.email", name="send-email", estimate="0.01usd")
def send_email(to: str, body: str) -> str:
    """A paid e-mail API; caps set by the operator are visible inside the call."""
    caps = current_caps()
    return f"sent to {to}" + (f" (caps: {caps.model_dump(exclude_none=True)})" if caps else "")


async def main() -> None:
    store = f"sqlite:///{tempfile.mkdtemp(prefix='cycles-tools-')}/budgets.db"
    configure(store=store)
    with open_ledger_sync(store) as ledger:
        ledger.set_budget("tenant:acme/workflow:research", "0.1usd")
    async with budget_scope(tenant="acme", workflow="research", run="demo-1"):
        for i in range(100):
            try:
                hits = await search(f"query {i}")
                send_email("team@example.com", f"{len(hits)} hits")
            except BudgetExceeded as exc:
                print(f"stopped after {i} rounds: {exc.reason_code} at {exc.scope}, remaining {exc.remaining} µ¢")
                break
    with open_ledger_sync(store) as ledger:
        b = ledger.balance("tenant:acme/workflow:research")
        print(f"spent {b.spent} of {b.allocated} USD_MICROCENTS, {b.reserved} still held")


if __name__ == "__main__":
    asyncio.run(main())
