"""What a LiteLLM call is, in ledger terms: its action, its cost in microcents, its streamed text."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

__all__ = ["action_kind", "action_name", "chunk_text", "usd_to_microcents"]


def usd_to_microcents(value: Any) -> int:
    """LiteLLM reports costs as float USD: convert once, rounding up (never under-charge)."""
    if not value:
        return 0
    # Drop float noise (0.00026250000000000004) below 1e-12 USD before rounding up to a microcent.
    return math.ceil(Decimal(str(value)).quantize(Decimal("1e-12")) * 10**8)


def action_kind(call_type: str) -> str:
    if "embedding" in call_type:
        return "llm.embedding"
    if "image" in call_type:
        return "llm.image"
    return "llm.completion"


@functools.lru_cache(maxsize=1024)
def action_name(model: str) -> str:
    """`<provider>:<model>`, e.g. `openai:gpt-4o-mini`, as LiteLLM resolves the provider (once per model)."""
    provider, sep, name = model.partition("/")
    if sep:
        return f"{provider}:{name}"
    try:
        import litellm

        name, provider, _, _ = litellm.get_llm_provider(model)
        return f"{provider}:{name}"
    except Exception:  # noqa: BLE001 - an unknown provider is still a valid action name
        return f"litellm:{model}"


def chunk_text(chunk: Any) -> str:
    try:
        choices = chunk.choices if not isinstance(chunk, Mapping) else chunk.get("choices", [])
        parts = []
        for choice in choices or []:
            delta = choice.delta if not isinstance(choice, Mapping) else choice.get("delta", {})
            content = delta.content if not isinstance(delta, Mapping) else delta.get("content")
            if content:
                parts.append(content)
        return "".join(parts)
    except AttributeError:
        return ""
