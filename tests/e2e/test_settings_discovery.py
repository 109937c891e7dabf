"""Where the proxy is started does not change what it enforces: started from another folder with no
$CYCLES_CONFIG, the plugin finds cycles.yaml beside LiteLLM's --config file, opens the store that file names
(a relative SQLite path beside it), says so in one log line, and the `cycles` CLI opens the same ledger."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cycles_litellm.fake_provider import FakeUpstream
from cycles_litellm.launch import LITELLM_CONFIG, LiteLLMProxy, start_proxy
from tests.e2e.test_routes_budget import wait_until


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("discovery")
    paths = {name: root / name for name in ("etc", "elsewhere", "cli-cwd", "work")}
    for path in paths.values():
        path.mkdir()
    shutil.copy(LITELLM_CONFIG, paths["etc"] / "litellm.yaml")
    (paths["etc"] / "cycles.yaml").write_text("store: sqlite:///ledger.db\nmode: enforce\n")
    return paths


@pytest.fixture(scope="module")
def proxy(fake_upstream: FakeUpstream, layout: dict[str, Path]) -> Iterator[LiteLLMProxy]:
    started = start_proxy(
        fake_upstream.base_url,
        layout["work"],
        litellm_config=layout["etc"] / "litellm.yaml",
        cwd=layout["elsewhere"],
        cycles_config=layout["etc"] / "cycles.yaml",
    )
    try:
        yield started
    finally:
        started.stop()


def cycles(layout: dict[str, Path], *args: str) -> subprocess.CompletedProcess[str]:
    cli = Path(sys.executable).parent / "cycles"
    return subprocess.run(
        [str(cli), "--config", str(layout["etc"] / "cycles.yaml"), *args],
        cwd=layout["cli-cwd"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_settings_beside_the_litellm_config_are_found_and_announced(
    proxy: LiteLLMProxy, layout: dict[str, Path]
) -> None:
    store = f"sqlite:///{layout['etc'] / 'ledger.db'}"
    assert proxy.store_url == store
    wait_until(lambda: "cycles: settings" in proxy.logs())
    line = next(ln for ln in proxy.logs().splitlines() if "cycles: settings" in ln)
    assert f"{layout['etc'] / 'cycles.yaml'} (beside" in line and f"store {store}" in line and "mode enforce" in line


def test_the_cli_and_the_proxy_share_one_ledger(
    proxy: LiteLLMProxy, layout: dict[str, Path], fake_upstream: FakeUpstream
) -> None:
    def ask() -> httpx.Response:
        return httpx.post(
            proxy.url + "/v1/chat/completions",
            headers={**proxy.auth_headers, "x-cycles-tenant": "disc"},
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
            timeout=60,
        )

    assert ask().json()["error"]["code"] == "BUDGET_NOT_FOUND"
    done = cycles(layout, "budget", "set", "tenant:disc", "1usd")
    assert done.returncode == 0, done.stderr
    assert f"store: {proxy.store_url} (store: of {layout['etc'] / 'cycles.yaml'})" in done.stderr
    assert ask().status_code == 200
    wait_until(lambda: json.loads(cycles(layout, "balances", "tenant:disc", "--json").stdout)[0]["spent"] > 0)
    assert not list(layout["elsewhere"].iterdir()) and not list(layout["cli-cwd"].iterdir())
