"""Cycles budget authority for LiteLLM: one line in the proxy config.

    litellm_settings:
      callbacks: cycles_litellm.proxy_handler

`proxy_handler` is built on first access from `$CYCLES_CONFIG` (default `configs/cycles.yaml`), so
importing this package reads no file and opens no ledger. The public names are imported on first use
too, so `cycles_litellm.launch` or `cycles_litellm.fake_provider` do not pay for importing litellm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# public name -> the module that defines it (imported on first access)
_HOMES = {
    "BudgetDenied": "cycles_ledger",
    "CyclesCallback": "cycles_litellm.handler",
    "budget_error": "cycles_litellm.handler",
    "CyclesGate": "cycles_litellm.sdk",
    "Guard": "cycles_litellm.sdk",
    "acompletion": "cycles_litellm.sdk",
    "aembedding": "cycles_litellm.sdk",
    "completion": "cycles_litellm.sdk",
    "configure": "cycles_litellm.sdk",
    "Settings": "cycles_litellm.settings",
    "load_settings": "cycles_litellm.settings",
}

_handler: CyclesCallback | None = None


def __getattr__(name: str) -> Any:
    global _handler
    if name == "proxy_handler":
        if _handler is None:
            from .handler import CyclesCallback

            _handler = CyclesCallback()
        return _handler
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
