"""What pricing a call costs as the router's fallback configuration grows: the estimate follows every fallback
LiteLLM may take (chains, `"*"` entries), so its time grows with the groups reached.

Two shapes per size n: a chain (each group falls back to the next, a call to the first may reach all n) and
a mesh (every group names 5 others). Printed: ms per estimate of a short chat call on the first group, after a
first call that builds the fallback index and the price cache (both kept a minute).

    .venv/bin/python bench/estimate_fallbacks.py
    .venv/bin/python bench/estimate_fallbacks.py --sizes 10 100 1000 --calls 50
"""

from __future__ import annotations

import argparse
import os
import time
import types
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from cycles_litellm import Settings
from cycles_litellm.estimate import estimate_call


def router(n: int, shape: str) -> Any:
    """A stand-in with the Router's attributes the estimate reads (a real Router of 1,000 groups takes
    seconds to build and answers the same)."""
    models = [
        {"model_name": f"g{i}", "litellm_params": {"model": "gpt-4o" if i % 2 else "gpt-4o-mini"}} for i in range(n)
    ]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for m in models:
        by_name.setdefault(m["model_name"], []).append(m)
    fan = 1 if shape == "chain" else 5
    fallbacks = [{f"g{i}": [f"g{(i + k) % n}" for k in range(1, fan + 1)]} for i in range(n)]
    return types.SimpleNamespace(
        fallbacks=fallbacks,
        context_window_fallbacks=[],
        content_policy_fallbacks=[],
        get_model_list=lambda model_name=None: by_name.get(model_name, []),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 300, 1000])
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    settings = Settings()
    data = {"model": "g0", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}
    print(f"{'groups':>7} {'shape':>6} {'reached':>8} {'first ms':>9} {'ms per estimate':>16}")
    for n in args.sizes:
        for shape in ("chain", "mesh"):
            r = router(n, shape)
            started = time.perf_counter()
            estimate_call("g0", data, "chat", settings, r)
            first = time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(args.calls):
                estimate_call("g0", data, "chat", settings, r)
            each = (time.perf_counter() - started) / args.calls
            print(f"{n:>7} {shape:>6} {n:>8} {first * 1000:>9.2f} {each * 1000:>16.3f}")


if __name__ == "__main__":
    main()
