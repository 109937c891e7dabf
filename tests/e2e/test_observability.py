"""Decisions in every trace and metric: a real proxy (configs/litellm-observability.yaml) with LiteLLM's `otel`
callback exporting to an OTLP/HTTP receiver on loopback, its `prometheus` callback serving /metrics, and a
CustomLogger reading the standard logging payload; health and readiness following the ledger.

Prices (LiteLLM's offline map): gpt-4o-mini costs 15 USD_MICROCENTS per input token and 60 per output
token; the fake upstream reports 25 prompt tokens and max_tokens completion tokens (up to 40).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import multiprocess
from prometheus_client.parser import text_string_to_metric_families

from cycles_ledger.redis_server import RedisServer
from cycles_litellm.fake_provider import FakeUpstream
from cycles_litellm.launch import REPO_ROOT, LiteLLMProxy, litellm_config_with_callbacks, start_proxy
from tests.conftest import need_redis
from tests.e2e.conftest import ProxyFactory
from tests.support.otlp_receiver import OtlpReceiver, Span

OBS_CONFIG = REPO_ROOT / "configs" / "litellm-observability.yaml"
ALLOWED = 25 * 15 + 5 * 60  # a call with max_tokens 5


def wait_until(pred: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)
    return value


def chat(proxy: LiteLLMProxy, tenant: str, text: str = "hello there", **extra: Any) -> httpx.Response:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], "max_tokens": 5, **extra}
    headers = {**proxy.auth_headers, "x-cycles-tenant": tenant}
    return httpx.post(f"{proxy.url}/v1/chat/completions", json=body, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    rx = OtlpReceiver()
    yield rx
    rx.close()


@pytest.fixture(scope="module")
def payload_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("payloads") / "payloads.jsonl"


@pytest.fixture(scope="module")
def proxy(proxy_factory: ProxyFactory, receiver: OtlpReceiver, payload_log: Path) -> LiteLLMProxy:
    env = {
        "OTEL_EXPORTER": "otlp_http",
        "OTEL_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s instead of 5 s
        "CYCLES_PAYLOAD_LOG": str(payload_log),
    }
    return proxy_factory({"shadow_scopes": ["tenant:obs-shadow"]}, litellm_config=OBS_CONFIG, env=env)


def logged(payload_log: Path, scope: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(event, cycles fields, payload) of every payload the CustomLogger got whose decision names `scope`."""
    out = []
    for line in payload_log.read_text().splitlines() if payload_log.exists() else []:
        record = json.loads(line)
        payload = record["payload"] or {}
        pairs = (payload.get("metadata") or {}).get("spend_logs_metadata")
        fields = pairs.get("cycles") if isinstance(pairs, dict) else None
        if isinstance(fields, dict) and fields.get("scope") == scope:
            out.append((record["event"], fields, payload))
    return out


@pytest.fixture(scope="module")
def traffic(proxy: LiteLLMProxy) -> dict[str, httpx.Response]:
    """One allowed, one denied, one shadow, one streamed and one Anthropic /v1/messages call, each its own
    tenant."""
    with proxy.ledger() as led:
        led.set_budget("tenant:obs-ok", "1usd")
        led.set_budget("tenant:obs-poor", "0.000001usd")
        led.set_budget("tenant:obs-shadow", "1usd")
        led.set_budget("tenant:obs-msg", "1usd")
        led.set_budget("tenant:obs-stream", "1usd")
    messages = httpx.post(
        f"{proxy.url}/v1/messages",
        json={"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        headers={**proxy.auth_headers, "x-cycles-tenant": "obs-msg"},
        timeout=60,
    )
    return {
        "ok": chat(proxy, "obs-ok"),
        "poor": chat(proxy, "obs-poor"),
        "shadow": chat(proxy, "obs-shadow"),
        "messages": messages,
        "stream": chat(proxy, "obs-stream", stream=True, stream_options={"include_usage": True}),
    }


def test_a_custom_logger_reads_each_decision_from_the_standard_logging_payload(
    proxy: LiteLLMProxy, traffic: dict[str, httpx.Response], payload_log: Path
) -> None:
    """Allowed, denied (never reaching a provider), shadow, streamed and /v1/messages calls: each logged once
    with decision, reason, scope, remaining, reservation id, estimate, committed amount and shadow flag."""
    ok, poor, shadow = traffic["ok"], traffic["poor"], traffic["shadow"]
    assert (ok.status_code, poor.status_code, shadow.status_code, traffic["messages"].status_code) == (
        200,
        402,
        200,
        200,
    )

    [(event, fields, payload)] = wait_until(lambda: logged(payload_log, "tenant:obs-ok"))
    assert (event, payload["status"]) == ("success", "success")
    assert fields["decision"] == "ALLOW" and fields["reason"] is None and fields["shadow"] is False
    assert fields["reservation_id"] == ok.headers["x-cycles-reservation-id"]
    assert fields["unit"] == "USD_MICROCENTS" and fields["estimate"] > 0  # the fake bills 25 prompt tokens anyway
    assert fields["committed"] == ALLOWED
    assert fields["remaining"] == 100_000_000 - fields["estimate"]
    with proxy.ledger() as led:
        wait_until(lambda: led.balance("tenant:obs-ok").reserved == 0)
        assert led.balance("tenant:obs-ok").spent == fields["committed"]

    [(event, fields, payload)] = wait_until(lambda: logged(payload_log, "tenant:obs-poor"))
    assert (event, payload["status"]) == ("failure", "failure")
    assert fields["decision"] == "DENY" and fields["reason"] == "BUDGET_EXCEEDED"
    assert fields["remaining"] == 100 and fields["estimate"] > 100
    assert fields["committed"] == 0 and fields["reservation_id"] is None and fields["shadow"] is False
    assert "402" in json.dumps(payload.get("error_information"))

    [(event, fields, _)] = wait_until(lambda: logged(payload_log, "tenant:obs-shadow"))
    assert event == "success" and fields["shadow"] is True and fields["decision"] == "ALLOW"
    assert fields["committed"] == ALLOWED and fields["reservation_id"] is None

    [(event, fields, _)] = wait_until(lambda: logged(payload_log, "tenant:obs-msg"))  # `litellm_metadata` routes
    assert event == "success" and fields["decision"] == "ALLOW" and fields["committed"] > 0

    assert traffic["stream"].status_code == 200 and "[DONE]" in traffic["stream"].text
    [(event, fields, _)] = wait_until(lambda: logged(payload_log, "tenant:obs-stream"))  # set at the stream's end
    assert event == "success" and fields["committed"] == ALLOWED
    time.sleep(0.5)  # nothing more arrives: one logged event per call
    tenants = ("ok", "poor", "shadow", "msg", "stream")
    assert [len(logged(payload_log, f"tenant:obs-{t}")) for t in tenants] == [1, 1, 1, 1, 1]


FORGED = {"decision": "ALLOW", "reason": None, "scope": "tenant:FORGED", "estimate": 1, "committed": 0}


@pytest.mark.parametrize("route", ["/v1/messages", "/v1/responses"])
def test_a_client_cannot_forge_or_erase_the_logged_decision(
    proxy: LiteLLMProxy, payload_log: Path, receiver: OtlpReceiver, route: str
) -> None:
    """On the routes where the proxy keeps its metadata in `litellm_metadata`, the client's own `metadata` wins
    LiteLLM's merge into the logging payload: a `spend_logs_metadata` sent there (a forged decision, or a string
    that would erase it) must not replace the plugin's decision, for a refused call or an allowed one."""
    tag = route.rsplit("/", 1)[-1]
    with proxy.ledger() as led:
        for kind in ("forge", "erase"):
            led.set_budget(f"tenant:obs-{tag}-{kind}-poor", "0.000001usd")
            led.set_budget(f"tenant:obs-{tag}-{kind}-ok", "1usd")
    if route == "/v1/messages":
        body: dict[str, Any] = {
            "model": "claude-haiku-4-5",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}],
        }
    else:
        body = {"model": "gpt-4o-mini", "max_output_tokens": 16, "input": "hi"}
    statuses = {}
    for kind, client_pairs in (("forge", {"cycles": FORGED, "team": "blue"}), ("erase", "x")):
        for budget in ("poor", "ok"):
            tenant = f"obs-{tag}-{kind}-{budget}"
            r = httpx.post(
                f"{proxy.url}{route}",
                json={**body, "metadata": {"spend_logs_metadata": client_pairs}},
                headers={**proxy.auth_headers, "x-cycles-tenant": tenant},
                timeout=60,
            )
            statuses[tenant] = r.status_code
    assert statuses == {
        f"obs-{tag}-{kind}-{budget}": 402 if budget == "poor" else 200
        for kind in ("forge", "erase")
        for budget in ("poor", "ok")
    }
    for kind in ("forge", "erase"):
        poor, ok = f"tenant:obs-{tag}-{kind}-poor", f"tenant:obs-{tag}-{kind}-ok"
        [(event, fields, _)] = wait_until(lambda: logged(payload_log, poor))  # noqa: B023 - waited for at once
        assert (event, fields["decision"], fields["reason"]) == ("failure", "DENY", "BUDGET_EXCEEDED")
        [(event, fields, _)] = wait_until(lambda: logged(payload_log, ok))  # noqa: B023
        assert (event, fields["decision"], fields["shadow"]) == ("success", "ALLOW", False)
        assert fields["committed"] > 0 and fields["reservation_id"]
    assert logged(payload_log, "tenant:FORGED") == []
    # the spans LiteLLM's otel callback exports say the same, as JSON
    [denied] = receiver.wait_for(lambda s: (_decision(s) or {}).get("scope") == f"tenant:obs-{tag}-forge-poor")
    forged = [s for s in receiver.spans if "FORGED" in str(s.attributes.get("metadata.spend_logs_metadata"))]
    assert (_decision(denied) or {}).get("decision") == "DENY" and forged == []


def _decision(span: Span) -> dict[str, Any] | None:
    raw = span.attributes.get("metadata.spend_logs_metadata")
    return json.loads(raw)["cycles"] if isinstance(raw, str) and raw.startswith("{") else None


def test_otel_spans_carry_the_decision_and_the_deny_span_exists(
    traffic: dict[str, httpx.Response], receiver: OtlpReceiver
) -> None:
    """LiteLLM's otel callback exports the decision as JSON in `metadata.spend_logs_metadata`; a denied call
    has its own error span with the decision, in the trace of the proxy's failed request."""
    [allowed] = receiver.wait_for(lambda s: (_decision(s) or {}).get("scope") == "tenant:obs-ok")
    fields = _decision(allowed)
    assert fields is not None and fields["decision"] == "ALLOW" and fields["committed"] == ALLOWED
    assert fields["reservation_id"] == traffic["ok"].headers["x-cycles-reservation-id"]

    [denied] = receiver.wait_for(lambda s: (_decision(s) or {}).get("scope") == "tenant:obs-poor")
    fields = _decision(denied)
    assert fields is not None and (fields["decision"], fields["reason"]) == ("DENY", "BUDGET_EXCEEDED")
    assert denied.status == 2  # ERROR
    failed = receiver.wait_for(lambda s: s.name == "Failed Proxy Server Request" and s.trace_id == denied.trace_id)
    assert "BUDGET_EXCEEDED" in str(failed[0].attributes.get("exception"))


def scrape(proxy: LiteLLMProxy) -> dict[str, list[tuple[dict[str, str], float]]]:
    """/metrics as {sample name: [(labels, value)]}."""
    text = httpx.get(f"{proxy.url}/metrics", follow_redirects=True, timeout=30).text
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def total(metrics: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for lab, v in metrics.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def test_metrics_count_decisions_and_a_deny_is_not_a_deployment_failure(
    proxy: LiteLLMProxy, traffic: dict[str, httpx.Response]
) -> None:
    """/metrics with LiteLLM's prometheus callback: the plugin's families are there; three denies count as
    decisions and as failed client requests, never as LLM API or deployment failures, and cool nothing down
    (both deployments keep serving); a real provider failure (control) does count."""
    before = scrape(proxy)
    for _ in range(3):
        assert chat(proxy, "obs-poor").status_code == 402
    after = wait_until(
        lambda: (
            m
            if total(m := scrape(proxy), "litellm_proxy_failed_requests_metric_total", exception_status="402")
            >= total(before, "litellm_proxy_failed_requests_metric_total", exception_status="402") + 3
            else None
        )
    )
    deny = {"decision": "DENY", "reason": "BUDGET_EXCEEDED", "shadow": "false"}
    assert total(after, "cycles_decisions_total", **deny) == total(before, "cycles_decisions_total", **deny) + 3
    for name in ("litellm_deployment_failure_responses_total", "litellm_llm_api_failed_requests_metric_total"):
        assert total(after, name) == total(before, name), name
    assert total(after, "litellm_deployment_cooled_down_total") == 0
    assert all(v == 0 for _, v in after.get("litellm_deployment_state", []))

    # the plugin's own families
    assert total(after, "cycles_reserve_duration_seconds_count") >= 4
    assert total(after, "cycles_commit_duration_seconds_count") >= 1
    assert total(after, "cycles_ledger_up") == 1 and "cycles_sweeper_lag_seconds" in after
    with proxy.ledger() as led:
        left = led.balance("tenant:obs-ok").remaining / 10**8
    assert total(after, "cycles_budget_remaining_usd", scope="tenant:obs-ok") == pytest.approx(left)
    assert total(after, "cycles_budget_burn_rate_usd_per_second", scope="tenant:obs-ok") > 0
    assert all("/" not in lab["scope"] for lab, _ in after["cycles_budget_remaining_usd"])  # top level only
    for name in ("cycles_ledger_unavailable_total", "cycles_fail_open_total", "cycles_settle_retries_total"):
        assert name in after, name

    # both deployments still take calls
    with proxy.ledger() as led:
        led.set_budget("tenant:obs-after", "1usd")
    served = set()
    for _ in range(30):
        r = chat(proxy, "obs-after")
        assert r.status_code == 200, r.text
        served.add(r.headers.get("x-litellm-model-id"))
        if served == {"mini-a", "mini-b"}:
            break
    assert served == {"mini-a", "mini-b"}

    # control: a provider failure is a deployment failure in the same metrics
    assert chat(proxy, "obs-after", text="FAIL500").status_code >= 500
    wait_until(lambda: total(scrape(proxy), "litellm_deployment_failure_responses_total", exception_status="500"))


def test_readiness_follows_a_fail_closed_ledger(proxy_factory: ProxyFactory) -> None:
    """A Redis ledger whose server stops: /cycles/health and /health/readiness turn 503 (calls get 503 too),
    and 200 again once it is back, with no call in between."""
    need_redis()
    server = RedisServer(appendonly=True, appendfsync="always")
    try:
        url = server.url(prefix="obs-health")
        proxy = proxy_factory({"on_unavailable": "fail_closed"}, env={"CYCLES_STORE": url})
        with proxy.ledger() as led:
            led.set_budget("tenant:obs-health", "1usd")

        def ready() -> int:
            return httpx.get(f"{proxy.url}/health/readiness", timeout=10).status_code

        assert ready() == 200
        health = httpx.get(f"{proxy.url}/cycles/health", timeout=10)
        assert health.status_code == 200 and health.json()["ledger"] == "ok"
        assert chat(proxy, "obs-health").status_code == 200

        server.kill()
        wait_until(lambda: ready() == 503)
        health = httpx.get(f"{proxy.url}/cycles/health", timeout=10)
        assert health.status_code == 503
        body = health.json()
        assert (body["status"], body["ledger"], body["serving"]) == ("unavailable", "unavailable", False)
        assert url not in json.dumps(body)  # the public route names no store address
        assert chat(proxy, "obs-health").status_code == 503

        server.start()
        wait_until(lambda: ready() == 200)
        assert httpx.get(f"{proxy.url}/cycles/health", timeout=10).json()["ledger"] == "ok"
        assert chat(proxy, "obs-health").status_code == 200
    finally:
        server.stop()


def test_readiness_follows_a_sqlite_ledger_another_process_locks(proxy_factory: ProxyFactory) -> None:
    """The embedded ledger's way of being down: another process holds the SQLite write lock (a stuck script, a
    long `sqlite3` session). The health probe's write cannot land, so readiness turns 503 while the plugin
    fails closed, and 200 again once the lock is let go, with no call in between."""
    proxy = proxy_factory({"on_unavailable": "fail_closed"})
    with proxy.ledger() as led:
        led.set_budget("tenant:obs-lock", "1usd")

    def ready() -> int:
        return httpx.get(f"{proxy.url}/health/readiness", timeout=30).status_code

    assert ready() == 200
    assert chat(proxy, "obs-lock").status_code == 200
    path = proxy.store_url.removeprefix("sqlite:///")
    other = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        other.execute("BEGIN EXCLUSIVE")
        wait_until(lambda: ready() == 503, timeout=30)
        body = httpx.get(f"{proxy.url}/cycles/health", timeout=30).json()
        assert (body["status"], body["ledger"], body["serving"]) == ("unavailable", "unavailable", False)
    finally:
        other.execute("ROLLBACK")
        other.close()
    wait_until(lambda: ready() == 200, timeout=60)
    assert chat(proxy, "obs-lock").status_code == 200


def test_metrics_of_several_workers_add_up(
    fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """LiteLLM with two workers (`--num_workers 2`, PROMETHEUS_MULTIPROC_DIR set): its /metrics serves what the
    workers wrote to the shared directory, and the plugin's families are there, added up over the workers."""
    tmp = tmp_path_factory.mktemp("workers")
    callbacks = ["cycles_litellm.proxy_handler", "prometheus"]
    config_path = litellm_config_with_callbacks(tmp, "litellm-workers.yaml", callbacks, open_metrics=True)
    prom_dir = tmp / "prometheus"
    prom_dir.mkdir()
    proxy = start_proxy(
        fake_upstream.base_url,
        tmp / "proxy",
        litellm_config=config_path,
        env={"PROMETHEUS_MULTIPROC_DIR": str(prom_dir)},
        args=("--num_workers", "2"),
    )
    try:
        with proxy.ledger() as led:
            led.set_budget("tenant:obs-workers", "1usd")

        def per_worker() -> dict[str, float]:
            """Decisions in each worker's counter file, as that worker last wrote them."""
            return {
                path.name: sum(
                    s.value
                    for family in multiprocess.MultiProcessCollector.merge([str(path)], accumulate=False)
                    if family.name == "cycles_decisions"
                    for s in family.samples
                )
                for path in prom_dir.glob("counter_*.db")
            }

        calls = 0
        while calls < 64:  # a connection per call: the kernel spreads them over the two workers' accepts
            assert [chat(proxy, "obs-workers").status_code for _ in range(8)] == [200] * 8
            calls += 8
            if calls < 16:
                continue
            wait_until(lambda n=calls: sum(per_worker().values()) == n, 10)  # each worker writes every second
            if sum(1 for v in per_worker().values() if v) == 2:
                break
        split = per_worker()
        print("decisions per worker file:", split)
        assert sorted(bool(v) for v in split.values()) == [True, True], split  # both workers served calls
        wait_until(lambda: total(scrape(proxy), "cycles_commit_duration_seconds_count") == calls)
        with proxy.ledger() as led:
            remaining = led.balance("tenant:obs-workers").remaining
        assert remaining == 10**8 - calls * ALLOWED
        metrics = wait_until(
            lambda: (
                (m := scrape(proxy))
                and total(m, "cycles_budget_remaining_usd", scope="tenant:obs-workers") == remaining / 10**8
                and m
            )
        )
        assert total(metrics, "cycles_decisions_total", decision="ALLOW", shadow="false") == calls
        assert total(metrics, "cycles_reserve_duration_seconds_count") == calls
        assert total(metrics, "cycles_ledger_up") == 1
        assert total(metrics, "litellm_proxy_total_requests_metric_total") >= calls  # LiteLLM's own, same scrape
    finally:
        proxy.stop()
