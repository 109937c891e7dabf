"""A real proxy on a Redis ledger that dies while a call streams: the call finishes (the provider answered and
billed it), its settle cannot reach Redis within its retries and is kept, and once Redis is back (restarted on
its AOF) the next call that gets through sends it: every call is paid, nothing is left held."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from cycles_ledger.redis_server import RedisServer
from tests.conftest import need_redis
from tests.e2e.conftest import ProxyFactory

IN, OUT = 15, 60  # USD_MICROCENTS per token for gpt-4o-mini
PROMPT, COMPLETION = 25, 16  # the fake upstream's usage for max_tokens 16


def body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], "max_tokens": 16, **extra}


def test_a_call_whose_settle_outlives_a_redis_outage_is_paid_when_redis_is_back(proxy_factory: ProxyFactory) -> None:
    need_redis()
    server = RedisServer(appendonly=True, appendfsync="always")
    try:
        url = server.url(prefix="outage")
        proxy = proxy_factory({"on_unavailable": "fail_closed"}, env={"CYCLES_STORE": url})
        with proxy.ledger() as led:
            led.set_budget("tenant:outage", "1usd")
        headers = {**proxy.auth_headers, "x-cycles-tenant": "outage"}
        first_chunk = threading.Event()
        streamed: list[int] = []

        def stream() -> None:
            payload = body("SLOWSTREAM please", stream=True, stream_options={"include_usage": True})
            with httpx.stream(
                "POST", f"{proxy.url}/v1/chat/completions", json=payload, headers=headers, timeout=60
            ) as r:
                streamed.append(r.status_code)
                for _ in r.iter_bytes():
                    first_chunk.set()

        caller = threading.Thread(target=stream)
        caller.start()
        assert first_chunk.wait(30), "the stream did not start"
        server.kill()  # mid-stream: the reserve is in Redis, its settle will not be
        caller.join(60)
        assert streamed == [200]
        time.sleep(3.0)  # longer than the settle's retries (~1.4 s)
        server.start()
        deadline = time.monotonic() + 30
        while True:  # the proxy's client reconnects; the first calls may still find it away (fail closed: 503)
            r = httpx.post(f"{proxy.url}/v1/chat/completions", json=body("hello there"), headers=headers, timeout=60)
            if r.status_code == 200:
                break
            assert r.status_code == 503 and time.monotonic() < deadline, r.text
            time.sleep(0.5)
        each = PROMPT * IN + COMPLETION * OUT
        with proxy.ledger() as led:
            deadline = time.monotonic() + 30
            while (b := led.balance("tenant:outage")).spent < 2 * each and time.monotonic() < deadline:
                time.sleep(0.1)
            assert (b.spent, b.reserved) == (2 * each, 0)
    finally:
        server.stop()
