"""The plugin's metrics with several LiteLLM workers: real worker processes write their share into a
PROMETHEUS_MULTIPROC_DIR and prometheus_client's MultiProcessCollector (what LiteLLM's /metrics serves then)
adds them up. prometheus_client picks its file-backed values when it is imported, so each worker is a fresh
process with the variable set, as under LiteLLM."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from cycles_ledger import open_ledger_sync
from cycles_litellm.launch import REPO_ROOT
from cycles_litellm.metrics import Collector, Stats
from cycles_litellm.metrics_workers import for_collector, workers_share_metrics

USD = 10**8

# One worker: `calls` allowed calls and one denied one, a reserve latency per call, a settle retry; the
# ledger view and the sweeper read the shared SQLite ledger; its share is written twice (the second
# write must not add the counts again), with one more call between the writes.
WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from cycles_ledger import StoreUnavailableError, open_ledger
    from cycles_litellm.health import LedgerHealth
    from cycles_litellm.metrics import Collector, LedgerView, Stats
    from cycles_litellm.metrics_workers import WorkerMetrics, workers_share_metrics
    from cycles_litellm.settings import Settings

    async def main(url, calls, down):
        assert workers_share_metrics()
        async with open_ledger(url) as ledger:
            async def source():
                return ledger
            async def away():
                raise StoreUnavailableError("this worker cannot reach the ledger")
            settings = Settings()
            stats = Stats()
            view = LedgerView(away if down else source, settings.metrics)
            health = LedgerHealth(away if down else source, settings)
            shared = WorkerMetrics(Collector(stats, view, health))
            if down:  # the plugin's own loop, with the ledger away for its reads and its sweeps
                stats.decision("ALLOW", "LEDGER_UNAVAILABLE", False)
                await health.sweep()
                try:
                    await asyncio.wait_for(shared.run_forever(0.1), 0.5)
                except asyncio.TimeoutError:
                    pass
                return
            for _ in range(calls - 1):
                stats.decision("ALLOW", None, False)
                stats.reserve.observe(0.002)
            stats.decision("DENY", "BUDGET_EXCEEDED", False)
            stats.counters["settle_retries"] += 1
            await view.refresh()
            await health.sweep()
            shared.write()
            stats.decision("ALLOW", None, False)
            stats.reserve.observe(0.002)
            shared.write()

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "down"))
    """
)


def run_worker(url: str, calls: int, prom_dir: Path, down: bool = False) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom_dir), "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, url, str(calls), "down" if down else "up"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def merged(prom_dir: Path) -> dict[str, list[tuple[dict[str, str], float]]]:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(prom_dir))
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(metrics: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    found = [v for lab, v in metrics.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]
    assert found, f"no {name} {labels} in {sorted(metrics)}"
    return sum(found)


def test_workers_add_up_on_the_shared_metrics(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with open_ledger_sync(url) as led:
        led.set_budget("tenant:acme", "10usd")
        r = led.reserve({"tenant": "acme"}, {"kind": "llm.completion", "name": "m"}, "1usd")
        led.commit(r.reservation_id, "0.25usd")
        remaining = led.balance("tenant:acme").remaining
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    run_worker(url, 3, prom_dir)
    run_worker(url, 5, prom_dir)
    got = merged(prom_dir)
    # decisions and counters add up across workers, and a second write does not count again
    assert value(got, "cycles_decisions_total", decision="ALLOW", reason="none", shadow="false") == 2 + 1 + 4 + 1
    assert value(got, "cycles_decisions_total", decision="DENY", reason="BUDGET_EXCEEDED") == 2
    assert value(got, "cycles_settle_retries_total") == 2
    # the latency histograms add up, with cumulative buckets
    assert value(got, "cycles_reserve_duration_seconds_count") == 3 + 5
    assert value(got, "cycles_reserve_duration_seconds_bucket", le="0.001") == 0
    assert value(got, "cycles_reserve_duration_seconds_bucket", le="0.0025") == 3 + 5
    assert value(got, "cycles_reserve_duration_seconds_sum") == pytest.approx(0.016)
    # the ledger's gauges are one reading, not one per worker
    assert value(got, "cycles_budget_remaining_usd", scope="tenant:acme") == pytest.approx(remaining / USD)
    assert value(got, "cycles_ledger_up") == 1
    assert 0 <= value(got, "cycles_sweeper_lag_seconds") < 60


def test_one_worker_unable_to_write_the_ledger_shows_it_down(tmp_path: Path) -> None:
    """`cycles_ledger_up` is the lowest of the live workers: one that cannot reach the ledger makes it 0, and
    its loop still writes its counts while every read of the ledger fails."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with open_ledger_sync(url) as led:
        led.set_budget("tenant:acme", "10usd")
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    run_worker(url, 2, prom_dir)
    assert value(merged(prom_dir), "cycles_ledger_up") == 1
    run_worker(url, 2, prom_dir, down=True)  # its reads and sweeps cannot reach the ledger
    got = merged(prom_dir)
    assert value(got, "cycles_ledger_up") == 0
    assert value(got, "cycles_decisions_total", reason="LEDGER_UNAVAILABLE") == 1  # its counts still go out


# A worker that read the ledger once, wrote, and then (its reads failing) writes again on a line from stdin.
STALE_WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from cycles_ledger import open_ledger
    from cycles_litellm.metrics import Collector, LedgerView, Stats
    from cycles_litellm.metrics_workers import WorkerMetrics
    from cycles_litellm.settings import Settings

    async def main(url):
        async with open_ledger(url) as ledger:
            async def source():
                return ledger
            view = LedgerView(source, Settings().metrics)
            shared = WorkerMetrics(Collector(Stats(), view))
            await view.refresh()
            shared.write()
            print("written", flush=True)
            sys.stdin.readline()
            shared.write()  # no new reading since the first write

    asyncio.run(main(sys.argv[1]))
    """
)


def test_a_worker_that_cannot_read_the_ledger_does_not_pass_old_numbers_off_as_new(tmp_path: Path) -> None:
    """The ledger's gauges show the most recent reading of any worker: a worker writes them once per reading,
    so one whose reads stopped does not outrank a fresher reading by writing its old one again."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with open_ledger_sync(url) as led:
        led.set_budget("tenant:acme", "10usd")
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom_dir), "PYTHONPATH": str(REPO_ROOT)}
    with subprocess.Popen(
        [sys.executable, "-c", STALE_WORKER, url], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as stale:
        assert stale.stdin is not None and stale.stdout is not None
        try:
            assert stale.stdout.readline().strip() == "written"
            assert value(merged(prom_dir), "cycles_budget_remaining_usd", scope="tenant:acme") == 10
            with open_ledger_sync(url) as led:
                led.fund("tenant:acme", "5usd")
            run_worker(url, 1, prom_dir)  # a worker that reads the ledger now
            assert value(merged(prom_dir), "cycles_budget_remaining_usd", scope="tenant:acme") == 15
            stale.stdin.write("go\n")
            stale.stdin.flush()
            assert stale.wait(30) == 0
        finally:
            stale.kill()
    assert value(merged(prom_dir), "cycles_budget_remaining_usd", scope="tenant:acme") == 15


def test_a_single_process_proxy_writes_no_shared_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """No directory, or one named after prometheus_client was imported (its values then live in memory)."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert not workers_share_metrics()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/tmp")
    assert not workers_share_metrics()


def test_one_writer_per_collector_follows_the_stats_register_swaps_in() -> None:
    """A second plugin instance in the process shares the registered collector: it gets the same writer, which
    mirrors the histograms of whichever Stats the collector holds and counts them anew."""
    first, second = Stats(), Stats()
    collector = Collector(first)
    writer = for_collector(collector)
    assert first.reserve.mirror is not None
    collector.stats = second  # what register() does for a later instance
    writer.write()
    assert for_collector(collector) is writer
    assert second.reserve.mirror is first.reserve.mirror
