"""One Lifecycle used from two event loops (it keeps a heartbeat and a backlog per loop for that: the SDK's
Guard and `@metered` serve async callers and blocking ones, whose SyncLedger runs its own loop) writes ONE
`settle_backlog` number: each loop's backlog overwrites it with its own length, so the gauge says 1 while 2
settles wait, and 0 while one still waits.

And a loop that had a backlog is never freed: the WeakKeyDictionary's value (`_Backlog`) holds its task and its
Event, which hold the loop, so the weak key never dies; whatever was kept on that loop stays in memory with it.
Real redis-server, killed and restarted."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

from cycles_ledger import Ledger, open_ledger, open_ledger_sync
from cycles_ledger.lifecycle import Lifecycle
from cycles_ledger.redis_server import RedisServer

from ._support import ACTION, SUBJECT, server, until, usd  # noqa: F401

__all__ = ["server"]


async def test_the_backlog_gauge_counts_the_settles_kept_on_every_loop(server: RedisServer) -> None:
    url = server.url()
    sync = open_ledger_sync(url)  # a second loop, in its own thread, with a ledger on it
    try:
        async with open_ledger(url) as led:
            await led.set_budget("tenant:kept", "1usd")
            sync_loop = sync.run(_running_loop())

            async def source() -> Ledger:
                return sync.ledger if asyncio.get_running_loop() is sync_loop else led

            life = Lifecycle(source, retries=0)
            life.backoff_s = life.backlog_wait_s = 30.0
            here = await life.reserve(SUBJECT, ACTION, usd(10), heartbeat=False)
            there = sync.run(life.reserve(SUBJECT, ACTION, usd(10), heartbeat=False))
            server.kill()
            await life.commit(here, usd(1))
            sync.run(life.commit(there, usd(2)))
            kept = life.backlog_size() + sync.run(_size(life))
            assert kept == 2
            assert life.counters["settle_backlog"] == kept, (
                f"cycles_settle_backlog reads {life.counters['settle_backlog']} while {kept} settles are kept"
            )
    finally:
        sync.close()


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


async def _size(life: Lifecycle) -> int:
    return life.backlog_size()


def test_a_loop_whose_backlog_drained_is_freed(server: RedisServer) -> None:
    """asyncio.run on a Lifecycle that outlives it (a module-level `@metered` or Guard, one run per job): the
    kept settle is made, the backlog is empty, the loop closes; nothing should keep that loop alive."""
    url = server.url()
    ledgers: dict[str, Ledger] = {}

    async def source() -> Ledger:
        return ledgers["led"]

    life = Lifecycle(source, retries=0)
    life.backoff_s = 0.05
    loops: list[Any] = []

    async def job() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        async with open_ledger(url) as led:
            ledgers["led"] = led
            await led.set_budget("tenant:kept", "1usd")
            hold = await life.reserve(SUBJECT, ACTION, usd(10), heartbeat=False)
            server.kill()
            await life.commit(hold, usd(1))
            server.start()

            async def settled() -> bool:
                return life.backlog_size() == 0

            await until(settled)
        ledgers.clear()

    asyncio.run(job())
    gc.collect()
    assert loops[0]() is None, "the closed loop (and its backlog) is still referenced by the Lifecycle"


def test_control_a_loop_without_a_backlog_is_freed(server: RedisServer) -> None:
    """The same run with nothing kept: the loop is freed (so the test above measures the backlog)."""
    url = server.url()
    ledgers: dict[str, Ledger] = {}

    async def source() -> Ledger:
        return ledgers["led"]

    life = Lifecycle(source, retries=0)
    loops: list[Any] = []

    async def job() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        async with open_ledger(url) as led:
            ledgers["led"] = led
            await led.set_budget("tenant:kept", "1usd")
            hold = await life.reserve(SUBJECT, ACTION, usd(10), heartbeat=False)
            await life.commit(hold, usd(1))
        ledgers.clear()

    asyncio.run(job())
    gc.collect()
    assert loops[0]() is None
