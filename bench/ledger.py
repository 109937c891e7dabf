"""Ledger benchmark: reserve+commit pairs per second and reserve/commit latency.

What it measures: each worker loops `reserve(subject, action, "0.01usd")` then `commit(id, "0.008usd")`
through the public async `Ledger` API (validation, store call, result models included), against a
subject with three budgeted scopes (`tenant:b`, `tenant:b/workspace:w`, `tenant:b/workspace:w/agent:a`)
whose allocations never deny. Scenarios:

    1 task        one coroutine, sequential (pure per-operation latency)
    64 tasks      64 concurrent asyncio tasks in one process (group commit at work)
    4 processes   4 spawned processes x 16 tasks each, started together on a Barrier

Every process runs its event loop on uvloop when it is installed (`--loop auto`, the default), as
LiteLLM's proxy does (it starts uvicorn with `loop="uvloop"`), else on asyncio's own loop; `--loop
asyncio` measures the standard loop. Each scenario warms up first, then runs for `--duration` seconds.
pairs/s = pairs / wall time (for processes: first start to last finish across all of them); latencies
come from `time.perf_counter_ns` around each await and are merged across tasks and processes for the
percentiles. Afterwards the books are checked: `ledger.verify() == []`, nothing left reserved, and spent
equals pairs x actual.

`--store` may be given several times to compare stores side by side in one run (scenario by scenario,
interleaved): `sqlite` (the default) is a fresh temporary SQLite file per scenario; `redis` starts a
throwaway redis-server (AOF on, fsync every second) on a free loopback port; a `redis://…` URL gets a
fresh key prefix per scenario; any other URL is used as given.

    .venv/bin/python bench/ledger.py                  # ~3 s per scenario, prints a table
    .venv/bin/python bench/ledger.py --store sqlite --store redis      # both stores, one run
    .venv/bin/python bench/ledger.py --duration 10 --json > bench.json   # table on stderr, JSON on stdout
    .venv/bin/python bench/ledger.py --scenarios 1task,64tasks --store sqlite:///bench.db
    .venv/bin/python bench/ledger.py --store redis --loop asyncio      # the standard event loop
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import sqlite3
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cycles_ledger import Amount, open_ledger

if TYPE_CHECKING:
    from cycles_ledger.redis_server import RedisServer

SUBJECT = {"tenant": "b", "workspace": "w", "agent": "a"}
SCOPES = ("tenant:b", "tenant:b/workspace:w", "tenant:b/workspace:w/agent:a")
ACTION = {"kind": "llm.completion", "name": "openai:gpt-4o"}
ESTIMATE = "0.01usd"
ACTUAL = "0.008usd"
ALLOCATION = "50000000usd"  # 5x10^15 microcents (Redis keeps integers exact to 2^53): 5x10^9 pairs before a deny


@dataclass(frozen=True)
class Goal:
    """pairs/s from (any of) the concurrent scenarios `pairs_from`, and the sequential reserve p50: with N
    requests in flight, latency is about N / throughput, so the p50 goal is read on the 1-task run."""

    pairs_per_s: int
    pairs_from: tuple[str, ...]
    reserve_p50_ms: float


# SQLite: issue 2 (>= 5,000 pairs/s, p50 < 1 ms); Redis: issue 5 (>= 10,000 pairs/s from 4 processes, p50 < 0.5 ms).
GOALS = {"sqlite": Goal(5_000, ("64tasks", "4procs"), 1.0), "redis": Goal(10_000, ("4procs",), 0.5)}


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    processes: int  # 0 = run in this process
    tasks: int  # per process


SCENARIOS = (
    Scenario("1task", "1 task (sequential)", 0, 1),
    Scenario("64tasks", "64 tasks, 1 process", 0, 64),
    Scenario("4procs", "4 procs x 16 tasks", 4, 16),
)


@dataclass
class Samples:
    """What one process measured: pair count, its own wall window, per-operation latencies in ns."""

    pairs: int = 0
    warmup_pairs: int = 0
    start_ns: int = 0
    end_ns: int = 0
    reserve_ns: list[int] = field(default_factory=list)
    commit_ns: list[int] = field(default_factory=list)


# --- the measured loop --------------------------------------------------------------------------------


async def _worker(ledger: Any, deadline_ns: int, out: Samples | None) -> int:
    """reserve+commit until the deadline; records latencies into `out` (None while warming up)."""
    pairs = 0
    clock = time.perf_counter_ns
    while clock() < deadline_ns:
        t0 = clock()
        r = await ledger.reserve(SUBJECT, ACTION, ESTIMATE)
        t1 = clock()
        if not r.allowed:
            raise RuntimeError(f"reserve denied: {r.reason_code} on {r.scope} (remaining {r.remaining})")
        await ledger.commit(r.reservation_id, ACTUAL)
        t2 = clock()
        if out is not None:
            out.reserve_ns.append(t1 - t0)
            out.commit_ns.append(t2 - t1)
        pairs += 1
    return pairs


async def _run_tasks(ledger: Any, tasks: int, seconds: float, out: Samples | None) -> int:
    deadline = time.perf_counter_ns() + int(seconds * 1e9)
    counts = await asyncio.gather(*(_worker(ledger, deadline, out) for _ in range(tasks)))
    return sum(counts)


async def _measure(url: str, tasks: int, warmup: float, duration: float, barrier: Any = None) -> Samples:
    """Open the ledger, warm up, (wait for the other processes,) then measure for `duration` seconds."""
    samples = Samples()
    ledger = open_ledger(url)
    try:
        samples.warmup_pairs = await _run_tasks(ledger, tasks, warmup, None)
        if barrier is not None:
            await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
        samples.start_ns = time.monotonic_ns()
        samples.pairs = await _run_tasks(ledger, tasks, duration, samples)
        samples.end_ns = time.monotonic_ns()
    finally:
        await ledger.aclose()
    return samples


def _loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop to measure on: uvloop (as LiteLLM's proxy runs) when asked or, for "auto", installed."""
    if loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if loop == "uvloop":
            raise SystemExit("--loop uvloop needs uvloop (pip install uvloop)") from None
        return None
    return uvloop.new_event_loop


def _loop_name(loop: str) -> str:
    return "asyncio" if _loop_factory(loop) is None else "uvloop"


def _run_on(loop: str, coro: Coroutine[Any, Any, Samples]) -> Samples:
    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        return runner.run(coro)


def _child(url: str, tasks: int, warmup: float, duration: float, barrier: Any, results: Any, loop: str) -> None:
    """Entry point of a spawned process: report Samples, or the traceback if anything failed."""
    try:
        results.put(("ok", _run_on(loop, _measure(url, tasks, warmup, duration, barrier))))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the child's traceback
        barrier.abort()
        results.put(("error", traceback.format_exc()))


def _run_processes(url: str, sc: Scenario, warmup: float, duration: float, loop: str) -> list[Samples]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(sc.processes, timeout=120)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_child,
            args=(url, sc.tasks, warmup, duration, barrier, results, loop),
            name=f"bench-{i}",
            daemon=True,
        )
        for i in range(sc.processes)
    ]
    for p in procs:
        p.start()
    out: list[Samples] = []
    errors: list[str] = []
    for _ in procs:
        status, payload = results.get(timeout=120 + 2 * (warmup + duration))
        if status == "ok":
            out.append(payload)
        else:
            errors.append(payload)
    for p in procs:
        p.join(timeout=30)
    if errors:
        raise RuntimeError("benchmark process failed:\n" + "\n".join(errors))
    return out


# --- setup and the books --------------------------------------------------------------------------------


async def _spent(url: str) -> dict[str, int]:
    async with open_ledger(url) as ledger:
        return {b.scope: b.spent for b in await ledger.balances("tenant:b") if b.scope in SCOPES}


async def _setup(url: str) -> dict[str, int]:
    """Budget the three scopes (idempotent on a reused store) and return spent before the run."""
    async with open_ledger(url) as ledger:
        for scope in SCOPES:
            await ledger.set_budget(scope, ALLOCATION)
    return await _spent(url)


async def _check_books(url: str, spent_before: dict[str, int], pairs: int) -> None:
    per_pair = Amount.parse(ACTUAL).amount
    async with open_ledger(url) as ledger:
        problems = await ledger.verify()
        assert problems == [], f"verify found problems: {problems}"
        balances = {b.scope: b for b in await ledger.balances("tenant:b")}
        for scope in SCOPES:
            b = balances[scope]
            assert b.reserved == 0, f"{scope}: {b.reserved} still reserved after the run"
            charged = b.spent - spent_before.get(scope, 0)
            assert charged == pairs * per_pair, f"{scope}: spent grew by {charged}, expected {pairs} x {per_pair}"


# --- reporting ------------------------------------------------------------------------------------------


def _pct(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile, in milliseconds."""
    if not sorted_ns:
        return float("nan")
    idx = min(len(sorted_ns) - 1, max(0, int(q * len(sorted_ns) + 0.5) - 1))
    return sorted_ns[idx] / 1e6


def _kind(url: str) -> str:
    return "redis" if url.startswith(("redis", "rediss")) else "sqlite"


def _summarise(sc: Scenario, parts: list[Samples], url: str) -> dict[str, Any]:
    pairs = sum(p.pairs for p in parts)
    wall_s = (max(p.end_ns for p in parts) - min(p.start_ns for p in parts)) / 1e9
    reserve = sorted(x for p in parts for x in p.reserve_ns)
    commit = sorted(x for p in parts for x in p.commit_ns)
    row: dict[str, Any] = {
        "scenario": sc.key,
        "label": sc.label,
        "processes": max(sc.processes, 1),
        "tasks_per_process": sc.tasks,
        "pairs": pairs,
        "warmup_pairs": sum(p.warmup_pairs for p in parts),
        "wall_s": round(wall_s, 3),
        "pairs_per_s": round(pairs / wall_s, 1) if wall_s > 0 else 0.0,
        "reserve_p50_ms": round(_pct(reserve, 0.50), 3),
        "reserve_p99_ms": round(_pct(reserve, 0.99), 3),
        "commit_p50_ms": round(_pct(commit, 0.50), 3),
        "commit_p99_ms": round(_pct(commit, 0.99), 3),
    }
    goal = GOALS[_kind(url)]
    row["store_kind"] = _kind(url)
    row["meets_pairs_goal"] = row["pairs_per_s"] >= goal.pairs_per_s if sc.key in goal.pairs_from else None
    row["meets_p50_goal"] = row["reserve_p50_ms"] < goal.reserve_p50_ms if sc.key == "1task" else None
    return row


def _goal_cell(r: dict[str, Any]) -> str:
    """What this row is judged on: the p50 (1 task), pairs/s (the goal's concurrent scenarios), or nothing."""
    if r["meets_p50_goal"] is not None:
        return "p50 met" if r["meets_p50_goal"] else "p50 NOT met"
    if r["meets_pairs_goal"] is not None:
        return "pairs/s met" if r["meets_pairs_goal"] else "pairs/s NOT met"
    return ""


def _verdict(kind: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The store kind's goal: met when a pairs/s row and the 1-task p50 both meet it (None: not all measured)."""
    goal = GOALS[kind]
    mine = [r for r in rows if r["store_kind"] == kind]
    pairs = [r["meets_pairs_goal"] for r in mine if r["meets_pairs_goal"] is not None]
    p50 = [r["meets_p50_goal"] for r in mine if r["meets_p50_goal"] is not None]
    met = (any(pairs) and all(p50)) if pairs and p50 else None
    return {
        "pairs_per_s": goal.pairs_per_s,
        "pairs_from": list(goal.pairs_from),
        "reserve_p50_ms": goal.reserve_p50_ms,
        "met": met,
    }


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        "store",
        "workload",
        "pairs/s",
        "reserve p50",
        "reserve p99",
        "commit p50",
        "commit p99",
        "pairs",
        "bytes/pair",
        "goal",
    )
    body = [
        (
            r["store_kind"],
            r["label"],
            f"{r['pairs_per_s']:,.0f}",
            f"{r['reserve_p50_ms']:.3f} ms",
            f"{r['reserve_p99_ms']:.3f} ms",
            f"{r['commit_p50_ms']:.3f} ms",
            f"{r['commit_p99_ms']:.3f} ms",
            f"{r['pairs']:,}",
            f"{r['bytes_per_pair']:,.0f}" if r.get("bytes_per_pair") is not None else "",
            _goal_cell(r),
        )
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in (head, *body)) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head), "  ".join("-" * w for w in widths), *(fmt.format(*line) for line in body)]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------------


def _redis_server() -> RedisServer:
    """A throwaway redis-server for `--store redis`: AOF on with fsync every second, a free loopback port."""
    if shutil.which("redis-server") is None:
        raise SystemExit("--store redis needs redis-server on PATH (apt-get install redis-server)")
    from cycles_ledger.redis_server import RedisServer

    return RedisServer(appendonly=True, appendfsync="everysec")


def _scenario_url(store: str, tmp: str, sc: Scenario, redis_server: RedisServer | None) -> str:
    if store == "sqlite":
        return f"sqlite:///{os.path.join(tmp, f'bench-{sc.key}-{uuid.uuid4().hex[:6]}.db')}"
    if store == "redis":
        assert redis_server is not None
        return redis_server.url(f"bench-{sc.key}-{uuid.uuid4().hex[:6]}")
    if _kind(store) == "redis" and "prefix=" not in store:
        return f"{store}{'&' if '?' in store else '?'}prefix=bench-{sc.key}-{uuid.uuid4().hex[:6]}"
    return store


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument(
        "--store",
        action="append",
        help="sqlite (default), redis (a throwaway redis-server), or a store URL; repeat to compare stores",
    )
    ap.add_argument("--duration", type=float, default=3.0, help="measured seconds per scenario (default 3)")
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured warm-up seconds per scenario (default 0.5)")
    ap.add_argument(
        "--scenarios",
        default=",".join(s.key for s in SCENARIOS),
        help=f"comma-separated subset of {', '.join(s.key for s in SCENARIOS)}",
    )
    ap.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop of the measuring processes: auto (default) = uvloop if installed, as LiteLLM's proxy runs",
    )
    ap.add_argument("--json", action="store_true", help="print a JSON summary on stdout (the table goes to stderr)")
    args = ap.parse_args(argv)
    known = {s.key for s in SCENARIOS}
    chosen = [k.strip() for k in args.scenarios.split(",") if k.strip()]
    unknown = [k for k in chosen if k not in known]
    if unknown or not chosen:
        ap.error(f"unknown scenario(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(sorted(known))}")
    args.chosen = [s for s in SCENARIOS if s.key in chosen]
    args.store = args.store or ["sqlite"]
    if any(":memory:" in store for store in args.store):
        ap.error(
            "--store must outlive one connection (the scenarios reopen it, the 4 processes share it): not :memory:"
        )
    if args.duration <= 0 or args.warmup < 0:
        ap.error("--duration must be > 0 and --warmup >= 0")
    return args


def _scenario(sc: Scenario, url: str, args: argparse.Namespace, say: Any) -> dict[str, Any]:
    """Run one scenario on one store, check its books, and return its row."""
    print(
        f"{sc.label}: warm-up {args.warmup:g} s, measuring {args.duration:g} s on {url} ({_loop_name(args.loop)})",
        file=say,
        flush=True,
    )
    spent_before = asyncio.run(_setup(url))
    if sc.processes:
        parts = _run_processes(url, sc, args.warmup, args.duration, args.loop)
    else:
        parts = [_run_on(args.loop, _measure(url, sc.tasks, args.warmup, args.duration))]
    row = _summarise(sc, parts, url)
    row["store"] = url
    asyncio.run(_check_books(url, spent_before, row["pairs"] + row["warmup_pairs"]))
    row["bytes_per_pair"] = _bytes_per_pair(url, row["pairs"] + row["warmup_pairs"])
    stored = f", {row['bytes_per_pair']:,.0f} bytes stored per pair" if row["bytes_per_pair"] is not None else ""
    print(
        f"  {row['pairs_per_s']:,.0f} pairs/s, reserve p50 {row['reserve_p50_ms']:.3f} ms"
        f" p99 {row['reserve_p99_ms']:.3f} ms, commit p50 {row['commit_p50_ms']:.3f} ms; books agree{stored}",
        file=say,
        flush=True,
    )
    return row


def _bytes_per_pair(url: str, pairs: int) -> float | None:
    """A SQLite file's size (after a full checkpoint) over the pairs it holds; None for other stores."""
    if not url.startswith("sqlite:///") or pairs <= 0:
        return None
    path = url[len("sqlite:///") :].split("?", 1)[0]
    if path == ":memory:" or not os.path.exists(path):
        return None
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = int(conn.execute("PRAGMA page_count").fetchone()[0]) * int(
            conn.execute("PRAGMA page_size").fetchone()[0]
        )
    finally:
        conn.close()
    return round(float(size) / pairs, 1)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    say = sys.stderr if args.json else sys.stdout
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cycles-bench-") as tmp:
        redis_server = _redis_server() if "redis" in args.store else None
        try:
            for sc in args.chosen:
                for store in args.store:
                    rows.append(_scenario(sc, _scenario_url(store, tmp, sc, redis_server), args, say))
        finally:
            if redis_server is not None:
                redis_server.stop()
    print(file=say)
    print(f"event loop: {_loop_name(args.loop)}", file=say)
    print(_table(rows), file=say)
    verdicts = {kind: _verdict(kind, rows) for kind in sorted({r["store_kind"] for r in rows})}
    for kind, v in verdicts.items():
        where = " or ".join(s.label for s in SCENARIOS if s.key in v["pairs_from"])
        state = {True: "MET", False: "NOT MET", None: "not judged (run the 1-task scenario and " + where + ")"}
        print(
            f"goal ({kind}): >= {v['pairs_per_s']:,} pairs/s from {where}, and 1-task reserve p50"
            f" < {v['reserve_p50_ms']:g} ms: {state[v['met']]}",
            file=say,
        )
    print(
        "  (with N requests in flight, latency ~ N / throughput: p50 < 1 ms at 10,000 ops/s allows ~10 in flight)",
        file=say,
    )
    print("books agree", file=say)
    if args.json:
        summary = {
            "stores": args.store,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "cpus": os.cpu_count(),
            "event_loop": _loop_name(args.loop),
            "python": sys.version.split()[0],
            "goals": verdicts,
            "scenarios": rows,
            "books_agree": True,
        }
        json.dump(summary, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
