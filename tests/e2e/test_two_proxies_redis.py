"""Two LiteLLM proxy replicas on ONE Redis ledger: a budget they share admits at most what it pays for.

Both proxies are real `litellm` processes (`start_proxy`, each with `CYCLES_STORE` set to the same Redis
URL and key prefix) in front of the session's fake upstream. Prices as in test_proxy_budget.py: gpt-4o-mini
costs 15 USD_MICROCENTS per input token and 60 per output token. The worst case is what the plugin holds
for the request below (its counted prompt + 40 output tokens); the upstream reports 25 prompt + 40 output
tokens, more than that hold, so no admitted call ever frees room for another.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from cycles_ledger import ReservationStatus
from cycles_litellm.fake_provider import MAX_COMPLETION_TOKENS, PROMPT_TOKENS, FakeUpstream
from cycles_litellm.launch import LiteLLMProxy, start_proxy
from tests.conftest import RedisTarget

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

IN, OUT = 15, 60  # USD_MICROCENTS per token for gpt-4o-mini
N = 8  # worst-case calls the budget pays for
TENANT = "e2e-replicas"
SCOPE = f"tenant:{TENANT}"
MAX_TOKENS = 40
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": MAX_TOKENS}


@pytest.fixture(scope="module")
def replicas(
    redis_server: RedisTarget, fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[LiteLLMProxy]]:
    """Two proxies started side by side on one Redis ledger (a fresh key prefix)."""
    store = redis_server.url()
    env = {"CYCLES_STORE": store}
    dirs = [tmp_path_factory.mktemp(f"replica-{i}") for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start_proxy, fake_upstream.base_url, d, env=env) for d in dirs]
    started = [f.result() for f in futures if f.exception() is None]
    try:
        for f in futures:
            f.result()  # re-raise a start-up failure (with its log tail) once both are done
        assert {p.store_url for p in started} == {store}
        yield started
    finally:
        for p in started:
            p.stop()


def _wait_until(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def _post(proxy: LiteLLMProxy) -> httpx.Response:
    headers = {**proxy.auth_headers, "x-cycles-tenant": TENANT}
    return httpx.post(f"{proxy.url}/v1/chat/completions", json=BODY, headers=headers, timeout=60)


async def _burst(proxies: list[LiteLLMProxy], n: int) -> list[tuple[int, httpx.Response]]:
    """`n` requests at once, alternating between the proxies; (proxy index, response) each."""
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as client:

        async def one(i: int) -> tuple[int, httpx.Response]:
            p = proxies[i % len(proxies)]
            headers = {**p.auth_headers, "x-cycles-tenant": TENANT}
            return i % len(proxies), await client.post(f"{p.url}/v1/chat/completions", json=BODY, headers=headers)

        return list(await asyncio.gather(*(one(i) for i in range(n))))


def test_two_proxies_share_one_budget_and_never_overspend(
    replicas: list[LiteLLMProxy], fake_upstream: FakeUpstream
) -> None:
    """A budget for N worst-case calls, 5N concurrent calls over two proxies: at most N pass, books reconcile."""
    actual = PROMPT_TOKENS * IN + min(MAX_TOKENS, MAX_COMPLETION_TOKENS) * OUT
    a, b = replicas
    with a.ledger() as led:
        led.set_budget(SCOPE, "1usd")  # for the first two calls; cut to N worst cases below

    def settled() -> Any:
        with a.ledger() as led:
            _wait_until(lambda: led.balance(SCOPE).reserved == 0)
            return led.balance(SCOPE)

    # One call through each proxy, one after the other: each one's spend shows on the other's ledger.
    admitted: list[tuple[int, str]] = []  # (proxy index, litellm call id) of every 200
    spent = 0
    for i, proxy in enumerate(replicas):
        r = _post(proxy)
        assert r.status_code == 200, r.text
        assert r.headers["x-cycles-decision"] == "ALLOW"
        admitted.append((i, r.headers["x-litellm-call-id"]))
        bal = settled()
        assert bal.spent == spent + actual
        spent = bal.spent
    with b.ledger() as led:
        worst = led.get_reservation(r.headers["x-cycles-reservation-id"]).reserved.amount
        assert 0 < worst <= actual, "this test's arithmetic needs calls that cost at least their hold"
        allocated = N * worst
        bal = led.set_budget(SCOPE, {"unit": "USD_MICROCENTS", "amount": allocated})
    assert (bal.spent, bal.remaining) == (2 * actual, allocated - 2 * actual)

    fake_upstream.clear()
    outcomes = asyncio.run(_burst(replicas, 5 * N))
    codes = [r.status_code for _, r in outcomes]
    assert set(codes) <= {200, 402}, [r.text for _, r in outcomes if r.status_code not in (200, 402)]
    for _, r in outcomes:
        if r.status_code == 402:
            err = r.json()["error"]
            assert (err["type"], err["code"], err["cycles"]["scope"]) == ("budget_exceeded", "BUDGET_EXCEEDED", SCOPE)
    admitted += [(i, r.headers["x-litellm-call-id"]) for i, r in outcomes if r.status_code == 200]
    assert 3 <= len(admitted) <= N  # the burst found room for one more worst case at least
    assert len(fake_upstream.requests) == codes.count(200)  # denied calls never went upstream

    bal = settled()
    assert bal.spent <= bal.allocated == allocated
    assert (bal.reserved, bal.debt) == (0, 0)
    with b.ledger() as led:
        assert led.verify() == []
        reservations = led.list_reservations(scope=SCOPE, limit=1000)
        events = led.events(scope=SCOPE, limit=1000)
    # Every admitted call, whichever proxy took it, is one COMMITTED reservation under its call id.
    assert sorted(r.idempotency_key for r in reservations) == sorted(key for _, key in admitted)
    assert {r.status for r in reservations} == {ReservationStatus.COMMITTED}
    assert sum(r.committed.amount for r in reservations if r.committed is not None) == bal.spent
    assert {i for i, _ in admitted} == {0, 1}
    kinds = [e.type for e in events]
    assert kinds.count("reserved") == kinds.count("committed") == len(admitted)
    assert kinds.count("denied") == codes.count(402)
