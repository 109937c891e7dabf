"""The plugin's metrics when LiteLLM runs several workers (`--num_workers N` with `PROMETHEUS_MULTIPROC_DIR`).

LiteLLM's `/metrics` (or its separate metrics port) then serves what the workers wrote into that directory,
through prometheus_client's `MultiProcessCollector`: a collector registered in a worker is never asked. So
each worker copies the plugin's families into prometheus_client metrics backed by the directory, from the
same `Collector` a scrape reads: counters every `interval_s`, the ledger's gauges once per reading of the
ledger (the worker re-reads it every `LedgerView.max_age_s`, scraped or not), the latency histograms as they
are observed (`Histogram.mirror`). Across workers, counters and histograms add up; the ledger's
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

from .metrics import BUCKETS, HISTOGRAMS, Collector, Stats, prometheus

__all__ = ["WorkerMetrics", "for_collector", "workers_share_metrics"]

log = logging.getLogger("cycles_litellm.metrics")

# how the gauges of several workers combine (prometheus_client's multiprocess modes); the rest: most recent
_GAUGE_MODES = {
    "cycles_ledger_up": "livemin",
    "cycles_sweeper_lag_seconds": "livemin",
    "cycles_settle_backlog": "livesum",  # each worker's own backlog, written every round (the ledger may be away)
}


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
    """This worker's share of the plugin's families, written where `MultiProcessCollector` reads them. One per
    collector (`for_collector`): two writers of the same series in one process would overwrite each other."""

    def __init__(self, collector: Collector) -> None:
        client = prometheus()
        self.collector = collector
        self._client = client
        self._registry = client.CollectorRegistry()  # private: these metrics only write the shared files
        self._metrics: dict[str, Any] = {}
        self._written: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._histograms = {
            attr: client.Histogram(name, what, buckets=BUCKETS, registry=self._registry)
            for name, attr, what in HISTOGRAMS
        }
        self._stats: Stats | None = None
        self._reading_at: float | None = None  # the ledger reading whose gauges were written last
        self.running: asyncio.Task[None] | None = None
        self._follow_stats()

    def _follow_stats(self) -> None:
        """Mirror the histograms of the collector's current Stats; a Stats swapped in (`register`) counts anew."""
        stats = self.collector.stats
        if stats is self._stats:
            return
        self._stats = stats
        self._written.clear()
        if stats is not None:
            for attr, mirror in self._histograms.items():
                getattr(stats, attr).mirror = mirror

    def write(self) -> None:
        """Copy the counters and gauges of the collector's current families (histograms are mirrored). The
        ledger's gauges are written once per reading, so a worker that cannot read the ledger any more does
        not pass its last numbers off as fresh; `cycles_ledger_up` and the sweeper's lag every time."""
        self._follow_stats()
        view = self.collector.view
        snap = view.snapshot if view is not None else None
        new_reading = snap is not None and snap.at != self._reading_at
        for family in self.collector.families(snap):
            if family.type not in ("counter", "gauge"):
                continue
            if family.type == "gauge" and family.name not in _GAUGE_MODES and not new_reading:
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
        if snap is not None:
            self._reading_at = snap.at

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

    async def run_forever(self, interval_s: float = 1.0, read_timeout_s: float = 5.0) -> None:
        """Every `interval_s`: re-read the ledger when the view is older than its `max_age_s` (at most
        `read_timeout_s`: a hung store must not stop the counts), then write this worker's numbers."""
        view = self.collector.view
        failing: str | None = None
        while True:
            problem = None
            if view is not None and time.monotonic() - view.snapshot.at > view.max_age_s:
                try:
                    await asyncio.wait_for(view.refresh(), read_timeout_s)
                except Exception as exc:  # noqa: BLE001 - the ledger's gauges wait for the next reading
                    problem = f"could not read the ledger ({exc or type(exc).__name__})"
            try:
                self.write()
            except Exception as exc:  # noqa: BLE001 - the next round tries again; metrics never stop the proxy
                problem = f"could not write this worker's metrics ({exc})"
            if problem is not None and problem != failing:  # once per spell, not every second
                log.warning("cycles metrics: %s", problem)
            failing = problem
            await asyncio.sleep(interval_s)


_WRITERS: dict[int, WorkerMetrics] = {}


def for_collector(collector: Collector) -> WorkerMetrics:
    """The one writer of `collector`'s families in this process."""
    writer = _WRITERS.get(id(collector))
    if writer is None or writer.collector is not collector:
        writer = _WRITERS[id(collector)] = WorkerMetrics(collector)
    return writer
