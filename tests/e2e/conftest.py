"""End-to-end fixtures: a fake OpenAI upstream and real `litellm` proxy subprocesses pointed at it.

    def test_x(fake_upstream, proxy_factory):
        proxy = proxy_factory({"mode": "shadow"})             # cycles.yaml overrides (deep-merged)
        proxy = proxy_factory(litellm_config=path_to_yaml)    # another LiteLLM config (e.g. no callback)
        with proxy.ledger() as ledger:                         # = open_ledger_sync(proxy.store_url)
            ledger.set_budget("tenant:acme", "1usd")
        client = proxy.openai_client()                         # openai.OpenAI(base_url=proxy.url + "/v1", ...)

Proxies are cached per session by (overrides, litellm config, extra env): tests asking for the same
configuration share one process (and so one ledger file - set budgets on scopes of your own, or read
balances as deltas). Everything under tests/e2e is marked `e2e` (`pytest -m "not e2e"` skips it).

The launcher (`start_proxy`, `LiteLLMProxy`, `litellm_config_without_callbacks`, `free_port`) is plain
code, also used by bench/proxy_overhead.py.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import httpx
import pytest
import yaml

from tests.e2e.fake_upstream import FakeUpstream

REPO_ROOT = Path(__file__).resolve().parents[2]
LITELLM_CONFIG = REPO_ROOT / "configs" / "litellm.yaml"
CYCLES_CONFIG = REPO_ROOT / "configs" / "cycles.yaml"
MASTER_KEY = "sk-test-master"
UPSTREAM_KEY = "sk-fake"
STARTUP_TIMEOUT_S = 120.0
E2E_DIR = Path(__file__).resolve().parent


# -- the launcher (no pytest in here) -----------------------------------------------------------


class ProxyStartError(RuntimeError):
    """The proxy process died or did not answer /health/liveliness in time; the message has its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def litellm_executable() -> str:
    """The `litellm` CLI of this interpreter's environment (next to sys.executable), else the one on PATH."""
    beside = Path(sys.executable).parent / "litellm"
    if beside.exists():
        return str(beside)
    found = shutil.which("litellm")
    if found is None:
        raise ProxyStartError("no `litellm` executable next to sys.executable or on PATH")
    return found


def deep_merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied: nested dicts merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def litellm_config_without_callbacks(dest_dir: Path, source: Path = LITELLM_CONFIG) -> Path:
    """Write `source` minus `litellm_settings.callbacks` into dest_dir; return the new file's path."""
    config = yaml.safe_load(source.read_text())
    settings = config.get("litellm_settings") or {}
    settings.pop("callbacks", None)
    if settings:
        config["litellm_settings"] = settings
    else:
        config.pop("litellm_settings", None)
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / "litellm-no-callback.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class LiteLLMProxy:
    """A running `litellm` proxy subprocess (its own cycles.yaml and SQLite ledger in `workdir`)."""

    url: str  # http://127.0.0.1:<port>
    store_url: str  # sqlite:////abs/path/ledger.db - the ledger the plugin was configured with
    master_key: str
    config_path: Path  # the LiteLLM config it runs
    cycles_config_path: Path  # the $CYCLES_CONFIG it was given
    workdir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.master_key}"}

    def logs(self, tail: int | None = None) -> str:
        """The proxy's combined stdout+stderr so far (the last `tail` lines if given)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-tail:]) if tail else text

    def openai_client(self, **kwargs: Any) -> Any:
        """An `openai.OpenAI` client for this proxy (max_retries=0 unless given)."""
        import openai

        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60.0)
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.master_key, **kwargs)

    def ledger(self, **settings: Any) -> Any:
        """`open_ledger_sync(self.store_url)`: use as `with proxy.ledger() as ledger:`."""
        from cycles_ledger import open_ledger_sync

        return open_ledger_sync(self.store_url, **settings)

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the proxy's process group (it was started in its own session), then SIGKILL if needed."""
        if self.process.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def start_proxy(
    upstream_base_url: str,
    workdir: Path,
    *,
    cycles_overrides: Mapping[str, Any] | None = None,
    litellm_config: Path | str = LITELLM_CONFIG,
    env: Mapping[str, str] | None = None,
    master_key: str = MASTER_KEY,
    timeout: float = STARTUP_TIMEOUT_S,
    cwd: Path | None = None,
    cycles_config: Path | None = None,
) -> LiteLLMProxy:
    """Start `litellm --config ... --host 127.0.0.1 --port <free>` and wait until /health/liveliness answers.

    Writes `workdir/cycles.yaml` (configs/cycles.yaml deep-merged with `cycles_overrides`, with
    `store: sqlite:///<workdir>/ledger.db`) and passes it as $CYCLES_CONFIG; with `cycles_config` given,
    writes nothing and sets no $CYCLES_CONFIG (the plugin finds its settings itself; `store_url` is then
    read from that file). `cwd`: where the proxy starts (default the repository). Raises ProxyStartError
    with the log tail if the process exits or is not live within `timeout` seconds.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if cycles_config is None:
        store_url = f"sqlite:///{workdir / 'ledger.db'}"
        cycles = deep_merge(yaml.safe_load(CYCLES_CONFIG.read_text()) or {}, cycles_overrides or {})
        cycles["store"] = store_url
        cycles_path = workdir / "cycles.yaml"
        cycles_path.write_text(yaml.safe_dump(cycles, sort_keys=False))
    else:
        from cycles_litellm.settings import load_settings

        cycles_path = cycles_config.resolve()
        store_url = load_settings(cycles_path).store_url()

    port = free_port()
    proc_env = dict(os.environ)
    proc_env.pop("CYCLES_STORE", None)  # it would win over the per-proxy store
    proc_env.update(
        {
            "UPSTREAM_API_BASE": upstream_base_url,
            "UPSTREAM_API_KEY": UPSTREAM_KEY,
            # the base without /v1: the anthropic and cohere providers (configs/litellm-routes.yaml) append it
            "UPSTREAM_ROOT": upstream_base_url.rstrip("/").removesuffix("/v1"),
            "LITELLM_MASTER_KEY": master_key,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "PYTHONUNBUFFERED": "1",
            # the repo's packages must import in the proxy even if the editable install omits one
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        }
    )
    if cycles_config is None:
        proc_env["CYCLES_CONFIG"] = str(cycles_path)
    else:
        proc_env.pop("CYCLES_CONFIG", None)
    proc_env.update(env or {})
    if env and "CYCLES_STORE" in env:  # the test overrode the store: report the one the plugin really uses
        store_url = env["CYCLES_STORE"]
    config_path = Path(litellm_config).resolve()
    log_path = workdir / "proxy.log"
    log_file = log_path.open("wb")
    cmd = [litellm_executable(), "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port)]
    log_file.write(("$ " + " ".join(cmd) + "\n").encode())
    log_file.flush()
    process = subprocess.Popen(
        cmd,
        cwd=cwd or REPO_ROOT,
        env=proc_env,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so stop() reaches any children
    )
    proxy = LiteLLMProxy(
        url=f"http://127.0.0.1:{port}",
        store_url=store_url,
        master_key=master_key,
        config_path=config_path,
        cycles_config_path=cycles_path,
        workdir=workdir,
        process=process,
        log_path=log_path,
        _log_file=log_file,
    )
    try:
        wait_until_live(proxy, timeout)
    except BaseException:
        proxy.stop()
        raise
    return proxy


def wait_until_live(proxy: LiteLLMProxy, timeout: float = STARTUP_TIMEOUT_S) -> float:
    """Poll GET /health/liveliness until 200; return the seconds it took. ProxyStartError on death/timeout."""
    started = time.monotonic()
    deadline = started + timeout
    with httpx.Client(timeout=2.0) as client:
        while True:
            code = proxy.process.poll()
            if code is not None:
                raise ProxyStartError(
                    f"litellm proxy ({proxy.config_path.name}) exited with code {code} during start-up; "
                    f"log tail:\n{proxy.logs(tail=60)}"
                )
            try:
                if client.get(proxy.url + "/health/liveliness").status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            if time.monotonic() >= deadline:
                raise ProxyStartError(
                    f"litellm proxy ({proxy.config_path.name}) not live after {timeout:.0f} s; "
                    f"log tail:\n{proxy.logs(tail=60)}"
                )
            time.sleep(0.2)


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


def make_tmp_dir(prefix: str) -> Path:
    """A fresh temp dir for callers outside pytest (the benchmark)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


__all__ = [
    "CYCLES_CONFIG",
    "LITELLM_CONFIG",
    "MASTER_KEY",
    "REPO_ROOT",
    "LiteLLMProxy",
    "ProxyFactory",
    "ProxyStartError",
    "deep_merge",
    "free_port",
    "litellm_config_without_callbacks",
    "litellm_executable",
    "make_tmp_dir",
    "start_proxy",
    "wait_until_live",
]
