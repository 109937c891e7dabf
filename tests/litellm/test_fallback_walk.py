"""The estimate follows the router's fallbacks however large its configuration: a long chain is priced to its
dearest end, and a fallback list the proxy's admin API replaces or grows is followed at once. The walk reads an
index of each list built for the request, so its cost grows with the configuration and the groups reached, not
with their product (`bench/estimate_fallbacks.py` prints the figures)."""

from __future__ import annotations

from typing import Any

import litellm

from cycles_litellm import Settings
from cycles_litellm.estimate import estimate_call, fallback_groups

MSGS = [{"role": "user", "content": "hi"}]


def _ring(n: int, dear_at: int) -> litellm.Router:
    """n groups g0..g{n-1}, each falling back to the next (provider-prefixed keys on odd ones, as LiteLLM matches
    keys with or without the provider); every group is gpt-4o-mini but one, o1 (100x the price)."""
    models = [
        {
            "model_name": f"g{i}",
            "litellm_params": {"model": "openai/o1" if i == dear_at else "openai/gpt-4o-mini", "api_key": "x"},
        }
        for i in range(n)
    ]
    fallbacks = [{(f"openai/g{i}" if i % 2 else f"g{i}"): [f"g{i + 1}"]} for i in range(n - 1)]
    return litellm.Router(model_list=models, num_retries=0, fallbacks=fallbacks)


def test_a_long_fallback_chain_is_priced_at_its_dearest_end() -> None:
    """300 groups chained one to the next: a call to g0 may end at g299 after 299 fallbacks, and g299 is o1.
    The hold is o1's; every group is reached once."""
    router = _ring(300, dear_at=299)
    req: dict[str, Any] = {"model": "g0", "messages": MSGS, "max_tokens": 10}
    groups = fallback_groups("g0", req, router)
    assert groups == [f"g{i}" for i in range(300)]
    held = estimate_call("g0", req, "chat", Settings(), router)
    assert held.amount >= estimate_call("g299", req, "chat", Settings(), router).amount
    assert "o1" in held.model
    # from the middle of the chain, only what lies after it
    assert fallback_groups("g150", {**req, "model": "g150"}, router) == [f"g{i}" for i in range(150, 300)]


def test_fallbacks_the_admin_api_changes_are_followed_at_once() -> None:
    """The proxy's admin API replaces the router's fallbacks (Router.update_settings) or a caller appends to them:
    the next estimate follows the new list, not the one read a moment before."""
    router = _ring(4, dear_at=3)
    req: dict[str, Any] = {"model": "g0", "messages": MSGS, "max_tokens": 10}
    assert fallback_groups("g0", req, router) == ["g0", "g1", "g2", "g3"]
    router.update_settings(fallbacks=[{"g0": ["g2"]}])  # replaced: g0 -> g2 only
    assert fallback_groups("g0", req, router) == ["g0", "g2"]
    router.fallbacks.append({"g2": ["g3"]})  # grown in place
    assert fallback_groups("g0", req, router) == ["g0", "g2", "g3"]
    router.fallbacks.append({"*": ["g1"]})  # a generic entry: every group may fall back to g1
    assert fallback_groups("g0", req, router) == ["g0", "g2", "g1", "g3"]
