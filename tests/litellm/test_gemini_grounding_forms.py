"""Every request form LiteLLM sends to Gemini as grounding is held at what LiteLLM bills for it: OpenAI's and
Anthropic's web search tools (LiteLLM drops their bound and sends `googleSearch`), the older `functions`
parameter, /v1/messages' legacy tool named `web_search`; and grounding on a Gemini model whose input window
LiteLLM's map does not know is priced, not refused (LiteLLM bills the grounding fee, not what the search read).

Each test compares the plugin's hold with what LiteLLM's own `completion_cost` bills the answer (up to
GROUNDING_QUERIES_HELD queries on a per_query model), after checking with LiteLLM's own transformation that the
request form really reaches Gemini as a `googleSearch` tool."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm
import pytest
from litellm.llms.anthropic.pass_through.adapters.transformation import LiteLLMAnthropicMessagesAdapter
from litellm.responses.litellm_completion_transformation.transformation import LiteLLMCompletionResponsesConfig

from cycles_litellm import Settings
from cycles_litellm.estimate import GROUNDING_QUERIES_HELD, RequestInvalid, estimate_call
from tests.support.litellm_costs import gemini_billed

MSGS = [{"role": "user", "content": "hi"}]
GEMINI_3 = "gemini/gemini-3-flash-preview"  # web_search_billing_unit: per_query
GEMINI_25 = "gemini/gemini-2.5-flash"  # per grounded prompt


def _gemini_tools(model: str, **params: Any) -> list[dict[str, Any]]:
    """The tools LiteLLM's Gemini transformation sends for chat params."""
    provider = model.split("/", 1)[0]
    optional = litellm.get_optional_params(model=model.split("/", 1)[1], custom_llm_provider=provider, **params)
    return list(optional.get("tools") or [])


def _queries(model: str) -> int:
    return GROUNDING_QUERIES_HELD if litellm.get_model_info(model).get("web_search_billing_unit") == "per_query" else 1


# --- 1. OpenAI / Anthropic web search tools sent to Gemini -----------------------------------------------------------


def _chat_web_search(model: str) -> dict[str, Any]:
    tools = [{"type": "web_search", "max_uses": 1}]
    assert _gemini_tools(model, tools=tools) == [{"googleSearch": {}}]  # LiteLLM drops max_uses: Gemini is unbounded
    return {"messages": MSGS, "max_tokens": 100, "tools": tools}


def _chat_web_search_preview(model: str) -> dict[str, Any]:
    tools = [{"type": "web_search_preview", "max_uses": 1}]
    assert _gemini_tools(model, tools=tools) == [{"googleSearch": {}}]
    return {"messages": MSGS, "max_tokens": 100, "tools": tools}


def _responses_web_search(model: str) -> dict[str, Any]:
    tools = [{"type": "web_search"}]
    chat_tools, options = LiteLLMCompletionResponsesConfig.transform_responses_api_tools_to_chat_completion_tools(
        tools  # type: ignore[arg-type]
    )
    assert chat_tools == [] and options is not None  # -> web_search_options -> googleSearch; max_tool_calls dropped
    assert _gemini_tools(model, web_search_options=dict(options)) == [{"googleSearch": {}}]
    return {"input": "hi", "max_output_tokens": 100, "tools": tools, "max_tool_calls": 1}


def _messages_web_search(model: str) -> dict[str, Any]:
    req = {
        "model": model, "messages": MSGS, "max_tokens": 100,
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 1}],
    }  # fmt: skip
    sent, _ = LiteLLMAnthropicMessagesAdapter().translate_anthropic_to_openai(req)  # type: ignore[arg-type]
    assert sent.get("web_search_options") == {} and "max_uses" not in str(sent)
    return req


@pytest.mark.parametrize(
    ("form", "kind"),
    [
        (_chat_web_search, "chat"),
        (_chat_web_search_preview, "chat"),
        (_responses_web_search, "responses"),
        (_messages_web_search, "messages"),
    ],
    ids=["chat-web_search", "chat-web_search_preview", "responses-web_search", "messages-web_search_20250305"],
)
@pytest.mark.parametrize(
    "model", [GEMINI_3, "vertex_ai/gemini-robotics-er-1.5-preview"], ids=["gemini-3", "no-search-fee-in-map"]
)
def test_web_search_tools_sent_to_gemini_hold_its_grounding(form: Any, kind: str, model: str) -> None:
    """LiteLLM turns an OpenAI / Anthropic web search tool into Gemini's `googleSearch` (`_map_function`, the
    Responses bridge and the /v1/messages adapter via `web_search_options`), dropping `max_uses` /
    `max_tool_calls`: Gemini decides how many queries run, and LiteLLM bills them per query on 3.x and at $0.035
    (its default) a grounded prompt on a model with no `search_context_cost_per_query`. The plugin prices such a
    tool as `max_uses` OpenAI-style searches (`_search_fee`): 1 query of 10 on Gemini 3, and 0 on a model without
    search prices."""
    req = form(model)
    est = estimate_call(model, {"model": model, **req}, kind, Settings())
    assert est.amount >= gemini_billed(model, est.input_tokens, 100, searches=_queries(model))


# --- 2. the legacy `functions` parameter ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", [GEMINI_3, GEMINI_25])
def test_gemini_tools_in_functions_are_grounding(model: str) -> None:
    """LiteLLM's Gemini config maps `functions` like `tools` (`param == "tools" or param == "functions"` ->
    `_map_function`), so `functions=[{"googleSearch": {}}]` is grounding; server_tools reads only `tools` and
    the hold is the prompt's alone (about 1/500 of one fee)."""
    functions = [{"googleSearch": {}}]
    assert _gemini_tools(model, functions=functions) == [{"googleSearch": {}}]
    req = {"model": model, "messages": MSGS, "max_tokens": 100, "functions": functions}
    est = estimate_call(model, req, "chat", Settings())
    assert est.amount >= gemini_billed(model, est.input_tokens, 100, searches=_queries(model))


# --- 3. /v1/messages: the legacy web search tool named `web_search` ------------------------------------------------


@pytest.mark.parametrize("model", [GEMINI_3, GEMINI_25])
def test_messages_tool_named_web_search_is_grounding(model: str) -> None:
    """LiteLLM's /v1/messages adapter takes a tool named `web_search` without an `input_schema` as a web search
    (`_is_web_search_tool`) and sends `web_search_options`, i.e. Google Search grounding on Gemini. The plugin
    reads it as a web search too: without `max_uses` it is refused like any unbounded web search tool (another
    deployment of the group could be Anthropic's, which searches as often as it likes), with one it is held at
    Gemini's grounding fee."""
    req = {"model": model, "messages": MSGS, "max_tokens": 100, "tools": [{"name": "web_search"}]}
    sent, _ = LiteLLMAnthropicMessagesAdapter().translate_anthropic_to_openai(req)  # type: ignore[arg-type]
    assert sent.get("web_search_options") == {}
    with pytest.raises(RequestInvalid, match="max_uses"):
        estimate_call(model, req, "messages", Settings())
    bounded = {**req, "tools": [{"name": "web_search", "max_uses": 1}]}
    est = estimate_call(model, bounded, "messages", Settings())
    assert est.amount >= gemini_billed(model, est.input_tokens, 100, searches=_queries(model))


# --- 4. grounding on a Gemini model without a known window -------------------------------------------


@pytest.mark.parametrize("tool", [{"googleSearch": {}}, {"googleMaps": {}}], ids=["googleSearch", "googleMaps"])
def test_grounding_on_a_gemini_model_without_a_known_window_is_priced_not_refused(tool: dict[str, Any]) -> None:
    """vertex_ai/gemini-2.0-flash is priced in LiteLLM's map without `max_input_tokens`. LiteLLM bills no input
    for what Google Search / Maps grounding retrieves (`_response_has_search_grounding`: toolUsePromptTokenCount
    is not billed when grounding is), so prompt + cap + the grounding fee prices it: held, not refused as
    content of unknown size."""
    model = "vertex_ai/gemini-2.0-flash"
    assert litellm.get_model_info(model).get("max_input_tokens") is None
    req = {"model": model, "messages": MSGS, "max_tokens": 100, "tools": [tool]}
    est = estimate_call(model, req, "chat", Settings())
    maps = 1 if "googleMaps" in tool else 0
    assert est.amount >= gemini_billed(model, est.input_tokens, 100, searches=1 - maps, maps=maps)
