"""The memory:// store under threads: one process, many threads, each with its own ledger on one named
store, random schedules; exact admission and reconciled books. (Its single-thread behaviour is the
conformance suite: every `db_url` test runs on it.)"""

from __future__ import annotations

import random
import threading
import time
import uuid

import pytest

from cycles_ledger import open_ledger_sync
from cycles_ledger.errors import ConfigError
from cycles_ledger.stores import store_from_url
from cycles_ledger.stores.memory import MemoryStore

pytestmark = pytest.mark.memory

E = 1_000_000
THREADS, CALLS = 8, 25


def test_threads_admit_exactly_what_the_budget_pays_for() -> None:
    url = f"memory://{uuid.uuid4().hex}"
    with open_ledger_sync(url) as led:
        led.set_budget("tenant:t", f"{40 * E}microcents")
        led.set_budget("tenant:t/agent:a", f"{1000 * E}microcents")
    outcomes: list[tuple[str, int]] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with open_ledger_sync(url) as led:
            for _ in range(CALLS):
                time.sleep(rng.random() / 2000)
                r = led.reserve({"tenant": "t", "agent": "a"}, {"kind": "tool", "name": "x"}, f"{E}microcents")
                with lock:
                    outcomes.append((r.decision.value, seed))
                if r.reservation_id is None:
                    continue
                if rng.random() < 0.3:
                    led.release(r.reservation_id)
                else:
                    led.commit(r.reservation_id, f"{E}microcents")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open_ledger_sync(url) as led:
        top = led.balance("tenant:t")
        assert led.verify() == []
        committed = sum(1 for e in led.events(limit=100_000) if e.type == "committed")
    assert len(outcomes) == THREADS * CALLS
    assert top.spent == committed * E <= top.allocated
    assert top.reserved == 0
    assert top.remaining == top.allocated - top.spent - top.reserved - top.debt
    # Released holds came back, so the tenant stops admitting only once 40 commits have been paid.
    allowed = sum(1 for d, _ in outcomes if d != "DENY")
    assert committed == 40 or allowed == THREADS * CALLS


async def test_private_and_named_stores() -> None:
    a, b = store_from_url("memory://"), store_from_url("memory://")
    assert isinstance(a, MemoryStore) and a._state is not b._state
    name = f"memory://{uuid.uuid4().hex}"
    c, d = store_from_url(name), store_from_url(name)
    assert isinstance(c, MemoryStore) and isinstance(d, MemoryStore) and c._state is d._state
    with pytest.raises(ConfigError):
        MemoryStore.from_url("mem://x")
