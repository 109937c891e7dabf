"""Every billable route of the LiteLLM proxy, through a real proxy to the fake upstream, with the real SDKs.

One proxy for the module: configs/litellm-routes.yaml minus the Cycles callback, plus `cost_recorder`
below - a passive LiteLLM CustomLogger that appends each call's `call_type` and `response_cost` (as
LiteLLM's own logging computed them) to a JSON-lines file. For each route the tests check that the fake
received the request, that its usage follows the request (the fake's module functions recompute it), and
that LiteLLM's cost equals the fake's usage x LiteLLM's price (`litellm.model_cost`): from the
`x-litellm-response-cost` header where LiteLLM sets one (non-streamed calls), else from the recorder
(streams, where headers go out before the usage exists, and pass-through routes).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before litellm is imported: no price-map fetch

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import litellm
import pytest
import yaml
from litellm.integrations.custom_logger import CustomLogger

from cycles_litellm.fake_provider import (
    IMAGE_OUTPUT_TOKENS,
    PROMPT_TOKENS,
    FakeUpstream,
    RecordedRequest,
    count_input_tokens,
    expected_content,
    image_usage_for,
    prompt_tokens_of_completion,
    transcription_duration_s,
    wav_bytes,
)
from cycles_litellm.launch import REPO_ROOT, LiteLLMProxy, litellm_config_without_callbacks, start_proxy

pytestmark = pytest.mark.e2e

ROUTES_CONFIG = REPO_ROOT / "configs" / "litellm-routes.yaml"
COST_LOG_ENV = "FAKE_ROUTES_COST_LOG"
RECORDER = "tests.e2e.test_fake_routes.cost_recorder"  # imported by the proxy process (REPO_ROOT is on its path)

TOOLS_OPENAI = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]
TOOLS_ANTHROPIC = [
    {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]
SYSTEM_BLOCKS = [{"type": "text", "text": "You are terse and exact.", "cache_control": {"type": "ephemeral"}}]


# -- the recorder, loaded inside the proxy ------------------------------------------------------------------


class CostRecorder(CustomLogger):
    """Appends {call_id, call_type, model, response_cost, ...} per logged call to $FAKE_ROUTES_COST_LOG."""

    def _write(self, kwargs: dict[str, Any], status: str) -> None:
        path = os.environ.get(COST_LOG_ENV)
        if not path:
            return
        slo = kwargs.get("standard_logging_object") or {}
        line = {
            "status": status,
            "call_id": kwargs.get("litellm_call_id") or slo.get("id"),
            "call_type": kwargs.get("call_type"),
            "slo_call_type": slo.get("call_type"),
            "model": slo.get("model") or kwargs.get("model"),
            "response_cost": slo.get("response_cost", kwargs.get("response_cost")),
            "prompt_tokens": slo.get("prompt_tokens"),
            "completion_tokens": slo.get("completion_tokens"),
            "stream": kwargs.get("stream"),
        }
        with open(path, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")

    async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._write(kwargs, "success")

    async def async_log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._write(kwargs, "failure")


cost_recorder = CostRecorder()


# -- fixtures and helpers ------------------------------------------------------------------------------------


@dataclass
class Routes:
    proxy: LiteLLMProxy
    cost_log: Path

    def costs(self) -> list[dict[str, Any]]:
        try:
            return [json.loads(line) for line in self.cost_log.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    def logged(self, call_id: str | None = None, *, after: int = 0, timeout: float = 10.0) -> dict[str, Any]:
        """The recorder's line for `call_id` (or the first line after index `after`), waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.costs()
            for line in lines[after:]:
                if call_id is None or line["call_id"] == call_id:
                    return line
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no cost record for call {call_id} after line {after}: {lines[after:]}")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def routes(fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routes]:
    workdir = tmp_path_factory.mktemp("routes")
    config_path = litellm_config_without_callbacks(workdir / "config", source=ROUTES_CONFIG)
    config = yaml.safe_load(config_path.read_text())
    config.setdefault("litellm_settings", {})["callbacks"] = [RECORDER]
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cost_log = workdir / "costs.jsonl"
    proxy = start_proxy(
        fake_upstream.base_url, workdir / "proxy", litellm_config=config_path, env={COST_LOG_ENV: str(cost_log)}
    )
    try:
        yield Routes(proxy, cost_log)
    finally:
        proxy.stop()


@pytest.fixture
def upstream(fake_upstream: FakeUpstream) -> FakeUpstream:
    fake_upstream.clear()
    return fake_upstream


def _one(up: FakeUpstream, path: str) -> RecordedRequest:
    (rec,) = [r for r in up.requests if r.path == path]
    assert rec.status == 200 and rec.completed
    return rec


def _price(model: str, key: str) -> float:
    return float(litellm.model_cost[model][key])


def _token_cost(model: str, prompt: int, completion: int) -> float:
    return prompt * _price(model, "input_cost_per_token") + completion * _price(model, "output_cost_per_token")


def _header_cost(headers: Any) -> float | None:
    value = headers.get("x-litellm-response-cost")
    return None if value is None else float(value)


@pytest.fixture(scope="module")
def oai(routes: Routes) -> Iterator[Any]:
    """An openai.OpenAI client for the proxy (closed at the end of the module)."""
    with routes.proxy.openai_client() as client:
        yield client


@pytest.fixture(scope="module")
def claude(routes: Routes) -> Iterator[anthropic.Anthropic]:
    """An anthropic.Anthropic client for the proxy's /v1/messages, authenticated with the master key."""
    with anthropic.Anthropic(base_url=routes.proxy.url, api_key=routes.proxy.master_key, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def claude_pass_through(routes: Routes) -> Iterator[anthropic.Anthropic]:
    """An anthropic.Anthropic client for the proxy's /anthropic pass-through route."""
    url = routes.proxy.url + "/anthropic"
    with anthropic.Anthropic(base_url=url, api_key=routes.proxy.master_key, max_retries=0) as client:
        yield client


# -- OpenAI-shaped routes ------------------------------------------------------------------------------------


def test_chat_n_choices(routes: Routes, upstream: FakeUpstream, oai: Any) -> None:
    """n=3: three choices, completion_tokens = 3 x words, prompt_tokens the fixed 25; the header is exact."""
    raw = oai.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "three ways"}], n=3, max_tokens=5
    )
    r = raw.parse()
    assert [c.message.content for c in r.choices] == [expected_content(5)] * 3
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (PROMPT_TOKENS, 15)
    assert _one(upstream, "/v1/chat/completions").body["n"] == 3
    assert _header_cost(raw.headers) == pytest.approx(_token_cost("gpt-4o-mini", PROMPT_TOKENS, 15), rel=1e-9)
    assert routes.logged(raw.headers["x-litellm-call-id"])["call_type"] == "acompletion"


def test_chat_countinput_counts_every_input(routes: Routes, upstream: FakeUpstream, oai: Any) -> None:
    """COUNTINPUT: prompt_tokens = count_input_tokens(what the fake received), tools included."""
    tools = [{"type": "function", "function": {k: v for k, v in TOOLS_OPENAI[0].items() if k != "type"}}]
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "COUNTINPUT what is the weather"}]},
    ]
    raw = oai.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=messages, tools=tools, max_tokens=4
    )
    r = raw.parse()
    rec = _one(upstream, "/v1/chat/completions")
    expected = count_input_tokens(rec.body)
    assert expected > 20
    assert r.usage.prompt_tokens == expected
    assert _header_cost(raw.headers) == pytest.approx(_token_cost("gpt-4o-mini", expected, 4), rel=1e-9)


def test_chat_stream_without_include_usage(routes: Routes, upstream: FakeUpstream, oai: Any) -> None:
    """A chat stream (n=2) without stream_options: LiteLLM asks the upstream for include_usage itself, keeps
    the usage chunk from the client, and logs the exact cost (no header on streams)."""
    raw = oai.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "stream"}], max_tokens=6, n=2, stream=True
    )
    chunks = list(raw.parse())
    assert all(c.usage is None for c in chunks)
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    rec = _one(upstream, "/v1/chat/completions")
    assert rec.body["stream_options"] == {"include_usage": True}
    assert rec.chunks_sent == 6
    assert _header_cost(raw.headers) is None
    logged = routes.logged(raw.headers["x-litellm-call-id"])
    assert (logged["call_type"], logged["prompt_tokens"], logged["completion_tokens"]) == ("acompletion", 25, 12)
    assert logged["response_cost"] == pytest.approx(_token_cost("gpt-4o-mini", PROMPT_TOKENS, 12), rel=1e-9)


def test_text_completion(routes: Routes, upstream: FakeUpstream, oai: Any) -> None:
    """/v1/completions, n=2, no max_tokens: 2 x 16 words; prompt tokens = the prompt's count; header exact."""
    raw = oai.completions.with_raw_response.create(
        model="gpt-3.5-turbo-instruct", prompt="Once upon a time there was", n=2
    )
    r = raw.parse()
    rec = _one(upstream, "/v1/completions")
    assert [c.text for c in r.choices] == [expected_content(16)] * 2
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens_of_completion(rec.body), 32)
    expected = _token_cost("gpt-3.5-turbo-instruct", r.usage.prompt_tokens, 32)
    assert _header_cost(raw.headers) == pytest.approx(expected, rel=1e-9)
    assert routes.logged(raw.headers["x-litellm-call-id"])["call_type"] == "atext_completion"


def test_text_completion_stream(routes: Routes, upstream: FakeUpstream, oai: Any) -> None:
    """Streamed /v1/completions with include_usage: words then a usage chunk; no cost header, recorder exact."""
    raw = oai.completions.with_raw_response.create(
        model="gpt-3.5-turbo-instruct",
        prompt=["Roses are red", "Violets are"],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    words: list[str] = []
    indexes: set[int] = set()
    usage: Any = None
    for chunk in raw.parse():
        for c in chunk.choices:
            words += (c.text or "").split()
            indexes.add(c.index)
        usage = chunk.usage or usage
    rec = _one(upstream, "/v1/completions")
    assert rec.body["stream"] is True and rec.body["stream_options"] == {"include_usage": True}
    assert rec.body["prompt"] == ["Roses are red", "Violets are"]
    assert sorted(words) == sorted(expected_content(5).split() * 2)
    assert indexes == {0}  # LiteLLM's text-completion stream wrapper re-indexes every choice to 0
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens_of_completion(rec.body), 10)
    assert _header_cost(raw.headers) is None  # headers precede the stream
    logged = routes.logged(raw.headers["x-litellm-call-id"])
    assert logged["call_type"] == "atext_completion"
    expected = _token_cost("gpt-3.5-turbo-instruct", usage.prompt_tokens, 10)
    assert logged["response_cost"] == pytest.approx(expected, rel=1e-9)


def test_text_completion_stream_without_usage(routes: Routes, upstream: FakeUpstream, oai: Any) -> None:
    """Streamed /v1/completions without include_usage: unlike chat, LiteLLM does not ask the upstream for
    usage, gets none (as from OpenAI), and logs a cost of 0 - it does not count the streamed text itself."""
    raw = oai.completions.with_raw_response.create(
        model="gpt-3.5-turbo-instruct", prompt="Count:", max_tokens=3, stream=True
    )
    chunks = list(raw.parse())
    assert "".join(c.choices[0].text or "" for c in chunks if c.choices) == expected_content(3)
    rec = _one(upstream, "/v1/completions")
    assert "stream_options" not in rec.body
    logged = routes.logged(raw.headers["x-litellm-call-id"])
    assert (logged["call_type"], logged["prompt_tokens"], logged["completion_tokens"]) == ("atext_completion", 0, 0)
    assert logged["response_cost"] == 0.0  # LiteLLM 1.108.7: a real 3-word, priced call logged as free


def test_responses(routes: Routes, upstream: FakeUpstream, oai: Any) -> None:
    """/v1/responses with instructions + tools + max_output_tokens: input = count_input_tokens; header exact."""
    raw = oai.responses.with_raw_response.create(
        model="gpt-4o-mini",
        instructions="Answer briefly.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "What is the weather in Oslo?"}]}],
        tools=TOOLS_OPENAI,
        max_output_tokens=30,
    )
    r = raw.parse()
    rec = _one(upstream, "/v1/responses")
    assert r.output_text == expected_content(30)
    assert r.status == "incomplete"  # cut short by max_output_tokens, as OpenAI reports it
    assert (r.usage.input_tokens, r.usage.output_tokens) == (count_input_tokens(rec.body), 30)
    expected = _token_cost("gpt-4o-mini", r.usage.input_tokens, 30)
    assert _header_cost(raw.headers) == pytest.approx(expected, rel=1e-9)
    assert routes.logged(raw.headers["x-litellm-call-id"])["call_type"] == "aresponses"


def test_responses_stream(routes: Routes, upstream: FakeUpstream, oai: Any) -> None:
    """Streamed /v1/responses: the real event sequence, usage on response.completed; recorder exact."""
    raw = oai.responses.with_raw_response.create(
        model="gpt-4o-mini", input="Tell me a story", instructions="Be brief.", stream=True
    )
    events = list(raw.parse())
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == 40
    usage = events[-1].response.usage
    rec = _one(upstream, "/v1/responses")
    assert (usage.input_tokens, usage.output_tokens) == (count_input_tokens(rec.body), 40)
    logged = routes.logged(raw.headers["x-litellm-call-id"])
    assert logged["call_type"] == "aresponses"
    assert logged["response_cost"] == pytest.approx(_token_cost("gpt-4o-mini", usage.input_tokens, 40), rel=1e-9)


def test_image_generation(routes: Routes, upstream: FakeUpstream, oai: Any) -> None:
    """gpt-image-1, n=2, 1024x1536 high: output = 2 x 6240 image tokens; header = text + image-output price."""
    raw = oai.images.with_raw_response.generate(
        model="gpt-image-1", prompt="A lighthouse at dawn", n=2, size="1024x1536", quality="high"
    )
    r = raw.parse()
    rec = _one(upstream, "/v1/images/generations")
    assert len(r.data) == 2 and r.data[0].b64_json
    usage = image_usage_for(rec.body)
    assert usage["output_tokens"] == 2 * IMAGE_OUTPUT_TOKENS["high"]["1024x1536"]
    assert (r.usage.input_tokens, r.usage.output_tokens) == (usage["input_tokens"], usage["output_tokens"])
    expected = usage["input_tokens"] * _price("gpt-image-1", "input_cost_per_token") + usage["output_tokens"] * _price(
        "gpt-image-1", "output_cost_per_image_token"
    )
    assert _header_cost(raw.headers) == pytest.approx(expected, rel=1e-9)
    assert routes.logged(raw.headers["x-litellm-call-id"])["call_type"] == "aimage_generation"


def test_speech(routes: Routes, upstream: FakeUpstream, oai: Any) -> None:
    """tts-1: audio bytes back; LiteLLM prices the input's NON-WHITESPACE characters (not len(input))."""
    text = "Hello there, general Kenobi."
    raw = oai.audio.speech.with_raw_response.create(model="tts-1", voice="alloy", input=text)
    assert raw.headers["content-type"].startswith("audio/mpeg")
    assert len(raw.content) > 0
    assert _one(upstream, "/v1/audio/speech").body["input"] == text
    per_char = _price("tts-1", "input_cost_per_character")
    non_space = len("".join(text.split()))
    assert _header_cost(raw.headers) == pytest.approx(non_space * per_char, rel=1e-9)
    assert non_space < len(text)  # so LiteLLM's tts cost is below len(input) x price
    assert routes.logged(raw.headers["x-litellm-call-id"])["call_type"] == "aspeech"


def test_transcription(routes: Routes, upstream: FakeUpstream, oai: Any) -> None:
    """whisper-1 with a real 2.5 s WAV: LiteLLM asks for verbose_json and prices usage.seconds (ceil -> 3 s)."""
    audio = wav_bytes(2.5)
    assert transcription_duration_s(audio) == 2.5
    raw = oai.audio.transcriptions.with_raw_response.create(model="whisper-1", file=("clip.wav", audio, "audio/wav"))
    r = raw.parse()
    assert r.text == expected_content(5)
    rec = _one(upstream, "/v1/audio/transcriptions")
    assert rec.body["file"]["size"] == len(audio)
    assert rec.body["response_format"] == "verbose_json"  # LiteLLM's choice, for the duration
    expected = math.ceil(2.5) * _price("whisper-1", "input_cost_per_second")
    assert _header_cost(raw.headers) == pytest.approx(expected, rel=1e-9)
    assert routes.logged(raw.headers["x-litellm-call-id"])["call_type"] == "atranscription"


def test_rerank(routes: Routes, upstream: FakeUpstream) -> None:
    """Cohere rerank via /v1/rerank: LiteLLM posts to /v2/rerank; 1 search unit x input_cost_per_query."""
    r = httpx.post(
        routes.proxy.url + "/v1/rerank",
        headers=routes.proxy.auth_headers,
        json={"model": "rerank-english-v3.0", "query": "capital of France", "documents": ["Paris", "Rome", "Oslo"]},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["index"] for x in body["results"]] == [0, 1, 2]
    rec = _one(upstream, "/v2/rerank")
    assert rec.body["query"] == "capital of France"
    assert body["meta"]["billed_units"]["search_units"] == 1
    cost = _header_cost(r.headers)
    assert cost == pytest.approx(_price("rerank-english-v3.0", "input_cost_per_query"), rel=1e-9)
    assert routes.logged(r.headers["x-litellm-call-id"])["call_type"] == "arerank"


def test_embeddings(routes: Routes, upstream: FakeUpstream, oai: Any) -> None:
    """Embeddings (unchanged fake): 8 tokens per input x price."""
    raw = oai.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["a", "b", "c"])
    assert raw.parse().usage.prompt_tokens == 24
    _one(upstream, "/v1/embeddings")
    expected = 24 * _price("text-embedding-3-small", "input_cost_per_token")
    assert _header_cost(raw.headers) == pytest.approx(expected, rel=1e-9)
    assert routes.logged(raw.headers["x-litellm-call-id"])["call_type"] == "aembedding"


# -- Anthropic-shaped routes ---------------------------------------------------------------------------------


def test_anthropic_messages(routes: Routes, upstream: FakeUpstream, claude: anthropic.Anthropic) -> None:
    """/v1/messages with system blocks + tools: input = count_input_tokens(received body); header exact."""
    raw = claude.messages.with_raw_response.create(
        model="claude-haiku-4-5",
        max_tokens=12,
        system=SYSTEM_BLOCKS,
        tools=TOOLS_ANTHROPIC,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]}],
    )
    m = raw.parse()
    rec = _one(upstream, "/v1/messages")
    assert rec.body["system"] == SYSTEM_BLOCKS and rec.body["tools"] == TOOLS_ANTHROPIC
    assert m.content[0].text == expected_content(12)
    assert m.stop_reason == "max_tokens"
    assert (m.usage.input_tokens, m.usage.output_tokens) == (count_input_tokens(rec.body), 12)
    expected = _token_cost("claude-haiku-4-5", m.usage.input_tokens, 12)
    assert _header_cost(raw.headers) == pytest.approx(expected, rel=1e-9)
    assert routes.logged(raw.headers["x-litellm-call-id"])["call_type"] == "anthropic_messages"


def test_anthropic_messages_stream(routes: Routes, upstream: FakeUpstream, claude: anthropic.Anthropic) -> None:
    """messages.stream: message_start input_tokens, per-word deltas, message_delta output_tokens; recorder exact."""
    with claude.messages.stream(
        model="claude-haiku-4-5",
        max_tokens=100,
        system="You are terse.",
        messages=[{"role": "user", "content": "Tell me a story"}],
    ) as stream:
        text = stream.get_final_text()
        final = stream.get_final_message()
        call_id = stream.response.headers.get("x-litellm-call-id")
        header = _header_cost(stream.response.headers)
    rec = _one(upstream, "/v1/messages")
    assert rec.body["stream"] is True
    assert text == expected_content(40)
    assert (final.usage.input_tokens, final.usage.output_tokens) == (count_input_tokens(rec.body), 40)
    assert header is None
    logged = routes.logged(call_id)
    assert logged["call_type"] == "anthropic_messages"
    expected = _token_cost("claude-haiku-4-5", final.usage.input_tokens, 40)
    assert logged["response_cost"] == pytest.approx(expected, rel=1e-9)


def test_chat_to_anthropic_model(routes: Routes, upstream: FakeUpstream, oai: Any) -> None:
    """Chat completions on claude-haiku-4-5: LiteLLM translates to /v1/messages (system moved out); header exact."""
    raw = oai.chat.completions.with_raw_response.create(
        model="claude-haiku-4-5",
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
        max_tokens=6,
    )
    r = raw.parse()
    rec = _one(upstream, "/v1/messages")
    assert "system" in rec.body and all(m["role"] != "system" for m in rec.body["messages"])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (count_input_tokens(rec.body), 6)
    expected = _token_cost("claude-haiku-4-5", r.usage.prompt_tokens, 6)
    assert _header_cost(raw.headers) == pytest.approx(expected, rel=1e-9)


# -- pass-through routes -------------------------------------------------------------------------------------


def test_openai_pass_through(routes: Routes, upstream: FakeUpstream) -> None:
    """/openai/v1/chat/completions reaches the fake's chat handler with the upstream key, body untouched.

    LiteLLM logs it with cost 0: its OpenAI pass-through cost tracking only runs when the target host is
    api.openai.com or an Azure OpenAI domain (OpenAIPassthroughLoggingHandler), never for a loopback fake."""
    r = httpx.post(
        routes.proxy.url + "/openai/v1/chat/completions",
        headers=routes.proxy.auth_headers,
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    rec = _one(upstream, "/v1/chat/completions")
    assert rec.headers["authorization"] == "Bearer sk-fake"
    assert _header_cost(r.headers) is None
    logged = routes.logged(r.headers["x-litellm-call-id"])
    assert logged["call_type"] == "pass_through_endpoint"
    assert (logged["response_cost"], logged["prompt_tokens"], logged["completion_tokens"]) == (0.0, 0, 0)


def test_anthropic_pass_through(
    routes: Routes, upstream: FakeUpstream, claude_pass_through: anthropic.Anthropic
) -> None:
    """/anthropic/v1/messages (the anthropic SDK with base_url .../anthropic) reaches the fake's messages handler."""
    raw = claude_pass_through.messages.with_raw_response.create(
        model="claude-haiku-4-5", max_tokens=8, system=SYSTEM_BLOCKS, messages=[{"role": "user", "content": "hi"}]
    )
    m = raw.parse()
    rec = _one(upstream, "/v1/messages")
    assert rec.headers["x-api-key"] == "sk-fake"
    assert (m.usage.input_tokens, m.usage.output_tokens) == (count_input_tokens(rec.body), 8)
    assert _header_cost(raw.headers) is None
    logged = routes.logged(raw.headers["x-litellm-call-id"])
    assert logged["call_type"] == "pass_through_endpoint"
    expected = _token_cost("claude-haiku-4-5", m.usage.input_tokens, 8)
    assert logged["response_cost"] == pytest.approx(expected, rel=1e-9)


# -- the fake on its own (no proxy) --------------------------------------------------------------------------


def test_fake_direct_edges(upstream: FakeUpstream) -> None:
    """Errors in each provider's format, SLOWSTREAM caps, and count_input_tokens' shape-independence."""
    base, root = upstream.base_url, upstream.root_url
    with httpx.Client(timeout=10) as http:
        r = http.post(root + "/v1/messages", json={"model": "claude-haiku-4-5", "messages": []})
        assert (r.status_code, r.json()["type"]) == (400, "error")  # max_tokens is required
        r = http.post(
            root + "/v1/messages",
            json={"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "FAIL500"}]},
        )
        assert (r.status_code, r.json()["error"]["type"]) == (500, "api_error")
        r = http.post(base + "/completions", json={"model": "gpt-3.5-turbo-instruct", "prompt": "FAIL500"})
        assert r.status_code == 500
        r = http.post(base + "/completions", json={"model": "x", "prompt": "SLOWSTREAM", "max_tokens": 100})
        assert r.json()["usage"]["completion_tokens"] == 100  # the SLOWSTREAM cap is 200
        r = http.post(base + "/completions", json={"model": "x", "prompt": [[1, 2, 3], [4, 5]], "max_tokens": 2})
        assert r.json()["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
        r = http.post(base + "/responses", json={"model": "gpt-4o-mini-fail", "input": "hi"})
        assert r.status_code == 500
        r = http.post(base + "/images/generations", json={"model": "gpt-image-1", "prompt": "p", "size": "7x7"})
        assert r.status_code == 400
        r = http.post(base + "/images/generations", json={"model": "gpt-image-1", "prompt": "p"})
        assert r.json()["usage"]["output_tokens"] == IMAGE_OUTPUT_TOKENS["medium"]["1024x1024"]  # auto -> medium
        r = http.post(root + "/v1/rerank", json={"model": "m", "query": "q", "documents": ["a"] * 150})
        assert r.json()["meta"] == {"api_version": {"version": "1"}, "billed_units": {"search_units": 2}}
        r = http.post(
            base + "/audio/transcriptions",
            data={"model": "whisper-1", "response_format": "text"},
            files={"file": ("a.wav", wav_bytes(1.0), "audio/wav")},
        )
        assert r.text == expected_content(2) + "\n"
    chat = {
        "model": "claude-haiku-4-5",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
    }
    native = {
        "model": "claude-haiku-4-5",
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}],
    }
    responses = {"model": "claude-haiku-4-5", "instructions": "Be brief.", "input": "Hello there"}
    assert count_input_tokens(chat) == count_input_tokens(native) == count_input_tokens(responses)
    assert count_input_tokens({**native, "tools": TOOLS_ANTHROPIC}) > count_input_tokens(native) + 10
