"""CPU per proxy call of the plugin's own work, in a quiet process (no LiteLLM proxy around it).

Calls the callback's hooks the way the proxy does for one sequential chat call: the pre-call hook (payer,
estimate, reserve), a simulated provider wait, the success event (which settles in the background), and
measures process CPU time per call over N calls on a real SQLite ledger (or `memory://`). Inside the proxy
the same work costs 2-2.5x this (colder CPU caches); `bench/proxy_overhead.py` measures that.

    .venv/bin/python bench/proxy_hook.py                      # 3,000 calls, SQLite, commits ride along
    .venv/bin/python bench/proxy_hook.py --coalesce-ms 0      # every commit in a transaction of its own
    .venv/bin/python bench/proxy_hook.py --store memory       # no SQLite

Runs each configuration `--rounds` times and prints every round (the machine is noisy: compare rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from cycles_ledger import open_ledger
from cycles_litellm import CyclesCallback, Settings

MESSAGES = [{"role": "user", "content": "hello there"}]


def request(call_id: str) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "messages": MESSAGES,
        "max_tokens": 16,
        "litellm_call_id": call_id,
        "metadata": {},
        "proxy_server_request": {"headers": {"x-cycles-tenant": "bench"}},
    }


async def measure(calls: int, store: str, coalesce_ms: float, warmup: int = 300) -> float:
    """CPU milliseconds per call."""
    with tempfile.TemporaryDirectory() as tmp:
        if store == "sqlite":
            ledger = open_ledger(f"sqlite:///{tmp}/hook.db", coalesce_ms=coalesce_ms)
        else:
            ledger = open_ledger(f"memory://hook-{os.getpid()}-{time.monotonic_ns()}")
        try:
            await ledger.set_budget("tenant:bench", "1000000usd")
            cb = CyclesCallback(Settings(), ledger=ledger)

            async def one(i: int) -> None:
                call_id = f"call-{i}"
                await cb.async_pre_call_hook(None, None, request(call_id), "acompletion")
                await asyncio.sleep(0.0005)  # the provider
                usage = {"prompt_tokens": 9, "completion_tokens": 16}
                kwargs = {"litellm_call_id": call_id, "response_cost": 0.0000133, "standard_logging_object": usage}
                await cb.async_log_success_event(kwargs, None, None, None)
                await asyncio.sleep(0.0005)  # the client's next request

            for i in range(warmup):
                await one(i)
            started = time.process_time()
            for i in range(warmup, warmup + calls):
                await one(i)
            while cb._tasks:  # the last settle
                await asyncio.sleep(0.001)
            cpu = time.process_time() - started
            balance = await ledger.balance("tenant:bench")
            assert balance.reserved == 0 and balance.spent == (warmup + calls) * 1330, balance
            return cpu / calls * 1000
        finally:
            await ledger.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    parser.add_argument("--coalesce-ms", type=float, default=20.0, help="SQLite: how long a commit may wait to ride")
    args = parser.parse_args()
    label = f"{args.store}" + (f", coalesce_ms={args.coalesce_ms:g}" if args.store == "sqlite" else "")
    for r in range(args.rounds):
        ms = asyncio.run(measure(args.calls, args.store, args.coalesce_ms))
        print(f"round {r + 1}: {label}: {ms:.3f} ms CPU per proxy call (pre-call hook + settle), {args.calls} calls")


if __name__ == "__main__":
    main()
