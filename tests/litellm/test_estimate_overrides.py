"""Request shapes that would let a call cost more than its hold: fields that override what the estimate read
(`extra_body`, a request fallback entry), and fallbacks the router follows beyond the request's group. Each is
either priced (the hold covers what LiteLLM then sends and bills) or refused with 400 REQUEST_INVALID; the
comparison is with LiteLLM's own behaviour (what it forwards to the provider, a spy on the deployment call)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import litellm
import pytest
from litellm.proxy._types import ProxyException
from openai import AsyncOpenAI

from cycles_ledger import open_ledger
from cycles_litellm import CyclesCallback, Settings
from cycles_litellm.estimate import RequestInvalid, estimate_call

MSGS = [{"role": "user", "content": "hi"}]
_USD = 10**8  # USD_MICROCENTS per dollar


def _microcents(usd: float) -> int:
    return int(usd * _USD)


def _fake_openai(seen: list[dict[str, Any]]) -> AsyncOpenAI:
    """An OpenAI client whose transport records the JSON body and answers every choice at max_tokens."""

    def answer(req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content)
        seen.append(body)
        n, cap = int(body.get("n", 1)), int(body.get("max_tokens", 1))
        choices = [
            {"index": i, "message": {"role": "assistant", "content": "x"}, "finish_reason": "length"} for i in range(n)
        ]
        usage = {"prompt_tokens": 8, "completion_tokens": n * cap, "total_tokens": 8 + n * cap}
        payload = {"id": "c", "object": "chat.completion", "created": 1, "model": body["model"]}
        return httpx.Response(200, json=payload | {"choices": choices, "usage": usage})

    return AsyncOpenAI(api_key="sk-fake", http_client=httpx.AsyncClient(transport=httpx.MockTransport(answer)))


async def test_extra_body_may_not_override_what_the_estimate_read(tmp_path: Path) -> None:
    """LiteLLM hands `extra_body` to the OpenAI SDK, which merges it over the body: `extra_body.n` and
    `extra_body.max_tokens` would win over the fields the plugin estimated and clamped (8 answers of 16,000
    tokens, $0.077 by LiteLLM's own price, held as 1 of 20). Refused with 400, nothing held; the SDK does send
    those values (the control), and an extra_body of provider options the estimate does not read passes."""
    seen: list[dict[str, Any]] = []
    response = await litellm.acompletion(
        model="openai/gpt-4o-mini",
        messages=MSGS,
        max_tokens=20,
        extra_body={"n": 8, "max_tokens": 16000},
        client=_fake_openai(seen),
    )
    assert (seen[-1]["n"], seen[-1]["max_tokens"]) == (8, 16000)  # the override reaches the provider
    assert _microcents(response._hidden_params["response_cost"]) > 7_000_000
    url = f"sqlite:///{tmp_path / 'h.db'}"
    async with open_ledger(url) as ledger:
        await ledger.set_budget("tenant:h", "0.01usd")
        cb = CyclesCallback(Settings(), ledger=ledger)

        def body(call_id: str, extra: Any) -> dict[str, Any]:
            return {
                "model": "gpt-4o-mini",
                "messages": MSGS,
                "max_tokens": 20,
                "extra_body": extra,
                "litellm_call_id": call_id,
                "proxy_server_request": {"headers": {"x-cycles-tenant": "h"}},
            }

        for n, extra in enumerate([{"n": 8, "max_tokens": 16000}, {"model": "o1"}, "n=8", {"fallbacks": ["o1"]}]):
            with pytest.raises(ProxyException) as refused:
                await cb.async_pre_call_hook(None, None, body(f"eb-{n}", extra), "acompletion")
            error = refused.value.to_dict()
            assert (refused.value.code, error["code"]) == ("400", "REQUEST_INVALID"), error
        assert (await ledger.balance("tenant:h")).reserved == 0
        ok = await cb.async_pre_call_hook(None, None, body("eb-ok", {"top_k": 5}), "acompletion")
        assert ok["extra_body"] == {"top_k": 5} and (await ledger.balance("tenant:h")).reserved > 0


_DEPLOYMENTS = [
    # `flaky` stands for a group whose provider fails this request (429, 5xx, or a context-window overflow the
    # client provokes with a long prompt: both fall back); the others answer
    {
        "model_name": "flaky",
        "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "x", "mock_response": "litellm.RateLimitError"},
    },
    {"model_name": "mini", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "x", "mock_response": "ok"}},
    {
        "model_name": "mid",
        "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "x", "mock_response": "litellm.RateLimitError"},
    },
    {"model_name": "dear", "litellm_params": {"model": "openai/o1", "api_key": "x", "mock_response": "ok"}},
]


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The kwargs of every deployment call the Router makes (it calls litellm.acompletion per attempt)."""
    calls: list[dict[str, Any]] = []
    real = litellm.acompletion

    async def spy(**kwargs: Any) -> Any:
        calls.append({k: kwargs.get(k) for k in ("model", "n", "max_tokens")})
        return await real(**kwargs)

    monkeypatch.setattr(litellm, "acompletion", spy)
    return calls


async def test_a_request_fallback_entry_may_name_a_model_but_not_override_the_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client's fallback entry `{"model": ..., <params>}` is merged into the call when LiteLLM falls back
    (run_async_fallback: kwargs.update(mg)): 50 answers of 16,000 tokens (the control) where the hold was for 1
    of 10. Such an entry is refused; one that only names a model is priced (o1, 100x gpt-4o-mini)."""
    router = litellm.Router(model_list=_DEPLOYMENTS, num_retries=0)
    req: dict[str, Any] = {"model": "flaky", "messages": MSGS, "max_tokens": 10}
    entry = {"model": "mini", "n": 50, "max_tokens": 16000}
    calls = _spy(monkeypatch)
    await router.acompletion(**req, fallbacks=[entry])
    assert (calls[-1]["n"], calls[-1]["max_tokens"]) == (50, 16000)
    with pytest.raises(RequestInvalid, match="max_tokens, n"):
        estimate_call("flaky", {**req, "fallbacks": [entry]}, "chat", Settings(), router)
    with pytest.raises(RequestInvalid, match="must be a list"):
        estimate_call("flaky", {**req, "fallbacks": "dear"}, "chat", Settings(), router)
    plain = estimate_call(
        "flaky", {**req, "fallbacks": [{"model": "dear", "temperature": 0}]}, "chat", Settings(), router
    )
    assert plain.amount == estimate_call("dear", req, "chat", Settings(), router).amount
    many = [f"group-{i}" for i in range(17)]
    with pytest.raises(RequestInvalid, match="17 fallback models"):
        estimate_call("flaky", {**req, "fallbacks": many}, "chat", Settings(), router)


@pytest.mark.parametrize(
    "config",
    [
        {"default_fallbacks": ["dear"]},  # stored by the Router as [{"*": ["dear"]}]
        {"fallbacks": [{"*": ["dear"]}]},
        {"fallbacks": [{"flaky": ["mid"]}, {"mid": ["dear"]}]},  # chained: LiteLLM follows mid's own fallbacks
    ],
    ids=["default_fallbacks", "generic-star", "chained"],
)
async def test_router_fallbacks_beyond_the_group_are_priced(config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The Router reaches o1 (100x gpt-4o-mini's price) from `flaky` through the generic "*" entry (what
    `default_fallbacks` becomes) or through the fallbacks of a fallback: the estimate prices it too."""
    router = litellm.Router(model_list=_DEPLOYMENTS, num_retries=0, **config)
    req = {"model": "flaky", "messages": MSGS, "max_tokens": 10}
    est = estimate_call("flaky", req, "chat", Settings(), router)
    calls = _spy(monkeypatch)
    await router.acompletion(**req)
    assert calls[-1]["model"] == "openai/o1"
    dear = estimate_call("dear", req, "chat", Settings(), router)
    assert est.amount >= dear.amount, f"held {est.amount} ({est.model}); the call went to o1, worth {dear.amount}"
