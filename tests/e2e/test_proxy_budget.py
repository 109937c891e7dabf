"""The plugin in a real LiteLLM proxy: allow, deny (402), caps, streaming, failures, shadow, outages.

Prices (LiteLLM's map, offline): gpt-4o-mini costs 15 USD_MICROCENTS per input token and 60 per output
token. The fake upstream always reports 25 prompt tokens and min(max_tokens, 40) completion tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import litellm
import pytest

from cycles_litellm.fake_provider import FakeUpstream
from cycles_litellm.launch import LiteLLMProxy
from tests.e2e.conftest import ProxyFactory

IN, OUT = 15, 60  # USD_MICROCENTS per token for gpt-4o-mini
SHADOW = {"shadow_scopes": ["tenant:e2e-shadow"]}


def cost(prompt: int, completion: int) -> int:
    return prompt * IN + completion * OUT


def chat(tenant: str, text: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def post(proxy: LiteLLMProxy, body: dict[str, Any], tenant: str, **kw: Any) -> httpx.Response:
    headers = {**proxy.auth_headers, "x-cycles-tenant": tenant}
    return httpx.post(f"{proxy.url}/v1/chat/completions", json=body, headers=headers, timeout=60, **kw)


def wait_until(pred: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def settled(proxy: LiteLLMProxy, scope: str) -> Any:
    """The balance once nothing is held any more (settling happens after the response)."""
    with proxy.ledger() as led:
        wait_until(lambda: led.balance(scope).reserved == 0)
        return led.balance(scope)


def wait_for_debits(proxy: LiteLLMProxy, scope: str, n: int) -> None:
    with proxy.ledger() as led:
        wait_until(lambda: sum(e.type == "debited" for e in led.events(scope=scope, limit=1000)) == n)


@pytest.fixture(scope="module")
def proxy(proxy_factory: ProxyFactory) -> LiteLLMProxy:
    return proxy_factory(SHADOW)


def fund(proxy: LiteLLMProxy, scope: str, amount: str) -> None:
    with proxy.ledger() as led:
        led.set_budget(scope, amount)


def test_allowed_call_commits_real_usage(proxy: LiteLLMProxy, fake_upstream: FakeUpstream) -> None:
    """An allowed call reaches the upstream, and exactly its usage x price is committed."""
    fund(proxy, "tenant:e2e-allow", "1usd")
    r = post(proxy, chat("e2e-allow", max_tokens=30), "e2e-allow")
    assert r.status_code == 200, r.text
    assert r.headers["x-cycles-decision"] == "ALLOW"
    assert r.headers["x-cycles-reservation-id"].startswith("rsv_")
    assert r.json()["usage"]["completion_tokens"] == 30
    b = settled(proxy, "tenant:e2e-allow")
    assert b.spent == cost(25, 30)
    with proxy.ledger() as led:
        res = led.get_reservation(r.headers["x-cycles-reservation-id"])
        assert res.status.value == "COMMITTED" and res.idempotency_key == r.headers["x-litellm-call-id"]


def test_deny_is_402_and_upstream_never_called(proxy: LiteLLMProxy, fake_upstream: FakeUpstream) -> None:
    """A call the budget cannot pay gets 402 budget_exceeded naming scope and remaining; nothing goes upstream."""
    fund(proxy, "tenant:e2e-deny", "0.00001usd")  # 1,000 microcents: not even 256 output tokens
    fake_upstream.clear()
    for stream in (False, True):
        r = post(proxy, chat("e2e-deny", max_tokens=100, stream=stream), "e2e-deny")
        assert r.status_code == 402, r.text
        err = r.json()["error"]
        assert (err["type"], err["code"]) == ("budget_exceeded", "BUDGET_EXCEEDED")
        assert "tenant:e2e-deny" in err["message"] and "$0.00001" in err["message"]
        assert err["cycles"]["scope"] == "tenant:e2e-deny" and err["cycles"]["remaining"] == 1000
        assert r.headers["x-should-retry"] == "false"
    assert fake_upstream.requests == []
    with proxy.ledger() as led:
        assert led.balance("tenant:e2e-deny").spent == 0
        assert [e.type for e in led.events(scope="tenant:e2e-deny")][-2:] == ["denied", "denied"]


def test_openai_client_sees_a_non_retried_error(proxy: LiteLLMProxy, fake_upstream: FakeUpstream) -> None:
    """The OpenAI SDK raises on the 402 at once (no retry) with our error code."""
    import openai

    fund(proxy, "tenant:e2e-sdk", "0.00001usd")
    client = proxy.openai_client(max_retries=3, default_headers={"x-cycles-tenant": "e2e-sdk"})
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**chat("e2e-sdk", max_tokens=100))
    assert info.value.status_code == 402
    assert info.value.code == "BUDGET_EXCEEDED"
    assert time.monotonic() - started < 5


def test_caps_clamp_what_the_upstream_receives(proxy: LiteLLMProxy, fake_upstream: FakeUpstream) -> None:
    """When the worst case does not fit, the upstream receives max_tokens clamped to what the budget pays."""
    fund(proxy, "tenant:e2e-caps", "0.0005usd")  # 50,000 microcents
    body = chat("e2e-caps", max_tokens=10_000)
    input_cost = litellm.token_counter(model="openai/gpt-4o-mini", messages=body["messages"]) * IN
    expected_cap = (50_000 - input_cost) // OUT
    fake_upstream.clear()
    r = post(proxy, body, "e2e-caps")
    assert r.status_code == 200, r.text
    assert r.headers["x-cycles-decision"] == "ALLOW_WITH_CAPS"
    [req] = fake_upstream.requests
    assert req.body["max_tokens"] == expected_cap == int(r.headers["x-cycles-max-tokens"])
    assert settled(proxy, "tenant:e2e-caps").spent == cost(25, 40)


def test_streaming_commits_usage(proxy: LiteLLMProxy, fake_upstream: FakeUpstream) -> None:
    """A streamed answer is committed at its real usage once the stream ends."""
    fund(proxy, "tenant:e2e-stream", "1usd")
    client = proxy.openai_client(default_headers={"x-cycles-tenant": "e2e-stream"})
    chunks = list(client.chat.completions.create(**chat("e2e-stream", max_tokens=10), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == [f"w{i}" for i in range(10)]
    assert settled(proxy, "tenant:e2e-stream").spent == cost(25, 10)


def test_upstream_failure_releases(proxy: LiteLLMProxy, fake_upstream: FakeUpstream) -> None:
    """An upstream 500 (after the router's retries) releases the hold: nothing spent, nothing held."""
    fund(proxy, "tenant:e2e-fail", "1usd")
    r = post(proxy, chat("e2e-fail", "please FAIL500", max_tokens=10), "e2e-fail")
    assert r.status_code == 500
    b = settled(proxy, "tenant:e2e-fail")
    assert (b.spent, b.reserved) == (0, 0)
    with proxy.ledger() as led:
        assert [x.status.value for x in led.list_reservations(scope="tenant:e2e-fail")] == ["RELEASED"]


def test_aborted_stream_commits_prompt_and_partial_output(proxy: LiteLLMProxy, fake_upstream: FakeUpstream) -> None:
    """A client that hangs up mid-stream is charged its prompt and the output generated so far."""
    fund(proxy, "tenant:e2e-abort", "1usd")
    body = chat("e2e-abort", "SLOWSTREAM please", max_tokens=200, stream=True)
    headers = {**proxy.auth_headers, "x-cycles-tenant": "e2e-abort"}
    received = 0
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                received += 1
            if received >= 6:
                break
    with proxy.ledger() as led:
        wait_until(lambda: led.balance("tenant:e2e-abort").reserved == 0, timeout=30)
        [res] = led.list_reservations(scope="tenant:e2e-abort")
        assert res.status.value == "COMMITTED" and res.committed is not None
        prompt_cost = litellm.token_counter(model="openai/gpt-4o-mini", messages=body["messages"]) * IN
        charged = res.committed.amount
        assert prompt_cost + 3 * OUT <= charged < prompt_cost + 200 * OUT
        assert led.balance("tenant:e2e-abort").spent == charged


def test_unpriced_model_is_denied(proxy: LiteLLMProxy, fake_upstream: FakeUpstream) -> None:
    """A model without a known price is denied with PRICE_UNKNOWN rather than treated as free."""
    fund(proxy, "tenant:e2e-price", "1usd")
    fake_upstream.clear()
    r = post(proxy, {**chat("e2e-price"), "model": "private-model"}, "e2e-price")
    assert r.status_code == 402
    assert r.json()["error"]["code"] == "PRICE_UNKNOWN"
    assert fake_upstream.requests == []
    with proxy.ledger() as led:  # the refusal is in the log, with the call id and the model
        wait_until(lambda: any(e.type == "denied" for e in led.events(scope="tenant:e2e-price")))
        [note] = [e for e in led.events(scope="tenant:e2e-price") if e.type == "denied"]
        assert note.reason_code == "PRICE_UNKNOWN" and note.data["model"] == "private-model"
        assert note.data["call_id"] == r.headers["x-litellm-call-id"]


def test_missing_subject_is_400(proxy: LiteLLMProxy, fake_upstream: FakeUpstream) -> None:
    """A request nobody can be charged for is refused with 400, never passed through silently."""
    r = httpx.post(f"{proxy.url}/v1/chat/completions", json=chat("x"), headers=proxy.auth_headers, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "cycles_subject_invalid"
    with proxy.ledger() as led:
        call_id = r.headers["x-litellm-call-id"]
        wait_until(lambda: any(e.data.get("call_id") == call_id for e in led.events(scope="tenant:_unidentified")))
        [note] = [e for e in led.events(scope="tenant:_unidentified") if e.data.get("call_id") == call_id]
        assert (note.type, note.reason_code) == ("denied", "SUBJECT_INVALID")


def test_shadow_never_blocks_and_records_the_would_be_denial(proxy: LiteLLMProxy, fake_upstream: FakeUpstream) -> None:
    """In a shadow scope every call passes unclamped, spend is recorded, and would_deny marks the exact call."""
    fund(proxy, "tenant:e2e-shadow", "0.00006usd")  # 6,000 microcents: two calls of 2,775, not three
    ids = []
    for _ in range(3):
        r = post(proxy, chat("e2e-shadow", max_tokens=40), "e2e-shadow")
        assert r.status_code == 200, r.text
        ids.append(r.headers["x-litellm-call-id"])
        wait_for_debits(proxy, "tenant:e2e-shadow", len(ids))  # settle first, as a sequential agent would
    with proxy.ledger() as led:
        events = led.events(scope="tenant:e2e-shadow", limit=1000)
        verdicts = [(e.type, e.data.get("key")) for e in events if e.type.startswith("would_")]
        assert verdicts == [("would_allow", ids[0]), ("would_allow", ids[1]), ("would_deny", ids[2])]
        debits = [e for e in events if e.type == "debited"]
        assert [e.data["actual"] for e in debits] == [cost(25, 40)] * 3
        assert [e.amount for e in debits] == [cost(25, 40)] * 3  # all of it, past the budget too
        b = led.balance("tenant:e2e-shadow")
        # the balance shows how far past the budget the traffic went: the excess is debt, over-limit
        assert (b.spent, b.debt, b.remaining) == (6_000, 3 * cost(25, 40) - 6_000, 6_000 - 3 * cost(25, 40))
        assert b.is_over_limit
        assert led.list_reservations(scope="tenant:e2e-shadow") == []


def test_concurrent_requests_never_overspend(proxy: LiteLLMProxy, fake_upstream: FakeUpstream) -> None:
    """50 concurrent calls against a budget for 10 worst cases: at most 10 pass, spent <= allocated, nothing held."""
    body = chat("e2e-conc", max_tokens=40)
    worst = litellm.token_counter(model="openai/gpt-4o-mini", messages=body["messages"]) * IN + 40 * OUT
    allocated = 10 * worst
    with proxy.ledger() as led:
        led.set_budget("tenant:e2e-conc", {"unit": "USD_MICROCENTS", "amount": allocated})

    async def run() -> list[int]:
        headers = {**proxy.auth_headers, "x-cycles-tenant": "e2e-conc"}
        async with httpx.AsyncClient(timeout=60) as client:
            rs = await asyncio.gather(
                *[client.post(f"{proxy.url}/v1/chat/completions", json=body, headers=headers) for _ in range(50)]
            )
        return [r.status_code for r in rs]

    codes = asyncio.run(run())
    assert set(codes) <= {200, 402}
    assert 1 <= codes.count(200) <= 10
    b = settled(proxy, "tenant:e2e-conc")
    assert b.spent <= b.allocated and b.reserved == 0


@pytest.mark.parametrize(("mode", "status"), [("enforce", 503), ("shadow", 200)])
def test_ledger_unreachable(proxy_factory: ProxyFactory, fake_upstream: FakeUpstream, mode: str, status: int) -> None:
    """With the ledger unreachable, enforce fails closed (503) and shadow fails open (200), by default."""
    broken = proxy_factory({"mode": mode}, env={"CYCLES_STORE": "sqlite:////nonexistent-dir/ledger.db"})
    r = post(broken, chat("e2e-down", max_tokens=5), "e2e-down")
    assert r.status_code == status, r.text
    if status == 503:
        assert r.json()["error"]["code"] == "LEDGER_UNAVAILABLE"
    assert "ledger unavailable" in broken.logs()


def test_embeddings_are_reserved_and_committed(proxy: LiteLLMProxy, fake_upstream: FakeUpstream) -> None:
    """Embedding calls are estimated (input only), reserved and committed at their real usage."""
    fund(proxy, "tenant:e2e-emb", "1usd")
    client = proxy.openai_client(default_headers={"x-cycles-tenant": "e2e-emb"})
    out = client.embeddings.create(model="text-embedding-3-small", input=["alpha beta", "gamma"])
    assert len(out.data) == 2
    b = settled(proxy, "tenant:e2e-emb")
    assert b.spent == 2 * 8 * 2  # 8 prompt tokens per input at 2 USD_MICROCENTS per token
    with proxy.ledger() as led:
        [res] = led.list_reservations(scope="tenant:e2e-emb")
        assert (res.action.kind, res.status.value) == ("llm.embedding", "COMMITTED")


def test_tokens_budget_is_charged_with_the_dollars_and_stops_calls(
    proxy: LiteLLMProxy, fake_upstream: FakeUpstream
) -> None:
    """A TOKENS budget on the payer's scope is held (prompt + cap) in the same decision as the dollars, charged
    the usage (25 prompt + 30 completion tokens), and refuses the call it cannot pay with 402 naming TOKENS."""
    body = chat("e2e-tokens", max_tokens=30)
    hold = litellm.token_counter(model="openai/gpt-4o-mini", messages=body["messages"]) + 30
    with proxy.ledger() as led:
        led.set_budget("tenant:e2e-tokens", "1usd")
        led.set_budget("tenant:e2e-tokens", f"{3 * 55 + hold - 1}tokens")
    for _ in range(3):
        r = post(proxy, body, "e2e-tokens")
        assert r.status_code == 200, r.text
        with proxy.ledger() as led:
            wait_until(lambda: led.balance("tenant:e2e-tokens", "TOKENS").reserved == 0)
    with proxy.ledger() as led:
        tokens = led.balance("tenant:e2e-tokens", "TOKENS")
        assert (tokens.spent, tokens.remaining) == (3 * 55, hold - 1)
        assert led.balance("tenant:e2e-tokens").spent == 3 * cost(25, 30)
        committed = [e for e in led.events(scope="tenant:e2e-tokens", limit=1000) if e.type == "committed"]
        assert [e.data["also"] for e in committed] == [{"TOKENS": 55}] * 3
        assert {(e.model, e.route) for e in committed} == {("gpt-4o-mini", "acompletion")}
    fake_upstream.clear()
    r = post(proxy, body, "e2e-tokens")
    assert r.status_code == 402, r.text
    err = r.json()["error"]
    assert (err["code"], err["cycles"]["unit"], err["cycles"]["remaining"]) == ("BUDGET_EXCEEDED", "TOKENS", hold - 1)
    assert f"remaining {hold - 1} TOKENS" in err["message"]
    assert fake_upstream.requests == []
    with proxy.ledger() as led:
        assert led.verify() == []


def test_burn_rate_limit_is_a_402_the_sdk_does_not_retry(proxy: LiteLLMProxy, fake_upstream: FakeUpstream) -> None:
    """A loop faster than its scope's rate limit gets 402 RATE_EXCEEDED with retry_after_ms, and the OpenAI SDK
    (max_retries=3) raises at once: a client must not retry a loop into the wall on its own."""
    import openai

    body = chat("e2e-rate", max_tokens=30)
    with proxy.ledger() as led:
        led.set_budget("tenant:e2e-rate", "10usd", rate_limits=[{"amount": 2 * cost(25, 30) + 500, "window": "1h"}])
    for _ in range(2):
        assert post(proxy, body, "e2e-rate").status_code == 200
        with proxy.ledger() as led:
            wait_until(lambda: led.balance("tenant:e2e-rate").reserved == 0)
    r = post(proxy, body, "e2e-rate")
    assert r.status_code == 402, r.text
    err = r.json()["error"]
    assert err["code"] == "RATE_EXCEEDED" and 0 < err["cycles"]["retry_after_ms"] <= 3_600_000
    assert r.headers["x-should-retry"] == "false"
    client = proxy.openai_client(max_retries=3, default_headers={"x-cycles-tenant": "e2e-rate"})
    fake_upstream.clear()
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**body)
    assert (info.value.status_code, info.value.code) == (402, "RATE_EXCEEDED")
    assert time.monotonic() - started < 5 and fake_upstream.requests == []
