"""The benchmark's stand-in (`bench/stand_in_callback.py`) must register the hooks the plugin registers, or
`bench/proxy_overhead.py --stand-in` would measure LiteLLM's handling of another callback than ours."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

from litellm.integrations.custom_logger import CustomLogger

from cycles_litellm.handler import CyclesCallback

STAND_IN = Path(__file__).resolve().parents[2] / "bench" / "stand_in_callback.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stand_in_callback", STAND_IN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def overridden(cls: type) -> set[str]:
    """The CustomLogger methods `cls` defines itself (what LiteLLM finds overridden on a callback)."""
    return {
        name
        for name in dir(CustomLogger)
        if not name.startswith("__")
        and callable(getattr(CustomLogger, name))
        and getattr(cls, name) is not getattr(CustomLogger, name)
    }


def test_the_stand_in_overrides_exactly_the_plugins_hooks() -> None:
    plugin = overridden(CyclesCallback)
    assert "async_pre_call_hook" in plugin and "async_logging_hook" in plugin
    assert overridden(load().StandIn) == plugin


def test_the_stand_in_changes_nothing() -> None:
    handler = load().handler
    data: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

    async def chunks() -> Any:
        for c in ("a", "b", "c"):
            yield c

    async def run() -> list[Any]:
        assert await handler.async_pre_call_hook(None, None, data, "acompletion") is data
        assert await handler.async_logging_hook(data, "result", "acompletion") == (data, "result")
        assert await handler.async_post_call_response_headers_hook(data, None, None) is None
        return [c async for c in handler.async_post_call_streaming_iterator_hook(None, chunks(), data)]

    assert asyncio.run(run()) == ["a", "b", "c"]
