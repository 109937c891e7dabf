"""The plugin's metrics when LiteLLM runs several workers (`--num_workers N` with `PROMETHEUS_MULTIPROC_DIR`).

LiteLLM's `/metrics` (or its separate metrics port) then serves what the workers wrote into that directory,
through prometheus_client's `MultiProcessCollector`: a collector registered in a worker is never asked. So
each worker copies the plugin's families into prometheus_client metrics backed by the directory, from the
same `Collector` a scrape reads: counters and the ledger's gauges every `interval_s`, the latency histograms
as they are observed (`Histogram.mirror`). Across workers, counters and histograms add up; the ledger's
gauges (every worker reads the same ledger) show the most recent reading of a live worker, and
`cycles_ledger_up` and `cycles_sweeper_lag_seconds` the lowest (one worker that cannot write makes it 0;
a sweep by any worker counts).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from .metrics import BUCKETS, Collector, prometheus

__all__ = ["WorkerMetrics", "workers_share_metrics"]

log = logging.getLogger("cycles_litellm.metrics")

# how the gauges of several workers combine (prometheus_client's multiprocess modes); the rest: most recent
_GAUGE_MODES = {"cycles_ledger_up": "livemin", "cycles_sweeper_lag_seconds": "livemin"}


def workers_share_metrics() -> bool:
    """True when prometheus_client writes this process's metrics to files that a multiprocess collector reads."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return False
    try:
        from prometheus_client import values
    except ImportError:
        return False
    return bool(getattr(values.ValueClass, "_multiprocess", False))


class WorkerMetrics:
    """This worker's share of the plugin's families, written where `MultiProcessCollector` reads them."""

    def __init__(self, collector: Collector) -> None:
        client = prometheus()
        self.collector = collector
        self._client = client
        self._registry = client.CollectorRegistry()  # private: these metrics only write the shared files
        self._metrics: dict[str, Any] = {}
        self._written: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        stats = collector.stats
        if stats is not None:
            for name, hist, what in (
                ("cycles_reserve_duration_seconds", stats.reserve, "Time the ledger took to reserve for a call"),
                ("cycles_commit_duration_seconds", stats.commit, "Time settling a call took (commit or debit)"),
            ):
                hist.mirror = client.Histogram(name, what, buckets=BUCKETS, registry=self._registry)

    def write(self) -> None:
        """Copy the counters and gauges of the collector's current families (histograms are mirrored)."""
        view = self.collector.view
        for family in self.collector.families(view.snapshot if view is not None else None):
            if family.type not in ("counter", "gauge"):
                continue
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = tuple(sorted(sample.labels.items()))
                metric = self._metric(family.type, family.name, family.documentation, [k for k, _ in labels])
                child = metric.labels(**sample.labels) if labels else metric
                if family.type == "gauge":
                    child.set(sample.value)
                    continue
                key = (sample.name, labels)
                delta = sample.value - self._written.get(key, 0.0)
                if delta > 0:
                    child.inc(delta)
                    self._written[key] = sample.value

    def _metric(self, kind: str, name: str, doc: str, labelnames: list[str]) -> Any:
        metric = self._metrics.get(name)
        if metric is None:
            if kind == "counter":
                metric = self._client.Counter(name, doc, labelnames, registry=self._registry)
            else:
                mode = _GAUGE_MODES.get(name, "livemostrecent")
                metric = self._client.Gauge(name, doc, labelnames, registry=self._registry, multiprocess_mode=mode)
            self._metrics[name] = metric
        return metric

    async def run_forever(self, interval_s: float = 1.0) -> None:
        """Every `interval_s`: read the ledger when the view is stale, then write this worker's numbers."""
        view = self.collector.view
        failing = False
        while True:
            try:
                if view is not None and time.monotonic() - view.snapshot.at > view.max_age_s:
                    try:
                        await view.refresh()
                    finally:
                        self.write()  # the ledger away: this worker's counts and `cycles_ledger_up` still go out
                else:
                    self.write()
                failing = False
            except Exception as exc:  # noqa: BLE001 - the next round tries again; metrics never stop the proxy
                if not failing:  # once per spell, not every second while the ledger is away
                    log.warning("cycles metrics: could not write this worker's metrics (%s)", exc)
                failing = True
            await asyncio.sleep(interval_s)
