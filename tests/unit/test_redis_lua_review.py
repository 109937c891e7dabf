"""Randomised differential check of the Redis scripts' batching against the SQLite store.

The Redis scripts run each tick's calls of one kind as one script call, reading the budgets and
reservations hashes through a per-call cache (decoded budgets changed in place, record texts spliced,
writes made once at the end). Here seeded random ticks of every operation (budget changes, reserves with
reused idempotency keys, dry runs, soft landing and caps, commits, releases and extensions of the same
hold several times in a tick, events, sweeps, time moving past ttl and grace) go to a Redis ledger with
asyncio.gather, and the same calls go one at a time, in the order the Redis store ran them, to a SQLite
ledger. Every answer (error type or result, ids renamed in order of appearance) and the final books
must agree.

Left out on purpose, as older, known differences of the stores rather than of the batching: amounts past
2^53 - 1 (the Redis store refuses them), more than one top-level scope (SQLite's lazy expiry of overdue
holds spans every tenant, Redis's one hash tag) and sweeps with a small limit (SQLite adds its lazy pass).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from cycles_ledger import open_ledger
from tests.conftest import FakeClock, RedisTarget
from tests.support.script_calls import count_script_calls

pytestmark = pytest.mark.redis

ACTION = {"kind": "llm.completion", "name": "m"}
SUBJECTS = [
    {"tenant": "a"},
    {"tenant": "a", "workspace": "w"},
    {"tenant": "a", "workspace": "w", "app": "x"},
    {"tenant": "a", "app": "y"},
    {"tenant": "a", "workspace": "v"},
]
SCOPES = ["tenant:a", "tenant:a/workspace:w", "tenant:a/workspace:w/app:x", "tenant:a/app:y"]
KEYS = ["k1", "k2", "k3", "k4"]
POLICIES = ["REJECT", "ALLOW_IF_AVAILABLE", "ALLOW_WITH_OVERDRAFT", "RECORD_ALL"]
UNKNOWN = "rsv_" + "0" * 26 + "@tenant:a"
SCRIPT = {"set": "budget", "fund": "budget", "freeze": "budget", "unfreeze": "budget", "close": "budget"}


def _amount(rng: random.Random, unit: str | None = None) -> str:
    n = rng.choice([0, 1, 5, 10, 20, 50, 100, 150, 300, rng.randint(0, 400)])
    return f"{n}{unit or rng.choice(['credits', 'credits', 'credits', 'tokens'])}"


def _time_policy(rng: random.Random, scope: str, unit: str) -> dict[str, Any]:
    """Periods, rate limits and alerts for a budget change (period ends differ by scope: the sweeps of SQLite
    and Redis order budgets whose periods end together differently)."""
    anchor = SCOPES.index(scope) * 7 + 1
    return {
        "period": rng.choice(
            [None, None, {}, {"every": "5s", "anchor_ms": anchor}, {"every": "1m", "anchor_ms": anchor}]
        ),
        "rate_limits": rng.choice(
            [
                None,
                None,
                [],
                [{"amount": f"300{unit}", "window": "2s"}],
                [{"amount": f"500{unit}", "window": "10s"}],
                [{"amount": f"200{unit}", "window": "1s", "on_exceed": "freeze"}],
            ]
        ),
        "alerts": rng.choice([None, None, [], [50, 100], [10, 80]]),
    }


def _op(rng: random.Random, kind: str, timed: bool = False) -> tuple[Any, ...]:
    if kind == "reserve":
        soft = None
        if rng.random() < 0.2:
            soft = {"min_amount": rng.choice([0, 1, 10]), "fixed_amount": rng.choice([0, 3])}
            if rng.random() < 0.5:
                soft["amount_per_million_tokens"] = rng.choice([1, 7, 1000])
        return (
            "reserve",
            rng.randrange(len(SUBJECTS)),
            _amount(rng),
            rng.choice([1000, 2000, 60000, 60000, 60000]),
            rng.choice([0, 0, 500]),
            rng.choice(POLICIES),
            rng.choice([None, None, None, None, None, None, *KEYS]),
            rng.random() < 0.1,
            rng.choice([None, None, {"m": 1}]),
            soft,
        )
    if kind == "decide":
        return ("decide", rng.randrange(len(SUBJECTS)), _amount(rng))
    if kind == "commit":
        unit = "credits" if rng.random() < 0.9 else "tokens"
        metrics = rng.choice([None, None, {"t": 2}])
        return ("commit", rng.randrange(1000), _amount(rng, unit), rng.choice([None] * 5 + KEYS), metrics)
    if kind == "release":
        return ("release", rng.randrange(1000), rng.choice([None, "why"]), rng.choice([None, None, *KEYS]))
    if kind == "extend":
        return ("extend", rng.randrange(1000), rng.choice([1000, 5000]), rng.choice([None, None, *KEYS]))
    if kind == "event":
        key = rng.choice([None] * 4 + KEYS)
        return ("event", rng.randrange(len(SUBJECTS)), _amount(rng), rng.choice(POLICIES), key)
    if kind == "sweep":
        return ("sweep",)
    ops = ["set", "set", "set", "fund", "fund", "freeze", "unfreeze"] if timed else ["set", "set", "fund", "fund"]
    op = rng.choice(ops if timed else [*ops, "freeze", "unfreeze", "close"])
    scope, unit = rng.choice(SCOPES), "tokens" if rng.random() < 0.3 else "credits"
    if op == "set":
        caps = rng.choice([None, None, {}, {"max_tokens": 100, "tool_denylist": ["x"]}, {"cooldown_ms": 5}])
        overdraft = rng.choice([None, None, 0, 50, 10_000])
        timing = _time_policy(rng, scope, unit) if timed else {}
        return ("set", scope, f"{rng.choice([0, 50, 100, 500, 1000])}{unit}", overdraft, caps, timing)
    if op == "fund":
        return ("fund", scope, f"{rng.choice([1, 30, 200])}{unit}")
    return (op, scope, unit.upper())


def _plan(seed: int, ticks: int, timed: bool = False) -> tuple[dict[str, Any], list[tuple[int, list[tuple[Any, ...]]]]]:
    rng = random.Random(seed)
    settings = {"max_extensions": rng.choice([None, 1, 2]), "allow_unbudgeted": rng.random() < 0.3}
    kinds = ["reserve", "reserve", "commit", "commit", "release", "extend", "event", "budget", "decide", "sweep"]
    plan = []
    for _ in range(ticks):
        tick = [
            _op(rng, kind, timed)
            for kind in rng.choices(kinds, k=rng.choice([1, 1, 2, 3]))
            for _ in range(rng.choice([1, 2, 3, 5, 8]))
        ]
        tick += [rng.choice(tick) for _ in range(rng.choice([0, 0, 1, 2]))]  # the same request twice in a tick
        rng.shuffle(tick)
        plan.append((rng.choice([0, 0, 0, 0, 0, 0, 0, 300, 700, 1500, 3000, 70_000]), tick))
    return settings, plan


def _call(led: Any, op: tuple[Any, ...], rid: str | None) -> Any:
    k = op[0]
    if k == "reserve":
        _, s, est, ttl, grace, policy, key, dry, meta, soft = op
        return led.reserve(
            SUBJECTS[s],
            ACTION,
            est,
            ttl_ms=ttl,
            grace_period_ms=grace,
            overage_policy=policy,
            idempotency_key=key,
            dry_run=dry,
            metadata=meta,
            soft_landing=soft,
        )
    if k == "decide":
        return led.decide(SUBJECTS[op[1]], ACTION, op[2])
    if k == "commit":
        return led.commit(rid, op[2], idempotency_key=op[3], metrics=op[4])
    if k == "release":
        return led.release(rid, reason=op[2], idempotency_key=op[3])
    if k == "extend":
        return led.extend(rid, op[2], idempotency_key=op[3])
    if k == "event":
        return led.record_event(SUBJECTS[op[1]], ACTION, op[2], overage_policy=op[3], idempotency_key=op[4])
    if k == "sweep":
        return led.sweep(1000)
    if k == "set":
        return led.set_budget(op[1], op[2], overdraft_limit=op[3], caps=op[4], **op[5])
    if k == "fund":
        return led.fund(op[1], op[2])
    return getattr(led, k)(op[1], op[2])


def _seen(result: Any, names: dict[str, str]) -> Any:
    if isinstance(result, BaseException):
        return type(result).__name__
    if isinstance(result, int):
        return result
    body = result.model_dump(mode="json")
    body.pop("event_id", None)
    rid = body.pop("reservation_id", None)
    if rid is not None:
        body["rid"] = names.setdefault(rid, f"R{len(names)}")
    return body


async def _drive(
    led: Any, plan: list[Any], clock: FakeClock, orders: list[list[int]], *, gather: bool, timed: bool = False
) -> tuple[list[Any], list[Any]]:
    """Run `plan`: with `gather` (Redis) each tick's calls at once, appending to `orders` the order the store
    runs them in (one script call per kind, kinds in order of their first call); else one call at a time, in
    the order `orders` gives. Returns what each call saw, and the books at the end."""
    live: list[str] = []
    names: dict[str, str] = {}
    out: list[Any] = []
    if timed:
        await led.set_budget(
            "tenant:a",
            "1000credits",
            overdraft_limit=100,
            period={"every": "5s"},
            rate_limits=[{"amount": "400credits", "window": "2s"}],
            alerts=[50, 90],
        )
        await led.set_budget(
            "tenant:a/workspace:w", "400credits", rate_limits=[{"amount": "300credits", "window": "2s"}]
        )
        await led.set_budget("tenant:a", "1000tokens", rate_limits=[{"amount": "400tokens", "window": "3s"}])
    else:
        await led.set_budget("tenant:a", "1000credits", overdraft_limit=100)
        await led.set_budget("tenant:a/workspace:w", "400credits")
        await led.set_budget("tenant:a", "1000tokens")
    for n, (advance, tick) in enumerate(plan):
        clock.advance(advance)
        rids = [
            (live[-1 - (op[1] // 10) % min(len(live), 6)] if op[1] % 10 and live else UNKNOWN)
            if op[0] in ("commit", "release", "extend")
            else None
            for op in tick
        ]
        if gather:
            groups: dict[str, list[int]] = {}
            for i, op in enumerate(tick):
                groups.setdefault(SCRIPT.get(op[0], op[0]), []).append(i)
            order = [i for g in groups.values() for i in g]
            done = await asyncio.gather(
                *(_call(led, op, rid) for op, rid in zip(tick, rids, strict=True)), return_exceptions=True
            )
            results = [done[i] for i in order]
            orders.append(order)
        else:
            order, results = orders[n], []
            for i in order:
                try:
                    results.append(await _call(led, tick[i], rids[i]))
                except Exception as exc:  # noqa: BLE001 - compared below
                    results.append(exc)
        for r in results:
            rid = getattr(r, "reservation_id", None)
            if rid and getattr(r, "decision", None) is not None and str(rid) not in live:
                live.append(str(rid))
        out.append([(tick[i][0], _seen(r, names)) for i, r in zip(order, results, strict=True)])
    books = sorted(
        (b.scope, b.unit.value, b.allocated, b.spent, b.reserved, b.debt, b.is_over_limit, b.status.value)
        for b in await led.balances()
    )
    held = await led.list_reservations(limit=10_000)
    statuses = sorted((names.get(str(r.reservation_id), "?"), r.status.value) for r in held)
    assert await led.verify() == []
    return out, [books, statuses]


@pytest.mark.parametrize("timed", [False, True], ids=["plain", "timed"])
@pytest.mark.parametrize("sweep", [64, 0])
@pytest.mark.parametrize("seed", range(8))
async def test_batched_redis_answers_like_sqlite_one_call_at_a_time(
    redis_server: RedisTarget, tmp_path: Path, seed: int, sweep: int, timed: bool
) -> None:
    """`sweep` overdue holds are expired before each write (0: only when a reserve does not fit, when a
    settlement finds its hold overdue, and by the sweeps). `timed`: budgets with periods, rate limits (the
    window sums changed by several operations of one script call) and alerts."""
    settings, plan = _plan(seed, 40, timed)
    orders: list[list[int]] = []
    clock = FakeClock()
    async with open_ledger(redis_server.url(sweep_per_call=sweep), clock=clock, **settings) as led:
        store: Any = led.store
        await store._register("tenant:a", always=True)
        # Every script loaded first: a tick whose pipeline meets NOSCRIPT for some of its script calls runs
        # those again after the others, a valid order for concurrent calls but not the one compared here.
        with redis_server.client() as client:
            for source in store._sources.values():
                client.script_load(source)

        async def registered(tag: str, *, always: bool = False) -> None:
            return None  # the tag is known: skip the round trip that would split a tick

        async def tags(scope_prefix: str | None = None) -> list[str]:
            return ["tenant:a"]  # likewise for the sweep's listing of tags

        store._register, store._tags = registered, tags
        sizes = count_script_calls(store)
        redis_out, redis_books = await _drive(led, plan, clock, orders, gather=True, timed=timed)
    clock = FakeClock()
    async with open_ledger(
        f"sqlite:///{tmp_path / 'ledger.db'}", clock=clock, sweep_per_batch=sweep, **settings
    ) as led:
        sqlite_out, sqlite_books = await _drive(led, plan, clock, orders, gather=False, timed=timed)
    assert max(sizes) > 3  # batches of several operations did run (operations per script call)
    for n, (r, s) in enumerate(zip(redis_out, sqlite_out, strict=True)):
        assert r == s, f"tick {n}: {plan[n]}"
    assert redis_books == sqlite_books
