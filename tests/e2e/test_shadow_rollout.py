"""Shadow mode never changes a response: a request with no payer, a name that is not a valid scope id, an
unpriced model or a route the plugin cannot meter all pass through unchanged in shadow mode, and each
leaves a `would_deny` event with its reason, the call id and the route."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from cycles_litellm.fake_provider import FakeUpstream
from cycles_litellm.launch import LiteLLMProxy
from cycles_litellm.subject import scope_value
from tests.e2e.conftest import ProxyFactory
from tests.e2e.test_routes_budget import ROUTES_CONFIG, wait_until


@pytest.fixture(scope="module")
def shadow_proxy(proxy_factory: ProxyFactory) -> LiteLLMProxy:
    return proxy_factory({"mode": "shadow"}, litellm_config=ROUTES_CONFIG)


def post(proxy: LiteLLMProxy, headers: dict[str, str], **body: Any) -> httpx.Response:
    payload = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **body}
    return httpx.post(
        proxy.url + "/v1/chat/completions", headers={**proxy.auth_headers, **headers}, json=payload, timeout=60
    )


def would_deny(proxy: LiteLLMProxy, scope: str, call_id: str) -> Any:
    with proxy.ledger() as led:

        def found() -> list[Any]:
            return [e for e in led.events(scope=scope, limit=1000) if e.data.get("call_id") == call_id]

        wait_until(lambda: bool(found()))
        [event] = found()
        return event


def test_no_payer_passes_and_is_logged(shadow_proxy: LiteLLMProxy, fake_upstream: FakeUpstream) -> None:
    r = post(shadow_proxy, {})
    assert r.status_code == 200, r.text
    event = would_deny(shadow_proxy, "tenant:_unidentified", r.headers["x-litellm-call-id"])
    assert (event.type, event.reason_code) == ("would_deny", "SUBJECT_INVALID")
    assert "/v1/chat/completions" in event.data["route"]


def test_a_name_with_spaces_is_a_scope_not_an_error(shadow_proxy: LiteLLMProxy, fake_upstream: FakeUpstream) -> None:
    with shadow_proxy.ledger() as led:
        led.set_budget(f"tenant:{scope_value('Acme Corp')}", "1usd")
    r = post(shadow_proxy, {"x-cycles-tenant": "Acme Corp"})
    assert r.status_code == 200, r.text
    with shadow_proxy.ledger() as led:
        wait_until(lambda: led.balance(f"tenant:{scope_value('Acme Corp')}").spent > 0)


def test_an_unpriced_model_passes_and_is_logged(shadow_proxy: LiteLLMProxy, fake_upstream: FakeUpstream) -> None:
    fake_upstream.clear()
    r = post(shadow_proxy, {"x-cycles-tenant": "shadow-price"}, model="private-model")
    assert r.status_code == 200, r.text
    assert len(fake_upstream.requests) == 1
    event = would_deny(shadow_proxy, "tenant:shadow-price", r.headers["x-litellm-call-id"])
    assert (event.type, event.reason_code, event.data["model"]) == ("would_deny", "PRICE_UNKNOWN", "private-model")


def test_an_unmetered_route_is_not_refused_in_shadow(shadow_proxy: LiteLLMProxy, fake_upstream: FakeUpstream) -> None:
    """A pass-through call is refused when enforcing; in shadow it goes on (whatever LiteLLM then answers)."""
    r = httpx.post(
        shadow_proxy.url + "/anthropic/v1/messages",
        headers={**shadow_proxy.auth_headers, "x-cycles-tenant": "shadow-route"},
        json={"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    with shadow_proxy.ledger() as led:  # LiteLLM gives a pass-through hook no request headers: no payer known
        wait_until(
            lambda: any(
                e.type == "would_deny" and e.reason_code == "ROUTE_NOT_METERED"
                for e in led.events(scope="tenant:_unidentified", limit=1000)
            )
        )


def test_a_dead_ledger_passes_in_shadow_and_is_logged_once_it_is_back(
    proxy_factory: ProxyFactory, fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Shadow fails open: with the ledger unreachable the call passes; the would_deny LEDGER_UNAVAILABLE
    decision waits in memory and is in the log as soon as the ledger answers again."""
    missing = tmp_path_factory.mktemp("dead-ledger") / "not-yet"
    store = f"sqlite:///{missing / 'ledger.db'}"
    proxy = proxy_factory({"mode": "shadow"}, env={"CYCLES_STORE": store})
    first = post(proxy, {"x-cycles-tenant": "dead"})
    assert first.status_code == 200, first.text
    assert "ledger unavailable" in proxy.logs()
    missing.mkdir()  # the ledger comes back
    second = post(proxy, {"x-cycles-tenant": "dead"})
    assert second.status_code == 200, second.text
    event = would_deny(proxy, "tenant:dead", first.headers["x-litellm-call-id"])
    assert (event.type, event.reason_code) == ("would_deny", "LEDGER_UNAVAILABLE")
