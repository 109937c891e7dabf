"""End-to-end fixtures: a fake provider and real `litellm` proxy subprocesses pointed at it.

    def test_x(fake_upstream, proxy_factory):
        proxy = proxy_factory({"mode": "shadow"})             # cycles.yaml overrides (deep-merged)
        proxy = proxy_factory(litellm_config=path_to_yaml)    # another LiteLLM config (e.g. no callback)
        with proxy.ledger() as ledger:                         # = open_ledger_sync(proxy.store_url)
            ledger.set_budget("tenant:acme", "1usd")
        client = proxy.openai_client()                         # openai.OpenAI(base_url=proxy.url + "/v1", ...)

Proxies are cached per session by (overrides, litellm config, extra env): tests asking for the same
configuration share one process (and so one ledger file - set budgets on scopes of your own, or read
balances as deltas). Everything under tests/e2e is marked `e2e` (`pytest -m "not e2e"` skips it).

The launcher and the fake provider are package code (`cycles_litellm.launch`, `cycles_litellm.fake_provider`),
also used by bench/ and examples/; this file only wires them into pytest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import pytest

from cycles_litellm.fake_provider import FakeUpstream
from cycles_litellm.launch import (
    LITELLM_CONFIG,
    LiteLLMProxy,
    ProxyStartError,
    litellm_config_without_callbacks,
    start_proxy,
)

E2E_DIR = Path(__file__).resolve().parent


# -- pytest wiring ------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end-to-end tests against real litellm proxy subprocesses (slow start)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


class ProxyFactory(Protocol):
    def __call__(
        self,
        cycles_overrides: Mapping[str, Any] | None = None,
        *,
        litellm_config: Path | str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> LiteLLMProxy: ...


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeUpstream]:
    """One fake OpenAI upstream for the session; call `.clear()` before asserting on `.requests`."""
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="session")
def proxy_factory(fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyFactory]:
    """`proxy_factory(cycles_overrides=None, *, litellm_config=None, env=None) -> LiteLLMProxy`, cached per session."""
    proxies: dict[str, LiteLLMProxy] = {}
    failures: dict[str, ProxyStartError] = {}

    def factory(
        cycles_overrides: Mapping[str, Any] | None = None,
        *,
        litellm_config: Path | str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> LiteLLMProxy:
        config = Path(litellm_config or LITELLM_CONFIG).resolve()
        key = json.dumps(
            {"overrides": cycles_overrides or {}, "config": str(config), "env": dict(env or {})},
            sort_keys=True,
            default=str,
        )
        if key in failures:  # do not pay another start-up timeout for a configuration that failed
            raise failures[key]
        proxy = proxies.get(key)
        if proxy is not None:
            if proxy.is_alive():
                return proxy
            proxy.stop()
            raise ProxyStartError(f"cached proxy {proxy.url} died; log tail:\n{proxy.logs(tail=60)}")
        workdir = tmp_path_factory.mktemp("proxy")
        try:
            proxy = start_proxy(
                fake_upstream.base_url, workdir, cycles_overrides=cycles_overrides, litellm_config=config, env=env
            )
        except ProxyStartError as exc:
            failures[key] = exc
            raise
        proxies[key] = proxy
        return proxy

    try:
        yield factory
    finally:
        for proxy in proxies.values():
            proxy.stop()


@pytest.fixture(scope="session")
def no_callback_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/litellm.yaml without the `litellm_settings.callbacks` line, written to a tmp dir."""
    return litellm_config_without_callbacks(tmp_path_factory.mktemp("litellm-config"))


__all__ = ["ProxyFactory"]
