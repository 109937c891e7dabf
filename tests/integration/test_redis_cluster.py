"""The Redis store on a real 3-master Redis Cluster (`redis+cluster://`): same answers as SQLite, one slot
per tenant, tenants spread over nodes, and no overspend under concurrency.

Tenants are picked so that each lands on a different master (from CLUSTER SLOTS). The mixed scenario runs
once on the cluster and once on a SQLite file with the same fake clock and the same idempotency keys; the
two must agree on every balance, reservation and per-tenant event, and on the numbers written out below.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from cycles_ledger import Decision, Ledger, ReservationStatus, open_ledger
from cycles_ledger.redis_server import RedisCluster, unique_prefix
from tests.conftest import FakeClock

pytestmark = pytest.mark.redis

ACTION = {"kind": "llm.completion", "name": "cluster"}
USD = 100_000_000  # USD_MICROCENTS


def _owners(cluster: RedisCluster) -> list[tuple[int, int, int]]:
    """(first slot, last slot, port of the master) for every slot range."""
    with redis.Redis(port=cluster.ports[0], decode_responses=True) as r:
        slots = r.execute_command("CLUSTER SLOTS")
    # each entry: [first, last, [host, port, id] of the master, replicas...]
    return sorted((int(entry[0]), int(entry[1]), int(entry[2][1])) for entry in slots)


def _node_of(owners: list[tuple[int, int, int]], slot: int) -> int:
    return next(port for start, end, port in owners if start <= slot <= end)


def _tenants_one_per_node(cluster: RedisCluster) -> list[str]:
    """The first tenant names (org0, org1, …) whose hash tag falls on each master, in port order."""
    owners = _owners(cluster)
    picked: dict[int, str] = {}
    for i in range(1000):
        name = f"org{i}"
        picked.setdefault(_node_of(owners, key_slot(f"tenant:{name}".encode())), name)
        if len(picked) == len(cluster.ports):
            break
    assert sorted(picked) == sorted(cluster.ports)
    return [picked[p] for p in sorted(picked)]


@pytest.fixture
def node_clients(redis_cluster: RedisCluster) -> Iterator[dict[int, redis.Redis]]:
    """A plain (non-cluster) client per master, by port, to look at what each node holds."""
    clients = {port: redis.Redis(port=port, decode_responses=True) for port in redis_cluster.ports}
    yield clients
    for c in clients.values():
        c.close()


async def _scenario(led: Ledger, clock: FakeClock, tenants: list[str]) -> dict[str, Any]:
    """Budgets, reserve/commit/release/extend, events, dry runs, denials, replays and an expiry per tenant;
    returns every answer the ledger gave, with ids replaced by idempotency keys so stores compare."""
    seen: dict[str, Any] = {}
    for t in tenants:
        top, wf = f"tenant:{t}", f"tenant:{t}/workflow:w"
        subj = {"tenant": t, "workflow": "w"}
        await led.set_budget(top, "10usd")
        await led.set_budget(wf, "4usd")
        r1 = await led.reserve(subj, ACTION, "1usd", idempotency_key="r1")
        again = await led.reserve(subj, ACTION, "1usd", idempotency_key="r1")
        assert r1.allowed and r1.reservation_id is not None and again.reservation_id == r1.reservation_id
        dry = await led.reserve(subj, ACTION, "2usd", idempotency_key="dry", dry_run=True)
        deny = await led.reserve(subj, ACTION, "5usd", idempotency_key="big")
        decide = await led.decide(subj, ACTION, "3usd")
        ext = await led.extend(r1.reservation_id, 30_000, idempotency_key="x1")
        c1 = await led.commit(r1.reservation_id, "0.6usd")
        c1_again = await led.commit(r1.reservation_id, "0.6usd")
        r2 = await led.reserve({"tenant": t}, ACTION, "2usd", idempotency_key="r2")
        assert r2.reservation_id is not None
        rel = await led.release(r2.reservation_id, reason="not needed")
        ev = await led.record_event({"tenant": t}, ACTION, "0.25usd", idempotency_key="e1")
        ev_again = await led.record_event({"tenant": t}, ACTION, "0.25usd", idempotency_key="e1")
        r3 = await led.reserve(subj, ACTION, "0.5usd", idempotency_key="r3", ttl_ms=1_000, grace_period_ms=0)
        r4 = await led.reserve(subj, ACTION, "0.3usd", idempotency_key="r4")  # stays ACTIVE
        seen[t] = {
            "r1": (r1.decision, r1.reserved.amount if r1.reserved else None, r1.scope, r1.remaining),
            "dry": (dry.decision, dry.dry_run, dry.reservation_id is None, dry.remaining),
            "deny": (deny.decision, deny.reason_code, deny.scope, deny.remaining, deny.reservation_id),
            "decide": (decide.decision, decide.scope, decide.remaining),
            "ext": ext.expires_at_ms - (r1.expires_at_ms or 0),
            "c1": (c1.charged.amount, c1.released.amount if c1.released else None, c1_again.charged.amount),
            "rel": rel.released.amount,
            "ev": (ev.charged.amount, ev_again.event_id == ev.event_id),
            "r3r4": (r3.decision, r4.decision, r4.remaining),
        }
    clock.advance(2_000)
    seen["swept"] = await led.sweep()
    seen["verify"] = await led.verify()
    seen["balances"] = [b.model_dump() for b in await led.balances()]
    reservations = await led.list_reservations(limit=1000)
    seen["reservations"] = sorted(
        (
            r.scope_path,
            r.idempotency_key,
            r.status,
            r.reserved.amount,
            r.committed,
            r.extension_count,
            r.budgeted_scopes,
        )
        for r in reservations
    )
    seen["active"] = sorted(
        (r.scope_path, r.idempotency_key) for r in await led.list_reservations(status=ReservationStatus.ACTIVE)
    )
    key_of = {r.reservation_id: r.idempotency_key for r in reservations}
    for t in tenants:
        seen[f"events {t}"] = [
            (e.type, e.scope, e.amount, e.reason_code, key_of.get(e.reservation_id or ""), e.ts_ms)
            for e in await led.events(scope=f"tenant:{t}", limit=1000)
        ]
    return seen


async def test_mixed_operations_agree_with_sqlite_and_the_rules(
    redis_cluster: RedisCluster, node_clients: dict[int, redis.Redis], tmp_path: Path
) -> None:
    """A realistic mix on three tenants (one per master) gives the SQLite store's answers, exactly."""
    tenants = _tenants_one_per_node(redis_cluster)
    prefix = unique_prefix()
    clock = FakeClock()
    async with open_ledger(redis_cluster.url(prefix), clock=clock) as led:
        on_cluster = await _scenario(led, clock, tenants)
    clock = FakeClock()
    async with open_ledger(f"sqlite:///{tmp_path / 'ref.db'}", clock=clock) as led:
        on_sqlite = await _scenario(led, clock, tenants)
    assert on_cluster == on_sqlite

    # The same answers, against the rules written out by hand.
    for t in tenants:
        s = on_cluster[t]
        assert s["r1"] == (Decision.ALLOW, USD, f"tenant:{t}/workflow:w", 4 * USD)
        assert s["dry"] == (Decision.ALLOW, True, True, 3 * USD)
        assert s["deny"] == (Decision.DENY, "BUDGET_EXCEEDED", f"tenant:{t}/workflow:w", 3 * USD, None)
        assert s["decide"] == (Decision.ALLOW, f"tenant:{t}/workflow:w", 3 * USD)
        assert s["ext"] == 30_000
        assert s["c1"] == (60_000_000, 40_000_000, 60_000_000)
        assert s["rel"] == 2 * USD
        assert s["ev"] == (25_000_000, True)
        assert s["r3r4"] == (Decision.ALLOW, Decision.ALLOW, 4 * USD - 60_000_000 - 50_000_000)
    assert on_cluster["swept"] == len(tenants)  # each tenant's r3 expired, nothing else
    assert on_cluster["verify"] == []
    bal = {(b["scope"], b["unit"]): b for b in on_cluster["balances"]}
    assert len(bal) == 2 * len(tenants)
    for t in tenants:
        top, wf = bal[(f"tenant:{t}", "USD_MICROCENTS")], bal[(f"tenant:{t}/workflow:w", "USD_MICROCENTS")]
        assert (top["allocated"], top["spent"], top["reserved"], top["debt"]) == (10 * USD, 85_000_000, 30_000_000, 0)
        assert (wf["allocated"], wf["spent"], wf["reserved"], wf["debt"]) == (4 * USD, 60_000_000, 30_000_000, 0)
        types = [e[0] for e in on_cluster[f"events {t}"]]
        assert types == [
            "budget_set",
            "budget_set",
            "reserved",
            "would_allow",  # the dry run
            "denied",
            "extended",
            "committed",
            "reserved",
            "released",
            "debited",
            "reserved",
            "reserved",
            "expired",
        ]
    statuses = {(sp.split("/")[0], key): st for sp, key, st, *_ in on_cluster["reservations"]}
    assert len(statuses) == 4 * len(tenants)
    for t in tenants:
        top = f"tenant:{t}"
        assert [statuses[(top, k)] for k in ("r1", "r2", "r3", "r4")] == [
            ReservationStatus.COMMITTED,
            ReservationStatus.RELEASED,
            ReservationStatus.EXPIRED,
            ReservationStatus.ACTIVE,
        ]
    assert on_cluster["active"] == sorted((f"tenant:{t}/workflow:w", "r4") for t in tenants)

    # Where the keys are: every key of a tenant in ONE slot, on the master that owns it; tenants apart.
    owners = _owners(redis_cluster)
    slots: dict[str, set[int]] = {}
    holders: dict[str, set[int]] = {}
    counts: dict[str, int] = {}
    for port, node in node_clients.items():
        for key in node.scan_iter(match=f"{prefix}:*", count=1000):
            if "{" not in key:
                assert key == f"{prefix}:tops", key  # the one unslotted key: the set of tenants
                continue
            tag = key.split("{", 1)[1].split("}", 1)[0]
            slot = int(node.execute_command("CLUSTER KEYSLOT", key))
            assert slot == key_slot(tag.encode())
            assert _node_of(owners, slot) == port, (key, slot, port)
            slots.setdefault(tag, set()).add(slot)
            holders.setdefault(tag, set()).add(port)
            counts[tag] = counts.get(tag, 0) + 1
    assert sorted(slots) == sorted(f"tenant:{t}" for t in tenants)
    assert all(len(s) == 1 for s in slots.values()), slots
    assert len({next(iter(s)) for s in slots.values()}) == len(tenants)
    assert len(set().union(*holders.values())) == len(tenants) >= 2
    for tag, [slot] in ((tag, sorted(s)) for tag, s in slots.items()):
        node = node_clients[_node_of(owners, slot)]
        assert int(node.execute_command("CLUSTER COUNTKEYSINSLOT", slot)) >= counts[tag] >= 5
    assert sum(1 for node in node_clients.values() if node.dbsize() > 0) >= 2


async def test_concurrent_reservations_on_two_tenants_never_overspend(redis_cluster: RedisCluster) -> None:
    """Four clients x 30 tasks per tenant race on two tenants (two masters): nobody spends past the budget."""
    a, b = _tenants_one_per_node(redis_cluster)[:2]
    url = redis_cluster.url(unique_prefix())
    est, fits = 1_000_000, 25
    rng = random.Random(21)
    async with open_ledger(url) as admin:
        for t in (a, b):
            await admin.set_budget(f"tenant:{t}", {"unit": "USD_MICROCENTS", "amount": fits * est})
    clients = [open_ledger(url) for _ in range(4)]
    try:

        async def one(led: Ledger, tenant: str, delay: float, actual: int) -> tuple[str, int | None]:
            await asyncio.sleep(delay)
            r = await led.reserve({"tenant": tenant}, ACTION, {"unit": "USD_MICROCENTS", "amount": est})
            if not r.allowed:
                assert (r.reason_code, r.scope) == ("BUDGET_EXCEEDED", f"tenant:{tenant}")
                return tenant, None
            assert r.reservation_id is not None
            await asyncio.sleep(delay)
            c = await led.commit(r.reservation_id, {"unit": "USD_MICROCENTS", "amount": actual})
            return tenant, c.charged.amount

        jobs = [
            one(led, t, rng.uniform(0, 0.05), est if rng.random() < 0.5 else rng.randint(0, est))
            for led in clients
            for t in (a, b)
            for _ in range(30)
        ]
        outcomes = await asyncio.gather(*jobs)
    finally:
        for led in clients:
            await led.aclose()

    async with open_ledger(url) as admin:
        assert await admin.verify() == []
        for t in (a, b):
            charged = [amount for tenant, amount in outcomes if tenant == t and amount is not None]
            bal = await admin.balance(f"tenant:{t}")
            # Commits below the estimate free room for later reservations, so at least `fits` get in;
            # more than half of each tenant's 120 calls charge the full estimate, so many are denied.
            assert fits <= len(charged) < 120
            assert sum(1 for amount in charged if amount == est) <= fits
            assert bal.spent == sum(charged) <= bal.allocated
            assert bal.reserved == 0 and bal.debt == 0 and bal.remaining == bal.allocated - bal.spent
            assert len(await admin.list_reservations(scope=f"tenant:{t}", limit=1000)) == len(charged)


async def test_more_than_a_hundred_concurrent_calls_on_one_node_are_served(redis_cluster: RedisCluster) -> None:
    """150 concurrent reserves on one tenant through one warm cluster ledger all succeed (as on one server)."""
    [tenant] = _tenants_one_per_node(redis_cluster)[:1]
    url = redis_cluster.url(unique_prefix())
    async with open_ledger(url) as led:
        await led.set_budget(f"tenant:{tenant}", "100usd")
        outcomes = await asyncio.gather(
            *(led.reserve({"tenant": tenant}, ACTION, "0.01usd") for _ in range(150)), return_exceptions=True
        )
    assert [o for o in outcomes if isinstance(o, BaseException)] == []


async def _timed_scenario(led: Ledger, clock: FakeClock, tenants: list[str]) -> dict[str, Any]:
    """Periods (fixed and calendar), a rate limit that throttles then freezes, alerts and the notifier's state
    per tenant; every answer and the books, with ids left out so stores compare."""
    seen: dict[str, Any] = {}
    for t in tenants:
        top, wf = f"tenant:{t}", f"tenant:{t}/workflow:w"
        subj = {"tenant": t, "workflow": "w"}
        await led.set_budget(top, "10usd", period={"every": "10s"}, alerts=[50, 90])
        await led.set_budget(wf, "4usd", period="daily", rate_limits=[{"amount": "1usd", "window": "5s"}])
        await led.set_budget(
            top, "1000tokens", rate_limits=[{"amount": "100tokens", "window": "5s", "on_exceed": "freeze"}]
        )
        answers: list[Any] = []
        for i in range(12):
            r = await led.reserve(subj, ACTION, "0.4usd", also=["60tokens"], idempotency_key=f"r{i}")
            answers.append((r.decision, r.reason_code, r.scope, r.remaining, r.retry_after_ms))
            if r.reservation_id:
                c = await led.commit(r.reservation_id, "0.35usd", also=["50tokens"])
                answers.append(c.charged.amount)
            ev = await led.record_event({"tenant": t}, ACTION, "1usd", idempotency_key=f"e{i}")
            answers.append(ev.charged.amount)
            clock.advance(1_000)
        seen[t] = answers
    clock.advance(30_000)
    seen["swept"] = await led.sweep()
    seen["verify"] = await led.verify()
    seen["balances"] = [b.model_dump() for b in await led.balances()]
    for t in tenants:
        seen[f"events {t}"] = [
            (e.type, e.scope, e.unit, e.amount, e.reason_code, e.data.get("threshold"), e.ts_ms)
            for e in await led.events(scope=f"tenant:{t}", limit=1000)
        ]
    return seen


async def test_time_policies_on_a_cluster_agree_with_sqlite(redis_cluster: RedisCluster, tmp_path: Path) -> None:
    """Periods, rate limits (their spend logs are keys in the tenant's slot that the scripts name themselves),
    freezes and alerts on three tenants, one per master, answer as on SQLite; the notifier's records (one
    unslotted hash) work on a cluster."""
    tenants = _tenants_one_per_node(redis_cluster)
    clock = FakeClock()
    async with open_ledger(redis_cluster.url(unique_prefix()), clock=clock) as led:
        on_cluster = await _timed_scenario(led, clock, tenants)
        store: Any = led.store
        assert await store.state_put("notify:lease", "me", None)
        assert not await store.state_put("notify:lease", "you", None)
        assert await store.state_list("notify:") == {"notify:lease": "me"}
    clock = FakeClock()
    async with open_ledger(f"sqlite:///{tmp_path / 'ref.db'}", clock=clock) as led:
        on_sqlite = await _timed_scenario(led, clock, tenants)
    assert on_cluster == on_sqlite
    types = {e[0] for t in tenants for e in on_cluster[f"events {t}"]}
    assert {"period_reset", "threshold_crossed", "frozen", "denied"} <= types, types
    assert any(a[1] == "RATE_EXCEEDED" for t in tenants for a in on_cluster[t] if isinstance(a, tuple))
