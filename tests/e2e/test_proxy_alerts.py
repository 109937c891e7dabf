"""Alerts from a real proxy: `notify:` in cycles.yaml makes the proxy deliver the ledger's events to a webhook
(a real HTTP receiver on loopback), signed, while it serves calls."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from cycles_ledger.notify import verify_signature
from cycles_litellm.fake_provider import FakeUpstream
from cycles_litellm.launch import LiteLLMProxy
from tests.e2e.conftest import ProxyFactory
from tests.support.webhook_receiver import Receiver

SECRET = "e2e-hook-secret"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def proxy(proxy_factory: ProxyFactory, receiver: Receiver) -> LiteLLMProxy:
    hook = {"name": "ops", "url": receiver.url, "secret": SECRET, "events": ["threshold_crossed", "denied"]}
    return proxy_factory({"notify": {"webhooks": [hook]}})


def test_the_proxy_delivers_threshold_and_deny_alerts(
    proxy: LiteLLMProxy, receiver: Receiver, fake_upstream: FakeUpstream
) -> None:
    with proxy.ledger() as led:
        led.set_budget("tenant:e2e-alerts", "0.0001usd", alerts=["50%"])  # 10,000 microcents
    headers = {**proxy.auth_headers, "x-cycles-tenant": "e2e-alerts"}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}
    for _ in range(2):  # each call costs 25 x 15 + 40 x 60 = 2,775 microcents: the second crosses 50%
        assert httpx.post(f"{proxy.url}/v1/chat/completions", json=body, headers=headers, timeout=60).status_code == 200
    big = {**body, "max_tokens": 1000}  # not even the smallest soft landing (256 tokens) fits what is left
    denied = httpx.post(f"{proxy.url}/v1/chat/completions", json=big, headers=headers, timeout=60)
    assert denied.status_code == 402
    deadline = time.monotonic() + 20
    while len(receiver.delivered()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    got = receiver.delivered()
    assert [p["event"]["type"] for p in got] == ["threshold_crossed", "denied"], got
    assert got[0]["event"]["scope"] == "tenant:e2e-alerts" and got[0]["event"]["data"]["threshold"] == 50
    for post in receiver.posts:
        assert verify_signature(SECRET, post["headers"]["x-cycles-signature"], post["body"])
    assert json.loads(receiver.posts[-1]["body"])["event"]["reason_code"] == "BUDGET_EXCEEDED"
