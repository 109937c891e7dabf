"""The decision every LiteLLM logger reads (observe.py) is the plugin's, whatever a client puts in its metadata:
not forged, not erased, and not made up on a route the plugin does not decide. (End to end, on a real proxy with
otel: tests/e2e/test_observability.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from litellm.litellm_core_utils.litellm_logging import StandardLoggingPayloadSetup
from litellm.proxy._types import ProxyException

from cycles_ledger import open_ledger
from cycles_litellm import CyclesCallback, Settings
from cycles_litellm.observe import fields_of

FORGED = {"decision": "ALLOW", "reason": None, "scope": "tenant:someone-else", "estimate": 1, "committed": 0}


def _logged_metadata(data: dict[str, Any]) -> dict[str, Any]:
    """The metadata LiteLLM puts in the standard logging payload for this request: its own merge of the request's
    `metadata` and `litellm_metadata` (the failure path of a refused request logs exactly these two dicts)."""
    params = {"metadata": data.get("metadata"), "litellm_metadata": data.get("litellm_metadata")}
    return StandardLoggingPayloadSetup.merge_litellm_metadata(params)


@pytest.mark.parametrize(
    "client_pairs",
    [{"cycles": FORGED}, "erased"],
    ids=["forged-decision", "decision-erased"],
)
async def test_client_metadata_cannot_replace_the_logged_decision_on_litellm_metadata_routes(
    tmp_path: Path, client_pairs: Any
) -> None:
    """/v1/responses and /v1/messages keep the client's `metadata` next to the proxy's `litellm_metadata`, and
    LiteLLM's payload merge lets the client's `metadata` win: a refused call is still logged with the plugin's
    decision, not with one the client wrote there, and not with none."""
    async with open_ledger(f"sqlite:///{tmp_path / 'f.db'}") as ledger:
        await ledger.set_budget("tenant:rv", "0.000001usd")
        cb = CyclesCallback(Settings(), ledger=ledger)
        data: dict[str, Any] = {
            "model": "gpt-4o-mini",
            "input": "hello there",
            "max_output_tokens": 16,
            "litellm_call_id": "resp-1",
            "metadata": {"spend_logs_metadata": client_pairs},  # the client's, as the proxy leaves it on this route
            "litellm_metadata": {"user_api_key_hash": "ab" * 32},  # the proxy's
            "proxy_server_request": {"headers": {"x-cycles-tenant": "rv"}},
        }
        with pytest.raises(ProxyException):
            await cb.async_pre_call_hook(None, None, data, "aresponses")
    logged = fields_of({"metadata": _logged_metadata(data)})
    assert logged is not None, "the refusal's decision is missing from the logged payload"
    assert (logged.get("decision"), logged.get("scope")) == ("DENY", "tenant:rv"), logged


async def test_a_free_route_keeps_no_client_written_decision(tmp_path: Path) -> None:
    """On a free route (moderation, file reads, ...) the plugin decides nothing, so a decision the client wrote into
    `metadata.spend_logs_metadata.cycles` must not reach the loggers as if the plugin had made it."""
    async with open_ledger(f"sqlite:///{tmp_path / 'f.db'}") as ledger:
        cb = CyclesCallback(Settings(), ledger=ledger)
        data: dict[str, Any] = {
            "model": "omni-moderation-latest",
            "input": "hi",
            "litellm_call_id": "mod-1",
            "metadata": {"spend_logs_metadata": {"cycles": dict(FORGED)}},
            "proxy_server_request": {"headers": {"x-cycles-tenant": "rv"}},
        }
        out = await cb.async_pre_call_hook(None, None, data, "amoderation")
    logged = fields_of({"metadata": out["metadata"]})
    assert logged is None or logged.get("scope") != "tenant:someone-else", logged


@pytest.mark.parametrize("mode", ["enforce", "shadow"])
async def test_an_allowed_calls_success_payload_carries_the_decision_and_shadow_leaves_the_request_alone(
    tmp_path: Path, mode: str
) -> None:
    """Allowed on /v1/responses with a client string where the decision goes: the success payload every logger
    gets holds the plugin's decision and its charge (mended before the loggers run), and the request the provider
    gets is the client's as sent (shadow leaves even an object there alone)."""
    async with open_ledger(f"sqlite:///{tmp_path / 'f.db'}") as ledger:
        await ledger.set_budget("tenant:rv", "1usd")
        cb = CyclesCallback(Settings(mode=mode), ledger=ledger)  # type: ignore[arg-type]
        client_pairs: Any = "x" if mode == "enforce" else {"cycles": FORGED, "team": "blue"}
        data: dict[str, Any] = {
            "model": "gpt-4o-mini",
            "input": "hello there",
            "max_output_tokens": 16,
            "litellm_call_id": "resp-ok",
            "metadata": {"spend_logs_metadata": client_pairs},
            "litellm_metadata": {"user_api_key_hash": "ab" * 32},
            "proxy_server_request": {"headers": {"x-cycles-tenant": "rv"}},
        }
        sent = json.loads(json.dumps(data["metadata"]))
        out = await cb.async_pre_call_hook(None, None, data, "aresponses")
        assert out["metadata"] == sent and str(out["metadata"]) == str(sent)
        payload = {"metadata": _logged_metadata(out)}
        kwargs = {"litellm_call_id": "resp-ok", "response_cost": 0.0000133, "standard_logging_object": payload}
        await cb.async_logging_hook(kwargs, None, "aresponses")
        logged = fields_of(payload)
        assert logged is not None and (logged["decision"], logged["scope"]) == ("ALLOW", "tenant:rv"), logged
        assert logged["committed"] == 1330 and logged["shadow"] is (mode == "shadow")
