"""A commit kept in the backlog leaves the Hold in state HELD. A second commit of the same Hold (the public API
makes a second commit a no-op once the first went through: `commit` returns at once on COMMITTED/DEBITED) is
then not a no-op: whichever of the two runs second finds the hold COMMITTED, not HELD, and its attempt takes the
"nothing holds it" branch and DEBITS the actual cost again under the hold's debit key. Spend is charged twice.

Without the backlog a second commit after the first went through returns early (state COMMITTED), and two
commits racing on a live ledger both go through `_commit_held` (the loser finds the reservation COMMITTED and
stops): charged once either way. Real redis-server, killed and restarted on its AOF."""

from __future__ import annotations

from cycles_ledger import open_ledger
from cycles_ledger.lifecycle import Lifecycle
from cycles_ledger.redis_server import RedisServer

from ._support import ACTION, SUBJECT, cents, server, until, usd

__all__ = ["server"]


async def test_two_commits_of_one_hold_during_an_outage_charge_it_once(server: RedisServer) -> None:
    async with open_ledger(server.url()) as led:
        await led.set_budget("tenant:kept", "1usd")
        life = Lifecycle(led)
        life.retries, life.backoff_s = 0, 0.05
        hold = await life.reserve(SUBJECT, ACTION, usd(50), heartbeat=False)
        server.kill()
        await life.commit(hold, usd(20))
        await life.commit(hold, usd(20))  # the caller sees the hold still HELD and settles it again
        server.start()

        async def settled() -> bool:
            return life.backlog_size() == 0

        await until(settled)
        b = await led.balance("tenant:kept")
        assert (b.spent, b.reserved) == (cents(20), 0), f"spent {b.spent / cents(1):.0f} cents for a 20 cent call"


async def test_a_kept_commit_does_not_debit_a_hold_committed_meanwhile(server: RedisServer) -> None:
    """The kept commit waits for its next try; the ledger is back and the hold is committed directly (a second
    commit, which now goes through); the kept attempt then runs and debits the same work again."""
    async with open_ledger(server.url()) as led:
        await led.set_budget("tenant:kept", "1usd")
        life = Lifecycle(led)
        life.retries = 0
        life.backoff_s = life.backlog_wait_s = 30.0  # the backlog's own timer would not fire during the test
        hold = await life.reserve(SUBJECT, ACTION, usd(50), heartbeat=False)
        server.kill()
        await life.commit(hold, usd(20))
        assert life.backlog_size() == 1
        server.start()
        await life.commit(hold, usd(20))  # goes through now: COMMITTED, 20 cents spent
        assert (await led.balance("tenant:kept")).spent == cents(20)
        other = await life.reserve(SUBJECT, ACTION, usd(5), heartbeat=False)  # nudges the backlog

        async def settled() -> bool:
            return life.backlog_size() == 0

        await until(settled, timeout=10)
        await life.release(other, "test")
        b = await led.balance("tenant:kept")
        assert (b.spent, b.reserved) == (cents(20), 0), f"spent {b.spent / cents(1):.0f} cents for a 20 cent call"
