"""Many OS processes x threads x asyncio tasks calling @metered tools against ONE budget in ONE SQLite file.

Each spawned worker (a fresh interpreter: `configure(store=url)` opens its own ledgers) waits for the
parent's go, then runs sync tool calls in a thread pool (each thread in a copy of the caller's context) and
async tool calls under `asyncio.gather`, all at once. Estimates equal actuals, so the budget pays for an
exact number of calls: the bodies that ran must be exactly that many, and the books must reconcile.
"""

from __future__ import annotations

import asyncio
import contextvars
import multiprocessing
import queue
import random
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import cycles_tools
from cycles_ledger import ReservationStatus, open_ledger_sync
from cycles_tools import BudgetDenied, budget_scope, current_subject, metered

pytestmark = pytest.mark.slow

PROCS = 4
SYNC_CALLS = 25  # per process, each on a pool thread
ASYNC_CALLS = 25  # per process, all gathered
COST = 1_000_000  # estimate == actual: 0.01 USD per call
PAID = 70  # the shared budget pays for exactly this many of the PROCS * (SYNC_CALLS + ASYNC_CALLS) = 200 calls
TENANT = "tenant:shared"


# --- worker side (runs in the spawned processes) ----------------------------------------------------


async def _worker_main(url: str, index: int, go: Any, results: Any) -> dict[str, Any]:
    cycles_tools.configure(store=url)
    rng = random.Random(index)
    ran: list[str] = []  # one entry per body that actually ran (list.append is atomic across threads)

    @metered(kind="tool.work", name="work", estimate=COST, actual=COST)
    def work_sync(i: int, pause: float) -> str:
        time.sleep(pause)
        ran.append(f"s{i}")
        return current_subject().scope_path  # type: ignore[union-attr]

    @metered(kind="tool.work", name="work", estimate=COST, actual=lambda result: COST)
    async def work_async(i: int, pause: float) -> str:
        await asyncio.sleep(pause)
        ran.append(f"a{i}")
        return current_subject().scope_path  # type: ignore[union-attr]

    def sync_call(i: int, pause: float) -> str:
        try:
            return work_sync(i, pause)
        except BudgetDenied as exc:
            return f"denied:{exc.reason_code}:{exc.scope}"

    async def async_call(i: int, pause: float) -> str:
        await asyncio.sleep(pause)
        try:
            return await work_async(i, pause)
        except BudgetDenied as exc:
            return f"denied:{exc.reason_code}:{exc.scope}"

    pauses = [rng.uniform(0, 0.01) for _ in range(SYNC_CALLS + ASYNC_CALLS)]
    results.put(("ready", index, None))
    if not await asyncio.to_thread(go.wait, 60):
        raise RuntimeError("the parent never said go")
    loop = asyncio.get_running_loop()
    async with budget_scope(tenant="shared", agent=f"p{index}"):
        with ThreadPoolExecutor(max_workers=8) as pool:
            outcomes = await asyncio.gather(
                *(
                    loop.run_in_executor(pool, contextvars.copy_context().run, sync_call, i, pauses[i])
                    for i in range(SYNC_CALLS)
                ),
                *(async_call(i, pauses[SYNC_CALLS + i]) for i in range(ASYNC_CALLS)),
            )
    return {"ran": ran, "outcomes": list(outcomes)}


def _worker(url: str, index: int, go: Any, results: Any) -> None:
    try:
        out = asyncio.run(_worker_main(url, index, go, results))
    except BaseException:  # noqa: BLE001 - the parent turns it into a test failure
        results.put(("error", index, traceback.format_exc()))
        return
    results.put(("done", index, out))


# --- parent side -----------------------------------------------------------------------------------


def _run_processes(url: str) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    go = ctx.Event()
    procs = [ctx.Process(target=_worker, args=(url, i, go, results), daemon=True) for i in range(PROCS)]
    done: dict[int, dict[str, Any]] = {}
    try:
        for p in procs:
            p.start()
        ready = 0
        while len(done) < PROCS:
            try:
                kind, index, payload = results.get(timeout=90)
            except queue.Empty:
                pytest.fail(f"workers went silent: {ready} ready, {len(done)} done")
            if kind == "error":
                pytest.fail(f"worker {index} failed:\n{payload}")
            elif kind == "ready":
                ready += 1
                if ready == PROCS:
                    go.set()  # all workers start together, so their calls really race on the write lock
            else:
                done[index] = payload
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0, f"worker pid {p.pid} exited with {p.exitcode}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [done[i] for i in range(PROCS)]


def test_many_processes_run_exactly_as_many_tool_calls_as_the_budget_pays_for(tmp_path: Path) -> None:
    """4 processes x (25 threaded sync + 25 gathered async) @metered calls on one budget for 70 calls: exactly
    70 bodies run, every other call is denied BUDGET_EXCEEDED at the tenant, and the books reconcile."""
    url = f"sqlite:///{tmp_path}/t.db"
    with open_ledger_sync(url) as admin:
        admin.set_budget(TENANT, {"unit": "USD_MICROCENTS", "amount": PAID * COST})

    per_proc = _run_processes(url)

    demand = PROCS * (SYNC_CALLS + ASYNC_CALLS)
    ran = [len(p["ran"]) for p in per_proc]
    assert sum(ran) == PAID
    outcomes = Counter(o for p in per_proc for o in p["outcomes"])
    assert outcomes["denied:BUDGET_EXCEEDED:" + TENANT] == demand - PAID
    for i, p in enumerate(per_proc):
        mine = f"{TENANT}/agent:p{i}"
        assert len(p["outcomes"]) == SYNC_CALLS + ASYNC_CALLS
        assert sum(o == mine for o in p["outcomes"]) == len(p["ran"]), f"worker {i}: a call ran but failed or v.v."
        assert len(set(p["ran"])) == len(p["ran"])
    assert sum(outcomes[f"{TENANT}/agent:p{i}"] for i in range(PROCS)) == PAID

    with open_ledger_sync(url) as admin:
        b = admin.balance(TENANT)
        assert b.spent == PAID * COST <= b.allocated
        assert (b.reserved, b.debt, b.remaining, b.is_over_limit) == (0, 0, 0, False)
        assert admin.verify() == []
        reservations = admin.list_reservations(limit=10_000)
        assert len(reservations) == PAID
        assert {(r.status, r.committed.amount if r.committed else None) for r in reservations} == {
            (ReservationStatus.COMMITTED, COST)
        }
        by_agent = Counter(r.subject.agent for r in reservations)
        assert by_agent == Counter({f"p{i}": n for i, n in enumerate(ran) if n})
        kinds = Counter(e.type for e in admin.events(limit=100_000))
        assert (kinds["reserved"], kinds["committed"], kinds["denied"]) == (PAID, PAID, demand - PAID)
        assert kinds["released"] == kinds["expired"] == kinds["debited"] == 0
