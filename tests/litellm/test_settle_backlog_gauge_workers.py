"""`cycles_settle_backlog` with several LiteLLM workers (PROMETHEUS_MULTIPROC_DIR): each worker keeps its own
backlog, so the shared gauge is their sum, and it is written on every round, not only after a new reading of the
ledger (which fails exactly while settles pile up: the ledger is away). Real worker processes with a real
Lifecycle on a real redis-server killed mid-run, as in tests/litellm/test_metrics_workers.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from cycles_litellm.launch import REPO_ROOT
from tests.conftest import need_redis

# A worker whose ledger is a redis-server it started: it reads the ledger and writes its share (backlog 0),
# then Redis dies, one call's commit is kept, and its metrics loop runs on for a while (the view's reads fail).
# `early`: the settle is kept before the first write instead (so the first write carries it).
WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from cycles_ledger import Amount, Unit, open_ledger
    from cycles_ledger.lifecycle import Lifecycle
    from cycles_ledger.redis_server import RedisServer
    from cycles_litellm.health import LedgerHealth
    from cycles_litellm.metrics import Collector, LedgerView, Stats
    from cycles_litellm.metrics_workers import WorkerMetrics, workers_share_metrics
    from cycles_litellm.settings import Settings

    async def main(early):
        assert workers_share_metrics()
        srv = RedisServer()
        try:
            async with open_ledger(srv.url()) as ledger:
                async def source():
                    return ledger
                await ledger.set_budget("tenant:acme", "10usd")
                settings = Settings()
                stats = Stats()
                life = Lifecycle(ledger, retries=0, counters=stats.counters)
                life.backoff_s = life.backlog_wait_s = 60.0
                view = LedgerView(source, settings.metrics, max_age_s=0.05)
                shared = WorkerMetrics(Collector(stats, view, LedgerHealth(source, settings)))
                usd = Amount(unit=Unit.USD_MICROCENTS, amount=10**7)
                hold = await life.reserve({"tenant": "acme"}, {"kind": "llm.completion", "name": "m"}, usd,
                                          heartbeat=False)
                if not early:
                    await view.refresh()
                    shared.write()
                srv.kill()
                await life.commit(hold, usd)
                assert stats.counters["settle_backlog"] == 1, stats.counters
                try:
                    await asyncio.wait_for(shared.run_forever(0.05), 1.0)
                except asyncio.TimeoutError:
                    pass
                print("backlog", life.backlog_size(), flush=True)
        finally:
            srv.stop()

    asyncio.run(main(sys.argv[1] == "early"))
    """
)


def run_worker(prom_dir: Path, early: bool = False) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom_dir), "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, "early" if early else "late"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "backlog 1" in done.stdout, done.stdout + done.stderr


def backlog_gauge(prom_dir: Path) -> float | None:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(prom_dir))
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            if s.name == "cycles_settle_backlog":
                return s.value
    return None


def test_the_shared_backlog_gauge_moves_while_the_ledger_is_away(tmp_path: Path) -> None:
    need_redis()
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    run_worker(prom_dir)
    assert backlog_gauge(prom_dir) == 1, "the worker keeps a settle, but the shared gauge was not written since"


def test_the_shared_backlog_gauge_adds_the_workers_backlogs(tmp_path: Path) -> None:
    need_redis()
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    run_worker(prom_dir, early=True)
    run_worker(prom_dir, early=True)
    assert backlog_gauge(prom_dir) == 2, "each worker keeps one settle: two wait in all"
