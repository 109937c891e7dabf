"""Rule vectors: the Lua copy of the ledger's rules (`stores/redis.lua`) answers exactly like the Python
engine (`operations.py` + `rules.py`, run by the memory:// store).

A vector is a sequence of store commands (budget set / fund / freeze / unfreeze / close, reserve and
decide with and without holds in other units, soft landing, dry runs, commits under every overage
policy, releases, extensions, direct debits, notes, sweeps, the clock moved past expiry and grace,
replayed and mismatched idempotency keys, unit mismatches, unknown reservations; and time: periods fixed
and calendar (time zones, daylight-saving days, month ends, the clock jumping across boundaries, months
past the stored calendar boundaries, and back), rate limits that throttle or freeze (and their burn-rate
alerts), alerts, debt). Each one is run through the memory store, the reference, and through the Redis
store on a real redis-server, both on one hand-moved clock. After every command both must give the same
answer (or the same error: code, message and details), the same balances and the same new events; at the
end the same reservations,
and `verify()` finds nothing on either. The vectors are a few named ones (one rule each) and seeded
random sequences, with and without time policies.

Normalized, because they legitimately differ: reservation ids (each store mints its own; a Redis one
names its hash tag) become R0, R1, … in order of first appearance, in messages too; event ids (the memory
store counts them, Redis derives them from stream ids) become their position in the log.

Left out, as differences of the stores rather than of the rules: amounts past 2^53 - 1 (the Redis store
refuses them), more than one tenant (the memory store's lazy expiry spans every tenant, Redis's one hash
tag), sweeps with a limit below the lazy pass (the memory store adds its lazy pass to the count). The Redis
side keeps finished reservations as long as the memory store does (its retention is set past the jumps).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from cycles_ledger.errors import CyclesError
from cycles_ledger.stores.base import (
    BudgetCommand,
    CommitCommand,
    EventCommand,
    ExtendCommand,
    NoteCommand,
    ReleaseCommand,
    ReserveCommand,
    Store,
    SupportsSweep,
)
from cycles_ledger.stores.memory import MemoryStore
from cycles_ledger.stores.redis import RedisStore
from tests.conftest import FakeClock, RedisTarget

pytestmark = pytest.mark.redis

ACTION = {"kind": "llm.completion", "name": "m"}
SUBJECTS: list[tuple[dict[str, str], list[str]]] = [
    ({"tenant": "t"}, ["tenant:t"]),
    ({"tenant": "t", "workspace": "w"}, ["tenant:t", "tenant:t/workspace:w"]),
    (
        {"tenant": "t", "workspace": "w", "agent": "a"},
        ["tenant:t", "tenant:t/workspace:w", "tenant:t/workspace:w/agent:a"],
    ),
    ({"tenant": "t", "app": "y"}, ["tenant:t", "tenant:t/app:y"]),
    ({"tenant": "t", "workspace": "v"}, ["tenant:t", "tenant:t/workspace:v"]),
]
SCOPES = ["tenant:t", "tenant:t/workspace:w", "tenant:t/workspace:w/agent:a", "tenant:t/app:y"]
UNITS = ["USD_MICROCENTS", "TOKENS", "CREDITS"]
POLICIES = ["REJECT", "ALLOW_IF_AVAILABLE", "ALLOW_WITH_OVERDRAFT", "RECORD_ALL"]
UNKNOWN = "rsv_" + "0" * 26 + "@tenant:t"  # one of the Redis store's ids, of no reservation
Step = tuple[Any, ...]


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# --- commands from steps ------------------------------------------------------------------------------


@dataclass
class Side:
    """One store under test and what its ids are called."""

    store: Store
    rids: list[str] = field(default_factory=list)  # in order of first appearance
    names: dict[str, str] = field(default_factory=dict)  # reservation id -> R<n>
    event_pos: dict[int, int] = field(default_factory=dict)  # event id -> position in the log
    last_event: int = 0

    def rid(self, ref: int | None) -> str:
        if ref is None or not self.rids:
            return UNKNOWN
        return self.rids[-1 - ref % min(len(self.rids), 6)]

    def name(self, rid: str) -> str:
        if rid not in self.names:
            self.names[rid] = f"R{len(self.names)}"
            self.rids.append(rid)
        return self.names[rid]


def _reserve_cmd(step: Step, n: int) -> ReserveCommand:
    _, subj, unit, estimate, also, ttl, grace, policy, key, dry, soft, meta, unbudgeted = step
    subject, scopes = SUBJECTS[subj]
    if key is None:
        key, payload_hash = f"fresh-{n}", ""  # a key the ledger minted: never replayed
    else:
        payload_hash = _hash(subj, unit, estimate, also, ttl, grace, policy, dry, soft, meta)
    return ReserveCommand(
        idempotency_key=key,
        payload_hash=payload_hash,
        subject=subject,
        action=ACTION,
        scopes=scopes,
        unit=unit,
        estimate=estimate,
        ttl_ms=ttl,
        grace_period_ms=grace,
        overage_policy=policy,
        dry_run=dry,
        allow_unbudgeted=unbudgeted,
        metadata=meta,
        soft_landing=soft,
        also=tuple(also),
    )


async def _run(side: Side, step: Step, n: int) -> Any:
    store, kind = side.store, step[0]
    if kind == "reserve":
        return await store.reserve(_reserve_cmd(step, n))
    if kind == "decide":
        return await store.decide(_reserve_cmd(step, n))
    if kind == "commit":
        _, ref, unit, actual, also, key, metrics = step
        rid = side.rid(ref)
        h = _hash(unit, actual, also, metrics)
        commit = CommitCommand(rid, key or f"commit:{ref}", h, unit, actual, metrics, None, tuple(also))
        return await store.commit(commit)
    if kind == "release":
        _, ref, reason, key = step
        return await store.release(ReleaseCommand(side.rid(ref), key or f"release:{ref}", _hash(reason), reason))
    if kind == "extend":
        _, ref, by, max_ext, key = step
        return await store.extend(ExtendCommand(side.rid(ref), key or f"extend-{n}", _hash(by), by, max_ext))
    if kind == "event":
        _, subj, unit, actual, also, policy, key, unbudgeted, metrics = step
        subject, scopes = SUBJECTS[subj]
        h = _hash(subj, unit, actual, also, policy, metrics)
        cmd = EventCommand(
            key or f"event-{n}",
            h,
            subject,
            ACTION,
            scopes,
            unit,
            actual,
            policy,
            unbudgeted,
            metrics,
            None,
            tuple(also),
        )
        return await store.record_event(cmd)
    if kind == "note":
        return await store.note(NoteCommand(step[1], step[2], step[3], step[4]))
    if kind == "sweep":
        assert isinstance(store, SupportsSweep)
        return await store.expire_due(step[1])
    # budget changes: ("set", scope, unit, amount, overdraft, caps[, period, rate limits, alerts]),
    # ("fund", scope, unit, amount), (op, scope, unit)
    op, scope, unit, *rest = step
    amount, overdraft, caps, period, limits, alerts = [*rest, None, None, None, None, None, None][:6]
    return await store.change_budget(BudgetCommand(op, scope, unit, amount, overdraft, caps, period, limits, alerts))


# --- normalizing ----------------------------------------------------------------------------------------


def _names(side: Side, value: Any) -> Any:
    """`value` with reservation ids renamed (in strings too) and event ids as log positions."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k == "event_id" and isinstance(v, int):
                out[k] = side.event_pos.get(v, f"?{v}")
            else:
                out[k] = _names(side, v)
        return out
    if isinstance(value, list):
        return [_names(side, v) for v in value]
    if isinstance(value, str):
        for rid, name in side.names.items():
            value = value.replace(rid, name)
        return value
    return value


async def _outcome(side: Side, step: Step, n: int) -> Any:
    try:
        result = await _run(side, step, n)
    except CyclesError as exc:
        result = {"raised": type(exc).__name__, **exc.to_dict()}
    if isinstance(result, dict) and isinstance(result.get("reservation_id"), str) and result.get("decision"):
        side.name(result["reservation_id"])
    new = await side.store.events(after=side.last_event, limit=100_000)
    for e in new:
        side.event_pos[e["event_id"]] = len(side.event_pos)
        side.last_event = e["event_id"]
        if e["reservation_id"]:
            side.name(e["reservation_id"])
    if isinstance(result, int) and step[0] == "note":
        result = side.event_pos.get(result, f"?{result}")
    balances = await side.store.balances()
    return _names(side, {"answer": result, "balances": balances, "events": new})


async def _books(side: Side) -> Any:
    found = await side.store.list_reservations(limit=100_000)
    one = [await side.store.get_reservation(rid) for rid in side.rids]
    assert isinstance(side.store, SupportsSweep)
    return _names(side, {"listed": found, "each": one, "verify": await side.store.verify()})


@pytest.fixture
async def sides(redis_server: RedisTarget) -> AsyncIterator[tuple[Side, Side, FakeClock]]:
    clock = FakeClock()
    memory = MemoryStore(clock=clock)
    # Finalized reservations are kept as long as the memory store keeps them (the vectors jump years ahead).
    redis = RedisStore.from_url(redis_server.url(), clock=clock, retention_ms=100 * 365 * 86_400_000)
    try:
        yield Side(memory), Side(redis), clock
    finally:
        await memory.aclose()
        await redis.aclose()


def _differences(got: Any, want: Any, path: str = "") -> list[str]:
    """Where two normalized outcomes differ, one line per leaf: the failure message."""
    if isinstance(got, dict) and isinstance(want, dict):
        out = []
        for k in sorted(set(got) | set(want), key=str):
            if k not in got or k not in want:
                out.append(f"{path}.{k}: lua {got.get(k, '<absent>')!r} python {want.get(k, '<absent>')!r}")
            else:
                out += _differences(got[k], want[k], f"{path}.{k}")
        return out
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        return [d for i, (g, w) in enumerate(zip(got, want, strict=True)) for d in _differences(g, w, f"{path}[{i}]")]
    return [] if got == want else [f"{path}: lua {got!r} python {want!r}"]


async def _agree(sides: tuple[Side, Side, FakeClock], steps: list[Step]) -> None:
    python, lua, clock = sides
    for n, step in enumerate(steps):
        if step[0] == "advance":
            clock.advance(step[1])
            continue
        if step[0] == "at":
            clock.now = step[1]
            continue
        want = await _outcome(python, step, n)
        got = await _outcome(lua, step, n)
        assert got == want, f"step {n}: {step}\n" + "\n".join(_differences(got, want))
    want_books, got_books = await _books(python), await _books(lua)
    assert want_books["verify"] == [] and got_books["verify"] == []
    assert got_books == want_books, "\n".join(_differences(got_books, want_books))


# --- named vectors: one rule each ------------------------------------------------------------------------

TOP, WS, AGENT = "tenant:t", "tenant:t/workspace:w", "tenant:t/workspace:w/agent:a"
USD, TOK, CR = "USD_MICROCENTS", "TOKENS", "CREDITS"


def _res(
    subj: int,
    unit: str,
    est: int,
    *,
    also: tuple[tuple[str, int], ...] = (),
    ttl: int = 60_000,
    grace: int = 0,
    policy: str = "ALLOW_IF_AVAILABLE",
    key: str | None = None,
    dry: bool = False,
    soft: dict[str, int] | None = None,
    unbudgeted: bool = False,
) -> Step:
    return ("reserve", subj, unit, est, also, ttl, grace, policy, key, dry, soft, None, unbudgeted)


def _dec(subj: int, unit: str, est: int, *, also: tuple[tuple[str, int], ...] = ()) -> Step:
    return ("decide", subj, unit, est, also, 60_000, 0, "ALLOW_IF_AVAILABLE", None, False, None, None, False)


def _com(ref: int, unit: str, actual: int, *, also: tuple[tuple[str, int], ...] = (), key: str | None = None) -> Step:
    return ("commit", ref, unit, actual, also, key, None)


def _evt(
    subj: int,
    unit: str,
    actual: int,
    *,
    also: tuple[tuple[str, int], ...] = (),
    policy: str = "ALLOW_IF_AVAILABLE",
    key: str | None = None,
    unbudgeted: bool = False,
) -> Step:
    return ("event", subj, unit, actual, also, policy, key, unbudgeted, None)


NAMED: dict[str, list[Step]] = {
    "no budget at all is BUDGET_NOT_FOUND; another unit only is UNIT_MISMATCH": [
        _res(2, USD, 10),
        _dec(2, USD, 10),
        _evt(2, USD, 10),
        ("set", AGENT, TOK, 100, None, None),
        _res(2, USD, 10),
        _res(2, USD, 10, also=((CR, 5),)),
        _evt(2, USD, 10, also=((CR, 5),)),
        _res(2, USD, 10, unbudgeted=True),
    ],
    "a hold in another unit that does not fit denies all, naming that unit": [
        ("set", TOP, USD, 1000, None, None),
        ("set", AGENT, TOK, 100, None, None),
        _res(2, USD, 10, also=((TOK, 101),)),
        _dec(2, USD, 10, also=((TOK, 101),)),
        _res(2, USD, 10, also=((TOK, 100),), dry=True),
        _res(2, USD, 10, also=((TOK, 60), (CR, 5))),
        _res(2, USD, 2000, also=((TOK, 10),)),
        ("freeze", AGENT, TOK),
        _res(2, USD, 10, also=((TOK, 1),)),
    ],
    "a subject with only tokens is budgeted through also": [
        ("set", AGENT, TOK, 100, None, {"max_tokens": 7}),
        _res(2, USD, 10, also=((TOK, 40),)),
        _com(0, USD, 5, also=((TOK, 30),)),
        _res(2, USD, 10, also=((TOK, 40),)),
        ("release", 0, "done", None),
        ("release", 0, "done", None),
        _res(2, USD, 10, also=((TOK, 40),), ttl=1000),
        ("advance", 5000),
        ("extend", 0, 1000, None, None),
        ("sweep", 1000),
    ],
    "commit settles every unit, each under the policy; an unnamed one is charged its hold": [
        ("set", TOP, USD, 1000, 50, None),
        ("set", AGENT, TOK, 100, 10, None),
        ("set", WS, CR, 100, None, None),
        _res(2, USD, 100, also=((TOK, 50), (CR, 10)), policy="ALLOW_WITH_OVERDRAFT"),
        _com(0, USD, 120, also=((TOK, 70),)),
        _com(0, USD, 120, also=((TOK, 70),)),
        _com(0, USD, 120, also=((TOK, 71),)),
        _res(2, USD, 10, also=((TOK, 20),), policy="REJECT"),
        _com(0, USD, 5, also=((TOK, 21),)),
        _com(0, USD, 5, also=((TOK, 20),)),
        _res(2, USD, 10, also=((TOK, 5),), policy="RECORD_ALL"),
        _com(0, USD, 5, also=((TOK, 500),)),
        _com(0, TOK, 5),
    ],
    "overdraft: debt up to the limit, then refused; funding repays debt first": [
        ("set", TOP, USD, 100, 30, None),
        _res(0, USD, 100, policy="ALLOW_WITH_OVERDRAFT"),
        _com(0, USD, 120),
        _res(0, USD, 1),
        ("fund", TOP, USD, 10),
        _res(0, USD, 1, policy="ALLOW_WITH_OVERDRAFT"),
        ("fund", TOP, USD, 15),
        _res(0, USD, 5, policy="ALLOW_WITH_OVERDRAFT"),
        _com(0, USD, 100),
        ("set", TOP, USD, 100, 0, None),
        _res(0, USD, 1),
        ("set", TOP, USD, 500, 0, None),
        _res(0, USD, 10, policy="ALLOW_WITH_OVERDRAFT"),
        _com(0, USD, 20),
    ],
    "debits: all or nothing across units and scopes": [
        ("set", TOP, USD, 100, None, None),
        ("set", AGENT, TOK, 100, None, None),
        _evt(2, USD, 10, also=((TOK, 20), (CR, 3))),
        _evt(2, USD, 10, also=((TOK, 200),), policy="REJECT"),
        _evt(2, USD, 10, also=((TOK, 200),), policy="ALLOW_WITH_OVERDRAFT"),
        _evt(2, USD, 10, also=((TOK, 200),), policy="RECORD_ALL", key="e1"),
        _evt(2, USD, 10, also=((TOK, 200),), policy="RECORD_ALL", key="e1"),
        _evt(2, USD, 11, also=((TOK, 200),), policy="RECORD_ALL", key="e1"),
        ("freeze", AGENT, TOK),
        _evt(2, USD, 10, also=((TOK, 1),)),
        ("close", TOP, USD),
        _evt(2, USD, 10),
        ("unfreeze", TOP, USD),
        ("fund", TOP, USD, 5),
    ],
    "idempotent replays keep their first answer with today's balances": [
        ("set", TOP, USD, 1000, None, None),
        ("set", AGENT, TOK, 100, None, None),
        _res(2, USD, 10, also=((TOK, 5),), key="k"),
        _res(2, USD, 10, also=((TOK, 5),), key="k"),
        _res(2, USD, 10, also=((TOK, 6),), key="k"),
        ("extend", 0, 1000, None, "x"),
        ("extend", 0, 1000, None, "x"),
        ("extend", 0, 2000, None, "x"),
        _com(0, USD, 4, key="c"),
        ("advance", 100_000),
        _res(2, USD, 10, also=((TOK, 5),), key="k"),
        _com(0, USD, 4, key="c"),
        ("release", 0, None, "c"),
        _res(2, USD, 10, key="d", dry=True),
        _res(2, USD, 10, key="d", dry=True),
        _evt(2, USD, 1, key="e"),
        _evt(2, USD, 1, key="e"),
    ],
    "messages quote keys as Python's repr does": [
        ("set", TOP, USD, 1000, None, None),
        _res(0, USD, 10, key="it's"),
        _res(0, USD, 11, key="it's"),
        _res(0, USD, 10, key='say "hi"'),
        _res(0, USD, 11, key='say "hi"'),
        _res(0, USD, 10, key="both ' and \" \\ \n \t \x01 \x7f"),
        _res(0, USD, 11, key="both ' and \" \\ \n \t \x01 \x7f"),
        _com(0, USD, 4, key="c'"),
        _com(0, USD, 5, key="c'"),
    ],
    "expiry: grace, lazy expiry, extensions and their limit": [
        ("set", TOP, USD, 1000, None, None),
        ("set", TOP, TOK, 1000, None, None),
        _res(0, USD, 100, also=((TOK, 10),), ttl=1000, grace=500),
        ("extend", 0, 1000, 1, None),
        ("extend", 0, 1000, 1, None),
        ("advance", 2500),
        ("extend", 0, 1000, None, None),
        _com(0, USD, 50),
        _res(0, USD, 100, ttl=1000, grace=500),
        ("advance", 1600),
        _com(0, USD, 50),
        _com(0, USD, 50),
        ("release", 0, None, None),
        _res(0, USD, 100, ttl=1000),
        ("advance", 1001),
        _res(0, USD, 950),
        ("commit", None, USD, 1, (), None, None),
        ("extend", None, 1, None, None),
    ],
    "soft landing and caps": [
        ("set", TOP, USD, 1000, None, {"max_tokens": 500, "tool_denylist": ["a"]}),
        ("set", WS, USD, 300, None, {"max_tokens": 200, "tool_denylist": ["b"], "tool_allowlist": ["x", "y"]}),
        ("set", AGENT, TOK, 100, None, {"tool_allowlist": ["y", "z"], "cooldown_ms": 5}),
        _res(2, USD, 500, soft={"min_amount": 10, "fixed_amount": 3, "amount_per_million_tokens": 7}),
        _res(2, USD, 500, also=((TOK, 10),), soft={"min_amount": 10, "fixed_amount": 0}),
        _dec(2, USD, 10, also=((TOK, 10),)),
        _res(2, USD, 5000, soft={"min_amount": 10_000, "fixed_amount": 0}),
        ("note", "denied", WS, "PRICE_UNKNOWN", {"model": "m"}),
    ],
}


# --- time: periods, rate limits, alerts, debt ------------------------------------------------------------

DAY, HOUR, MIN = 86_400_000, 3_600_000, 60_000
PARIS_SAT_2330 = 1_806_186_600_000  # 2027-03-27 23:30 in Paris; the next day is 23 hours long (summer time)
PARIS_AUTUMN_2330 = 1_824_931_800_000  # 2027-10-30 23:30 in Paris; the next day is 25 hours long
NEW_YORK_FEB_END = 1_803_877_140_000  # 2027-02-28 23:59 in New York


def _every(ms: int, anchor: int = 0) -> dict[str, int]:
    return {"every_ms": ms, "anchor_ms": anchor}


def _cal(every: str, tz: str) -> dict[str, str]:
    return {"every": every, "tz": tz}


def _lim(amount: int, window_ms: int, *, freeze: bool = False, alert_at: int | None = None) -> dict[str, Any]:
    lim: dict[str, Any] = {"amount": amount, "window_ms": window_ms, "on_exceed": "freeze" if freeze else "throttle"}
    if alert_at is not None:
        lim["alert_at"] = alert_at
    return lim


def _set(
    scope: str,
    unit: str,
    amount: int,
    *,
    overdraft: int | None = None,
    caps: dict[str, Any] | None = None,
    period: dict[str, Any] | None = None,
    limits: list[dict[str, Any]] | None = None,
    alerts: list[int] | None = None,
) -> Step:
    return ("set", scope, unit, amount, overdraft, caps, period, limits, alerts)


TIMED: dict[str, list[Step]] = {
    "a period rolls over at the first write after its end; holds keep their amount, debt carries over": [
        _set(TOP, USD, 1000, overdraft=300, period=_every(10_000)),
        _set(TOP, TOK, 500, period=_every(4_000, 1_000)),
        _set(WS, USD, 800),
        _res(0, USD, 300),
        _com(0, USD, 300),
        _res(0, USD, 200, ttl=100_000),
        _res(0, USD, 400, policy="ALLOW_WITH_OVERDRAFT"),
        _com(0, USD, 600),
        ("advance", 10_000),
        _dec(1, USD, 10),
        ("note", "denied", TOP, "PRICE_UNKNOWN", None),
        _res(1, USD, 10),
        _res(1, USD, 10),
        ("fund", TOP, USD, 500),
        _res(1, USD, 10),
        ("advance", 35_000),
        _evt(1, USD, 5),
        _com(2, USD, 150),
        ("advance", 10_000),
        ("sweep", 1000),
        ("sweep", 1000),
        ("advance", 2_000),
        ("extend", 0, 1000, None, None),
        ("release", 0, None, None),
        _set(TOP, USD, 1000, period={}),
        ("advance", 20_000),
        _res(1, USD, 10, also=((TOK, 7),)),
        _set(TOP, USD, 1000, period=_every(7_000, 3)),
        _set(TOP, USD, 900, period=_every(7_000, 3)),
        ("advance", 7_000),
        ("close", TOP, USD),
        ("advance", 7_000),
        _set(TOP, USD, 5),
    ],
    "calendar periods: 23 and 25-hour days in Paris, a month in New York, a week in Tokyo": [
        ("at", PARIS_SAT_2330),
        _set(TOP, USD, 1000, period=_cal("daily", "Europe/Paris")),
        _set(WS, USD, 1000, period=_cal("monthly", "America/New_York")),
        _set(AGENT, USD, 1000, period=_cal("weekly", "Asia/Tokyo")),
        _set(AGENT, TOK, 1000, period=_cal("daily", "Europe/Paris")),
        _res(2, USD, 100, also=((TOK, 10),)),
        _com(0, USD, 100),
        ("advance", 30 * MIN),
        _res(2, USD, 100),
        ("advance", 1),
        _res(2, USD, 100),
        _com(0, USD, 90),
        ("advance", 23 * HOUR - 2),
        _evt(2, USD, 20),
        ("advance", 1),
        _evt(2, USD, 20),
        ("at", NEW_YORK_FEB_END + 32 * DAY),
        _evt(2, USD, 20),
        ("sweep", 1000),
        ("advance", 200 * DAY),
        _dec(2, USD, 10),
        _res(2, USD, 10),
        ("advance", 400 * DAY),
        ("sweep", 1000),
        ("at", PARIS_AUTUMN_2330),
        _set(TOP, USD, 1000, period=_cal("daily", "Europe/Paris")),
        _set(TOP, USD, 1000, period=_cal("weekly", "Europe/Paris")),
        _set(TOP, USD, 1000, period=_cal("daily", "Europe/Paris")),
        ("advance", 30 * MIN),
        _evt(0, USD, 1),
        ("advance", 25 * HOUR - 1),
        _evt(0, USD, 1),
        ("advance", 1),
        _evt(0, USD, 1),
    ],
    "rate limits: the window counts holds, then charges; releases and expiry leave it; retry_after_ms": [
        _set(TOP, USD, 100_000, limits=[_lim(100, 10_000)]),
        _set(WS, USD, 100_000, limits=[_lim(60, 3_000), _lim(150, 30_000)]),
        _res(1, USD, 40),
        ("advance", 1000),
        _res(1, USD, 15, ttl=1500),
        ("advance", 1000),
        _res(1, USD, 30),
        _dec(1, USD, 30),
        _res(1, USD, 30, dry=True, key="d"),
        _res(1, USD, 30, dry=True, key="d"),
        _com(1, USD, 10),
        _res(1, USD, 30),
        ("advance", 1000),
        _res(1, USD, 30),
        ("release", 0, "done", None),
        _res(1, USD, 30),
        _evt(1, USD, 45),
        _res(1, USD, 1),
        _res(1, USD, 200),
        _res(0, USD, 101),
        ("advance", 3000),
        _res(1, USD, 20, also=((TOK, 5),)),
        _com(0, USD, 25),
        ("advance", 30_000),
        _res(1, USD, 60),
        _res(1, USD, 1),
    ],
    "freeze: the breaker trips once, dry runs never trip it, a limit on another unit's budget names it": [
        _set(TOP, USD, 10_000, limits=[_lim(50, MIN, freeze=True)]),
        _set(AGENT, TOK, 10_000, limits=[_lim(100, MIN, freeze=True), _lim(1000, HOUR)]),
        _res(2, USD, 60, dry=True),
        _res(2, USD, 30, also=((TOK, 60),)),
        _res(2, USD, 10, also=((TOK, 60),)),
        _res(2, USD, 10),
        _res(2, USD, 10, also=((TOK, 1),)),
        _res(2, USD, 30),
        _res(2, USD, 1),
        _evt(2, USD, 5),
        ("unfreeze", TOP, USD),
        ("advance", MIN + 1),
        _res(2, USD, 1),
        ("unfreeze", AGENT, TOK),
        _evt(2, USD, 5, also=((TOK, 500),)),
        _res(2, USD, 1, also=((TOK, 1),)),
        ("advance", MIN),
        _res(2, USD, 1, also=((TOK, 1),)),
    ],
    "alerts fire once per period; a charge that makes debt is a debt event": [
        _set(TOP, USD, 1000, overdraft=500, period=_every(MIN), alerts=[50, 80, 100, 150]),
        _set(WS, USD, 200, alerts=[90, 200]),
        _res(1, USD, 100),
        _com(0, USD, 450),
        _evt(1, USD, 100),
        _evt(1, USD, 100),
        _res(1, USD, 100, policy="ALLOW_WITH_OVERDRAFT"),
        _com(0, USD, 600),
        _evt(1, USD, 1, policy="RECORD_ALL"),
        ("advance", MIN),
        ("fund", TOP, USD, 400),
        _evt(1, USD, 700, policy="RECORD_ALL"),
        _set(TOP, USD, 3000),
        _evt(1, USD, 1, policy="RECORD_ALL"),
        _set(TOP, USD, 3000, alerts=[]),
        _evt(1, USD, 2000, policy="RECORD_ALL"),
        _set(TOP, USD, 3000, alerts=[10]),
        _evt(1, USD, 1, policy="RECORD_ALL"),
        ("sweep", 1000),
        ("advance", MIN),
        ("sweep", 1000),
        _evt(1, USD, 1, policy="RECORD_ALL"),
    ],
    "burn-rate alerts: once per window length, again after it; not on a denial or a dry run; debits fire": [
        _set(TOP, USD, 100_000, limits=[_lim(100, 10_000, alert_at=80)]),
        _set(WS, USD, 100_000, limits=[_lim(60, 3_000), _lim(150, 30_000, alert_at=50)]),
        _set(AGENT, CR, 1000, limits=[_lim(50, MIN, freeze=True, alert_at=100)]),
        _res(1, USD, 50),
        _res(1, USD, 40, dry=True),
        ("advance", 3_000),
        _res(1, USD, 30),
        _res(1, USD, 10),
        _res(1, USD, 20),
        _evt(0, USD, 5),
        ("advance", 10_000),
        _evt(0, USD, 85),
        _res(1, USD, 1),
        ("release", 0, None, None),
        _set(TOP, USD, 100_000, limits=[_lim(100, 10_000, alert_at=90)]),
        _res(0, USD, 5),
        _set(TOP, USD, 100_000, limits=[_lim(100, 10_000, alert_at=90)]),
        _res(0, USD, 1),
        _evt(0, USD, 5, policy="RECORD_ALL"),
        _set(TOP, TOK, 1000, limits=[_lim(100, MIN, alert_at=10)]),
        _res(1, USD, 1, also=((TOK, 20),)),
        _com(0, USD, 3, also=((TOK, 90),)),
        _res(2, CR, 49),
        _res(2, CR, 1),
        _res(2, CR, 1),
        _set(WS, USD, 100_000, period=_every(MIN)),
        ("advance", MIN),
        _res(1, USD, 80),
        ("advance", 20_000),
        _res(1, USD, 1),
        ("advance", -5_000),
        _evt(1, USD, 100),
        _set(WS, USD, 100_000, limits=[_lim(60, 3_000), _lim(150, 30_000)]),
        _res(1, USD, 1),
        ("unfreeze", AGENT, CR),
        ("advance", MIN),
        _evt(2, CR, 60),
    ],
    "changed limits are summed again; removed limits keep the log; a clock that goes back": [
        _set(TOP, USD, 100_000, limits=[_lim(100, 10_000)]),
        _res(0, USD, 40),
        ("advance", 4_000),
        _evt(0, USD, 30),
        ("advance", 4_000),
        _set(TOP, USD, 100_000, limits=[_lim(50, 5_000), _lim(100, 10_000)]),
        _res(0, USD, 25),
        _set(TOP, USD, 100_000, limits=[]),
        _com(1, USD, 5),
        _res(0, USD, 500),
        ("advance", 1_000),
        _set(TOP, USD, 100_000, limits=[_lim(120, 10_000)]),
        _res(0, USD, 1),
        ("advance", -6_000),
        _res(0, USD, 1),
        _evt(0, USD, 1),
        ("advance", 16_000),
        _res(0, USD, 100),
        ("release", 0, None, None),
        _res(0, USD, 120),
        ("advance", 60_000),
        _evt(0, USD, 60),
        ("advance", 10_000),
        _evt(0, USD, 10),
        ("advance", -1),
        _res(0, USD, 85),
    ],
}


@pytest.mark.parametrize("name", list(NAMED) + list(TIMED))
async def test_named_vector(sides: tuple[Side, Side, FakeClock], name: str) -> None:
    """Each named rule answers alike in Python and in Lua."""
    await _agree(sides, NAMED.get(name) or TIMED[name])


# --- seeded random vectors ----------------------------------------------------------------------------


def _also(rng: random.Random, unit: str) -> tuple[tuple[str, int], ...]:
    if rng.random() < 0.6:
        return ()
    others = [u for u in UNITS if u != unit]
    rng.shuffle(others)
    return tuple((u, _amount(rng)) for u in others[: rng.choice([1, 1, 2])])


def _amount(rng: random.Random) -> int:
    return rng.choice([0, 1, 5, 10, 20, 50, 100, 150, 300, rng.randint(0, 400)])


def _unit(rng: random.Random) -> str:
    return rng.choice([USD, USD, USD, TOK, CR])


RES_KEYS = ["k1", "k2", "k3"]
SETTLE_KEYS = ["c1", "c2"]


def _step(rng: random.Random, kind: str) -> Step:
    if kind in ("reserve", "decide"):
        unit = _unit(rng)
        soft = None
        if rng.random() < 0.15:
            soft = {"min_amount": rng.choice([0, 1, 10]), "fixed_amount": rng.choice([0, 3])}
            if rng.random() < 0.5:
                soft["amount_per_million_tokens"] = rng.choice([1, 7, 1000])
        return (
            kind,
            rng.randrange(len(SUBJECTS)),
            unit,
            _amount(rng),
            _also(rng, unit),
            rng.choice([1000, 2000, 60_000, 60_000]),
            rng.choice([0, 0, 500]),
            rng.choice(POLICIES),
            rng.choice([None, None, None, *RES_KEYS]) if kind == "reserve" else None,
            kind == "reserve" and rng.random() < 0.1,
            soft,
            rng.choice([None, None, {"m": 1}]),
            rng.random() < 0.1,
        )
    if kind == "commit":
        unit = USD if rng.random() < 0.7 else _unit(rng)
        return (
            "commit",
            rng.randrange(1000),
            unit,
            _amount(rng),
            _also(rng, unit),
            rng.choice([None, None, None, *SETTLE_KEYS]),
            rng.choice([None, None, {"t": 2}]),
        )
    if kind == "release":
        return ("release", rng.randrange(1000), rng.choice([None, "why"]), rng.choice([None, None, *SETTLE_KEYS]))
    if kind == "extend":
        return (
            "extend",
            rng.randrange(1000),
            rng.choice([1000, 5000]),
            rng.choice([None, None, 1, 2]),
            rng.choice([None, None, "x1", "x2"]),
        )
    if kind == "event":
        unit = _unit(rng)
        return (
            "event",
            rng.randrange(len(SUBJECTS)),
            unit,
            _amount(rng),
            _also(rng, unit),
            rng.choice(POLICIES),
            rng.choice([None, None, None, "e1", "e2"]),
            rng.random() < 0.1,
            rng.choice([None, {"t": 1}]),
        )
    if kind == "sweep":
        return ("sweep", 1000)
    if kind == "advance":
        return ("advance", rng.choice([1, 300, 700, 1500, 3000, 70_000]))
    if kind == "note":
        return (
            "note",
            rng.choice(["denied", "would_deny"]),
            rng.choice(SCOPES),
            "PRICE_UNKNOWN",
            rng.choice([None, {"why": "x"}]),
        )
    op = rng.choice(["set", "set", "set", "fund", "fund", "freeze", "unfreeze", "close"])
    scope, unit = rng.choice(SCOPES), rng.choice([USD, USD, TOK, CR])
    if op == "set":
        caps = rng.choice([None, None, None, {}, {"max_tokens": 100, "tool_denylist": ["x"]}, {"cooldown_ms": 5}])
        return ("set", scope, unit, rng.choice([0, 50, 100, 500, 1000]), rng.choice([None, None, 0, 50, 10_000]), caps)
    if op == "fund":
        return ("fund", scope, unit, rng.choice([1, 30, 200]))
    return (op, scope, unit)


KINDS = (
    ["reserve"] * 6
    + ["commit"] * 4
    + ["release"] * 2
    + ["extend"] * 2
    + ["event"] * 2
    + ["budget"] * 3
    + ["decide", "sweep", "advance", "advance", "note"]
)


def _random_vector(seed: int, count: int) -> list[Step]:
    rng = random.Random(seed)
    steps: list[Step] = [
        ("set", TOP, USD, 2000, 100, None),
        ("set", WS, USD, 800, None, None),
        ("set", TOP, TOK, 1000, None, None),
        ("set", AGENT, CR, 300, None, None),
    ]
    while len(steps) < count:
        step = _step(rng, rng.choice(KINDS))
        steps.append(step)
        if rng.random() < 0.05:
            steps.append(step)  # the same request again: a replay, or what a retry meets
    return steps


@pytest.mark.parametrize("seed", range(10))
async def test_random_vector(sides: tuple[Side, Side, FakeClock], seed: int) -> None:
    """Seeded random sequences of every operation answer alike in Python and in Lua."""
    await _agree(sides, _random_vector(seed, 400))


PERIODS: list[dict[str, Any] | None] = [
    None,
    None,
    {},
    _every(5_000),
    _every(MIN, 7),
    _cal("daily", "UTC"),
    _cal("daily", "Europe/Paris"),
    _cal("weekly", "Asia/Tokyo"),
    _cal("monthly", "America/New_York"),
]
LIMITS: list[list[dict[str, Any]] | None] = [
    None,
    None,
    [],
    [_lim(300, 5_000)],
    [_lim(400, MIN, freeze=True)],
    [_lim(100, 2_000), _lim(600, 30_000)],
    [_lim(300, 5_000, alert_at=80)],
    [_lim(400, MIN, freeze=True, alert_at=50)],
    [_lim(100, 2_000, alert_at=60), _lim(600, 30_000, alert_at=90)],
    [_lim(100, 2_000), _lim(600, 30_000, alert_at=40)],
]
ALERTS: list[list[int] | None] = [None, None, [], [50, 100], [10, 80, 120]]


TIMED_KINDS = ["reserve"] * 8 + ["commit"] * 5 + ["release"] * 2 + ["event"] * 3 + ["budget"] * 3
TIMED_KINDS += ["extend", "decide", "sweep", "note", "advance", "advance", "advance", "jump"]


def _timed_step(rng: random.Random) -> Step:
    """A random step for the time vectors: budgets mostly set (with periods, limits and alerts) or funded,
    rarely closed; the clock mostly moving within rate windows, sometimes across days or months, or back."""
    kind = rng.choice(TIMED_KINDS)
    if kind == "advance":
        return ("advance", rng.choice([1, 100, 500, 1000, 2000, 4000]))
    if kind == "jump":
        return ("advance", rng.choice([MIN, HOUR, DAY, 7 * DAY, 31 * DAY, -rng.randrange(1, 3000)]))
    if kind != "budget":
        return _step(rng, kind)
    scope, unit = rng.choice(SCOPES), rng.choice([USD, USD, TOK, CR])
    op = rng.choice(["set"] * 6 + ["fund"] * 3 + ["unfreeze"] * 2 + ["freeze"] + ["close"] * (rng.random() < 0.1))
    if op == "set":
        amount = rng.choice([100, 500, 1000, 5000])
        overdraft = rng.choice([None, None, 0, 200])
        return _set(
            scope,
            unit,
            amount,
            overdraft=overdraft,
            period=rng.choice(PERIODS),
            limits=rng.choice(LIMITS),
            alerts=rng.choice(ALERTS),
        )
    if op == "fund":
        return ("fund", scope, unit, rng.choice([30, 200, 1000]))
    return (op, scope, unit)


def _random_timed_vector(seed: int, count: int) -> list[Step]:
    rng = random.Random(seed)
    steps: list[Step] = [
        ("at", PARIS_SAT_2330 + rng.randrange(-DAY, DAY)),
        _set(
            TOP, USD, 2000, overdraft=100, period=_every(MIN), limits=[_lim(500, 10_000, alert_at=70)], alerts=[50, 90]
        ),
        _set(WS, USD, 800, period=_cal("daily", "Europe/Paris"), alerts=[100]),
        _set(TOP, TOK, 1000, limits=[_lim(300, 5_000, freeze=True)]),
        _set(AGENT, CR, 300, period=_every(7_000, 1_000), limits=[_lim(100, 3_000), _lim(200, 20_000, alert_at=50)]),
    ]
    while len(steps) < count:
        step = _timed_step(rng)
        steps.append(step)
        if rng.random() < 0.05:
            steps.append(step)
    return steps


@pytest.mark.parametrize("seed", range(20))
async def test_random_timed_vector(sides: tuple[Side, Side, FakeClock], seed: int) -> None:
    """Seeded random sequences with periods (fixed and calendar, the clock jumping across boundaries and back),
    rate limits (throttle and freeze), alerts and debt answer alike in Python and in Lua."""
    await _agree(sides, _random_timed_vector(seed, 500))
