"""Every request field is untrusted input: whatever JSON a client sends on any metered route, the pre-call
hook answers with a typed refusal (a ProxyException with a 4xx status) or lets the call through — never
another exception (a 500) — and in shadow mode it always lets the call through."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litellm.proxy._types import ProxyException

from cycles_ledger import open_ledger, open_ledger_sync
from cycles_litellm import CyclesCallback, Settings

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
FIELDS = [
    "messages", "prompt", "input", "system", "tools", "instructions", "n", "best_of", "max_tokens",
    "max_completion_tokens", "max_output_tokens", "service_tier", "response_format", "fallbacks", "size",
    "quality", "documents", "query", "modalities", "metadata", "suffix",
]  # fmt: skip
CALL_TYPES = [
    "acompletion", "atext_completion", "aembedding", "anthropic_messages", "aresponses", "aimage_generation",
    "aspeech", "arerank",
]  # fmt: skip
BODIES = st.fixed_dictionaries(
    {"model": st.sampled_from(["gpt-4o-mini", "claude-haiku-4-5", "gpt-image-1", "tts-1", "nope", ""])},
    optional={f: JSON for f in FIELDS},
)

_tmp = Path(tempfile.mkdtemp(prefix="cycles-fuzz-"))
_URL = f"sqlite:///{_tmp / 'fuzz.db'}"
with open_ledger_sync(_URL) as _led:
    _led.set_budget("tenant:fz", "1000usd")


async def _hook(body: dict[str, Any], call_type: str, mode: str) -> Any:
    ledger = open_ledger(_URL)
    try:
        cb = CyclesCallback(Settings(mode=mode), ledger=ledger)  # type: ignore[arg-type]
        data = {**body, "litellm_call_id": "fuzz", "proxy_server_request": {"headers": {"x-cycles-tenant": "fz"}}}
        return await cb.async_pre_call_hook(None, None, data, call_type)
    finally:
        await ledger.aclose()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODIES, call_type=st.sampled_from(CALL_TYPES))
def test_any_request_is_answered_with_a_typed_refusal_or_passes(body: dict[str, Any], call_type: str) -> None:
    try:
        asyncio.run(_hook(body, call_type, "enforce"))
    except ProxyException as exc:
        assert 400 <= int(exc.code) < 500, exc.to_dict()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODIES, call_type=st.sampled_from(CALL_TYPES))
def test_shadow_lets_any_request_through(body: dict[str, Any], call_type: str) -> None:
    assert asyncio.run(_hook(body, call_type, "shadow")) is not None
