"""The settle process: orders settled by a real helper process on a real SQLite file, exactly once,
also when the helper is killed with orders in flight or cannot reach the ledger."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import pytest

from cycles_ledger import Ledger, ReservationStatus, open_ledger
from cycles_ledger.settler import SettleOrder, SettleProcess, settle

from .test_ledger import check_invariant

SUBJECT = {"tenant": "s", "agent": "a"}
ACTION = {"kind": "llm.completion", "name": "openai:gpt-4o-mini"}
UNIT = "USD_MICROCENTS"


async def _until(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


@pytest.fixture
async def ledger(tmp_path: Path) -> Ledger:
    led = open_ledger(f"sqlite:///{tmp_path / 's.db'}")
    await led.set_budget("tenant:s", "100usd")
    yield led  # type: ignore[misc]
    await led.aclose()


def _url(ledger: Ledger) -> str:
    return f"sqlite:///{ledger.store.path}"  # type: ignore[attr-defined]


async def _reserve(ledger: Ledger, n: int, **kw: object) -> list[str]:
    return [
        (await ledger.reserve(SUBJECT, ACTION, "0.01usd", idempotency_key=f"call-{i}", **kw)).reservation_id or ""
        for i in range(n)
    ]


def _order(i: int, rid: str | None, actual: int) -> SettleOrder:
    return SettleOrder(f"call-{i}", rid, SUBJECT, ACTION, UNIT, actual, {"tokens_output": i})


async def test_orders_are_settled_by_the_helper_process(ledger: Ledger) -> None:
    rids = await _reserve(ledger, 40)
    fallbacks: list[SettleOrder] = []

    async def fallback(order: SettleOrder) -> None:
        fallbacks.append(order)

    proc = SettleProcess(_url(ledger), fallback=fallback)
    assert all(proc.submit(_order(i, rid, 1000 + i)) for i, rid in enumerate(rids))
    assert proc.pid is not None and proc.pid != os.getpid()
    await _until(lambda: not proc.unacked)
    await proc.aclose()
    assert fallbacks == []
    balance = await ledger.balance("tenant:s")
    assert balance.spent == sum(1000 + i for i in range(40)) and balance.reserved == 0
    assert {r.status for r in await ledger.list_reservations(limit=100)} == {ReservationStatus.COMMITTED}
    committed = [e for e in await ledger.events(limit=500) if e.type == "committed"]
    assert sorted(e.data["metrics"]["tokens_output"] for e in committed) == list(range(40))
    await check_invariant(ledger)


async def test_a_shadow_order_sent_twice_debits_once(ledger: Ledger) -> None:
    proc = SettleProcess(_url(ledger))
    assert proc.submit(_order(7, None, 5000))
    assert proc.submit(_order(7, None, 5000))  # a repeat (e.g. the host re-settling) replays
    await _until(lambda: not proc.unacked)
    await proc.aclose()
    assert (await ledger.balance("tenant:s")).spent == 5000
    assert [e.type for e in await ledger.events(limit=50)].count("debited") == 1


async def test_an_expired_hold_is_recorded_as_a_debit(ledger: Ledger) -> None:
    [rid] = await _reserve(ledger, 1, ttl_ms=1_000, grace_period_ms=0)
    await asyncio.sleep(1.1)
    proc = SettleProcess(_url(ledger))
    assert proc.submit(_order(0, rid, 3000))
    await _until(lambda: not proc.unacked)
    await proc.aclose()
    balance = await ledger.balance("tenant:s")
    assert (balance.spent, balance.reserved) == (3000, 0)
    assert (await ledger.get_reservation(rid)).status is ReservationStatus.EXPIRED
    await check_invariant(ledger)


async def test_orders_in_flight_when_the_helper_is_killed_are_settled_by_the_host(ledger: Ledger) -> None:
    """SIGSTOP the helper, hand it orders, SIGKILL it: the host settles what was never acknowledged,
    each order exactly once (with the orders it had settled before, a repeat is a replay)."""
    rids = await _reserve(ledger, 30)

    async def fallback(order: SettleOrder) -> None:
        await settle(ledger, order, retries=3, count=lambda name: None)

    proc = SettleProcess(_url(ledger), fallback=fallback)
    for i, rid in enumerate(rids[:10]):
        assert proc.submit(_order(i, rid, 100))
    await _until(lambda: not proc.unacked)
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGSTOP)
    for i, rid in enumerate(rids[10:], start=10):
        assert proc.submit(_order(i, rid, 100))
    assert len(proc.unacked) == 20
    os.kill(proc.pid, signal.SIGKILL)
    await _until(lambda: not proc.unacked and not proc._tasks)
    await proc.aclose()
    balance = await ledger.balance("tenant:s")
    assert (balance.spent, balance.reserved) == (30 * 100, 0)
    assert [e.type for e in await ledger.events(limit=500)].count("committed") == 30
    await check_invariant(ledger)


async def test_retries_and_failures_are_counted_in_the_host() -> None:
    """The helper cannot reach its ledger (nothing listens on the port): every order is retried,
    given up and counted, and the counts reach the host."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    counted: list[str] = []
    proc = SettleProcess(f"redis://127.0.0.1:{port}/0?timeout=0.2", retries=1, count=counted.append)
    assert proc.submit(_order(1, "rsv_00000000000000000000000000@tenant:s", 100))
    await _until(lambda: not proc.unacked)
    await proc.aclose()
    assert sorted(counted) == ["settle_failures", "settle_retries", "settle_retries"]


async def test_a_closed_settle_process_takes_no_orders(ledger: Ledger) -> None:
    proc = SettleProcess(_url(ledger))
    await proc.aclose()
    assert proc.submit(_order(1, None, 1)) is False
    assert proc.pid is None  # never started
