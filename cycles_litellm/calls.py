"""What a LiteLLM call is, in ledger terms: its action, its cost in microcents, its streamed text."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

__all__ = ["action_kind", "action_name", "chunk_text", "usage_tokens", "usd_to_microcents"]


def usd_to_microcents(value: Any) -> int:
    """LiteLLM reports costs as float USD: convert once, rounding up (never under-charge)."""
    if not value:
        return 0
    if type(value) is float:
        return _float_microcents(value)  # calls of one model and size cost the same: converted once
    return _microcents(value)


def _microcents(value: Any) -> int:
    # Drop float noise (0.00026250000000000004) below 1e-12 USD before rounding up to a microcent.
    return math.ceil(Decimal(str(value)).quantize(Decimal("1e-12")) * 10**8)


_float_microcents = functools.lru_cache(maxsize=4096)(_microcents)


_KINDS = {
    "embedding": "llm.embedding",
    "image": "llm.image",
    "speech": "llm.speech",
    "transcription": "llm.transcription",
    "rerank": "llm.rerank",
}


@functools.lru_cache(maxsize=256)
def action_kind(kind: str) -> str:
    """The ledger action kind of a route kind (routes.py) or a LiteLLM call type."""
    for key, value in _KINDS.items():
        if key in kind:
            return value
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


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)


def chunk_text(chunk: Any) -> str:
    """Everything generated in one streamed chunk, whatever the route: chat deltas (content, reasoning,
    tool-call arguments), text completions, Responses API `output_text` / `function_call_arguments` /
    reasoning deltas, Anthropic `text_delta` / `thinking_delta` / `input_json_delta` (objects, dicts or raw
    SSE bytes). An aborted stream is charged for all of it, not only the visible text."""
    if isinstance(chunk, bytes | bytearray):
        return "".join(_sse_texts(bytes(chunk)))
    try:
        parts: list[str] = []
        for choice in _get(chunk, "choices") or []:
            delta = _get(choice, "delta")
            if delta is not None:
                for key in ("content", "reasoning_content"):
                    text = _get(delta, key)
                    if isinstance(text, str):
                        parts.append(text)
                for call in _get(delta, "tool_calls") or []:
                    function = _get(call, "function")
                    for key in ("name", "arguments"):
                        text = _get(function, key) if function is not None else None
                        if isinstance(text, str):
                            parts.append(text)
            else:
                text = _get(choice, "text")
                if isinstance(text, str):
                    parts.append(text)
        if parts:
            return "".join(parts)
        delta = _get(chunk, "delta")
        if isinstance(delta, str) and str(_get(chunk, "type") or "").endswith(".delta"):
            return delta  # Responses: output_text, function_call_arguments, reasoning_summary_text, ...
        if delta is not None and not isinstance(delta, str):
            out = [t for key in ("text", "thinking", "partial_json") if isinstance(t := _get(delta, key), str)]
            return "".join(out)
        return ""
    except (AttributeError, TypeError):
        return ""


def _sse_texts(raw: bytes) -> list[str]:
    out = []
    for line in raw.decode(errors="replace").splitlines():
        if line.startswith("data:"):
            try:
                out.append(chunk_text(json.loads(line[5:].strip())))
            except ValueError:
                continue
    return out


def usage_tokens(response: Any) -> int | None:
    """Tokens a response reports it used (prompt + output, any route's field names); None without usage."""
    usage = _get(response, "usage")
    if usage is None:
        return None
    total = _get(usage, "total_tokens")
    if isinstance(total, int) and total > 0:
        return total
    # Anthropic's input_tokens leave out the cached part of the prompt, which it reports on its own.
    names = (
        "prompt_tokens",
        "completion_tokens",
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    )
    parts = [_get(usage, k) for k in names]
    counted = [p for p in parts if isinstance(p, int) and p >= 0]
    return sum(counted) if counted else None
