"""Prometheus metrics: what the plugin decided and how long the ledger took, and what the ledger holds.

Inside a LiteLLM proxy the plugin registers one collector on prometheus_client's default registry, which
LiteLLM's `/metrics` serves when its `prometheus` callback is on. Without that callback, `cycles metrics
--port N` serves the ledger's side of the same families from any host that reaches the ledger (decisions
counted from its event log, for every proxy sharing it).

Recording costs no prometheus_client call on a request: counts and latency buckets live in plain Python
(`Stats`), and prometheus_client is imported only to expose them (a missing package is an error naming
the extra: `pip install 'cycles-litellm[metrics]'`). The ledger's numbers (remaining, burn rate, notifier
backlog) are read when a scrape asks, at most every `max_age_s`, on the event loop the ledger lives on (with
several LiteLLM workers, every `max_age_s` by each worker: metrics_workers.py).

Families (names and labels by Prometheus conventions):

    cycles_decisions_total{decision,reason,shadow}     ALLOW | ALLOW_WITH_CAPS | DENY; reason "none" when allowed
    cycles_reserve_duration_seconds                    histogram: the ledger's reserve, per call
    cycles_commit_duration_seconds                     histogram: settling a call (commit or debit, retries included)
    cycles_ledger_unavailable_total                    reserves that found the ledger unreachable
    cycles_fail_open_total                             ... of which let through (fail_open, or shadow)
    cycles_settle_retries_total / cycles_settle_failures_total   settle attempts retried / settles kept after them
    cycles_settle_backlog                              settles kept for a ledger that does not answer (see lifecycle)
    cycles_budget_remaining_<unit>{scope}              usd, tokens, credits, risk_points (USD as dollars)
    cycles_budget_burn_rate_<unit>_per_second{scope}   spend over the last burn_window_minutes / its length
    cycles_sweeper_lag_seconds                         since the last successful sweep of expired holds
    cycles_notifier_backlog_events{webhook}            events in the log after the webhook's cursor
    cycles_ledger_up                                   1 while the last write reached the ledger

Budget series are bounded: the scopes of `metrics.scopes` in cycles.yaml, else every top-level budget,
at most `metrics.max_scopes`.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from cycles_ledger import ConfigError, Ledger, Unit
from cycles_ledger.models import Balance
from cycles_ledger.report import row_charges
from cycles_ledger.stores.base import SupportsState

from .health import LedgerHealth
from .settings import MetricsSettings, Settings

__all__ = ["Histogram", "LedgerView", "Stats", "register", "serve"]

log = logging.getLogger("cycles_litellm.metrics")

# unit -> (metric name part, divisor to the unit Prometheus shows)
UNITS: dict[Unit, tuple[str, int]] = {
    Unit.USD_MICROCENTS: ("usd", 10**8),
    Unit.TOKENS: ("tokens", 1),
    Unit.CREDITS: ("credits", 1),
    Unit.RISK_POINTS: ("risk_points", 1),
}
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# the latency histograms: (family, Stats attribute, help)
HISTOGRAMS = (
    ("cycles_reserve_duration_seconds", "reserve", "Time the ledger took to reserve for a call"),
    ("cycles_commit_duration_seconds", "commit", "Time settling a call took (commit or debit)"),
)
_NOTIFY_CURSOR = "notify:cursor:"  # the Notifier's cursor per webhook, in the ledger's state (notify.py)
# log event type -> (decision, shadow) for decisions counted from the log (`cycles metrics`)
_LOGGED_DECISIONS = {
    "reserved": ("ALLOW", False),
    "denied": ("DENY", False),
    "would_allow": ("ALLOW", True),
    "would_deny": ("DENY", True),
}


def prometheus() -> ModuleType:
    """prometheus_client, or a ConfigError naming the extra that installs it."""
    try:
        import prometheus_client
    except ImportError as exc:
        raise ConfigError(
            "Prometheus metrics need prometheus_client: pip install 'cycles-litellm[metrics]' "
            "(LiteLLM's prometheus callback needs it too)"
        ) from exc
    return prometheus_client


class Histogram:
    """Latency buckets in plain Python: an observation is one bisect and two additions (and, with several
    LiteLLM workers, one more into the prometheus_client histogram that shares it: metrics_workers.py)."""

    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.mirror: Any = None

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds
        if self.mirror is not None:
            self.mirror.observe(seconds)

    def cumulative(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, count in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, float(total)))
        return out


@dataclass
class Stats:
    """What one proxy process counts: decisions, the ledger's latency, and the handler's counters
    (`ledger_unavailable`, `fail_open`, `settle_retries`, `settle_failures`, kept by the handler and its
    Lifecycle)."""

    counters: collections.Counter[str] = field(default_factory=collections.Counter)
    decisions: collections.Counter[tuple[str, str, bool]] = field(default_factory=collections.Counter)
    reserve: Histogram = field(default_factory=Histogram)
    commit: Histogram = field(default_factory=Histogram)

    def decision(self, decision: str, reason: str | None, shadow: bool) -> None:
        self.decisions[(decision, reason or "none", shadow)] += 1


_MINUTE_MS = 60_000
_FIRST_READ = 20_000  # newest events read on the first refresh; later refreshes read only what is new
_PAGE = 2_000


class Burn:
    """Spend per payer scope and unit in one-minute buckets over the window, fed with the events the log adds
    since the last read: a refresh costs the new events and the window's minutes, not its whole history."""

    def __init__(self, minutes: int) -> None:
        self.minutes = minutes
        self.buckets: dict[int, collections.Counter[tuple[str, Unit]]] = {}
        self._after: int | None = None
        self._reading = asyncio.Lock()  # a scrape's refresh and one already under way must not read twice

    def start_ms(self, now_ms: int) -> int:
        return (now_ms // _MINUTE_MS - self.minutes + 1) * _MINUTE_MS

    async def refresh(self, ledger: Ledger, now_ms: int) -> None:
        """Add the events logged since the last read. This runs on the proxy's event loop, so the events are
        read as the store keeps them (no models) and added a page at a time, the loop free between pages."""
        async with self._reading:
            await self._read(ledger, now_ms)

    async def _read(self, ledger: Ledger, now_ms: int) -> None:
        first = self.start_ms(now_ms) // _MINUTE_MS
        if self._after is None:
            newest = await ledger.event_rows(limit=_FIRST_READ, newest=True)
            self._after = newest[0]["event_id"] if newest else 0
            self._add(reversed(newest), first)
        else:
            while True:
                page = await ledger.event_rows(after=self._after, limit=_PAGE)
                if page:
                    self._after = page[-1]["event_id"]
                self._add(page, first)
                if len(page) < _PAGE:
                    break
                await asyncio.sleep(0)  # a backlog of pages: let the requests waiting on the loop through
        for minute in [m for m in self.buckets if m < first]:
            del self.buckets[minute]

    def _add(self, rows: Iterable[dict[str, Any]], first_minute: int) -> None:
        for row in rows:
            for c in row_charges(row):
                minute = c.ts_ms // _MINUTE_MS
                if minute >= first_minute:
                    self.buckets.setdefault(minute, collections.Counter())[(c.scope, c.unit)] += c.amount

    def per_second(self, budgets: set[str], now_ms: int) -> dict[tuple[str, Unit], float]:
        """Spend at or below each budget scope over the window (its minutes so far), per second."""
        spent: collections.Counter[tuple[str, Unit]] = collections.Counter()
        for bucket in self.buckets.values():
            for (scope, unit), amount in bucket.items():
                for budget in _covering(scope, budgets):
                    spent[(budget, unit)] += amount
        window_s = max((now_ms - self.start_ms(now_ms)) / 1000, 1.0)
        return {key: amount / window_s for key, amount in spent.items()}


@dataclass
class Snapshot:
    """The ledger's numbers as of one read."""

    at: float = 0.0
    balances: list[Balance] = field(default_factory=list)
    burn: dict[tuple[str, Unit], float] = field(default_factory=dict)  # per second
    backlog: dict[str, int] = field(default_factory=dict)


class LedgerView:
    """Budgets, burn rates, the notifier's backlog (and, for `cycles metrics`, decisions from the log) read
    from the ledger for a scrape: at most every `max_age_s`, on the loop the ledger lives on."""

    def __init__(
        self,
        ledger: Callable[[], Awaitable[Ledger]],
        settings: MetricsSettings,
        webhooks: Iterable[str] = (),
        *,
        count_decisions: bool = False,
        max_age_s: float = 2.0,
    ) -> None:
        self._ledger = ledger
        self.settings = settings
        self.webhooks = list(webhooks)
        self.max_age_s = max_age_s
        self.loop: asyncio.AbstractEventLoop | None = None  # set by whoever owns the ledger
        self.snapshot = Snapshot()
        self._burn = Burn(settings.burn_window_minutes)
        self._refreshing: asyncio.Task[None] | None = None
        self.logged: collections.Counter[tuple[str, str, bool]] | None = (
            collections.Counter() if count_decisions else None
        )
        self._log_cursor: int | None = None

    def current(self, timeout_s: float = 5.0) -> Snapshot:
        """The snapshot, refreshed first when stale: from another thread (LiteLLM renders /metrics in a worker
        thread) this waits for the ledger's loop; on that loop it returns what it has and refreshes behind."""
        loop = self.loop
        if loop is None or loop.is_closed() or time.monotonic() - self.snapshot.at <= self.max_age_s:
            return self.snapshot
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._spawn_refresh()
            return self.snapshot
        try:
            asyncio.run_coroutine_threadsafe(self.refresh(), loop).result(timeout_s)
        except Exception as exc:  # noqa: BLE001 - a scrape shows the last numbers rather than fail
            log.warning("cycles metrics: could not read the ledger (%s); serving the last numbers", exc)
        return self.snapshot

    def _spawn_refresh(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self.refresh())

    async def refresh(self) -> None:
        ledger = await self._ledger()
        now_ms = time.time_ns() // 1_000_000
        snap = Snapshot(at=time.monotonic())
        snap.balances = await self._balances(ledger)
        await self._burn.refresh(ledger, now_ms)
        burn = self._burn.per_second({b.scope for b in snap.balances}, now_ms)
        snap.burn = {(b.scope, b.unit): burn.get((b.scope, b.unit), 0.0) for b in snap.balances}
        snap.backlog = await self._backlog(ledger)
        if self.logged is not None:
            await self._count_logged(ledger)
        self.snapshot = snap

    async def _balances(self, ledger: Ledger) -> list[Balance]:
        if self.settings.scopes:
            wanted = set(self.settings.scopes)
            found = [b for s in self.settings.scopes for b in await ledger.balances(s) if b.scope in wanted]
        else:
            found = [b for b in await ledger.balances() if "/" not in b.scope]
        found.sort(key=lambda b: (b.scope, b.unit.value))
        keep = set(sorted({b.scope for b in found})[: self.settings.max_scopes])
        return [b for b in found if b.scope in keep]

    async def _backlog(self, ledger: Ledger) -> dict[str, int]:
        if not self.webhooks or not isinstance(ledger.store, SupportsState):
            return {}
        newest = await ledger.events(newest=True, limit=1, calls=False)
        head = newest[0].event_id if newest else 0
        out = {}
        for name in self.webhooks:
            cursor = await ledger.store.state_get(_NOTIFY_CURSOR + name)
            out[name] = max(head - int(cursor), 0) if cursor is not None else 0
        return out

    async def _count_logged(self, ledger: Ledger) -> None:
        """Count the decisions logged since this exporter started (every proxy on the ledger)."""
        assert self.logged is not None
        if self._log_cursor is None:
            newest = await ledger.events(newest=True, limit=1, calls=False)
            self._log_cursor = newest[0].event_id if newest else 0
            return
        while True:
            page = await ledger.events(after=self._log_cursor, limit=5000, calls=False)
            for e in page:
                kind = _LOGGED_DECISIONS.get(e.type)
                if kind is not None:
                    self.logged[(kind[0], e.reason_code or "none", kind[1])] += 1
            if page:
                self._log_cursor = page[-1].event_id
            if len(page) < 5000:
                return


def _covering(scope: str, budgets: set[str]) -> Iterator[str]:
    """The budget scopes at or above `scope` (a charge to tenant:a/workflow:w burns tenant:a too)."""
    parts = scope.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        if prefix in budgets:
            yield prefix


class Collector:
    """The prometheus_client collector over `Stats` (this process), a `LedgerView` and a `LedgerHealth`."""

    def __init__(
        self, stats: Stats | None = None, view: LedgerView | None = None, health: LedgerHealth | None = None
    ) -> None:
        self.stats = stats
        self.view = view
        self.health = health

    def describe(self) -> list[Any]:
        """Every family this collector can yield, without reading the ledger (registration calls this)."""
        return list(self.families(None, describe=True))

    def collect(self) -> Iterator[Any]:
        yield from self.families(self.view.current() if self.view is not None else None)

    def families(self, snap: Snapshot | None, describe: bool = False) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        stats = self.stats
        decisions = CounterMetricFamily(
            "cycles_decisions",
            "Budget decisions on calls, by decision, reason and shadow",
            labels=["decision", "reason", "shadow"],
        )
        counts = collections.Counter(stats.decisions if stats is not None else {})
        if self.view is not None and self.view.logged is not None:
            counts.update(self.view.logged)
        for (decision, reason, shadow), n in sorted(counts.items()):
            decisions.add_metric([decision, reason, "true" if shadow else "false"], n)
        yield decisions
        if stats is not None:
            for name, attr, what in HISTOGRAMS:
                hist = getattr(stats, attr)
                family = HistogramMetricFamily(name, what)
                if not describe:
                    family.add_metric([], hist.cumulative(), hist.sum)
                yield family
            for name, key, what in (
                ("cycles_ledger_unavailable", "ledger_unavailable", "Reserves that found the ledger unreachable"),
                ("cycles_fail_open", "fail_open", "Calls let through unmetered because the ledger was unreachable"),
                ("cycles_settle_retries", "settle_retries", "Settle attempts retried because the ledger was away"),
                (
                    "cycles_settle_failures",
                    "settle_failures",
                    "Settles whose retries ran out (kept to settle when the ledger answers again)",
                ),
            ):
                yield CounterMetricFamily(name, what, value=stats.counters[key])
            yield GaugeMetricFamily(
                "cycles_settle_backlog",
                "Settles kept for a ledger that does not answer, settled when it does",
                value=stats.counters["settle_backlog"],
            )
        elif self.view is not None and self.view.logged is not None:
            unavailable = {k: n for k, n in self.view.logged.items() if k[1] == "LEDGER_UNAVAILABLE"}
            yield CounterMetricFamily(
                "cycles_ledger_unavailable", "Calls logged as LEDGER_UNAVAILABLE", value=sum(unavailable.values())
            )
            yield CounterMetricFamily(
                "cycles_fail_open",
                "Calls let through while the ledger was unreachable",
                value=sum(n for k, n in unavailable.items() if k[2]),
            )
        if self.view is not None:
            yield from self._budget_families(snap, GaugeMetricFamily)
            backlog = GaugeMetricFamily(
                "cycles_notifier_backlog_events", "Ledger events after a webhook's cursor", labels=["webhook"]
            )
            for name, n in sorted((snap.backlog if snap is not None else {}).items()):
                backlog.add_metric([name], n)
            yield backlog
        if self.health is not None:
            lag = self.health.sweeper_lag_s()
            lag_family = GaugeMetricFamily("cycles_sweeper_lag_seconds", "Seconds since the last successful sweep")
            if lag is not None and not describe:
                lag_family.add_metric([], lag)
            yield lag_family
            up = GaugeMetricFamily("cycles_ledger_up", "1 while the last write reached the ledger")
            if self.health.last is not None and not describe:
                up.add_metric([], 1.0 if self.health.last.ok else 0.0)
            yield up

    def _budget_families(self, snap: Snapshot | None, gauge: Any) -> Iterator[Any]:
        for unit, (name, divisor) in UNITS.items():
            remaining = gauge(f"cycles_budget_remaining_{name}", f"What a budget has left, in {name}", labels=["scope"])
            burn = gauge(
                f"cycles_budget_burn_rate_{name}_per_second",
                f"Spend per second over the burn window, in {name}",
                labels=["scope"],
            )
            for b in snap.balances if snap is not None else []:
                if b.unit is unit:
                    remaining.add_metric([b.scope], b.remaining / divisor)
                    burn.add_metric([b.scope], snap.burn.get((b.scope, unit), 0.0) / divisor if snap else 0.0)
            yield remaining
            yield burn


_registered: dict[int, Collector] = {}


def register(collector: Collector, registry: Any = None) -> Collector:
    """Register on `registry` (prometheus_client's default one when None). One plugin collector per registry:
    a second registration replaces what the first exposes, so tests and reloads never duplicate series."""
    registry = registry if registry is not None else prometheus().REGISTRY
    current = _registered.get(id(registry))
    if current is not None:
        current.stats, current.view, current.health = collector.stats, collector.view, collector.health
        return current
    registry.register(collector)
    _registered[id(registry)] = collector
    return collector


async def serve(
    ledger: Ledger, settings: Settings, *, port: int, host: str = "127.0.0.1", once: bool = False
) -> str | None:
    """`cycles metrics`: the ledger's families on http://host:port/metrics until interrupted, sweeping the
    ledger like a proxy (its lag and up gauges are this process's); `once` returns one exposition instead."""
    client = prometheus()

    async def source() -> Ledger:
        return ledger

    health = LedgerHealth(source, settings)
    view = LedgerView(
        source, settings.metrics, [h.name for h in settings.webhooks()], count_decisions=True, max_age_s=1.0
    )
    view.loop = asyncio.get_running_loop()
    registry = client.CollectorRegistry()
    registry.register(Collector(None, view, health))
    await health.sweep()
    await view.refresh()  # starts the log cursor: decisions count from now on
    if once:
        await view.refresh()
        view.snapshot.at = time.monotonic()
        return str(client.generate_latest(registry).decode())
    server, thread = client.start_http_server(port, addr=host, registry=registry)
    log.warning("cycles metrics: serving http://%s:%d/metrics (Ctrl-C stops)", host, port)
    try:
        await health.run_forever()
    finally:
        server.shutdown()
        thread.join(5)
    return None
