"""Start a real LiteLLM proxy with the Cycles callback on loopback, for the tests, benchmarks and demo.

    with FakeUpstream() as up:                          # cycles_litellm.fake_provider
        proxy = start_proxy(up.base_url, workdir, cycles_overrides={"mode": "shadow"})
        try:
            with proxy.ledger() as ledger: ...           # the SQLite ledger the plugin was given
            proxy.openai_client().chat.completions.create(...)
        finally:
            proxy.stop()

The defaults (configs/litellm.yaml, configs/cycles.yaml, the proxy's working directory) are the source
checkout this package is installed from (`pip install -e .`); pass `litellm_config`, `cycles_config` and
`cwd` to run elsewhere. Nothing here imports pytest.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import yaml

from cycles_ledger.ports import free_port

__all__ = [
    "CYCLES_CONFIG",
    "LITELLM_CONFIG",
    "MASTER_KEY",
    "REPO_ROOT",
    "UPSTREAM_KEY",
    "LiteLLMProxy",
    "ProxyStartError",
    "deep_merge",
    "free_port",
    "litellm_config_without_callbacks",
    "litellm_executable",
    "start_proxy",
    "wait_until_live",
]

REPO_ROOT = Path(__file__).resolve().parents[1]  # the source checkout of an editable install
LITELLM_CONFIG = REPO_ROOT / "configs" / "litellm.yaml"
CYCLES_CONFIG = REPO_ROOT / "configs" / "cycles.yaml"
MASTER_KEY = "sk-test-master"
UPSTREAM_KEY = "sk-fake"
STARTUP_TIMEOUT_S = 120.0


class ProxyStartError(RuntimeError):
    """The proxy process died or did not answer /health/liveliness in time; the message has its log tail."""


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


def litellm_config_with_callbacks(
    dest_dir: Path, name: str, callbacks: Sequence[str], *, open_metrics: bool = False, source: Path = LITELLM_CONFIG
) -> Path:
    """Write `source` with `litellm_settings.callbacks` replaced by `callbacks` into dest_dir/name; with
    `open_metrics`, /metrics answers without a key (LiteLLM checks keys against a database these proxies lack)."""
    config = yaml.safe_load(source.read_text())
    settings = config.setdefault("litellm_settings", {})
    settings["callbacks"] = list(callbacks)
    if open_metrics:
        settings["require_auth_for_metrics_endpoint"] = False
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / name
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
    args: Sequence[str] = (),
) -> LiteLLMProxy:
    """Start `litellm --config ... --host 127.0.0.1 --port <free> [args]` and wait until /health/liveliness
    answers (`args`: more of LiteLLM's CLI options, e.g. `("--num_workers", "2")`).

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
    cmd = [litellm_executable(), "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port), *args]
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
