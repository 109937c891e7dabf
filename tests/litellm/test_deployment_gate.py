"""The deployment gate (the last check before a provider, for routes that skip LiteLLM's pre-call hook) opens only
for an attempt of a request the pre-call hook let through: it carries that request's secret in the metadata
LiteLLM passes to every retry and fallback. A call id alone does not open it: not a denied one, not a settled one,
and not one a client writes into the body of a route without the hook (/queue/chat/completions,
/v1/threads/{id}/runs), which would reach the provider with nothing held."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from litellm.proxy._types import ProxyException
from litellm.types.utils import CallTypes

from cycles_ledger import open_ledger
from cycles_litellm import CyclesCallback, Settings

MSGS = [{"role": "user", "content": "hello there"}]


def _request(call_id: str, max_tokens: int = 20) -> dict[str, Any]:
    headers = {"x-cycles-tenant": "h", "x-litellm-call-id": call_id}
    return {
        "model": "gpt-4o-mini",
        "messages": MSGS,
        "max_tokens": max_tokens,
        "litellm_call_id": call_id,
        "proxy_server_request": {"headers": headers},
    }


def _queued(call_id: str) -> dict[str, Any]:
    """What /queue/chat/completions hands the router: the client's body as is, plus proxy_server_request."""
    return {
        "model": "gpt-4o-mini",
        "messages": MSGS,
        "priority": 0,
        "litellm_call_id": call_id,
        "proxy_server_request": {"url": "http://proxy/queue/chat/completions", "headers": {"x-cycles-tenant": "h"}},
    }


async def test_a_denied_call_id_does_not_open_the_deployment_gate(tmp_path: Path) -> None:
    async with open_ledger(f"sqlite:///{tmp_path / 'd.db'}") as ledger:
        await ledger.set_budget("tenant:h", "0usd")
        cb = CyclesCallback(Settings(), ledger=ledger)
        with pytest.raises(ProxyException) as denied:
            await cb.async_pre_call_hook(None, None, _request("client-x"), "acompletion")
        assert denied.value.code == "402"
        # the same id on a route that skips the pre-call hook: nothing is held for it, so it must be refused
        with pytest.raises(ProxyException) as gate:
            await cb.async_pre_call_deployment_hook(_queued("client-x"), CallTypes.acompletion)
        assert gate.value.code == "402"
        assert await ledger.list_reservations() == []


async def test_a_denied_call_id_does_not_open_the_gate_for_a_refused_call_type(tmp_path: Path) -> None:
    """/v1/threads/{id}/runs (arun_thread, no LiteLLM hook) is the README's known gap that the gate closes."""
    async with open_ledger(f"sqlite:///{tmp_path / 't.db'}") as ledger:
        await ledger.set_budget("tenant:h", "0usd")
        cb = CyclesCallback(Settings(), ledger=ledger)
        with pytest.raises(ProxyException):
            await cb.async_pre_call_hook(None, None, _request("client-y"), "acompletion")
        run = {"litellm_call_id": "client-y", "proxy_server_request": {"url": "http://proxy/v1/threads/t/runs"}}
        with pytest.raises(ProxyException) as gate:
            await cb.async_pre_call_deployment_hook(run, CallTypes.arun_thread)
        assert gate.value.code == "402"


async def test_a_settled_call_id_cannot_be_replayed_through_the_deployment_gate(tmp_path: Path) -> None:
    async with open_ledger(f"sqlite:///{tmp_path / 's.db'}") as ledger:
        await ledger.set_budget("tenant:h", "1usd")
        cb = CyclesCallback(Settings(), ledger=ledger)
        await cb.async_pre_call_hook(None, None, _request("client-z"), "acompletion")
        await cb.async_log_success_event({"litellm_call_id": "client-z", "response_cost": 0.00001}, None, None, None)
        for _ in range(100):
            if (await ledger.balance("tenant:h")).reserved == 0:
                break
            await asyncio.sleep(0.02)
        assert (await ledger.balance("tenant:h")).reserved == 0  # paid and settled: nothing held any more
        with pytest.raises(ProxyException) as gate:
            await cb.async_pre_call_deployment_hook(_queued("client-z"), CallTypes.acompletion)
        assert gate.value.code == "402"


@pytest.mark.parametrize(
    ("model", "settings", "passes"),
    [
        ("omni-moderation-latest", Settings(), True),  # OpenAI's moderation bills nothing
        ("text-moderation-latest", Settings(), True),  # a name LiteLLM cannot place goes to OpenAI
        ("mistral/mistral-moderation-latest", Settings(), False),  # Mistral bills it; LiteLLM's map says 0
        ("mistral/mistral-moderation-latest", Settings(free_models=["mistral/mistral-moderation-latest"]), True),
        ("mistral/mistral-moderation-latest", Settings(unmetered_routes=["amoderation"]), True),
    ],
)
async def test_moderation_is_free_at_openai_only(tmp_path: Path, model: str, settings: Settings, passes: bool) -> None:
    """LiteLLM sends a moderation to whichever provider the model names, with that provider's key: free at OpenAI,
    refused before the provider elsewhere (402 ROUTE_NOT_METERED) unless cycles.yaml lists the model as free or the
    route as unmetered."""
    async with open_ledger(f"sqlite:///{tmp_path / 'm.db'}") as ledger:
        cb = CyclesCallback(settings, ledger=ledger)
        data = {"model": model, "input": "hi", "proxy_server_request": {"headers": {"x-cycles-tenant": "h"}}}
        if passes:
            assert await cb.async_pre_call_hook(None, None, data, "amoderation") is data
        else:
            with pytest.raises(ProxyException) as refused:
                await cb.async_pre_call_hook(None, None, data, "amoderation")
            assert refused.value.to_dict()["code"] == "ROUTE_NOT_METERED"
