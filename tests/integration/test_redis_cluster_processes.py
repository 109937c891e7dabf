"""The many-process race of the conformance suite on a real 3-master Redis Cluster (`redis+cluster://`).

`test_concurrency.py` runs it on SQLite and on one redis-server (`durable_url`); here every one of the 8 spawned
workers opens its own cluster client, as proxy replicas starting under load would.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from cycles_ledger import open_ledger
from cycles_ledger.redis_server import RedisCluster
from tests.integration import test_concurrency as conc

pytestmark = [pytest.mark.redis, pytest.mark.slow]


# redis-py 8.1's asyncio RedisCluster breaks when several commands are sent before its first `initialize()`
# has finished; every worker here opens a fresh ledger and starts with 25 gathered reservations, so this is
# also the regression test for the store initializing its cluster client once, under a lock, first.
async def test_eight_processes_on_the_cluster_admit_exactly_what_the_budget_pays_for(
    redis_cluster: RedisCluster,
) -> None:
    """200 reservations from 8 processes on nested budgets: exactly 40 ALLOWs, no overspend, books reconcile."""
    assert conc.PROCS >= 8
    url = redis_cluster.url()
    await conc._setup(url, {conc.TENANT: 40 * conc.E, conc.WORKFLOW: 25 * conc.E})
    rng = random.Random(11)
    subjects = [conc.SUBJECT_W, conc.SUBJECT_T, conc.SUBJECT_V]
    plans = conc._plans(rng, lambda p, t: {"subject": rng.choice(subjects), "estimate": conc.E})
    outcomes = await asyncio.to_thread(conc._run_processes, url, plans)

    allowed, denied = conc._split(outcomes)
    assert len(outcomes) == conc.PROCS * conc.TASKS
    assert len(allowed) == 40  # holds are kept, so the tenant admits exactly what it pays for
    assert sum(o["subject"] == conc.SUBJECT_W for o in allowed) <= 25
    assert all(o["remaining"] < conc.E for o in denied), "a DENY that would have fitted"
    async with open_ledger(url) as ledger:
        balances = await conc._check_books(ledger)
        tenant, workflow = balances[conc.TENANT], balances[conc.WORKFLOW]
        assert (tenant.reserved, tenant.remaining, tenant.spent, tenant.debt) == (40 * conc.E, 0, 0, 0)
        assert workflow.reserved <= workflow.allocated
        events, reservations = await conc._log(ledger)
        conc._assert_log_matches(events, reservations, allowed, len(denied))
