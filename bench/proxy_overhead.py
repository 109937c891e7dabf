"""Proxy overhead benchmark: what the Cycles callback adds to a request through a real LiteLLM proxy.

What it measures: one run starts the fake provider (cycles_litellm.fake_provider) and TWO real
`litellm` proxy subprocesses pointed at it - A = configs/litellm.yaml (with `callbacks:
cycles_litellm.proxy_handler`), B = the same config minus that line - each with its own cycles.yaml and
SQLite ledger. A budget that never denies is set on `tenant:bench` in A's ledger, and every request
carries `x-cycles-tenant: bench`. After a warm-up, N chat completions per proxy (default 400,
gpt-4o-mini, max_tokens 16) are sent over keep-alive httpx connections, interleaved so both proxies see
the same machine state: in blocks, alternating A,B then B,A (a block is one request when sequential,
4 x concurrency requests with `--concurrency C`). Sequential and concurrent runs on separate proxies
swing +-15 % on a 2-core machine; only interleaved A/B numbers are comparable.

Reported per proxy: req/s (requests / wall time spent in that proxy's blocks), latency p50/p99 (client
side, to the last byte), the median `x-cycles-hook-ms` (our pre-call hook's own time) and
`x-litellm-callback-duration-ms` response headers, and the HTTP status codes seen. Then the ratios
(with / without), the p50 overhead in ms, the goal verdict, and what A's ledger charged `tenant:bench`
compared with the `x-litellm-response-cost` headers.

`--also LABEL:NAME=VALUE` adds one more proxy with the callback and that environment, interleaved with
A and B in the same run and compared with B: `--also old:PYTHONPATH=/tmp/old-checkout` compares two
versions of the plugin, which separate runs (±25 % apart on this machine) cannot.

    .venv/bin/python bench/proxy_overhead.py                     # 400 sequential requests per proxy
    .venv/bin/python bench/proxy_overhead.py --concurrency 8     # 8 in flight per proxy
    .venv/bin/python bench/proxy_overhead.py --stream --requests 200 --json   # streamed; JSON on stdout
    .venv/bin/python bench/proxy_overhead.py --control           # A/A: both without callback = noise floor
    .venv/bin/python bench/proxy_overhead.py --also old:PYTHONPATH=/tmp/old   # and a proxy on another checkout
    .venv/bin/python bench/proxy_overhead.py --observability    # LiteLLM's otel + prometheus on A and B
    .venv/bin/python bench/proxy_overhead.py --stand-in         # and a proxy whose callback does nothing
    .venv/bin/python bench/proxy_overhead.py --hook-cpu         # and the plugin's own CPU per call, by step
    .venv/bin/python bench/proxy_overhead.py --bounds           # and what other ledger designs could save

`--stand-in` adds a proxy whose callback (`bench/stand_in_callback.py`) overrides the plugin's hooks and does
nothing: what it costs over B is LiteLLM's own handling of such a callback, the share no change to the plugin
can remove. Every proxy's CPU is also given for its main thread alone (the event loop, where every hook runs),
apart from LiteLLM's and otel's worker threads. `--hook-cpu` adds a proxy with the plugin whose own steps
are timed (`bench/hook_cpu/sitecustomize.py`) and prints its thread CPU per call by hook and by part of
the pre-call hook.

`--bounds` adds proxies running the plugin with part of its ledger work cut out (`bench/bounds/`, never for
real traffic): `no-reserve` allows every call without a ledger operation and debits its cost when it settles
(the best case of any design that decides in memory, such as per-process budget leases, and still writes each
call's charge), `no-ledger` writes nothing at all (the plugin's own work: no ledger design can cost less), and
`none` the whole plugin started the same way (PYTHONPATH, sitecustomize): compare the cuts with `none`.

`--observability` runs both proxies with LiteLLM's `otel` callback (OTLP/HTTP to a sink on loopback that
discards the spans) and its `prometheus` callback: what the plugin adds then includes its decision in every
span and payload, its metrics collector, and a /metrics scrape every second on each proxy.

Exit status: 0 when both proxies were measured, even if the plugin denied or errored (the status codes
are reported); 3 when the proxy with the callback did not start (e.g. `cycles_litellm.proxy_handler`
not importable yet) - the baseline is still measured and printed; 2 when the baseline itself failed.
Start-up takes ~10-30 s (the two proxies start in parallel).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from cycles_ledger import open_ledger_sync
from cycles_litellm.fake_provider import FakeUpstream
from cycles_litellm.launch import (
    LITELLM_CONFIG,
    LiteLLMProxy,
    ProxyStartError,
    litellm_config_with_callbacks,
    litellm_config_without_callbacks,
    start_proxy,
)

TENANT = "bench"
SCOPE = f"tenant:{TENANT}"
BUDGET = "1000000usd"
MICROCENTS_PER_USD = 10**8
GOAL_OVERHEAD_MS = 1.0
GOAL_RATIO = 0.95
GOAL_LINE = "goal: overhead <= 1 ms p50 and throughput ratio >= 0.95"
STAND_IN = Path(__file__).resolve().parent / "stand_in_callback.py"
STAND_IN_LABEL = "stand-in (hooks only)"
HOOK_CPU_DIR = Path(__file__).resolve().parent / "hook_cpu"
HOOK_CPU_LABEL = "plugin, steps timed"
BOUNDS_DIR = Path(__file__).resolve().parent / "bounds"
BOUNDS = ("none", "no-reserve", "no-ledger")  # bench/bounds/sitecustomize.py; "none" cuts nothing (the control)


@dataclass
class Sample:
    latency_s: float
    status: int
    callback_ms: float | None
    cost_usd: float | None
    error: str | None = None
    hook_ms: float | None = None


@dataclass
class Side:
    label: str
    proxy: LiteLLMProxy | None
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    baseline: bool = False  # the proxy without the callback, which the others are compared with
    cpu_s: float = 0.0  # CPU time of the proxy's processes over the measured run (user + system)
    main_cpu_s: float = 0.0  # ... of the proxy's main thread (its event loop), without LiteLLM's and otel's threads

    def cpu_ms_per_request(self) -> float | None:
        return self.cpu_s * 1000 / len(self.samples) if self.samples and self.cpu_s else None

    def main_cpu_ms_per_request(self) -> float | None:
        return self.main_cpu_s * 1000 / len(self.samples) if self.samples and self.main_cpu_s else None

    def statuses(self) -> Counter[int]:
        return Counter(s.status for s in self.samples)

    def latencies_ms(self) -> list[float]:
        return sorted(s.latency_s * 1000 for s in self.samples)

    def req_per_s(self) -> float:
        return len(self.samples) / self.wall_s if self.wall_s else 0.0

    def callback_ms_p50(self) -> float | None:
        values = [s.callback_ms for s in self.samples if s.callback_ms is not None]
        return statistics.median(values) if values else None

    def hook_ms_p50(self) -> float | None:
        values = [s.hook_ms for s in self.samples if s.hook_ms is not None]
        return statistics.median(values) if values else None

    def hook_ms_mean(self) -> float | None:
        values = [s.hook_ms for s in self.samples if s.hook_ms is not None]
        return statistics.fmean(values) if values else None


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _float_header(headers: httpx.Headers, name: str) -> float | None:
    value = headers.get(name)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


_prompt_ids = itertools.count()
_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def session_cpu_s(sid: int) -> float:
    """User + system CPU seconds of every live process in session `sid` (a proxy runs in its own session),
    plus the children they reaped. Far steadier than latency on a shared machine: noise there is mostly
    waiting, which costs no CPU."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after "(comm)": state ppid pgrp session ... utime stime cutime cstime
            total += sum(int(x) for x in fields[11:15])
    return total * _TICK_S


def main_thread_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid`'s main thread, where the event loop (and every hook) runs."""
    try:
        with open(f"/proc/{pid}/task/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) * _TICK_S


async def one_request(client: httpx.AsyncClient, body: dict[str, Any]) -> Sample:
    if body.get("vary"):  # a prompt no proxy has seen, so no cache keyed on the prompt flatters the result
        body = {k: v for k, v in body.items() if k != "vary"}
        body["messages"] = [{"role": "user", "content": f"benchmark {next(_prompt_ids)}"}]
    start = time.perf_counter()
    try:
        if body.get("stream"):
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                content = await response.aread()
        else:
            response = await client.post("/v1/chat/completions", json=body)
            content = response.content
    except httpx.HTTPError as exc:
        return Sample(time.perf_counter() - start, 0, None, None, f"{type(exc).__name__}: {exc}")
    latency = time.perf_counter() - start
    error = None if response.status_code == 200 else content[:300].decode(errors="replace")
    return Sample(
        latency,
        response.status_code,
        _float_header(response.headers, "x-litellm-callback-duration-ms"),
        _float_header(response.headers, "x-litellm-response-cost"),
        error,
        _float_header(response.headers, "x-cycles-hook-ms"),
    )


async def run_block(side: Side, client: httpx.AsyncClient, body: dict[str, Any], n: int, concurrency: int) -> None:
    if n <= 0:
        return
    sem = asyncio.Semaphore(concurrency)

    async def limited() -> Sample:
        async with sem:
            return await one_request(client, body)

    start = time.perf_counter()
    samples = await asyncio.gather(*(limited() for _ in range(n)))
    side.wall_s += time.perf_counter() - start
    side.samples.extend(samples)


async def run_interleaved(
    sides: list[Side], body: dict[str, Any], n: int, concurrency: int, block: int, record: bool = True
) -> None:
    """n requests per side, in blocks, the order of the sides reversed every round (ABBA...); with more
    than two sides, shuffled every round, each side's blocks in pairs."""
    clients = {
        side.label: httpx.AsyncClient(
            base_url=side.proxy.url,
            headers={**side.proxy.auth_headers, "x-cycles-tenant": TENANT},
            timeout=60.0,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        for side in sides
        if side.proxy is not None
    }
    scratch = {side.label: Side(side.label, side.proxy) for side in sides}
    cpu_start = {side.label: session_cpu_s(side.proxy.process.pid) for side in sides if side.proxy is not None}
    main_start = {side.label: main_thread_cpu_s(side.proxy.process.pid) for side in sides if side.proxy is not None}
    try:
        done = 0
        rnd = 0
        shuffle = random.Random(0)
        while done < n:
            size = min(block, n - done)
            if len(sides) <= 2:
                order = sides if rnd % 2 == 0 else list(reversed(sides))
                done += size
            else:
                # ABC CBA would give A and C back-to-back repeats B never gets. Shuffle instead, each side's
                # blocks in pairs: as in ABBA, half of each side's blocks follow one of its own (where a
                # proxy's work left over from its last answer meets its next request).
                reps = 2 if n - done >= 2 * size else 1
                order = [side for side in shuffle.sample(sides, len(sides)) for _ in range(reps)]
                done += reps * size
            for side in order:
                target = side if record else scratch[side.label]
                await run_block(target, clients[side.label], body, size, concurrency)
            rnd += 1
        if record:
            await asyncio.sleep(0.5)  # work a proxy does after its last answer (e.g. a commit) belongs to the run
            for side in sides:
                if side.proxy is not None:
                    side.cpu_s = session_cpu_s(side.proxy.process.pid) - cpu_start[side.label]
                    side.main_cpu_s = main_thread_cpu_s(side.proxy.process.pid) - main_start[side.label]
    finally:
        for client in clients.values():
            await client.aclose()


def start_all(
    upstream: FakeUpstream,
    tmp: Path,
    control: bool = False,
    extras: dict[str, dict[str, str]] | None = None,
    observability: str | None = None,
    stand_in: bool = False,
) -> tuple[LiteLLMProxy | Exception, LiteLLMProxy | Exception, dict[str, LiteLLMProxy | Exception]]:
    """Start A (with the callback), B (without) and one more proxy with the callback per extra, in parallel,
    and with `stand_in` one with the stand-in callback (`bench/stand_in_callback.py`); with `observability`
    (an OTLP/HTTP endpoint) every proxy also runs LiteLLM's otel and prometheus callbacks."""
    with_cb, no_cb = LITELLM_CONFIG, litellm_config_without_callbacks(tmp / "config")
    common: dict[str, str] = {}
    if observability is not None:
        with_cb, no_cb = observed_config(tmp / "config", True), observed_config(tmp / "config", False)
        common = {"OTEL_EXPORTER": "otlp_http", "OTEL_ENDPOINT": observability}

    def start(name: str, config: Path, env: dict[str, str] | None = None) -> LiteLLMProxy | Exception:
        try:
            return start_proxy(upstream.base_url, tmp / name, litellm_config=config, env={**common, **(env or {})})
        except ProxyStartError as exc:
            return exc

    extras = extras or {}
    with ThreadPoolExecutor(max_workers=2 + len(extras)) as pool:
        a = pool.submit(start, "with-callback", no_cb if control else with_cb)
        b = pool.submit(start, "without-callback", no_cb)
        more = {label: pool.submit(start, f"extra-{n}", with_cb, env) for n, (label, env) in enumerate(extras.items())}
        if stand_in:
            config = stand_in_config(tmp / "stand-in-config", observability)
            more[STAND_IN_LABEL] = pool.submit(start, "stand-in", config)
        return a.result(), b.result(), {label: f.result() for label, f in more.items()}


def observed_config(dest_dir: Path, plugin: bool) -> Path:
    """configs/litellm.yaml with LiteLLM's otel and prometheus callbacks, with or without the plugin."""
    callbacks = (["cycles_litellm.proxy_handler"] if plugin else []) + ["otel", "prometheus"]
    name = f"litellm-observed-{'plugin' if plugin else 'bare'}.yaml"
    return litellm_config_with_callbacks(dest_dir, name, callbacks, open_metrics=True)


def hook_cpu_table(path: Path, out: Any) -> dict[str, float]:
    """The `--hook-cpu` proxy's thread CPU per call of each of the plugin's steps (bench/hook_cpu/), between
    the first and the last of its dumps (one every 250 pre-call hooks)."""
    lines = path.read_text().splitlines() if path.exists() else []
    if len(lines) < 2:
        print("hook CPU: fewer than 500 calls reached the timed proxy; nothing to report", file=out)
        return {}
    first, last = json.loads(lines[0]), json.loads(lines[-1])
    calls = last["async_pre_call_hook"][0] - first["async_pre_call_hook"][0]
    table = {name: (ns - first.get(name, [0, 0])[1]) / calls / 1000 for name, (_, ns) in last.items()}
    print(f"\n{HOOK_CPU_LABEL}: the plugin's own thread CPU per call inside the proxy ({calls} calls)", file=out)
    for name, us in table.items():
        print(f"  {name:<44}{us:>9.1f} us", file=out)
    print(
        f"  {'sum (the indented lines are within a hook)':<44}"
        f"{sum(us for name, us in table.items() if not name.startswith(' ')):>9.1f} us",
        file=out,
    )
    return table


def stand_in_config(dest_dir: Path, observability: str | None) -> Path:
    """The baseline's config plus the stand-in callback (copied beside it, where LiteLLM looks for it first)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(STAND_IN, dest_dir / STAND_IN.name)
    callbacks = ["stand_in_callback.handler"] + (["otel", "prometheus"] if observability else [])
    return litellm_config_with_callbacks(
        dest_dir, "litellm-stand-in.yaml", callbacks, open_metrics=observability is not None
    )


@contextlib.contextmanager
def span_sink() -> Iterator[str]:
    """An OTLP/HTTP endpoint on loopback that accepts and discards spans; yields its traces URL."""

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def scraping(proxies: list[LiteLLMProxy], interval_s: float = 1.0) -> Iterator[None]:
    """GET /metrics on every proxy every `interval_s` (as a Prometheus server would) while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        with httpx.Client(timeout=10, follow_redirects=True) as client:
            while not stop.wait(interval_s):
                for proxy in proxies:
                    with contextlib.suppress(httpx.HTTPError):
                        client.get(proxy.url + "/metrics")

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(15)


def loading(sitecustomize_dir: Path) -> str:
    """PYTHONPATH for a proxy that loads the `sitecustomize.py` of `sitecustomize_dir` (and imports the repo)."""
    return os.pathsep.join((str(sitecustomize_dir), str(sitecustomize_dir.parents[1])))


def parse_extra(spec: str) -> tuple[str, dict[str, str]]:
    """`LABEL:NAME=VALUE[,NAME=VALUE...]` -> (label, env); e.g. `old:PYTHONPATH=/tmp/old-checkout`."""
    label, _, assignments = spec.partition(":")
    env = dict(item.split("=", 1) for item in assignments.split(",") if "=" in item)
    if not label or not env:
        raise argparse.ArgumentTypeError(f"--also wants LABEL:NAME=VALUE[,NAME=VALUE], got {spec!r}")
    return label, env


def describe_start_failure(exc: Exception) -> str:
    text = str(exc)
    hints = [
        line.strip()
        for line in text.splitlines()
        if any(k in line for k in ("Error", "error:", "cycles_litellm", "proxy_handler"))
        and not line.strip().startswith("File ")
    ]
    first = text.splitlines()[0] if text else type(exc).__name__
    return first + ("\n    cause: " + hints[-1] if hints else "")


def settle_ledger(proxy: LiteLLMProxy, timeout: float = 15.0) -> Any:
    """A's balance for tenant:bench once nothing is reserved any more (commits land after the response)."""
    deadline = time.monotonic() + timeout
    with open_ledger_sync(proxy.store_url) as ledger:
        while True:
            balance = ledger.balance(SCOPE)
            if balance.reserved == 0 or time.monotonic() >= deadline:
                return balance
            time.sleep(0.1)


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def report(sides: list[Side], args: argparse.Namespace, out: Any) -> dict[str, Any]:
    mode = "sequential" if args.concurrency == 1 else f"concurrency {args.concurrency}, blocks of {args.block}"
    kind = "streamed" if args.stream else "non-streamed"
    print(
        f"\nproxy overhead: {args.requests} requests per proxy, {mode}, interleaved A/B (ABBA), "
        f"{kind} chat {args.model} max_tokens={args.max_tokens}"
        + (", a new prompt every time" if args.vary else "")
        + (", LiteLLM's otel + prometheus callbacks on both" if getattr(args, "observability", False) else ""),
        file=out,
    )
    print(
        f"{'':<26}{'req/s':>9}{'p50 ms':>9}{'mean ms':>9}{'p99 ms':>9}{'hook p50 ms':>13}{'cb-hdr p50 ms':>15}"
        f"{'CPU ms/req':>12}{'main ms/req':>13}  statuses",
        file=out,
    )
    result: dict[str, Any] = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "stream": args.stream,
        "observability": getattr(args, "observability", False),
    }
    for side in sides:
        lat = side.latencies_ms()
        statuses = dict(sorted(side.statuses().items()))
        mean = statistics.fmean(lat) if lat else math.nan
        print(
            f"{side.label:<26}{side.req_per_s():>9.1f}{percentile(lat, 50):>9.2f}{mean:>9.2f}"
            f"{percentile(lat, 99):>9.2f}{fmt(side.hook_ms_p50(), '.3f'):>13}"
            f"{fmt(side.callback_ms_p50(), '.3f'):>15}{fmt(side.cpu_ms_per_request(), '.2f'):>12}"
            f"{fmt(side.main_cpu_ms_per_request(), '.2f'):>13}  {statuses}",
            file=out,
        )
        result[side.label] = {
            "req_per_s": side.req_per_s(),
            "p50_ms": percentile(lat, 50),
            "mean_ms": mean,
            "p99_ms": percentile(lat, 99),
            "hook_ms_p50": side.hook_ms_p50(),
            "hook_ms_mean": side.hook_ms_mean(),
            "callback_header_p50_ms": side.callback_ms_p50(),
            "cpu_ms_per_request": side.cpu_ms_per_request(),
            "main_thread_cpu_ms_per_request": side.main_cpu_ms_per_request(),
            "statuses": statuses,
        }
    base = next((side for side in sides if side.baseline), None)
    others = [side for side in sides if side is not base and side.samples]
    if base is not None and base.samples:
        for n, side in enumerate(others):
            outcome = compare(side, base, out, prefix="" if len(others) == 1 else f"[{side.label}] ")
            if n == 0:
                result.update(outcome)
            else:
                result[side.label]["comparison"] = outcome
        if all((side.callback_ms_p50() or 0.0) < 0.01 for side in sides):
            print(
                "note: x-litellm-callback-duration-ms is ~0 on both: LiteLLM 1.108.7 counts only the building of "
                "its standard logging payload there, not async_pre_call_hook",
                file=out,
            )
        for side in sides:
            errors = [s.error for s in side.samples if s.status != 200 and s.error]
            if errors:
                print(f"NOTE {side.label}: {len(errors)} non-200 answers; first: {errors[0][:200]}", file=out)
    return result


def compare(a: Side, b: Side, out: Any, prefix: str = "") -> dict[str, Any]:
    """Print (and return) side `a` against the baseline `b`: ratios, overheads and the goal verdict."""
    la, lb = a.latencies_ms(), b.latencies_ms()
    ratio = a.req_per_s() / b.req_per_s() if b.req_per_s() else math.nan
    p50_ratio = percentile(la, 50) / percentile(lb, 50)
    overhead = percentile(la, 50) - percentile(lb, 50)
    p99_overhead = percentile(la, 99) - percentile(lb, 99)
    met = overhead <= GOAL_OVERHEAD_MS and ratio >= GOAL_RATIO
    print(f"{prefix}ratio (with / without): throughput {ratio:.3f}, p50 latency {p50_ratio:.3f}", file=out)
    mean_overhead = statistics.fmean(la) - statistics.fmean(lb)
    # sequential: A's i-th and B's i-th request ran back to back, so their difference cancels drift
    paired = statistics.median((x.latency_s - y.latency_s) * 1000 for x, y in zip(a.samples, b.samples, strict=False))
    print(
        f"{prefix}overhead: p50 {overhead:+.2f} ms, mean {mean_overhead:+.2f} ms, p99 {p99_overhead:+.2f} ms; "
        f"median of paired differences {paired:+.2f} ms",
        file=out,
    )
    cpu_a, cpu_b = a.cpu_ms_per_request(), b.cpu_ms_per_request()
    cpu_overhead = cpu_a - cpu_b if cpu_a is not None and cpu_b is not None else None
    if cpu_overhead is not None:
        print(f"{prefix}proxy CPU per request: {cpu_overhead:+.2f} ms ({cpu_a:.2f} vs {cpu_b:.2f})", end="", file=out)
        main_a, main_b = a.main_cpu_ms_per_request(), b.main_cpu_ms_per_request()
        if main_a is not None and main_b is not None:
            print(f", of which the main thread {main_a - main_b:+.2f} ms", end="", file=out)
        print(file=out)
    if abs(overhead - paired) > 5:
        print(
            f"{prefix}note: p50s disagree with the paired median by > 5 ms: the latency distribution is multi-modal "
            "on this machine and p50 flipped between modes; rerun, or read the paired median and the ratio",
            file=out,
        )
    all_ok = set(a.statuses()) == {200} and set(b.statuses()) == {200}
    verdict = ("MET" if met else "NOT MET") if all_ok else "NOT COMPARABLE (non-200 answers, see statuses)"
    print(f"{prefix}{GOAL_LINE} -> {verdict}", file=out)
    return {
        "throughput_ratio": ratio,
        "p50_ratio": p50_ratio,
        "p50_overhead_ms": overhead,
        "mean_overhead_ms": mean_overhead,
        "paired_median_overhead_ms": paired,
        "cpu_overhead_ms_per_request": cpu_overhead,
        "goal_met": met and all_ok,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", "-n", type=int, default=400, help="measured requests per proxy (400)")
    parser.add_argument("--warmup", type=int, default=30, help="warm-up requests per proxy (30)")
    parser.add_argument("--concurrency", "-c", type=int, default=1, help="requests in flight per proxy (1)")
    parser.add_argument("--block", type=int, default=None, help="requests per A/B block (1, or 4 x concurrency)")
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--budget", default=BUDGET, help=f"budget on {SCOPE} in A's ledger ({BUDGET})")
    parser.add_argument("--stream", action="store_true", help="streamed completions (include_usage)")
    parser.add_argument("--vary", action="store_true", help="a different prompt on every request (defeats caches)")
    parser.add_argument(
        "--control", action="store_true", help="A/A run: A also without the callback (shows the noise floor)"
    )
    parser.add_argument(
        "--also",
        action="append",
        type=parse_extra,
        default=[],
        metavar="LABEL:NAME=VALUE,...",
        help="one more proxy with the callback and this extra environment, interleaved with A and B and compared "
        "with B; e.g. `--also old:PYTHONPATH=/tmp/old-checkout` compares two versions of the plugin in one run",
    )
    parser.add_argument(
        "--observability",
        action="store_true",
        help="every proxy with LiteLLM's otel (to a loopback sink) and prometheus callbacks; /metrics scraped each s",
    )
    parser.add_argument(
        "--stand-in",
        action="store_true",
        help="one more proxy whose callback has the plugin's hooks and does nothing (LiteLLM's own share)",
    )
    parser.add_argument(
        "--hook-cpu",
        action="store_true",
        help="one more proxy with the plugin whose own steps are timed (bench/hook_cpu/): CPU per call by hook",
    )
    parser.add_argument(
        "--bounds",
        action="store_true",
        help="two more proxies with part of the plugin's ledger work cut out (bench/bounds/): what another ledger "
        "design could save at best",
    )
    parser.add_argument("--json", action="store_true", help="also print the results as JSON on stdout")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (proxy logs, ledgers)")
    args = parser.parse_args(argv)
    args.concurrency = max(1, args.concurrency)
    args.block = args.block or (1 if args.concurrency == 1 else 4 * args.concurrency)
    out = sys.stderr if args.json else sys.stdout

    body: dict[str, Any] = {
        "model": args.model,
        "messages": [{"role": "user", "content": "benchmark"}],
        "max_tokens": args.max_tokens,
    }
    if args.vary:
        body["vary"] = True
    if args.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}

    tmp = Path(tempfile.mkdtemp(prefix="cycles-proxy-bench-"))
    upstream = FakeUpstream().start()
    proxies: list[LiteLLMProxy] = []
    code = 0
    observed = contextlib.ExitStack()
    sink = observed.enter_context(span_sink()) if args.observability else None
    try:
        print(f"starting fake upstream {upstream.base_url} and two litellm proxies (logs in {tmp}) ...", file=out)
        t0 = time.perf_counter()
        extra_envs = dict(args.also)
        hook_cpu_file = tmp / "hook-cpu.jsonl"
        if args.hook_cpu:
            timed = {"CYCLES_HOOK_CPU_FILE": str(hook_cpu_file)}
            extra_envs[HOOK_CPU_LABEL] = {"PYTHONPATH": loading(HOOK_CPU_DIR)} | timed
        if args.bounds:
            for bound in BOUNDS:
                cut = {"CYCLES_BOUND": bound} if bound != "none" else {}
                extra_envs[f"bound: {bound}"] = {"PYTHONPATH": loading(BOUNDS_DIR)} | cut
        with_cb, without_cb, extras = start_all(
            upstream, tmp, control=args.control, extras=extra_envs, observability=sink, stand_in=args.stand_in
        )
        proxies = [p for p in (with_cb, without_cb, *extras.values()) if isinstance(p, LiteLLMProxy)]
        if args.observability:
            observed.enter_context(scraping(proxies))
        print(f"start-up: {time.perf_counter() - t0:.1f} s", file=out)
        if isinstance(without_cb, Exception):
            print(
                f"FAILED: the proxy WITHOUT the callback did not start: {describe_start_failure(without_cb)}", file=out
            )
            return 2
        sides = [Side("without callback (B)", without_cb, baseline=True)]
        if isinstance(with_cb, Exception):
            print(
                "NOT MEASURED: the proxy WITH `callbacks: cycles_litellm.proxy_handler` did not start "
                "(expected until the plugin exists):\n    " + describe_start_failure(with_cb),
                file=out,
            )
            print(f"    full log: {tmp / 'with-callback' / 'proxy.log'}", file=out)
            print("measuring the baseline alone:", file=out)
            code = 3
        else:
            with open_ledger_sync(with_cb.store_url) as ledger:
                ledger.set_budget(SCOPE, args.budget)
            sides.insert(0, Side("control, no callback (A)" if args.control else "with callback (A)", with_cb))
        for label, extra in extras.items():
            if isinstance(extra, Exception):
                print(
                    f"NOT MEASURED: the extra proxy {label!r} did not start: {describe_start_failure(extra)}", file=out
                )
                continue
            if label != STAND_IN_LABEL:
                with open_ledger_sync(extra.store_url) as ledger:
                    ledger.set_budget(SCOPE, args.budget)
            sides.append(Side(label, extra))

        asyncio.run(run_interleaved(sides, body, args.warmup, args.concurrency, args.block, record=False))
        spent_before = settle_ledger(with_cb).spent if isinstance(with_cb, LiteLLMProxy) and not args.control else 0
        asyncio.run(run_interleaved(sides, body, args.requests, args.concurrency, args.block))
        result = report(sides, args, out)
        if args.hook_cpu:
            result["hook_cpu_us_per_call"] = hook_cpu_table(hook_cpu_file, out)

        if isinstance(with_cb, LiteLLMProxy) and not args.control:
            balance = settle_ledger(with_cb)
            ok = [s for s in sides[0].samples if s.status == 200]
            costs = [s.cost_usd for s in ok if s.cost_usd is not None]
            median = statistics.median(costs) if costs else None
            spent_usd = (balance.spent - spent_before) / MICROCENTS_PER_USD
            line = f"ledger {SCOPE} (A): the measured run spent ${spent_usd:.6f}, {balance.reserved} µ¢ still reserved"
            if costs:
                line += (
                    f"; LiteLLM's x-litellm-response-cost over its {len(ok)} 200s sums to ${sum(costs):.6f} "
                    f"(median ${fmt(median, '.8f')} per call)"
                )
            else:
                line += f" over {len(ok)} 200s (no x-litellm-response-cost header to compare: streams do not get one)"
            print(line, file=out)
            result["ledger_spent_usd"] = spent_usd
            result["ledger_reserved_microcents"] = balance.reserved
        if args.json:
            print(json.dumps(result, indent=2, default=str))
    finally:
        observed.close()
        for proxy in proxies:
            proxy.stop()
        upstream.stop()
        if args.keep or code:
            print(f"kept {tmp}", file=out)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
