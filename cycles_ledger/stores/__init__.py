"""Stores chosen by URL: `store_from_url("sqlite:///budgets.db")`.

Each backend registers the URL schemes it serves; drivers for optional backends are imported only
when such a store is built.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import ConfigError
from .base import Store, SupportsSweep

__all__ = ["Store", "SupportsSweep", "known_schemes", "store_from_url"]

# scheme → "module:Class", resolved lazily so optional drivers load only on use.
_REGISTRY: dict[str, str] = {
    "memory": "cycles_ledger.stores.memory:MemoryStore",
    "sqlite": "cycles_ledger.stores.sqlite:SqliteStore",
    "redis": "cycles_ledger.stores.redis:RedisStore",
    "rediss": "cycles_ledger.stores.redis:RedisStore",
    "redis+cluster": "cycles_ledger.stores.redis:RedisStore",
    "rediss+cluster": "cycles_ledger.stores.redis:RedisStore",
}


def known_schemes() -> list[str]:
    return sorted(_REGISTRY)


def store_from_url(url: str, **settings: Any) -> Store:
    """Build the store a URL names; an unknown scheme is a ConfigError listing the known ones."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"store URL {url!r} has no scheme; known: {', '.join(s + '://' for s in known_schemes())}")
    scheme = url.split("://", 1)[0].lower()
    target = _REGISTRY.get(scheme)
    if target is None:
        raise ConfigError(f"unknown store scheme {scheme!r} in {url!r}; known: {', '.join(known_schemes())}")
    module_name, cls_name = target.split(":")
    cls: type[Store] = getattr(importlib.import_module(module_name), cls_name)
    return cls.from_url(url, **settings)
