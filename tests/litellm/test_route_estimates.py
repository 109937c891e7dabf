"""Worst-case estimates per route: every billed input counted, every possible output paid, prices from
LiteLLM's own map; and the call-type table that decides which routes are metered, free or refused."""

from __future__ import annotations

import io
import json
import math
from decimal import Decimal

import litellm
import pytest
from litellm.types.utils import CallTypes

from cycles_litellm.calls import chunk_text
from cycles_litellm.estimate import PriceUnknown, RequestInvalid, estimate_call, image_tokens, price_of_group
from cycles_litellm.fake_provider import wav_bytes
from cycles_litellm.routes import FREE, METERED, classify
from cycles_litellm.settings import Settings

S = Settings()
MSGS = [{"role": "user", "content": "hello there"}]
IN, OUT = 15, 60  # gpt-4o-mini, USD_MICROCENTS per token


def usd(value: float) -> int:
    return math.ceil(Decimal(str(value)) * 10**8)


def test_n_choices_multiply_the_output() -> None:
    one = estimate_call("gpt-4o-mini", {"messages": MSGS, "max_tokens": 100}, "chat", S)
    three = estimate_call("gpt-4o-mini", {"messages": MSGS, "max_tokens": 100, "n": 3}, "chat", S)
    assert three.amount - three.input_cost == 3 * (one.amount - one.input_cost) == 3 * 100 * OUT
    assert three.outputs == 3 and three.output_cap == 100


@pytest.mark.parametrize(("n", "outputs"), [(0, 1), (-2, 1), (True, 1), (None, 1), ("x", 1), (float("nan"), 1)])
def test_a_meaningless_n_counts_as_one(n: object, outputs: int) -> None:
    est = estimate_call("gpt-4o-mini", {"messages": MSGS, "max_tokens": 10, "n": n}, "chat", S)
    assert est.outputs == outputs


@pytest.mark.parametrize(("n", "outputs"), [("3", 3), (3.0, 3), (2.5, 3), (" 4 ", 4)])
def test_n_written_as_text_or_float_counts_as_providers_read_it(n: object, outputs: int) -> None:
    """LiteLLM forwards n unchanged and lax providers parse "3" and 3.0: the hold pays for every answer."""
    est = estimate_call("gpt-4o-mini", {"messages": MSGS, "max_tokens": 10, "n": n}, "chat", S)
    assert est.outputs == outputs


def test_absurd_requests_are_invalid_not_a_crash() -> None:
    with pytest.raises(RequestInvalid):
        estimate_call("gpt-4o-mini", {"messages": MSGS, "max_tokens": 10, "n": 10**13}, "chat", S)
    deep: dict[str, object] = {"type": "object"}
    for _ in range(2000):
        deep = {"type": "object", "properties": {"x": deep}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": deep}}]
    with pytest.raises(RequestInvalid):
        estimate_call("gpt-4o-mini", {"messages": MSGS, "max_tokens": 10, "tools": tools}, "chat", S)


def test_responses_cap_below_the_floor_holds_the_floor() -> None:
    """LiteLLM raises max_output_tokens below 16 to 16: the hold pays for 16."""
    est = estimate_call("gpt-4o-mini", {"input": "hi", "max_output_tokens": 1}, "responses", S)
    assert est.output_cap == 16


def test_response_format_and_suffix_are_counted() -> None:
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "s", "schema": {"properties": {f"p{i}": {"type": "string"} for i in range(300)}}},
    }
    bare = estimate_call("gpt-4o-mini", {"messages": MSGS, "max_tokens": 1}, "chat", S)
    shaped = estimate_call("gpt-4o-mini", {"messages": MSGS, "max_tokens": 1, "response_format": schema}, "chat", S)
    assert shaped.input_tokens > bare.input_tokens + 300
    suffix = estimate_call(
        "gpt-3.5-turbo-instruct", {"prompt": "a", "suffix": "word " * 2000, "max_tokens": 1}, "text", S
    )
    assert suffix.input_tokens > 2000


def test_output_cap_never_above_the_models_maximum() -> None:
    est = estimate_call("gpt-4o-mini", {"messages": MSGS, "max_tokens": 10_000_000}, "chat", S)
    assert est.output_cap == 16384 and est.cap_field == "max_tokens"
    est = estimate_call("gpt-4o-mini", {"messages": MSGS, "max_completion_tokens": 50}, "chat", S)
    assert est.output_cap == 50 and est.cap_field == "max_completion_tokens"


def test_both_cap_fields_the_larger_one_holds() -> None:
    """max_tokens and max_completion_tokens together: a provider may honour either, so the larger is held."""
    est = estimate_call("gpt-4o-mini", {"messages": MSGS, "max_completion_tokens": 10, "max_tokens": 500}, "chat", S)
    assert est.output_cap == 500


def test_text_completions_pay_every_prompt_times_n_or_best_of() -> None:
    data = {"prompt": ["one two", "three"], "max_tokens": 20, "n": 2, "best_of": 3}
    est = estimate_call("gpt-3.5-turbo-instruct", data, "text", S)
    assert est.outputs == 2 * 3 and est.output_cap == 20
    _, price = price_of_group("gpt-3.5-turbo-instruct", S)
    assert est.amount == est.input_cost + -(-6 * 20 * price.output_per_million // 10**6)
    tokens = estimate_call("gpt-3.5-turbo-instruct", {"prompt": [1, 2, 3, 4], "max_tokens": 1}, "text", S)
    assert tokens.input_tokens == 4 and tokens.outputs == 1


def test_anthropic_messages_count_system_and_tools() -> None:
    system_text = "You are a careful assistant who answers in French. " * 20
    tools = [
        {
            "name": "get_weather",
            "description": "Get the current weather in a given location " * 5,
            "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}},
        }
    ]
    bare = {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    base = estimate_call("claude-haiku-4-5", bare, "messages", S)
    as_text = estimate_call("claude-haiku-4-5", {**bare, "system": system_text}, "messages", S)
    as_blocks = estimate_call(
        "claude-haiku-4-5",
        {**bare, "system": [{"type": "text", "text": system_text, "cache_control": {"type": "ephemeral"}}]},
        "messages",
        S,
    )
    with_tools = estimate_call("claude-haiku-4-5", {**bare, "system": system_text, "tools": tools}, "messages", S)
    system_tokens = litellm.token_counter(model="claude-haiku-4-5", text=system_text)
    assert as_text.input_tokens >= base.input_tokens + system_tokens
    assert as_blocks.input_tokens >= base.input_tokens + system_tokens
    tool_tokens = litellm.token_counter(model="claude-haiku-4-5", text=json.dumps(tools))
    assert with_tools.input_tokens >= as_text.input_tokens + tool_tokens
    assert with_tools.cap_field == "max_tokens" and with_tools.output_cap == 100


def test_responses_count_instructions_and_input_items_and_read_max_output_tokens() -> None:
    instructions = "Answer like a pirate. " * 30
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "first question " * 10}]},
        {"type": "function_call_output", "call_id": "c1", "output": "result text " * 10},
    ]
    est = estimate_call(
        "gpt-4o-mini", {"instructions": instructions, "input": items, "max_output_tokens": 300}, "responses", S
    )
    floor = sum(
        litellm.token_counter(model="gpt-4o-mini", text=t)
        for t in (instructions, "first question " * 10, "result text " * 10)
    )
    assert est.input_tokens >= floor
    assert est.output_cap == 300 and est.cap_field == "max_output_tokens"
    assert est.amount == est.input_cost + 300 * OUT
    plain = estimate_call("gpt-4o-mini", {"input": "hi"}, "responses", S)
    assert plain.output_cap == 16384  # no cap named: the model's maximum


def test_images_in_content_count_as_images_not_base64_text() -> None:
    data_url = "data:image/png;base64," + "A" * 200_000
    msgs = [{"role": "user", "content": [{"type": "input_image", "image_url": data_url}]}]
    est = estimate_call("gpt-4o", {"input": msgs, "max_output_tokens": 1}, "responses", S)
    assert 1_600 <= est.input_tokens < 2_000
    # gpt-4o-mini bills an image at up to 2,833 + 8 x 5,667 tokens (so it costs what gpt-4o's does)
    mini = estimate_call("gpt-4o-mini", {"input": msgs, "max_output_tokens": 1}, "responses", S)
    assert image_tokens("gpt-4o-mini") == 48_169 <= mini.input_tokens < 48_169 + 400


def test_rates_the_request_selects_are_held() -> None:
    """A service tier, a long-context tier, audio output and cache writes bill above the base rate: the
    hold uses the rate LiteLLM's map gives for what the request asks."""
    base = estimate_call("gpt-5", {"messages": MSGS, "max_tokens": 100}, "chat", S)
    priority = estimate_call("gpt-5", {"messages": MSGS, "max_tokens": 100, "service_tier": "priority"}, "chat", S)
    out_priority = _per_million_of("gpt-5", "output_cost_per_token_priority")
    assert priority.output_per_million == out_priority > base.output_per_million
    long_prompt = [{"role": "user", "content": "word " * 210_000}]
    long = estimate_call("gemini-2.5-pro", {"messages": long_prompt, "max_tokens": 10}, "chat", S)
    assert long.output_per_million == _per_million_of("gemini-2.5-pro", "output_cost_per_token_above_200k_tokens")
    cached = [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}]
    write = estimate_call("claude-haiku-4-5", {"messages": cached, "max_tokens": 10}, "messages", S)
    plain = estimate_call("claude-haiku-4-5", {"messages": MSGS, "max_tokens": 10}, "messages", S)
    assert write.input_cost > plain.input_cost


def _per_million_of(model: str, key: str) -> int:
    return math.ceil(Decimal(str(litellm.model_cost[model][key])) * 10**8 * 10**6)


def test_chat_images_and_files_are_paid_at_the_worst_case() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.invalid/x.png", "detail": "high"}}
    pdf = {"type": "file", "file": {"file_data": "data:application/pdf;base64," + "A" * 450_000}}
    bare = estimate_call("gpt-4o-mini", {"messages": MSGS, "max_tokens": 1}, "chat", S)
    with_media = [{"role": "user", "content": [{"type": "text", "text": "hello there"}, image, image, pdf]}]
    est = estimate_call("gpt-4o-mini", {"messages": with_media, "max_tokens": 1}, "chat", S)
    assert est.input_tokens >= bare.input_tokens + 2 * 1_600 + 5 * 1_600  # two images, a 450 kB file


def test_image_generation_priced_by_litellms_map_at_the_worst_quality() -> None:
    named = estimate_call("gpt-image-1", {"prompt": "a cat", "n": 2, "size": "1024x1024", "quality": "low"}, "image", S)
    prompt_cost = -(-litellm.token_counter(model="gpt-image-1", text="a cat") * 500 // 1)  # 5e-6 USD = 500 µ¢
    assert named.amount == 2 * usd(0.011) + prompt_cost
    worst = estimate_call("gpt-image-1", {"prompt": "a cat"}, "image", S)
    assert worst.amount == usd(0.25) + prompt_cost  # high quality at the largest size LiteLLM prices


def test_speech_priced_per_character() -> None:
    text = "Hello, this is a test of speech. " * 3
    est = estimate_call("tts-1", {"input": text, "voice": "alloy"}, "speech", S)
    assert est.amount == math.ceil(Decimal("0.000015") * len(text) * 10**8)


def test_transcription_priced_per_second_of_the_uploaded_wav() -> None:
    f = io.BytesIO(wav_bytes(2.5))
    est = estimate_call("whisper-1", {"file": f}, "transcription", S)
    assert est.amount == 3 * usd(0.0001)  # 2.5 s rounds up to 3 s
    assert f.tell() == 0  # the file is left where the provider call reads it from
    hidden = wav_bytes(1.0) + b"data" + (60 * 16000).to_bytes(4, "little") + b"\0" * (60 * 16000)
    est = estimate_call("whisper-1", {"file": io.BytesIO(hidden)}, "transcription", S)
    assert est.amount >= 61 * usd(0.0001)  # a second data chunk the header does not count is still paid
    with pytest.raises(PriceUnknown, match="duration"):
        estimate_call("whisper-1", {"file": io.BytesIO(b"not audio")}, "transcription", S)


def test_rerank_priced_per_search_unit() -> None:
    docs = [f"document {i}" for i in range(150)]
    est = estimate_call("rerank-english-v3.0", {"query": "q", "documents": docs}, "rerank", S)
    assert est.amount == 2 * usd(0.002)  # 150 documents: two search units


def test_unpriced_routes_are_price_unknown() -> None:
    with pytest.raises(PriceUnknown):
        estimate_call("gpt-4o-mini-tts", {"input": "hi"}, "speech", S)  # output billed by audio length
    with pytest.raises(PriceUnknown):
        estimate_call("openai/private-image", {"prompt": "x"}, "image", S)


def test_every_litellm_call_type_is_classified_and_unknown_ones_are_refused() -> None:
    names = {c.value for c in CallTypes}
    assert set(METERED) - {"aanthropic_messages"} <= names | {"aanthropic_messages"}
    kinds = {name: classify(name).kind for name in names}
    assert kinds["acompletion"] == "chat" and kinds["anthropic_messages"] == "messages"
    assert kinds["pass_through_endpoint"] == kinds["acreate_batch"] == kinds["arun_thread"] == "refused"
    assert kinds["afile_retrieve"] == kinds["amoderation"] == "free"
    assert classify("a_call_type_from_the_future").kind == "refused"
    assert classify("pass_through_endpoint", frozenset({"pass_through_endpoint"})).kind == "free"
    assert not (FREE & set(METERED))


@pytest.mark.parametrize(
    ("chunk", "text"),
    [
        ({"choices": [{"delta": {"content": "ab"}}]}, "ab"),
        ({"choices": [{"text": "cd", "index": 0}]}, "cd"),
        ({"type": "response.output_text.delta", "delta": "ef"}, "ef"),
        ({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "gh"}}, "gh"),
        (b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"ij"}}\n\n', "ij"),
        ({"type": "response.created", "response": {}}, ""),
        ({"choices": [{"delta": {"tool_calls": [{"function": {"name": "f", "arguments": '{"a":'}}]}}]}, 'f{"a":'),
        ({"choices": [{"delta": {"reasoning_content": "hmm", "content": None}}]}, "hmm"),
        ({"type": "response.function_call_arguments.delta", "delta": '{"x"'}, '{"x"'),
        ({"type": "content_block_delta", "delta": {"type": "thinking_delta", "thinking": "think"}}, "think"),
        ({"type": "content_block_delta", "delta": {"type": "input_json_delta", "partial_json": "[1"}}, "[1"),
        (object(), ""),
    ],
)
def test_streamed_text_of_every_route(chunk: object, text: str) -> None:
    assert chunk_text(chunk) == text
