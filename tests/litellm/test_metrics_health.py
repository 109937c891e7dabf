"""The plugin's Prometheus families, the ledger view behind its gauges, and the health routes, without a proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI, Response
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cycles_ledger import Ledger, StoreUnavailableError, Unit, open_ledger
from cycles_ledger.cli import main as cli
from cycles_litellm.health import LedgerHealth, add_routes
from cycles_litellm.metrics import Burn, Collector, Histogram, LedgerView, Stats
from cycles_litellm.settings import MetricsSettings, Settings


def samples(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


@pytest.fixture
async def ledger() -> AsyncIterator[Ledger]:
    async with open_ledger("sqlite:///:memory:") as led:
        yield led


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    """An observation equal to a bound falls in that bucket (Prometheus' `le`); counts accumulate upward."""
    h = Histogram((0.001, 0.01))
    for s in (0.0005, 0.001, 0.005, 2.0):
        h.observe(s)
    assert h.cumulative() == [("0.001", 2.0), ("0.01", 3.0), ("+Inf", 4.0)]
    assert h.sum == pytest.approx(2.0065)


def test_process_families_follow_prometheus_naming() -> None:
    """Decisions by decision, reason and shadow as a `_total` counter, latencies as `_seconds` histograms, and
    the handler's counters; nothing is read from a ledger without a view."""
    stats = Stats()
    stats.decision("ALLOW", None, False)
    stats.decision("DENY", "BUDGET_EXCEEDED", False)
    stats.decision("DENY", "BUDGET_EXCEEDED", True)
    stats.reserve.observe(0.002)
    stats.counters.update({"ledger_unavailable": 2, "fail_open": 1, "settle_retries": 3})
    registry = CollectorRegistry()
    registry.register(Collector(stats))
    got = samples(registry)
    assert sorted((lab["decision"], lab["reason"], lab["shadow"], v) for lab, v in got["cycles_decisions_total"]) == [
        ("ALLOW", "none", "false", 1.0),
        ("DENY", "BUDGET_EXCEEDED", "false", 1.0),
        ("DENY", "BUDGET_EXCEEDED", "true", 1.0),
    ]
    assert got["cycles_reserve_duration_seconds_count"] == [({}, 1.0)]
    assert ({"le": "0.0025"}, 1.0) in got["cycles_reserve_duration_seconds_bucket"]
    assert got["cycles_ledger_unavailable_total"] == [({}, 2.0)]
    assert got["cycles_fail_open_total"] == [({}, 1.0)]
    assert got["cycles_settle_retries_total"] == [({}, 3.0)]
    assert got["cycles_settle_failures_total"] == [({}, 0.0)]


async def test_budget_series_are_bounded_and_burn_counts_spend_below_a_scope(ledger: Ledger) -> None:
    """Without configured scopes only top-level budgets become series (at most max_scopes); spend charged
    to a deeper scope burns its top-level budget; USD shows in dollars, tokens as tokens."""
    for tenant in ("a", "b", "c"):
        await ledger.set_budget(f"tenant:{tenant}", "1usd")
    await ledger.set_budget("tenant:a/workflow:w", "1usd")
    await ledger.set_budget("tenant:a", "1000tokens")
    r = await ledger.reserve({"tenant": "a", "workflow": "w"}, {"kind": "llm", "name": "m"}, "0.5usd")
    assert r.reservation_id is not None
    await ledger.commit(r.reservation_id, "0.3usd")

    async def source() -> Ledger:
        return ledger

    view = LedgerView(source, MetricsSettings(max_scopes=2))
    await view.refresh()
    registry = CollectorRegistry()
    registry.register(Collector(None, view))
    got = samples(registry)
    assert got["cycles_budget_remaining_usd"] == [({"scope": "tenant:a"}, 0.7), ({"scope": "tenant:b"}, 1.0)]
    assert got["cycles_budget_remaining_tokens"] == [({"scope": "tenant:a"}, 1000.0)]
    [(_, burn)] = [x for x in got["cycles_budget_burn_rate_usd_per_second"] if x[0]["scope"] == "tenant:a"]
    assert 0 < burn <= 0.3  # 0.3 USD over at most the burn window's elapsed seconds

    configured = LedgerView(source, MetricsSettings(scopes=["tenant:a/workflow:w"]))
    await configured.refresh()
    assert [(b.scope, b.remaining) for b in configured.snapshot.balances] == [("tenant:a/workflow:w", 70_000_000)]


async def test_burn_reads_only_new_events_and_forgets_minutes_past_the_window() -> None:
    """Spend counts in its minute; a later refresh adds what the log added since; minutes older than the
    window drop out, and the rate is the window's spend over its elapsed seconds."""
    from tests.conftest import FakeClock

    clock = FakeClock(1_800_000_000_000)
    async with open_ledger("sqlite:///:memory:", clock=clock) as led:
        await led.set_budget("tenant:a", "10usd")
        subject, action = {"tenant": "a", "workflow": "w"}, {"kind": "llm", "name": "m"}
        burn = Burn(minutes=2)
        await led.record_event(subject, action, "0.6usd")
        await burn.refresh(led, clock())
        window_s = (clock() - burn.start_ms(clock())) / 1000
        assert burn.per_second({"tenant:a"}, clock()) == pytest.approx(
            {("tenant:a", Unit.USD_MICROCENTS): 60_000_000 / window_s}
        )
        clock.advance(60_000)
        await led.record_event(subject, action, "0.3usd")
        await burn.refresh(led, clock())
        assert sum(sum(b.values()) for b in burn.buckets.values()) == 90_000_000
        clock.advance(5 * 60_000)
        await burn.refresh(led, clock())
        assert burn.buckets == {} and burn.per_second({"tenant:a"}, clock()) == {}


async def test_notifier_backlog_and_decisions_from_the_log(ledger: Ledger) -> None:
    """The backlog is the events after a webhook's cursor; `cycles metrics` counts decisions the log records
    after it started (every proxy's), fail-open LEDGER_UNAVAILABLE notes included."""
    await ledger.set_budget("tenant:a", "1usd")

    async def source() -> Ledger:
        return ledger

    view = LedgerView(source, MetricsSettings(), ["ops"], count_decisions=True)
    await view.refresh()  # starts the log cursor
    newest = (await ledger.events(newest=True, limit=1))[0].event_id
    await ledger.store.state_put("notify:cursor:ops", str(newest), None)  # type: ignore[attr-defined]
    subject, action = {"tenant": "a"}, {"kind": "llm", "name": "m"}
    await ledger.reserve(subject, action, "0.1usd")
    await ledger.reserve(subject, action, "5usd")
    await ledger.reserve(subject, action, "5usd", dry_run=True)
    await ledger.note("tenant:a", "LEDGER_UNAVAILABLE", would=True)
    await view.refresh()
    assert view.snapshot.backlog == {"ops": 4}
    registry = CollectorRegistry()
    registry.register(Collector(None, view))
    got = samples(registry)
    assert sorted((lab["decision"], lab["reason"], lab["shadow"], v) for lab, v in got["cycles_decisions_total"]) == [
        ("ALLOW", "none", "false", 1.0),
        ("DENY", "BUDGET_EXCEEDED", "false", 1.0),
        ("DENY", "BUDGET_EXCEEDED", "true", 1.0),
        ("DENY", "LEDGER_UNAVAILABLE", "true", 1.0),
    ]
    assert got["cycles_fail_open_total"] == [({}, 1.0)]
    assert got["cycles_notifier_backlog_events"] == [({"webhook": "ops"}, 4.0)]


def test_cycles_metrics_once_prints_the_ledger_families(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`cycles metrics --once` prints one exposition of the ledger's families (no litellm needed)."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    assert cli(["--store", url, "budget", "set", "tenant:m", "2usd"]) == 0
    capsys.readouterr()
    assert cli(["--store", url, "metrics", "--once"]) == 0
    text = capsys.readouterr().out
    assert 'cycles_budget_remaining_usd{scope="tenant:m"} 2.0' in text
    assert "cycles_ledger_up 1.0" in text and "cycles_sweeper_lag_seconds" in text


def app_with(settings: Settings, fail: bool) -> TestClient:
    """A FastAPI app with a stand-in for LiteLLM's readiness route, and the plugin's routes over a ledger
    source that fails (as an unreachable store) or answers."""

    async def source() -> Any:
        if fail:
            raise StoreUnavailableError("cannot reach redis://:secret@10.0.0.1:6379/0")

        class Swept:
            store = None  # keeps no state: the probe's write is skipped

            async def sweep(self) -> int:
                return 0

        return Swept()

    app = FastAPI()

    @app.get("/health/readiness")
    async def litellm_readiness(response: Response) -> dict[str, Any]:
        return {"status": "healthy", "db": "Not connected"}

    add_routes(app, LedgerHealth(source, settings, max_age_s=0))
    return TestClient(app)


@pytest.mark.parametrize(
    ("settings", "status", "ready"),
    [
        (Settings(store="redis://:secret@10.0.0.1:6379/0"), "unavailable", 503),
        (Settings(store="redis://:secret@10.0.0.1:6379/0", on_unavailable="fail_open"), "degraded", 200),
        (Settings(store="redis://:secret@10.0.0.1:6379/0", mode="shadow"), "degraded", 200),
    ],
)
def test_health_routes_turn_503_only_when_the_plugin_would_refuse_every_call(
    settings: Settings, status: str, ready: int
) -> None:
    """Ledger down: fail-closed answers 503 on /cycles/health and LiteLLM's readiness; fail-open and shadow
    keep serving (200, `degraded`). The public body names no store address or secret."""
    client = app_with(settings, fail=True)
    health = client.get("/cycles/health")
    assert health.status_code == ready and health.json()["status"] == status
    assert health.json()["store"] == "redis" and "secret" not in health.text and "10.0.0.1" not in health.text
    readiness = client.get("/health/readiness")
    assert readiness.status_code == ready
    assert readiness.json()["cycles"]["status"] == status


async def test_the_probe_writes_and_deletes_its_own_key(ledger: Ledger) -> None:
    """A sweep that expires nothing still proves a write lands: the probe's key is written, then deleted."""
    writes: list[tuple[str, str | None]] = []
    put = ledger.store.state_put  # type: ignore[attr-defined]

    async def recording(key: str, value: str | None, expected: str | None) -> bool:
        writes.append((key, value))
        return bool(await put(key, value, expected))

    ledger.store.state_put = recording  # type: ignore[attr-defined]

    async def source() -> Ledger:
        return ledger

    health = LedgerHealth(source, Settings())
    assert (await health.sweep()).ok and health.sweeper_lag_s() is not None
    assert [v is None for _, v in writes] == [False, True] and writes[0][0] == writes[1][0]
    assert await ledger.store.state_list("health:") == {}  # type: ignore[attr-defined]


def test_readiness_false_leaves_litellms_readiness_alone() -> None:
    """`readiness: false`: only /cycles/health says the ledger is down; LiteLLM's readiness answers as before."""
    client = app_with(Settings(readiness=False), fail=True)
    assert client.get("/cycles/health").status_code == 503
    ready = client.get("/health/readiness")
    assert ready.status_code == 200 and "cycles" not in ready.json()


def test_readiness_passes_litellms_answer_through_while_the_ledger_answers() -> None:
    """With the ledger up, readiness is LiteLLM's own answer plus a `cycles` block."""
    client = app_with(Settings(), fail=False)
    body = client.get("/health/readiness").json()
    assert body["status"] == "healthy" and body["db"] == "Not connected" and body["cycles"]["ledger"] == "ok"
    assert client.get("/cycles/health").json()["status"] == "ok"
