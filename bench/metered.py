"""@metered overhead benchmark: what `@metered` adds to a call of a function that does nothing.

What it measures: per-call latency (time.perf_counter_ns around each call, in µs: p50, p99, mean) of a
no-op function wrapped in `@metered(kind="tool.bench", estimate="0.001usd")`, next to the same bare
no-op measured in the same run; overhead = metered - bare. Each metered call reserves 0.001usd on
`tenant:bench` (through `budget_scope(tenant="bench")`), runs the no-op, and commits the estimate: two
ledger round trips on the embedded SQLite store, plus the heartbeat (a thread per call for sync
functions, a task per call for async ones; it never fires on a no-op, the default TTL is 60 s).
Workloads, each with `heartbeat=True` (the default) and `heartbeat=False` (to show what it costs):

    sync             a sync no-op, called sequentially (SyncLedger: private loop thread)
    async            an async no-op, awaited sequentially on one event loop
    async x64        64 asyncio tasks started by asyncio.gather, sharing the calls (64 in flight);
                     also reports calls/s = calls / wall time

Each row warms up first (`--warmup` calls of the bare and the metered function, not measured), then
measures `--calls` calls of each. The ledger is chosen with `cycles_tools.configure(store=url)`: a
fresh temporary SQLite file unless `--store URL` names one. A huge budget is set on `tenant:bench` with
`open_ledger_sync` beforehand. Afterwards the books are checked: `verify() == []`, nothing reserved on
`tenant:bench`, and its spent grew by (every metered call, warm-up included) x 0.001usd.

Goal: < 1 ms p50 overhead. With 64 calls in flight a call's latency is mostly waiting behind the other
63 (~ 64 / calls/s); the `in flight` column (time inside calls / wall time) shows how many overlapped,
and 1 / calls/s is the ledger time each call costs there.

    .venv/bin/python bench/metered.py                       # 3000 calls per row, prints a table
    .venv/bin/python bench/metered.py --calls 10000 --json > metered.json   # table on stderr, JSON on stdout
    .venv/bin/python bench/metered.py --store sqlite:///bench.db
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import cycles_tools
from cycles_ledger import Amount, open_ledger_sync
from cycles_tools import budget_scope, metered

TENANT = "bench"
SCOPE = f"tenant:{TENANT}"
ESTIMATE = "0.001usd"
ALLOCATION = "1000000000usd"  # 10^17 microcents: ~10^12 calls before anything could deny
CONCURRENCY = 64
GOAL_OVERHEAD_P50_US = 1000.0
GOAL_LINE = "goal: < 1 ms p50 overhead"


# --- the functions under test ---------------------------------------------------------------------------


def noop() -> None:
    return None


async def anoop() -> None:
    return None


def _meter(heartbeat: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return metered(kind="tool.bench", name="noop", estimate=ESTIMATE, heartbeat=heartbeat)


sync_hb = _meter(True)(noop)
sync_nohb = _meter(False)(noop)
async_hb = _meter(True)(anoop)
async_nohb = _meter(False)(anoop)


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    shape: str  # "sync" | "async" | "gather"
    heartbeat: bool
    fn: Callable[..., Any]
    bare: Callable[..., Any]


ROWS = (
    Row("sync", "sync, sequential", "sync", True, sync_hb, noop),
    Row("sync-nohb", "sync, sequential, heartbeat=False", "sync", False, sync_nohb, noop),
    Row("async", "async, sequential", "async", True, async_hb, anoop),
    Row("async-nohb", "async, sequential, heartbeat=False", "async", False, async_nohb, anoop),
    Row("gather", f"async x{CONCURRENCY} (gather)", "gather", True, async_hb, anoop),
    Row("gather-nohb", f"async x{CONCURRENCY} (gather), heartbeat=False", "gather", False, async_nohb, anoop),
)


@dataclass
class Run:
    """One measured batch: per-call latencies in ns and the wall time of the whole batch."""

    ns: list[int]
    wall_s: float


# --- the measured loops ---------------------------------------------------------------------------------


def _run_sync(fn: Callable[[], Any], calls: int) -> Run:
    clock = time.perf_counter_ns
    out: list[int] = []
    start = clock()
    for _ in range(calls):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return Run(out, (clock() - start) / 1e9)


async def _run_async(fn: Callable[[], Awaitable[Any]], calls: int) -> Run:
    clock = time.perf_counter_ns
    out: list[int] = []
    start = clock()
    for _ in range(calls):
        t0 = clock()
        await fn()
        out.append(clock() - t0)
    return Run(out, (clock() - start) / 1e9)


async def _run_gather(fn: Callable[[], Awaitable[Any]], calls: int) -> Run:
    """CONCURRENCY tasks share `calls`; each times its own awaits."""
    clock = time.perf_counter_ns
    out: list[int] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            t0 = clock()
            await fn()
            out.append(clock() - t0)

    shares = [calls // CONCURRENCY + (1 if i < calls % CONCURRENCY else 0) for i in range(CONCURRENCY)]
    start = clock()
    await asyncio.gather(*(worker(n) for n in shares if n))
    return Run(out, (clock() - start) / 1e9)


async def _measure_async(row: Row, calls: int, warmup: int) -> tuple[Run, Run]:
    runner = _run_gather if row.shape == "gather" else _run_async
    await runner(row.bare, warmup)
    await runner(row.fn, warmup)
    return await runner(row.bare, calls), await runner(row.fn, calls)


def _measure_sync(row: Row, calls: int, warmup: int) -> tuple[Run, Run]:
    _run_sync(row.bare, warmup)
    _run_sync(row.fn, warmup)
    return _run_sync(row.bare, calls), _run_sync(row.fn, calls)


# --- setup and the books --------------------------------------------------------------------------------


def _setup(url: str) -> int:
    """Budget tenant:bench (idempotent on a reused store); returns its spent before the run."""
    with open_ledger_sync(url) as ledger:
        return ledger.set_budget(SCOPE, ALLOCATION).spent


def _check_books(url: str, spent_before: int, metered_calls: int) -> None:
    per_call = Amount.parse(ESTIMATE).amount
    with open_ledger_sync(url) as ledger:
        problems = ledger.verify()
        assert problems == [], f"verify found problems: {problems}"
        b = ledger.balance(SCOPE)
        assert b.reserved == 0, f"{SCOPE}: {b.reserved} still reserved after the run"
        charged = b.spent - spent_before
        expected = metered_calls * per_call
        assert charged == expected, f"{SCOPE}: spent grew by {charged}, expected {metered_calls} x {per_call}"


# --- reporting ------------------------------------------------------------------------------------------


def _pct(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile, in microseconds."""
    if not sorted_ns:
        return float("nan")
    idx = min(len(sorted_ns) - 1, max(0, int(q * len(sorted_ns) + 0.5) - 1))
    return sorted_ns[idx] / 1e3


def _stats(run: Run) -> dict[str, float]:
    s = sorted(run.ns)
    return {
        "p50_us": round(_pct(s, 0.50), 2),
        "p99_us": round(_pct(s, 0.99), 2),
        "mean_us": round(statistics.fmean(s) / 1e3, 2),
        "calls_per_s": round(len(s) / run.wall_s, 1) if run.wall_s > 0 else 0.0,
        # time spent inside calls / wall time: how many calls overlapped on average (1 = none)
        "in_flight": round(sum(s) / 1e9 / run.wall_s, 2) if run.wall_s > 0 else 0.0,
    }


def _summarise(row: Row, bare: Run, met: Run) -> dict[str, Any]:
    b, m = _stats(bare), _stats(met)
    out: dict[str, Any] = {
        "workload": row.key,
        "label": row.label,
        "heartbeat": row.heartbeat,
        "concurrency": CONCURRENCY if row.shape == "gather" else 1,
        "calls": len(met.ns),
        "bare": b,
        "metered": m,
        "overhead_p50_us": round(m["p50_us"] - b["p50_us"], 2),
        "overhead_p99_us": round(m["p99_us"] - b["p99_us"], 2),
        "overhead_mean_us": round(m["mean_us"] - b["mean_us"], 2),
    }
    out["meets_goal"] = out["overhead_p50_us"] < GOAL_OVERHEAD_P50_US
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        "workload",
        "bare p50",
        "metered p50",
        "p99",
        "mean",
        "overhead p50",
        "overhead mean",
        "calls/s",
        "in flight",
        "goal",
    )
    body = [
        (
            r["label"],
            f"{r['bare']['p50_us']:.2f} µs",
            f"{r['metered']['p50_us']:.1f} µs",
            f"{r['metered']['p99_us']:.1f} µs",
            f"{r['metered']['mean_us']:.1f} µs",
            f"{r['overhead_p50_us']:.1f} µs",
            f"{r['overhead_mean_us']:.1f} µs",
            f"{r['metered']['calls_per_s']:,.0f}",
            f"{r['metered']['in_flight']:.1f}",
            "met" if r["meets_goal"] else "missed",
        )
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in (head, *body)) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head), "  ".join("-" * w for w in widths), *(fmt.format(*line) for line in body)]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--store", help="store URL (default: a fresh temporary SQLite file)")
    ap.add_argument("--calls", type=int, default=3000, help="measured calls per function per row (default 3000)")
    ap.add_argument("--warmup", type=int, default=300, help="unmeasured warm-up calls per function per row (300)")
    ap.add_argument("--json", action="store_true", help="print a JSON summary on stdout (the table goes to stderr)")
    args = ap.parse_args(argv)
    if args.calls <= 0 or args.warmup < 0:
        ap.error("--calls must be > 0 and --warmup >= 0")
    if args.store is not None and ":memory:" in args.store:
        ap.error("--store must outlive one connection (set-up, @metered and the books check each open it)")
    return args


def _bench(url: str, calls: int, warmup: int, say: Any) -> list[dict[str, Any]]:
    cycles_tools.configure(store=url)
    results: dict[str, dict[str, Any]] = {}

    def report(row: Row, bare: Run, met: Run) -> None:
        r = _summarise(row, bare, met)
        results[row.key] = r
        print(
            f"  {row.label}: bare p50 {r['bare']['p50_us']:.2f} µs, metered p50 {r['metered']['p50_us']:.1f} µs"
            f" (p99 {r['metered']['p99_us']:.1f}, mean {r['metered']['mean_us']:.1f}),"
            f" {r['metered']['calls_per_s']:,.0f} calls/s",
            file=say,
            flush=True,
        )

    with budget_scope(tenant=TENANT):
        for row in ROWS:
            if row.shape == "sync":
                report(row, *_measure_sync(row, calls, warmup))

    async def run_async() -> None:
        async with budget_scope(tenant=TENANT):
            for row in ROWS:
                if row.shape != "sync":
                    report(row, *await _measure_async(row, calls, warmup))

    asyncio.run(run_async())
    return [results[row.key] for row in ROWS]


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    say = sys.stderr if args.json else sys.stdout
    with tempfile.TemporaryDirectory(prefix="cycles-bench-") as tmp:
        url = args.store or f"sqlite:///{os.path.join(tmp, 'bench-metered.db')}"
        print(
            f"@metered no-op, estimate {ESTIMATE}: warm-up {args.warmup}, {args.calls} measured calls per row on {url}",
            file=say,
            flush=True,
        )
        print(
            f"  (load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs: anything else running skews this)",
            file=say,
        )
        spent_before = _setup(url)
        rows = _bench(url, args.calls, args.warmup, say)
        metered_calls = len(rows) * (args.calls + args.warmup)
        _check_books(url, spent_before, metered_calls)
    print(file=say)
    print(_table(rows), file=say)
    print(GOAL_LINE, file=say)
    met = [r["workload"] for r in rows if r["meets_goal"]]
    missed = [r["workload"] for r in rows if not r["meets_goal"]]
    print(f"  met by: {', '.join(met) or 'none'}; missed by: {', '.join(missed) or 'none'}", file=say)
    print(
        "  (in flight = time inside calls / wall time; with N calls in flight a call's latency includes waiting"
        " behind the others, ~ N / calls/s)",
        file=say,
    )
    for r in rows:
        if r["concurrency"] > 1 and r["metered"]["calls_per_s"] > 0:
            print(
                f"  {r['workload']}: {r['metered']['in_flight']:.1f} in flight; ledger time per call"
                f" = 1 / calls/s = {1e6 / r['metered']['calls_per_s']:.0f} µs",
                file=say,
            )
    print(f"books agree ({metered_calls:,} metered calls x {ESTIMATE} on {SCOPE}, verify() == [])", file=say)
    if args.json:
        summary = {
            "store": args.store or "sqlite (fresh temp file)",
            "calls": args.calls,
            "warmup": args.warmup,
            "estimate": ESTIMATE,
            "cpus": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "python": sys.version.split()[0],
            "goal": {"overhead_p50_us": GOAL_OVERHEAD_P50_US},
            "workloads": rows,
            "metered_calls": metered_calls,
            "books_agree": True,
        }
        json.dump(summary, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
