"""The e2e harness itself: fake upstream + a real litellm proxy WITHOUT the Cycles callback.

Nothing here depends on the plugin's budget behaviour; if these fail, the plugin's e2e tests cannot be trusted.
"""

from __future__ import annotations

import base64
import struct
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from cycles_litellm.fake_provider import (
    EMBEDDING_DIM,
    EMBEDDING_TOKENS_PER_INPUT,
    MAX_COMPLETION_TOKENS,
    PROMPT_TOKENS,
    FakeUpstream,
    RecordedRequest,
    expected_content,
)
from cycles_litellm.launch import LITELLM_CONFIG, LiteLLMProxy
from tests.e2e.conftest import ProxyFactory

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def plain_proxy(proxy_factory: ProxyFactory, no_callback_config: Path) -> LiteLLMProxy:
    return proxy_factory(litellm_config=no_callback_config)


@pytest.fixture
def upstream(fake_upstream: FakeUpstream) -> FakeUpstream:
    fake_upstream.clear()
    return fake_upstream


def _chat_requests(up: FakeUpstream) -> list[RecordedRequest]:
    return [r for r in up.requests if r.path == "/v1/chat/completions"]


def test_no_callback_config_drops_only_the_callback_line(no_callback_config: Path) -> None:
    """The no-callback config is configs/litellm.yaml minus litellm_settings.callbacks, nothing else."""
    original = yaml.safe_load(LITELLM_CONFIG.read_text())
    stripped = yaml.safe_load(no_callback_config.read_text())
    assert "callbacks" in original["litellm_settings"]
    assert "callbacks" not in (stripped.get("litellm_settings") or {})
    assert stripped["model_list"] == original["model_list"]
    assert stripped["general_settings"] == original["general_settings"]


def test_fake_upstream_direct(upstream: FakeUpstream) -> None:
    """The fake upstream answers deterministically, records requests and fails on FAIL500, without a proxy."""
    client = openai.OpenAI(base_url=upstream.base_url, api_key="sk-fake", max_retries=0)
    r = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3
    )
    assert r.choices[0].message.content == "w0 w1 w2"
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (PROMPT_TOKENS, 3, 28)
    r = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert r.usage.completion_tokens == MAX_COMPLETION_TOKENS
    assert r.choices[0].finish_reason == "stop"
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "FAIL500 now"}])
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o-mini-fail", messages=[{"role": "user", "content": "hi"}])
    recorded = upstream.requests
    assert [r.status for r in recorded] == [200, 200, 500, 500]
    assert recorded[0].headers["authorization"] == "Bearer sk-fake"
    assert recorded[0].body["max_completion_tokens"] == 3


def test_fake_upstream_slow_stream_sees_client_abort(upstream: FakeUpstream) -> None:
    """A SLOWSTREAM stream paces its chunks and notices when the client goes away mid-stream."""
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "SLOWSTREAM"}]}
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", upstream.base_url + "/chat/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        data = [line for line in (next(lines) for _ in range(8)) if line.startswith("data: ")]
        assert len(data) >= 3
    rec = upstream.wait_for(lambda r: r.disconnected, timeout=5)
    assert not rec.completed
    assert 2 <= rec.chunks_sent < 20


def test_chat_completion_through_proxy(plain_proxy: LiteLLMProxy, upstream: FakeUpstream) -> None:
    """A non-streamed chat completion goes through the proxy with the client's max_tokens and exact usage."""
    client = plain_proxy.openai_client()
    r = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "say something"}], max_tokens=7
    )
    assert r.choices[0].message.content == expected_content(7)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (PROMPT_TOKENS, 7, 32)
    (rec,) = _chat_requests(upstream)
    assert rec.body["model"] == "gpt-4o-mini"  # the `openai/` prefix is stripped before the upstream
    assert rec.body["max_tokens"] == 7
    assert rec.body["messages"][-1]["content"] == "say something"
    assert rec.headers["authorization"] == "Bearer sk-fake"  # the upstream key, not the master key
    assert not rec.body.get("stream")


def test_streaming_chat_completion_through_proxy(plain_proxy: LiteLLMProxy, upstream: FakeUpstream) -> None:
    """A streamed chat completion arrives chunk by chunk through the proxy, with the usage chunk last."""
    client = plain_proxy.openai_client()
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "stream please"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts: list[str] = []
    usage: Any = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(parts) == expected_content(12)
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (PROMPT_TOKENS, 12, 37)
    (rec,) = _chat_requests(upstream)
    assert rec.body["stream"] is True
    assert rec.body["max_tokens"] == 12
    assert rec.body["stream_options"]["include_usage"] is True
    assert rec.completed and rec.chunks_sent == 12


def test_embedding_through_proxy(plain_proxy: LiteLLMProxy, upstream: FakeUpstream) -> None:
    """An embedding request goes through the proxy and returns the fake's vectors and token usage."""
    client = plain_proxy.openai_client()
    r = client.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta", "gamma"])
    assert len(r.data) == 3
    assert [len(d.embedding) for d in r.data] == [EMBEDDING_DIM] * 3
    assert r.data[1].embedding[0] == pytest.approx(0.02, rel=1e-6)
    assert r.usage.prompt_tokens == 3 * EMBEDDING_TOKENS_PER_INPUT
    assert r.usage.total_tokens == 3 * EMBEDDING_TOKENS_PER_INPUT
    (rec,) = [r for r in upstream.requests if r.path == "/v1/embeddings"]
    assert rec.body["input"] == ["alpha", "beta", "gamma"]
    assert rec.body["model"] == "text-embedding-3-small"


def test_upstream_500_surfaces_as_error(plain_proxy: LiteLLMProxy, upstream: FakeUpstream) -> None:
    """An upstream 500 (FAIL500) reaches the proxy's client as an error, and the upstream saw the call."""
    client = plain_proxy.openai_client()
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "FAIL500 please"}], max_tokens=5
        )
    assert info.value.status_code >= 500
    attempts = _chat_requests(upstream)
    assert attempts
    assert all(r.status == 500 for r in attempts)
    assert all("FAIL500" in r.body["messages"][-1]["content"] for r in attempts)


def test_proxy_handle(
    plain_proxy: LiteLLMProxy, proxy_factory: ProxyFactory, no_callback_config: Path, fake_upstream: FakeUpstream
) -> None:
    """The factory caches by configuration, writes the per-proxy cycles.yaml, and exposes logs and a usable ledger."""
    assert proxy_factory(litellm_config=no_callback_config) is plain_proxy
    cycles = yaml.safe_load(plain_proxy.cycles_config_path.read_text())
    assert cycles["store"] == plain_proxy.store_url
    assert plain_proxy.store_url.startswith("sqlite:////")
    assert "--config" in plain_proxy.logs()
    r = httpx.get(plain_proxy.url + "/health/liveliness", timeout=5)
    assert r.status_code == 200
    before = len(_chat_requests(fake_upstream))
    r = httpx.post(plain_proxy.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []}, timeout=5)
    # the master key is enforced. 1.108.7 answers 500, not 401, when `prisma` is not installed: its auth
    # error handler imports prisma and the ModuleNotFoundError replaces the 401 (see the proxy log).
    assert r.status_code in (401, 500)
    assert len(_chat_requests(fake_upstream)) == before
    with plain_proxy.ledger() as ledger:
        ledger.set_budget("tenant:harness", "1usd")
        assert ledger.balance("tenant:harness").remaining == 10**8


def test_embedding_base64_decodes(upstream: FakeUpstream) -> None:
    """Base64 embeddings (the openai client's default wire format) decode to the same float32 vector."""
    r = httpx.post(
        upstream.base_url + "/embeddings",
        json={"model": "text-embedding-3-small", "input": "x", "encoding_format": "base64"},
        timeout=5,
    )
    vector = struct.unpack(f"<{EMBEDDING_DIM}f", base64.b64decode(r.json()["data"][0]["embedding"]))
    assert vector[0] == pytest.approx(0.01, rel=1e-6)
