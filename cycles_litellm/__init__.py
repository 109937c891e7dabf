"""Cycles budget authority for LiteLLM: one line in the proxy config.

    litellm_settings:
      callbacks: cycles_litellm.proxy_handler

`proxy_handler` is built on first access from `$CYCLES_CONFIG` (default `configs/cycles.yaml`), so
importing this package reads no file and opens no ledger.
"""

from __future__ import annotations

from typing import Any

from cycles_ledger import BudgetDenied

from .handler import CyclesCallback, budget_error
from .sdk import CyclesGate, Guard, acompletion, aembedding, completion, configure
from .settings import Settings, load_settings

__all__ = [
    "BudgetDenied",
    "CyclesCallback",
    "CyclesGate",
    "Guard",
    "Settings",
    "acompletion",
    "aembedding",
    "budget_error",
    "completion",
    "configure",
    "load_settings",
    "proxy_handler",
]

_handler: CyclesCallback | None = None


def __getattr__(name: str) -> Any:
    global _handler
    if name == "proxy_handler":
        if _handler is None:
            _handler = CyclesCallback()
        return _handler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
