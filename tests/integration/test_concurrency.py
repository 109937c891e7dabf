"""Real OS processes x asyncio tasks reserving against ONE store: exact admission, reconciled books.

Each test runs once per backend (`durable_url`: one SQLite file, or one namespace on a real redis-server).

Every test starts 8 worker processes (multiprocessing "spawn", so each is a fresh interpreter that opens
its own `open_ledger(url)`; the last test also forks them), each running 25 tasks under `asyncio.gather`
with random jitter. Plans (subjects, estimates, actuals) come from a seeded RNG in the parent, so the
parent knows the demand; only the interleaving is left to the OS. Workers send every outcome back over a
Queue, and the parent then reopens the store and checks balances, reservations and the event log against
those outcomes.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import queue
import random
import time
import traceback
from collections import Counter
from typing import Any

import pytest

from cycles_ledger import (
    Balance,
    BudgetExceededError,
    Ledger,
    LedgerEvent,
    OveragePolicy,
    Reservation,
    ReservationStatus,
    open_ledger,
)

pytestmark = pytest.mark.slow

PROCS = 8
TASKS = 25
UNIT = "USD_MICROCENTS"
ACTION = {"kind": "llm.completion", "name": "test:model"}
E = 1_000_000  # one fixed-size estimate: 0.01 USD
TENANT = "tenant:t"
WORKFLOW = "tenant:t/workflow:w"
SUBJECT_W = {"tenant": "t", "workflow": "w"}
SUBJECT_T = {"tenant": "t"}
SUBJECT_V = {"tenant": "t", "workflow": "v"}  # workflow v has no budget: only the tenant is held

Plan = list[dict[str, Any]]  # one dict per task: subject, estimate, actual (None = keep the hold), policy, seed


# --- worker side (runs in the spawned processes) ----------------------------------------------------


def _amount(n: int) -> dict[str, Any]:
    return {"unit": UNIT, "amount": n}


async def _task(ledger: Ledger, item: dict[str, Any]) -> dict[str, Any]:
    rng = random.Random(item["seed"])
    await asyncio.sleep(rng.uniform(0, 0.03))
    r = await ledger.reserve(
        item["subject"],
        ACTION,
        _amount(item["estimate"]),
        overage_policy=item["policy"],
        idempotency_key=item.get("key"),
    )
    out: dict[str, Any] = {
        "decision": r.decision.value,
        "reservation_id": r.reservation_id,
        "reason_code": r.reason_code,
        "scope": r.scope,
        "remaining": r.remaining,
        "estimate": item["estimate"],
        "actual": item["actual"],
        "subject": item["subject"],
    }
    if r.allowed:
        assert r.reserved is not None
        out["held"] = r.reserved.amount
    if r.allowed and item["actual"] is not None:
        assert r.reservation_id is not None
        await asyncio.sleep(rng.uniform(0, 0.02))
        try:
            c = await ledger.commit(r.reservation_id, _amount(item["actual"]))
        except BudgetExceededError:  # REJECT refused the overage and changed nothing: give the hold back
            out["rejected"] = True
            rel = await ledger.release(r.reservation_id, reason="overage rejected")
            out["released"] = rel.released.amount
        else:
            out["charged"] = c.charged.amount
    return out


def _frozen_clock(ms: int) -> int:
    return ms


async def _worker_main(
    url: str, plan: Plan, go: Any, results: Any, index: int, clock_ms: int | None
) -> list[dict[str, Any]]:
    settings = {} if clock_ms is None else {"clock": functools.partial(_frozen_clock, clock_ms)}
    if url.startswith("redis") and "timeout=" not in url:
        # Eight fresh copies of a large pytest process connecting at once on a loaded 2-core machine can take
        # longer than the default 2 s; what these tests check is admission and ids, not connect latency.
        url += ("&" if "?" in url else "?") + "timeout=15"
    async with open_ledger(url, **settings) as ledger:
        results.put(("ready", index, None))
        # All workers start together, so their reservations really race on the SQLite write lock.
        if not await asyncio.to_thread(go.wait, 60):
            raise RuntimeError("the parent never said go")
        return list(await asyncio.gather(*(_task(ledger, item) for item in plan)))


def _worker(url: str, plan: Plan, go: Any, results: Any, index: int, clock_ms: int | None) -> None:
    try:
        outcome = asyncio.run(_worker_main(url, plan, go, results, index, clock_ms))
    except BaseException:  # noqa: BLE001 - the parent turns it into a test failure
        results.put(("error", index, traceback.format_exc()))
        return
    results.put(("done", index, outcome))


# --- parent side -----------------------------------------------------------------------------------


def _run_processes(
    url: str, plans: list[Plan], start_method: str = "spawn", clock_ms: int | None = None
) -> list[dict[str, Any]]:
    """Start one process per plan, release them together, and return every task's outcome.

    `clock_ms` freezes every worker's store clock at that millisecond (as if all of them ran in the same ms).
    """
    ctx = multiprocessing.get_context(start_method)
    results = ctx.Queue()
    go = ctx.Event()
    procs = [
        ctx.Process(target=_worker, args=(url, plan, go, results, i, clock_ms), daemon=True)
        for i, plan in enumerate(plans)
    ]
    done: dict[int, list[dict[str, Any]]] = {}
    try:
        for p in procs:
            p.start()
        ready = 0
        while len(done) < len(procs):
            try:
                kind, index, payload = results.get(timeout=90)
            except queue.Empty:
                pytest.fail(f"workers went silent: {ready} ready, {len(done)} done")
            if kind == "error":
                pytest.fail(f"worker {index} failed:\n{payload}")
            elif kind == "ready":
                ready += 1
                if ready == len(procs):
                    go.set()
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
    return [o for i in range(len(plans)) for o in done[i]]


def _plans(rng: random.Random, make: Any) -> list[Plan]:
    """PROCS plans of TASKS items; `make(proc, task)` gives subject/estimate/actual/policy."""
    return [
        [{"seed": rng.getrandbits(32), "policy": None, "actual": None, **make(p, t)} for t in range(TASKS)]
        for p in range(PROCS)
    ]


async def _setup(url: str, budgets: dict[str, int]) -> None:
    async with open_ledger(url) as ledger:
        for scope, allocated in budgets.items():
            await ledger.set_budget(scope, _amount(allocated))


async def _check_books(ledger: Ledger) -> dict[str, Balance]:
    """Arithmetic identity on every balance, verify() clean, and reserved = the ACTIVE holds."""
    balances = {b.scope: b for b in await ledger.balances()}
    for b in balances.values():
        assert b.remaining == b.allocated - b.spent - b.reserved - b.debt, b
        assert min(b.spent, b.reserved, b.debt) >= 0, b
    assert await ledger.verify() == []
    active = await ledger.list_reservations(status=ReservationStatus.ACTIVE, limit=100_000)
    for scope, b in balances.items():
        assert b.reserved == sum(r.reserved.amount for r in active if scope in r.budgeted_scopes), scope
    return balances


async def _log(ledger: Ledger) -> tuple[list[LedgerEvent], dict[str, Reservation]]:
    events = await ledger.events(limit=100_000)
    assert len(events) < 100_000
    reservations = {r.reservation_id: r for r in await ledger.list_reservations(limit=100_000)}
    return events, reservations


def _split(outcomes: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    allowed = [o for o in outcomes if o["decision"] != "DENY"]
    denied = [o for o in outcomes if o["decision"] == "DENY"]
    return allowed, denied


def _assert_log_matches(
    events: list[LedgerEvent], reservations: dict[str, Reservation], allowed: list[dict[str, Any]], denied: int
) -> Counter[str]:
    """One `reserved` event per ALLOW (same ids as the workers saw), one `denied` per DENY."""
    kinds = Counter(e.type for e in events)
    assert kinds["reserved"] == len(allowed)
    assert kinds["denied"] == denied
    ids = {o["reservation_id"] for o in allowed}
    assert len(ids) == len(allowed), "two ALLOWs share a reservation id"
    assert {e.reservation_id for e in events if e.type == "reserved"} == ids
    assert set(reservations) == ids
    for o in allowed:
        assert reservations[o["reservation_id"]].reserved.amount == o["held"] == o["estimate"]
    return kinds


# --- tests -----------------------------------------------------------------------------------------


async def test_equal_estimates_admit_exactly_what_one_budget_pays_for(durable_url: str) -> None:
    """200 equal reservations from 8 processes against a budget for 50 of them get exactly 50 ALLOWs."""
    url = durable_url
    await _setup(url, {TENANT: 50 * E})
    plans = _plans(random.Random(1), lambda p, t: {"subject": SUBJECT_T, "estimate": E})
    outcomes = await asyncio.to_thread(_run_processes, url, plans)

    allowed, denied = _split(outcomes)
    assert len(outcomes) == PROCS * TASKS
    assert len(allowed) == 50
    assert len(denied) == PROCS * TASKS - 50
    assert {(o["reason_code"], o["scope"]) for o in denied} == {("BUDGET_EXCEEDED", TENANT)}
    assert all(0 <= o["remaining"] < E for o in denied)
    async with open_ledger(url) as ledger:
        balances = await _check_books(ledger)
        t = balances[TENANT]
        assert (t.reserved, t.spent, t.debt, t.remaining) == (50 * E, 0, 0, 0)
        events, reservations = await _log(ledger)
        _assert_log_matches(events, reservations, allowed, len(denied))
        assert {e.amount for e in events if e.type in ("reserved", "denied")} == {E}
        assert all(r.status is ReservationStatus.ACTIVE for r in reservations.values())


async def test_random_estimates_never_overbook_and_every_deny_was_a_real_shortfall(durable_url: str) -> None:
    """Random estimates racing on one budget: holds sum to reserved <= allocated, and each DENY did not fit."""
    url = durable_url
    rng = random.Random(2)
    plans = _plans(rng, lambda p, t: {"subject": SUBJECT_T, "estimate": rng.randint(1, 20) * 100_000})
    demand = sum(item["estimate"] for plan in plans for item in plan)
    allocated = demand // 2
    await _setup(url, {TENANT: allocated})
    outcomes = await asyncio.to_thread(_run_processes, url, plans)

    allowed, denied = _split(outcomes)
    held = sum(o["estimate"] for o in allowed)
    assert denied, "the budget covers half the demand, so some requests must be denied"
    async with open_ledger(url) as ledger:
        t = (await _check_books(ledger))[TENANT]
        assert t.reserved == held <= allocated
        assert t.remaining == allocated - held
        # Without releases remaining only falls, so whatever was denied is still bigger than what is left,
        # and the remaining a DENY reported was below its estimate and never below the final remaining.
        for o in denied:
            assert o["reason_code"] == "BUDGET_EXCEEDED"
            assert t.remaining <= o["remaining"] < o["estimate"]
        events, reservations = await _log(ledger)
        _assert_log_matches(events, reservations, allowed, len(denied))


async def test_nested_scopes_the_tighter_workflow_admits_exactly_its_count(durable_url: str) -> None:
    """tenant pays for 100, its workflow for 40: 200 racing reservations at the workflow get exactly 40."""
    url = durable_url
    await _setup(url, {TENANT: 100 * E, WORKFLOW: 40 * E})
    plans = _plans(random.Random(3), lambda p, t: {"subject": SUBJECT_W, "estimate": E})
    outcomes = await asyncio.to_thread(_run_processes, url, plans)

    allowed, denied = _split(outcomes)
    assert len(allowed) == 40
    assert {(o["reason_code"], o["scope"]) for o in denied} == {("BUDGET_EXCEEDED", WORKFLOW)}
    async with open_ledger(url) as ledger:
        balances = await _check_books(ledger)
        assert (balances[WORKFLOW].reserved, balances[WORKFLOW].remaining) == (40 * E, 0)
        assert (balances[TENANT].reserved, balances[TENANT].remaining) == (40 * E, 60 * E)
        events, reservations = await _log(ledger)
        _assert_log_matches(events, reservations, allowed, len(denied))
        assert all(r.budgeted_scopes == [TENANT, WORKFLOW] for r in reservations.values())


async def test_nested_scopes_with_a_sibling_the_tenant_admits_exactly_its_count(durable_url: str) -> None:
    """Half the tasks at workflow w (40), half at unbudgeted sibling v, tenant 120: exactly 120 ALLOWs."""
    url = durable_url
    await _setup(url, {TENANT: 120 * E, WORKFLOW: 40 * E})
    plans = _plans(random.Random(4), lambda p, t: {"subject": SUBJECT_W if p % 2 else SUBJECT_V, "estimate": E})
    outcomes = await asyncio.to_thread(_run_processes, url, plans)

    allowed, denied = _split(outcomes)
    at_w = [o for o in allowed if o["subject"] == SUBJECT_W]
    # v-requests (100 of them) are stopped only by the tenant, so the tenant must fill: 120 exactly.
    assert len(allowed) == 120
    assert 20 <= len(at_w) <= 40
    assert all(o["reason_code"] == "BUDGET_EXCEEDED" for o in denied)
    assert {o["scope"] for o in denied if o["subject"] == SUBJECT_V} <= {TENANT}
    async with open_ledger(url) as ledger:
        balances = await _check_books(ledger)
        assert (balances[TENANT].reserved, balances[TENANT].remaining) == (120 * E, 0)
        assert balances[WORKFLOW].reserved == len(at_w) * E
        events, reservations = await _log(ledger)
        _assert_log_matches(events, reservations, allowed, len(denied))


@pytest.mark.parametrize("policy", [OveragePolicy.REJECT, OveragePolicy.ALLOW_IF_AVAILABLE])
async def test_reserve_then_commit_random_actuals_reconciles_with_the_event_log(
    durable_url: str, policy: OveragePolicy
) -> None:
    """Racing reserve→commit with random actuals (some over) keeps spent<=allocated, 0 reserved, log == books."""
    url = durable_url
    rng = random.Random(5 if policy is OveragePolicy.REJECT else 6)

    def make(p: int, t: int) -> dict[str, Any]:
        est = rng.randint(1, 20) * 100_000
        over = rng.random() < 0.3
        actual = rng.randint(est + 1, 2 * est) if over else rng.randint(0, est)
        return {"subject": SUBJECT_W if t % 2 else SUBJECT_T, "estimate": est, "actual": actual, "policy": policy}

    plans = _plans(rng, make)
    items = [item for plan in plans for item in plan]

    def floor_charge(item: dict[str, Any]) -> int:  # the least this item is charged if it is allowed
        if item["actual"] <= item["estimate"]:
            return int(item["actual"])
        return 0 if policy is OveragePolicy.REJECT else int(item["estimate"])

    # Half of what admitting everyone would cost at least: DENYs are certain on both scopes' demand.
    budgets = {
        TENANT: sum(map(floor_charge, items)) // 2,
        WORKFLOW: sum(floor_charge(i) for i in items if i["subject"] == SUBJECT_W) // 2,
    }
    await _setup(url, budgets)
    outcomes = await asyncio.to_thread(_run_processes, url, plans)

    allowed, denied = _split(outcomes)
    assert allowed
    assert any(o["subject"] == SUBJECT_W for o in denied)
    committed = [o for o in allowed if "charged" in o]
    rejected = [o for o in allowed if o.get("rejected")]
    assert len(committed) + len(rejected) == len(allowed)
    if policy is OveragePolicy.REJECT:
        # Every overage is refused (and released); everything else is charged exactly.
        assert rejected == [o for o in allowed if o["actual"] > o["estimate"]]
        assert all(o["charged"] == o["actual"] for o in committed)
        assert all(o["released"] == o["estimate"] for o in rejected)
        assert {o["reason_code"] for o in denied} == {"BUDGET_EXCEEDED"}
    else:
        # Overages are charged as far as the tightest scope can pay; a shortfall marks a scope over-limit.
        assert not rejected
        for o in committed:
            if o["actual"] <= o["estimate"]:
                assert o["charged"] == o["actual"]
            else:
                assert o["estimate"] <= o["charged"] <= o["actual"]
        assert {o["reason_code"] for o in denied} <= {"BUDGET_EXCEEDED", "OVERDRAFT_LIMIT_EXCEEDED"}
    assert any(o["actual"] > o["estimate"] for o in allowed), "the plan must exercise overages"

    async with open_ledger(url) as ledger:
        balances = await _check_books(ledger)
        events, reservations = await _log(ledger)
        kinds = _assert_log_matches(events, reservations, allowed, len(denied))
        assert kinds["committed"] == len(committed)
        assert kinds["released"] == len(rejected)
        short = [o for o in committed if o["charged"] < o["actual"]]
        assert (kinds["over_limit"] > 0) == bool(short)
        if policy is OveragePolicy.ALLOW_IF_AVAILABLE:
            flagged = {e.scope for e in events if e.type == "over_limit"}
            assert flagged == {s for s, b in balances.items() if b.is_over_limit}

        for scope, b in balances.items():
            assert b.reserved == 0, scope
            assert b.debt == 0, scope
            assert b.spent <= b.allocated, scope
            # The log: committed amounts over the reservations that held this scope = spent + debt.
            from_log = sum(
                e.amount or 0
                for e in events
                if e.type == "committed" and scope in reservations[str(e.reservation_id)].budgeted_scopes
            )
            assert from_log == b.spent + b.debt, scope
            # The workers' own answers add up to the same number.
            from_workers = sum(
                o["charged"] for o in committed if scope in reservations[o["reservation_id"]].budgeted_scopes
            )
            assert from_workers == b.spent, scope
        for o in committed:
            r = reservations[o["reservation_id"]]
            assert r.status is ReservationStatus.COMMITTED
            assert r.committed is not None and r.committed.amount == o["charged"]
        for o in rejected:
            assert reservations[o["reservation_id"]].status is ReservationStatus.RELEASED
        for r in reservations.values():
            assert r.budgeted_scopes == ([TENANT] if r.scope_path == TENANT else [TENANT, WORKFLOW])


@pytest.mark.parametrize(("start_method", "keys"), [("spawn", "auto"), ("fork", "auto"), ("fork", "explicit")])
async def test_workers_in_the_same_millisecond_get_their_own_reservations(
    durable_url: str, start_method: str, keys: str
) -> None:
    """Processes reserving in the same ms (spawned, or forked after import) get 200 distinct holds and charges."""
    # fork (Linux's default start method in 3.11, Celery prefork, gunicorn --preload) copies every module-level
    # value of the parent, including whatever is meant to make keys and ids unique per process. All workers'
    # store clocks are frozen at one millisecond, which real processes hit by chance; here it is certain.
    url = durable_url
    await _setup(url, {TENANT: 1_000 * E})
    rng = random.Random(7)
    plans = _plans(
        rng,
        lambda p, t: {
            "subject": SUBJECT_T,
            "estimate": E,
            "actual": E // 2,
            "key": f"k-{p}-{t}-{rng.getrandbits(64):x}" if keys == "explicit" else None,
        },
    )
    now_ms = time.time_ns() // 1_000_000
    if start_method == "fork":
        # Fork from the loop's own thread: children forked from an executor thread exit with code 1 after
        # their target returns (CPython 3.11), which would hide what this test is about.
        outcomes = _run_processes(url, plans, "fork", now_ms)
    else:
        outcomes = await asyncio.to_thread(_run_processes, url, plans, "spawn", now_ms)

    allowed, denied = _split(outcomes)
    assert (len(allowed), len(denied)) == (PROCS * TASKS, 0)
    assert len({o["reservation_id"] for o in allowed}) == PROCS * TASKS
    async with open_ledger(url) as ledger:
        t = (await _check_books(ledger))[TENANT]
        assert (t.reserved, t.spent) == (0, PROCS * TASKS * (E // 2))
        events, reservations = await _log(ledger)
        kinds = _assert_log_matches(events, reservations, allowed, 0)
        assert kinds["committed"] == PROCS * TASKS
