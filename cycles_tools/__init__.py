"""Budget authority for tools: `@metered` functions and `budget_scope(...)` on the same ledger as LLM calls.

from cycles_tools import budget_scope, metered

@metered(kind="tool.search", estimate="0.02usd")
async def search(q: str) -> str: ...

async with budget_scope(tenant="acme", workflow="doc-processing"):
    await search("invoices")          # raises BudgetDenied (alias BudgetExceeded) on DENY
"""

from cycles_ledger import BudgetDenied

from .metered import configure, current_caps, metered
from .scope import budget_scope, current_subject, litellm_headers, litellm_metadata

BudgetExceeded = BudgetDenied  # the name the design uses; one class, one error tree

__all__ = [
    "BudgetDenied",
    "BudgetExceeded",
    "budget_scope",
    "configure",
    "current_caps",
    "current_subject",
    "litellm_headers",
    "litellm_metadata",
    "metered",
]
