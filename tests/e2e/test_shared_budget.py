"""An agent's LLM calls (through the real proxy) and its @metered tools draw on one budget."""

from __future__ import annotations

import time

import httpx
import pytest

import cycles_tools
from cycles_litellm.fake_provider import FakeUpstream
from cycles_litellm.launch import LiteLLMProxy
from cycles_tools import BudgetExceeded, budget_scope, litellm_headers, metered
from tests.e2e.conftest import ProxyFactory

SCOPE = "tenant:e2e-mix/workflow:w"
TOOL_COST = 1_000  # USD_MICROCENTS per tool call


@pytest.fixture(scope="module")
def proxy(proxy_factory: ProxyFactory) -> LiteLLMProxy:
    return proxy_factory({"shadow_scopes": ["tenant:e2e-shadow"]})


def test_llm_and_tool_spend_share_one_budget(proxy: LiteLLMProxy, fake_upstream: FakeUpstream) -> None:
    """Alternating LLM and tool calls stop at the budget: combined spend stays within it, and whichever
    call comes when the budget is short is the one denied."""
    with proxy.ledger() as led:
        led.set_budget(SCOPE, {"unit": "USD_MICROCENTS", "amount": 20_000})
    cycles_tools.configure(store=proxy.store_url)
    tool_runs: list[int] = []

    @metered(kind="tool.ocr", name="ocr", estimate=TOOL_COST)
    def ocr(page: int) -> str:
        tool_runs.append(page)
        return f"text of page {page}"

    llm_ok = 0
    denied_by = None
    with budget_scope(tenant="e2e-mix", workflow="w"):
        headers = {**proxy.auth_headers, **litellm_headers()}
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "summarize"}], "max_tokens": 40}
        for page in range(100):
            r = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
            if r.status_code == 402:
                denied_by = ("llm", r.json()["error"]["code"], r.json()["error"]["cycles"]["scope"])
                break
            assert r.status_code == 200, r.text
            llm_ok += 1
            with proxy.ledger() as led:  # the commit is written after the response: wait for it
                deadline = time.monotonic() + 10
                while led.balance(SCOPE).reserved and time.monotonic() < deadline:
                    time.sleep(0.02)
            try:
                ocr(page)
            except BudgetExceeded as exc:
                denied_by = ("tool", exc.reason_code, exc.scope)
                break
    assert denied_by is not None and denied_by[1:] == ("BUDGET_EXCEEDED", SCOPE)
    with proxy.ledger() as led:
        b = led.balance(SCOPE)
        assert b.reserved == 0 and b.spent <= b.allocated
        settled = [r for r in led.list_reservations(scope=SCOPE, limit=10_000) if r.committed is not None]
        by_kind = {"tool.ocr": 0, "llm.completion": 0}
        for r in settled:
            by_kind[r.action.kind] += r.committed.amount if r.committed else 0
        assert by_kind["tool.ocr"] == len(tool_runs) * TOOL_COST
        assert b.spent == by_kind["tool.ocr"] + by_kind["llm.completion"]
        assert llm_ok >= 1 and tool_runs, "both kinds of spend must have drawn on the budget"
        # Whoever was denied asked for more than was left at that moment.
        left = b.allocated - b.spent
        assert left < (TOOL_COST if denied_by[0] == "tool" else 2_000)
