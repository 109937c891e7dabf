"""Router retries and fallbacks inside one client request settle exactly one reservation."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import yaml

from cycles_litellm.fake_provider import FakeUpstream
from cycles_litellm.launch import LITELLM_CONFIG, LiteLLMProxy
from tests.e2e.conftest import ProxyFactory

IN, OUT = 15, 60  # gpt-4o-mini, USD_MICROCENTS per token
GPT4O_OUT = 1000  # gpt-4o output, USD_MICROCENTS per token


@pytest.fixture(scope="module")
def fallback_proxy(proxy_factory: ProxyFactory, tmp_path_factory: pytest.TempPathFactory) -> LiteLLMProxy:
    """A group `flaky` whose only deployment fails, falling back to `gpt-4o` (the dearer model)."""
    config = yaml.safe_load(LITELLM_CONFIG.read_text())
    config["model_list"].append(
        {
            "model_name": "flaky",
            "litellm_params": {
                "model": "openai/gpt-4o-mini-fail",
                "api_base": "os.environ/UPSTREAM_API_BASE",
                "api_key": "os.environ/UPSTREAM_API_KEY",
                "input_cost_per_token": 1.5e-07,
                "output_cost_per_token": 6e-07,
            },
        }
    )
    config["router_settings"] = {"num_retries": 0, "fallbacks": [{"flaky": ["gpt-4o"]}]}
    path: Path = tmp_path_factory.mktemp("fallback-config") / "litellm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return proxy_factory(litellm_config=path)


def test_fallback_settles_one_reservation_at_the_final_cost(
    fallback_proxy: LiteLLMProxy, fake_upstream: FakeUpstream
) -> None:
    """A failing deployment then a successful fallback: one reservation, priced for the dearest, committed once."""
    with fallback_proxy.ledger() as led:
        led.set_budget("tenant:e2e-fb", "1usd")
    fake_upstream.clear()
    body = {"model": "flaky", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    headers = {**fallback_proxy.auth_headers, "x-cycles-tenant": "e2e-fb"}
    r = httpx.post(f"{fallback_proxy.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    assert [q.body["model"] for q in fake_upstream.requests] == ["gpt-4o-mini-fail", "gpt-4o"]
    with fallback_proxy.ledger() as led:
        deadline = time.monotonic() + 15
        while led.balance("tenant:e2e-fb").reserved and time.monotonic() < deadline:
            time.sleep(0.05)
        [res] = led.list_reservations(scope="tenant:e2e-fb")
        assert res.status.value == "COMMITTED"
        assert res.reserved.amount >= 20 * GPT4O_OUT  # the estimate used the dearer fallback's price
        b = led.balance("tenant:e2e-fb")
        assert b.reserved == 0
        assert b.spent == 25 * 250 + 20 * GPT4O_OUT  # what gpt-4o really cost: 25 prompt, 20 completion
        assert [e.type for e in led.events(scope="tenant:e2e-fb")].count("committed") == 1
