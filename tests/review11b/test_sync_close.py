"""SyncLedger.close (how a SyncLifecycle user, the SDK's sync Guard, `@metered` on a blocking function, ends)
cancels every task on the private loop, the settle backlog's among them: a settle kept there vanishes without a
try, a log line or a count, even when the ledger answers again at that moment, and `settle_backlog` (the
`cycles_settle_backlog` gauge's source) keeps saying one is waiting. Real redis-server, killed and restarted."""

from __future__ import annotations

from cycles_ledger import open_ledger, open_ledger_sync
from cycles_ledger.lifecycle import SyncLifecycle
from cycles_ledger.redis_server import RedisServer

from ._support import ACTION, SUBJECT, cents, server, usd

__all__ = ["server"]


async def test_closing_a_sync_ledger_makes_or_counts_its_kept_settles(server: RedisServer) -> None:
    url = server.url()
    sync = open_ledger_sync(url)
    try:
        sync.set_budget("tenant:kept", "1usd")
        life = SyncLifecycle(sync, retries=0)
        life.lifecycle.backoff_s = life.lifecycle.backlog_wait_s = 30.0  # the kept settle waits for its next try
        hold = life.reserve(SUBJECT, ACTION, usd(50), heartbeat=False)
        server.kill()
        life.commit(hold, usd(20))
        assert life.lifecycle.counters["settle_backlog"] == 1
        server.start()  # the ledger answers again
    finally:
        sync.close()
    counters = life.lifecycle.counters
    async with open_ledger(url) as led:
        b = await led.balance("tenant:kept")
    made = b.spent == cents(20)
    assert made or counters["settle_dropped"] == 1, (
        f"the kept commit was neither made nor counted: spent {b.spent}, still reserved {b.reserved}, "
        f"counters {dict(counters)}"
    )
    assert counters["settle_backlog"] == 0, "the gauge still shows a settle that no longer exists"
