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
from litellm.types.utils import ModelResponse, ServerToolUse, Usage
from openai import AsyncOpenAI

from cycles_ledger import open_ledger
from cycles_litellm import CyclesCallback, Settings
from cycles_litellm.estimate import GROUNDING_QUERIES_HELD, RequestInvalid, estimate_call, image_tokens
from tests.support.litellm_costs import gemini_billed

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
async def test_router_fallbacks_beyond_the_group_are_priced(
    config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
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


# --- content the request only points at -------------------------------------------------------------------------


def _window(model: str) -> int:
    return int(litellm.get_model_info(model)["max_input_tokens"])


@pytest.mark.parametrize(
    "req",
    [
        {"previous_response_id": "resp_long"},  # OpenAI bills every input token of the stored chain
        {"conversation": "conv_1"},
        {"prompt": {"id": "pmpt_1", "version": "2"}},  # a stored prompt
        {"input": [{"type": "item_reference", "id": "msg_1"}]},
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]},
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_url": "https://x/a.pdf"}]}]},
    ],
    ids=["previous-response", "conversation", "stored-prompt", "item-reference", "file-id", "file-url"],
)
def test_a_responses_call_pointing_at_stored_content_holds_the_whole_input_window(req: dict[str, Any]) -> None:
    """The provider bills content the body only names (a stored response, a file by id or URL) in full, up to
    the model's input window (1,047,576 tokens for gpt-4.1); the body says nothing of its size."""
    est = estimate_call(
        "gpt-4.1", {"model": "gpt-4.1", "input": "go on", "max_output_tokens": 16, **req}, "responses", Settings()
    )
    plain = estimate_call(
        "gpt-4.1", {"model": "gpt-4.1", "input": "go on", "max_output_tokens": 16}, "responses", Settings()
    )
    assert est.input_tokens == _window("gpt-4.1") and plain.input_tokens < 100


def test_files_by_reference_hold_the_window_and_inline_files_their_size() -> None:
    """Gemini bills video at 263 tokens a second (an hour ~950,000): a video or document given by id or URL holds
    the model's input window; one sent inline is sized by its bytes (an image's worth per 100 kB), as before; an
    image is held at the most its model bills for one (gpt-4o-mini: 2,833 + 8 x 5,667, so it costs what gpt-4o's
    does)."""
    video = {"type": "file", "file": {"file_id": "https://example.com/talk.mp4", "format": "video/mp4"}}
    doc = {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}
    inline = {"type": "file", "file": {"file_data": "data:application/pdf;base64," + "A" * 1000, "filename": "a.pdf"}}
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "high"}}

    def held(model: str, block: dict[str, Any], kind: str = "chat") -> int:
        msgs = [{"role": "user", "content": [{"type": "text", "text": "summarize"}, block]}]
        return estimate_call(model, {"messages": msgs, "max_tokens": 10}, kind, Settings()).input_tokens

    assert held("gemini/gemini-2.5-flash", video) == _window("gemini/gemini-2.5-flash")
    assert held("claude-haiku-4-5", doc, "messages") == _window("claude-haiku-4-5")
    assert held("gpt-4o", inline) < 10_000 and held("gemini/gemini-2.5-flash", inline) < 10_000
    assert held("gpt-4o-mini", image) >= 2_833 + 8 * 5_667
    assert 1_445 <= held("gpt-4o", image) < 2_000  # gpt-4o: 85 + 8 x 170 at most


def _house_router(model_info: dict[str, Any] | None = None) -> litellm.Router:
    """A deployment priced in its own litellm_params (no map entry); by default its model_info gives `max_tokens`
    (LiteLLM's map: "LEGACY parameter. set to max_output_tokens if provider specifies it") and no max_input_tokens."""
    deployment: dict[str, Any] = {
        "model_name": "house",
        "litellm_params": {
            "model": "openai/house-model",
            "api_key": "x",
            "input_cost_per_token": 0.000001,
            "output_cost_per_token": 0.000002,
        },
        "model_info": {"max_tokens": 4096} if model_info is None else model_info,
    }
    return litellm.Router(model_list=[deployment])


def test_content_nobody_can_size_on_a_model_without_a_known_window_is_refused() -> None:
    """A deployment priced in its own litellm_params (no map entry, so no input window): a call pointing at a
    stored response cannot be bounded, and is refused rather than held for the 8 tokens of its body."""
    router = _house_router({})
    req = {"model": "house", "input": "go on", "max_output_tokens": 16}
    assert estimate_call("house", req, "responses", Settings(), router).input_tokens < 100
    with pytest.raises(RequestInvalid, match="cannot size"):
        estimate_call("house", {**req, "previous_response_id": "resp_1"}, "responses", Settings(), router)


# --- tools the provider runs itself -------------------------------------------------------------------------------


def _billed(model: str, prompt: int, completion: int, searches: int) -> int:
    """What LiteLLM's cost calculator charges an Anthropic answer of this usage with `searches` web searches."""
    usage = Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        server_tool_use=ServerToolUse(web_search_requests=searches),
    )
    answer = ModelResponse(
        model=model,
        usage=usage,
        choices=[{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "end_turn"}],
    )
    return _microcents(
        litellm.completion_cost(completion_response=answer, model=model, custom_llm_provider="anthropic")
    )


def test_a_server_web_search_holds_its_fees_and_what_it_reads() -> None:
    """Anthropic's web search bills $0.01 a search (LiteLLM's map) and its results as input: with `max_uses: 3` the
    hold covers three searches and the model's whole input window, which is what LiteLLM bills at most; without
    `max_uses` the model may search without limit, so the request is refused (one search already cost 7x the
    hold of the tool's JSON alone)."""
    model = "claude-sonnet-4-5-20250929"
    tool = {"type": "web_search_20250305", "name": "web_search"}
    req = {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "news?"}]}
    with pytest.raises(RequestInvalid, match="max_uses"):
        estimate_call(model, {**req, "tools": [tool]}, "messages", Settings())
    with pytest.raises(RequestInvalid, match="max_uses"):  # only /v1/responses has max_tool_calls: no bound here
        estimate_call(model, {**req, "tools": [tool], "max_tool_calls": 1}, "messages", Settings())
    est = estimate_call(model, {**req, "tools": [{**tool, "max_uses": 3}]}, "messages", Settings())
    assert est.input_tokens == _window(model)
    assert est.amount >= _billed(model, est.input_tokens, 100, 3) > _billed(model, est.input_tokens, 100, 2)
    plain = estimate_call(model, req, "messages", Settings())
    assert plain.input_tokens < 100  # a call without server tools holds what it sends, as before


def test_openai_web_search_is_bounded_and_priced_per_search() -> None:
    """/v1/responses' web search tool counts against `max_tool_calls` (refused without it); chat's
    `web_search_options` is one search a request; each at $0.025 (LiteLLM's map for gpt-4.1)."""
    fee = 2_500_000
    base = {"model": "gpt-4.1", "input": "news?", "max_output_tokens": 16}
    with pytest.raises(RequestInvalid, match="max_tool_calls"):
        estimate_call("gpt-4.1", {**base, "tools": [{"type": "web_search_preview"}]}, "responses", Settings())
    two = estimate_call(
        "gpt-4.1", {**base, "tools": [{"type": "web_search_preview"}], "max_tool_calls": 2}, "responses", Settings()
    )
    window = estimate_call("gpt-4.1", {**base, "previous_response_id": "r"}, "responses", Settings())
    assert two.amount == window.amount + 2 * fee
    chat = {"model": "gpt-4o-mini", "messages": MSGS, "max_tokens": 10}
    searched = estimate_call("gpt-4o-mini", {**chat, "web_search_options": {}}, "chat", Settings())
    assert searched.input_tokens == _window("gpt-4o-mini") and searched.amount >= fee


# --- fallback targets, key and team fallbacks, input windows, more image rules ------------------------------


async def test_a_router_form_fallback_with_dict_targets_is_priced_or_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """`[{"flaky": [{"model": "dear", "n": 5, "max_tokens": 16000}]}]`: LiteLLM's run_async_fallback does
    kwargs.update(target) for a dict target, so the call goes to o1 with 5 answers of 16,000 tokens (the control):
    a target carrying such fields is refused like an entry carrying them."""
    router = litellm.Router(model_list=_DEPLOYMENTS, num_retries=0)
    req: dict[str, Any] = {"model": "flaky", "messages": MSGS, "max_tokens": 10}
    fallbacks = [{"flaky": [{"model": "dear", "n": 5, "max_tokens": 16000}]}]
    calls = _spy(monkeypatch)
    await router.acompletion(**req, fallbacks=fallbacks)
    assert calls[-1] == {"model": "openai/o1", "n": 5, "max_tokens": 16000}  # the control: LiteLLM sends this
    worst = estimate_call("dear", {**req, "n": 5, "max_tokens": 16000}, "chat", Settings(), router).amount
    try:
        held = estimate_call("flaky", {**req, "fallbacks": fallbacks}, "chat", Settings(), router).amount
    except RequestInvalid:
        return  # refused: fine
    assert held >= worst, f"held {held}, the fallback LiteLLM makes may cost {worst}"


def test_a_router_fallback_target_given_as_a_dict_is_priced() -> None:
    """The router's own config may name a target as `{"model": "dear"}` (the form LiteLLM's
    _get_fallback_target_model_group accepts): it is priced like a name."""
    router = litellm.Router(model_list=_DEPLOYMENTS, num_retries=0, fallbacks=[{"flaky": [{"model": "dear"}]}])
    req = {"model": "flaky", "messages": MSGS, "max_tokens": 10}
    held = estimate_call("flaky", req, "chat", Settings(), router).amount
    assert held >= estimate_call("dear", req, "chat", Settings(), router).amount


def test_key_or_team_router_settings_fallbacks_are_priced() -> None:
    """A key's or team's router_settings.fallbacks reach the request as `router_settings_override` before the
    pre-call hooks; route_llm_request copies them into data["fallbacks"] afterwards, and the Router follows them:
    the fallback group is priced."""
    router = litellm.Router(model_list=_DEPLOYMENTS, num_retries=0)
    req: dict[str, Any] = {"model": "flaky", "messages": MSGS, "max_tokens": 10}
    data = {**req, "router_settings_override": {"fallbacks": [{"flaky": ["dear"]}]}}
    held = estimate_call("flaky", data, "chat", Settings(), router).amount
    assert held >= estimate_call("dear", req, "chat", Settings(), router).amount


def test_max_tokens_is_not_an_input_window() -> None:
    """`max_tokens` in LiteLLM's map is the output's maximum, not an input window: a 20,000-token prompt on such a
    deployment is held in full, not cut to 4,096."""
    router = _house_router()
    text = "hello world " * 10_000
    req = {"model": "house", "messages": [{"role": "user", "content": text}], "max_tokens": 16}
    est = estimate_call("house", req, "chat", Settings(), router)
    assert est.input_tokens >= 15_000, f"held {est.input_tokens} input tokens for a ~20,000-token prompt"


def test_unsized_content_on_a_model_with_only_max_tokens_is_refused() -> None:
    """A stored response on that model: its input window is unknown, so the request is refused, as without
    model_info, rather than held for 4,096 input tokens."""
    router = _house_router()
    req = {"model": "house", "input": "go on", "max_output_tokens": 16, "previous_response_id": "resp_1"}
    with pytest.raises(RequestInvalid):
        estimate_call("house", req, "responses", Settings(), router)


@pytest.mark.parametrize(("model", "at_least"), [("gpt-5-mini", 1_843), ("gpt-5-nano", 2_304)])
def test_patch_priced_gpt5_small_models_hold_their_image_cost(model: str, at_least: int) -> None:
    """gpt-5-mini and gpt-5-nano bill images by 32 px patches (up to 1,536) times a multiplier: 1.62 / 2.46 in
    OpenAI's vision guide, 1.2 / 1.5 as measured; either way more than IMAGE_TOKENS (1,600) at the cap."""
    assert image_tokens(model) >= at_least


@pytest.mark.parametrize(
    ("model", "queries"),
    [("gemini/gemini-2.5-flash", 25), ("vertex_ai/gemini-2.5-pro", 3), ("vertex_ai/gemini-3-flash-preview", 10)],
    ids=["2.5-flash-per-prompt", "vertex-2.5-pro-per-prompt", "3-flash-per-query"],
)
@pytest.mark.parametrize(
    "grounding",
    [{"tools": [{"googleSearch": {}}]}, {"tools": [{"google_search": {}}]}, {"web_search_options": {}}],
    ids=["googleSearch", "google_search", "web_search_options"],
)
def test_gemini_grounding_holds_what_litellm_bills(model: str, queries: int, grounding: dict[str, Any]) -> None:
    """Gemini's own tools are keyed by name (`{"googleSearch": {}}`), and chat's `web_search_options` becomes
    that tool. Grounding with Google Search bills $0.035 a grounded prompt on Gemini 2.x however many queries
    ran, and per query on 3.x (`web_search_billing_unit: per_query`, held at GROUNDING_QUERIES_HELD): the hold
    covers what LiteLLM charges an answer with that many queries (LiteLLM bills the fee, not what the search
    read; `web_search_options` still holds the input window, as on any model). Before, the tool was not
    recognised and the hold was the prompt's alone, 1/1,000 of one fee on gemini-2.5-flash."""
    req = {"model": model, "messages": MSGS, "max_tokens": 100}
    est = estimate_call(model, {**req, **grounding}, "chat", Settings())
    assert queries <= GROUNDING_QUERIES_HELD or "3-" not in model
    assert est.amount >= gemini_billed(model, est.input_tokens, 100, searches=queries)
    plain = estimate_call(model, req, "chat", Settings())
    assert plain.amount * 10 < gemini_billed(model, 10, 100, searches=1)
    if "tools" in grounding:
        assert est.input_tokens < 100  # the prompt and the tool, not the window


@pytest.mark.parametrize("model", ["gemini/gemini-2.5-flash", "vertex_ai/gemini-3-flash-preview"])
def test_gemini_maps_grounding_holds_what_litellm_bills(model: str) -> None:
    """Grounding with Google Maps (`{"googleMaps": {}}`) bills $0.025 a grounded prompt on 2.x, $0.014 a query on
    3.x (LiteLLM's list prices, or the map's `google_maps_grounding_cost_per_query`); with Google Search too,
    both fees are held."""
    req = {"model": model, "messages": MSGS, "max_tokens": 100}
    maps = estimate_call(model, {**req, "tools": [{"googleMaps": {}}]}, "chat", Settings())
    assert maps.amount >= gemini_billed(model, maps.input_tokens, 100, maps=GROUNDING_QUERIES_HELD)
    both = estimate_call(model, {**req, "tools": [{"googleMaps": {}}, {"googleSearch": {}}]}, "chat", Settings())
    billed = gemini_billed(model, both.input_tokens, 100, searches=GROUNDING_QUERIES_HELD, maps=GROUNDING_QUERIES_HELD)
    assert both.amount >= billed > maps.amount


def test_grounding_fees_are_gemini_s_alone() -> None:
    """A tool keyed `googleSearch` on an OpenAI or a Claude model is no Gemini grounding: no grounding fee, the
    hold is the prompt's and the tool's (a grounding fee is 3,500,000 USD_MICROCENTS)."""
    for model in ("gpt-4o-mini", "claude-haiku-4-5"):
        req = {"model": model, "messages": MSGS, "max_tokens": 100}
        tool = estimate_call(model, {**req, "tools": [{"googleSearch": {}}]}, "chat", Settings())
        assert tool.input_tokens < 100 and tool.amount < 100_000


def test_gemini_3_grounding_is_held_for_every_answer() -> None:
    """On Gemini 3 each of `n` candidates may run its own search queries, and LiteLLM bills every distinct one:
    the hold is GROUNDING_QUERIES_HELD per answer (Gemini 2.x bills one fee per grounded prompt, whatever n)."""
    for model, per_answer in (("vertex_ai/gemini-3-flash-preview", True), ("gemini/gemini-2.5-flash", False)):
        req = {"model": model, "messages": MSGS, "max_tokens": 100, "tools": [{"googleSearch": {}}]}
        three = estimate_call(model, {**req, "n": 3}, "chat", Settings())
        queries = 3 * GROUNDING_QUERIES_HELD if per_answer else 1
        assert three.amount >= gemini_billed(model, three.input_tokens, 300, searches=queries)
        if per_answer:
            assert three.amount < gemini_billed(model, three.input_tokens, 300, searches=queries + 1)
