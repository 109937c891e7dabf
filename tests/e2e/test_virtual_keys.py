"""No client can forge who pays: with LiteLLM virtual keys (real `UserAPIKeyAuth` objects from a
`custom_auth` hook, no database) the key's team is the tenant and its alias the app; a client's
x-cycles-tenant or metadata.cycles.tenant changes nothing, while workflow / agent refinements are kept."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import yaml

from cycles_litellm.fake_provider import FakeUpstream
from cycles_litellm.launch import LITELLM_CONFIG, LiteLLMProxy
from cycles_litellm.subject import scope_value
from tests.e2e.conftest import ProxyFactory
from tests.e2e.test_routes_budget import settled_spend, wait_until

APP_A = f"tenant:team-a/app:{scope_value('CI bot')}"


@pytest.fixture(scope="module")
def keyed_proxy(proxy_factory: ProxyFactory, tmp_path_factory: pytest.TempPathFactory) -> LiteLLMProxy:
    config = yaml.safe_load(LITELLM_CONFIG.read_text())
    config["general_settings"]["custom_auth"] = "tests.e2e.virtual_keys.user_api_key_auth"
    path = tmp_path_factory.mktemp("keys") / "litellm-keys.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return proxy_factory({}, litellm_config=path)


def chat(proxy: LiteLLMProxy, key: str, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    payload = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, **body}
    return httpx.post(
        proxy.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}", **(headers or {})},
        json=payload,
        timeout=60,
    )


def balance(proxy: LiteLLMProxy, scope: str) -> Any:
    with proxy.ledger() as led:
        return led.balance(scope)


def test_a_forged_tenant_header_or_metadata_charges_the_keys_team(
    keyed_proxy: LiteLLMProxy, fake_upstream: FakeUpstream
) -> None:
    with keyed_proxy.ledger() as led:
        led.set_budget("tenant:team-a", "1usd")
        led.set_budget("tenant:team-b", "1usd")
    forged = chat(keyed_proxy, "sk-team-a", {"x-cycles-tenant": "team-b"}, metadata={"cycles": {"tenant": "team-b"}})
    assert forged.status_code == 200, forged.text
    assert forged.headers["x-cycles-scope"] == "tenant:team-a"
    settled_spend(keyed_proxy, "tenant:team-a")
    assert balance(keyed_proxy, "tenant:team-a").spent > 0
    assert balance(keyed_proxy, "tenant:team-b").spent == 0


def test_an_exhausted_team_cannot_escape_by_naming_another(
    keyed_proxy: LiteLLMProxy, fake_upstream: FakeUpstream
) -> None:
    with keyed_proxy.ledger() as led:
        led.set_budget(APP_A, "0.00000001usd")  # the key's own app scope is spent out
        led.set_budget("tenant:team-b", "1usd")
    fake_upstream.clear()
    for headers in ({"x-cycles-tenant": "team-b"}, {"x-cycles-app": "billing", "x-cycles-tenant": "team-b"}):
        r = chat(keyed_proxy, "sk-team-a", headers)
        assert r.status_code == 402, r.text
        assert r.json()["error"]["cycles"]["scope"] == APP_A
    assert fake_upstream.requests == []
    with keyed_proxy.ledger() as led:
        led.set_budget(APP_A, "1usd")  # leave it funded for the other tests


def test_the_client_refines_below_the_key(keyed_proxy: LiteLLMProxy, fake_upstream: FakeUpstream) -> None:
    """x-cycles-workflow / x-cycles-agent add levels under the key's team and alias, and are charged."""
    wf = f"{APP_A}/workflow:docs"
    with keyed_proxy.ledger() as led:
        led.set_budget("tenant:team-a", "1usd")
        led.set_budget(APP_A, "1usd")
        led.set_budget(wf, "0.5usd")
    r = chat(keyed_proxy, "sk-team-a", {"x-cycles-workflow": "docs", "x-cycles-agent": "my agent"})
    assert r.status_code == 200, r.text
    assert r.headers["x-cycles-scope"].startswith(wf)
    settled_spend(keyed_proxy, wf)
    assert balance(keyed_proxy, wf).spent > 0


def test_team_metadata_opens_a_level_and_names_with_spaces_are_scopes(
    keyed_proxy: LiteLLMProxy, fake_upstream: FakeUpstream
) -> None:
    team = f"tenant:{scope_value('Team Open')}"
    with keyed_proxy.ledger() as led:
        led.set_budget(team, "1usd")
    r = chat(keyed_proxy, "sk-team-open", {"x-cycles-workspace": "prod", "x-cycles-tenant": "team-b"})
    assert r.status_code == 200, r.text
    with keyed_proxy.ledger() as led:
        [reserved] = [e for e in led.events(scope=team, limit=100) if e.type == "reserved"]
        assert reserved.scope == f"{team}/workspace:prod"  # the subject's full path
    user = f"tenant:{scope_value('alice@example.com')}"
    with keyed_proxy.ledger() as led:
        led.set_budget(user, "1usd")
    r = chat(keyed_proxy, "sk-user", {"x-cycles-tenant": "team-b"})
    assert r.status_code == 200, r.text
    assert r.headers["x-cycles-scope"] == user
    wait_until(lambda: balance(keyed_proxy, user).spent > 0)


def test_the_master_key_still_chooses_by_headers(keyed_proxy: LiteLLMProxy, fake_upstream: FakeUpstream) -> None:
    with keyed_proxy.ledger() as led:
        led.set_budget("tenant:by-header", "1usd")
    r = chat(keyed_proxy, keyed_proxy.master_key, {"x-cycles-tenant": "by-header"})
    assert r.status_code == 200, r.text
    assert r.headers["x-cycles-scope"] == "tenant:by-header"
