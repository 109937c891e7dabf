"""A budget refusal is not a deployment failure: LiteLLM's router (allowed_fails 1) never cools a deployment
down because the plugin refused calls routed to it, while the same 402 from anywhere else does."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import litellm
import pytest
from litellm import Router
from litellm.integrations.custom_logger import CustomLogger
from litellm.router_utils.cooldown_handlers import _async_get_cooldown_deployments

from cycles_ledger import open_ledger
from cycles_litellm import CyclesCallback, Settings
from cycles_litellm.fake_provider import FakeUpstream

MSGS = [{"role": "user", "content": "hello"}]
PROXIED = {"headers": {"x-cycles-tenant": "rt"}}  # a client request the proxy received


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


@pytest.fixture
def callbacks() -> Iterator[list[Any]]:
    """litellm.callbacks for one test, restored after it."""
    saved = list(litellm.callbacks)
    litellm.callbacks = []
    try:
        yield litellm.callbacks
    finally:
        litellm.callbacks = saved


def router(up: FakeUpstream) -> Router:
    """One model group, two deployments (a lone deployment is never cooled down), a cooldown after 2 fails."""

    def deployment(i: int) -> dict[str, Any]:
        params = {"model": "openai/gpt-4o-mini", "api_base": up.base_url, "api_key": "k"}
        return {"model_name": "gpt-4o-mini", "litellm_params": params, "model_info": {"id": f"dep-{i}"}}

    return Router(model_list=[deployment(1), deployment(2)], allowed_fails=1, cooldown_time=60, num_retries=0)


async def refused_three_times(r: Router) -> None:
    for _ in range(3):  # calls on dep-1 (by its id) that skipped the pre-call hook: the plugin's last gate refuses
        with pytest.raises(Exception) as info:
            call_id = uuid.uuid4().hex
            await r.acompletion(
                model="dep-1", messages=MSGS, max_tokens=5, litellm_call_id=call_id, proxy_server_request=PROXIED
            )
        assert getattr(info.value, "status_code", None) == 402


async def test_plugin_refusals_never_cool_a_deployment_down(upstream: FakeUpstream, callbacks: list[Any]) -> None:
    """Three 402s from the plugin on one deployment, then a paid call to that same deployment succeeds."""
    async with open_ledger("sqlite:///:memory:") as ledger:
        await ledger.set_budget("tenant:rt", "1usd")
        cb = CyclesCallback(Settings(), ledger=ledger)
        callbacks.append(cb)
        r = router(upstream)
        upstream.clear()
        await refused_three_times(r)
        assert upstream.requests == []  # refused before the provider
        assert await _async_get_cooldown_deployments(r, None) == []
        data = {"model": "gpt-4o-mini", "messages": MSGS, "max_tokens": 5, "litellm_call_id": uuid.uuid4().hex}
        data = await cb.async_pre_call_hook(None, None, {**data, "proxy_server_request": PROXIED}, "acompletion")
        response = await r.acompletion(**{**data, "model": "dep-1"})
        assert response._hidden_params["model_id"] == "dep-1"
        assert await _async_get_cooldown_deployments(r, None) == []


class _PaymentRequired(Exception):
    status_code = 402  # what a provider's 402 looks like to the router


class _Untagged(CustomLogger):
    """A control: a deployment hook that refuses with a 402 the router is not told about."""

    async def async_pre_call_deployment_hook(self, kwargs: dict[str, Any], call_type: Any) -> dict[str, Any] | None:
        raise _PaymentRequired("payment required")


async def test_control_an_untagged_402_does_cool_the_deployment_down(
    upstream: FakeUpstream, callbacks: list[Any]
) -> None:
    """The same three 402s from a hook that does not tag them put the deployment in cooldown: the test above
    would see one."""
    callbacks.append(_Untagged())
    r = router(upstream)
    await refused_three_times(r)
    assert await _async_get_cooldown_deployments(r, None) == ["dep-1"]
