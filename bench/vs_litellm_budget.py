"""The same budget kept by LiteLLM's own proxy budget and by this plugin, measured side by side.

LiteLLM without a database offers one budget for the whole proxy (`litellm_settings: max_budget`, in USD),
checked against the spend of calls that already finished. This plugin reserves each call's worst case
before it runs. The run starts the fake provider and two real proxies on loopback:

- L: configs/litellm.yaml without the callback line, plus `litellm_settings: max_budget: <budget>`;
- C: configs/litellm.yaml with the callback, and the same budget on `tenant:bench`;

then sends the same traffic to each: `--concurrent` requests at once, then `--sequential` one after another
(every request costs the same, known amount at the fake provider), and prints how many calls each let
through and what they cost against the budget.

    .venv/bin/python bench/vs_litellm_budget.py                 # budget for 10 calls, 50 at once, then 30
    .venv/bin/python bench/vs_litellm_budget.py --calls 5 --concurrent 100
"""

from __future__ import annotations

import argparse
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml

from cycles_ledger import Amount, Unit, open_ledger_sync
from cycles_litellm.fake_provider import MAX_COMPLETION_TOKENS, FakeUpstream, count_input_tokens
from cycles_litellm.launch import (
    LiteLLMProxy,
    litellm_config_without_callbacks,
    start_proxy,
)

IN, OUT = 15, 60  # gpt-4o-mini, USD_MICROCENTS per token
# COUNTINPUT: the fake provider bills the prompt's real token count (not its fixed 25), like a provider does
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "COUNTINPUT hi"}], "max_tokens": 40}
COST = count_input_tokens(BODY) * IN + MAX_COMPLETION_TOKENS * OUT  # what each request costs


def send(proxy: LiteLLMProxy, n: int, parallel: int) -> list[int]:
    body = BODY
    headers = {**proxy.auth_headers, "x-cycles-tenant": "bench"}

    def one(_: int) -> int:
        with httpx.Client(timeout=60) as client:
            return client.post(proxy.url + "/v1/chat/completions", json=body, headers=headers).status_code

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(one, range(n)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=10, help="the budget, in calls' worth (default 10)")
    ap.add_argument("--concurrent", type=int, default=50, help="requests sent at once (default 50)")
    ap.add_argument("--sequential", type=int, default=30, help="then requests one after another (default 30)")
    args = ap.parse_args()
    budget = args.calls * COST  # USD_MICROCENTS
    work = Path(tempfile.mkdtemp(prefix="cycles-vs-litellm-"))
    config = yaml.safe_load(litellm_config_without_callbacks(work / "l").read_text())
    config.setdefault("litellm_settings", {})["max_budget"] = budget / 10**8
    lite_config = work / "l" / "litellm-max-budget.yaml"
    lite_config.write_text(yaml.safe_dump(config, sort_keys=False))
    results: list[tuple[str, str, list[int]]] = []
    with FakeUpstream() as up:
        for label, cfg in (("LiteLLM max_budget", lite_config), ("Cycles plugin", None)):
            for phase, n, parallel in (
                ("at once", args.concurrent, args.concurrent),
                ("one by one", args.sequential, 1),
            ):
                kwargs: dict[str, Any] = {} if cfg is None else {"litellm_config": cfg}
                proxy = start_proxy(up.base_url, work / f"{label[:5]}-{phase[:3]}".replace(" ", ""), **kwargs)
                try:
                    if cfg is None:
                        with open_ledger_sync(proxy.store_url) as led:
                            led.set_budget("tenant:bench", Amount(unit=Unit.USD_MICROCENTS, amount=budget))
                    results.append((label, phase, send(proxy, n, parallel)))
                finally:
                    proxy.stop()
    print(f"budget: {args.calls} calls' worth = ${budget / 10**8:.8f} (each call costs ${COST / 10**8:.8f})")
    print(
        f"{'keeper':20s} {'traffic':11s} {'sent':>5s} {'served':>7s} {'refused':>8s} {'spent':>12s} {'of budget':>10s}"
    )
    for label, phase, codes in results:
        served = codes.count(200)
        spent = served * COST
        print(
            f"{label:20s} {phase:11s} {len(codes):5d} {served:7d} {len(codes) - served:8d} "
            f"${spent / 10**8:11.8f} {spent / budget:9.1f}x"
        )


if __name__ == "__main__":
    main()
