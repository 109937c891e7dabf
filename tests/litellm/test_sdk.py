"""SDK wrappers: reserve, call LiteLLM (its own mock_response, no network), commit, release, deny."""

from __future__ import annotations

import math
from decimal import Decimal
from pathlib import Path

import litellm
import pytest

from cycles_ledger import BudgetDenied, open_ledger_sync
from cycles_ledger.context import subject_var
from cycles_ledger.models import Subject
from cycles_litellm import Guard, Settings

MSGS = [{"role": "user", "content": "hello there"}]
DEAD = "http://127.0.0.1:9/v1"  # nothing listens: a call that reaches it fails with a connection error


@pytest.fixture
def store(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'sdk.db'}"
    with open_ledger_sync(url) as led:
        led.set_budget("tenant:sdk", "1usd")
    return url


def balance(url: str) -> tuple[int, int]:
    with open_ledger_sync(url) as led:
        b = led.balance("tenant:sdk")
        return b.spent, b.reserved


async def test_acompletion_commits_litellm_cost(store: str) -> None:
    """A metered call commits LiteLLM's computed cost and holds nothing afterwards."""
    guard = Guard(Settings(), store=store)
    resp = await guard.acall(
        "acompletion",
        litellm.acompletion,
        {"model": "gpt-4o-mini", "messages": MSGS, "mock_response": "hi back", "max_tokens": 50},
        {"tenant": "sdk"},
    )
    expected = litellm.completion_cost(completion_response=resp)
    spent, reserved = balance(store)
    assert reserved == 0
    assert expected > 0
    assert spent == math.ceil(Decimal(str(expected)) * 10**8)


async def test_denied_call_never_reaches_the_provider(store: str) -> None:
    """DENY raises BudgetDenied before LiteLLM is called (the dead upstream is never contacted)."""
    with open_ledger_sync(store) as led:
        led.set_budget("tenant:sdk", "0.0000001usd")
    guard = Guard(Settings(min_output_tokens=1000), store=store)
    with pytest.raises(BudgetDenied) as info:
        await guard.acall(
            "acompletion",
            litellm.acompletion,
            {"model": "gpt-4o", "messages": MSGS, "api_base": DEAD, "api_key": "x"},
            {"tenant": "sdk"},
        )
    assert info.value.reason_code == "BUDGET_EXCEEDED"
    assert info.value.scope == "tenant:sdk"
    assert balance(store) == (0, 0)


async def test_failed_call_releases(store: str) -> None:
    """A provider error releases the hold and re-raises."""
    guard = Guard(Settings(), store=store)
    with pytest.raises(Exception) as info:
        await guard.acall(
            "acompletion",
            litellm.acompletion,
            {"model": "gpt-4o-mini", "messages": MSGS, "api_base": DEAD, "api_key": "x", "num_retries": 0},
            {"tenant": "sdk"},
        )
    assert not isinstance(info.value, BudgetDenied)
    assert balance(store) == (0, 0)
    with open_ledger_sync(store) as led:
        assert [r.status.value for r in led.list_reservations()] == ["RELEASED"]


async def test_caps_clamp_max_tokens(store: str) -> None:
    """When the worst case does not fit, the call runs with max_tokens capped to what the budget pays."""
    with open_ledger_sync(store) as led:
        led.set_budget("tenant:sdk", "0.001usd")  # 100,000 microcents: ~1,600 gpt-4o-mini output tokens
    guard = Guard(Settings(min_output_tokens=100), store=store)
    kwargs = {"model": "gpt-4o-mini", "messages": MSGS, "mock_response": "ok", "max_tokens": 100_000}
    await guard.acall("acompletion", litellm.acompletion, kwargs, {"tenant": "sdk"})
    assert 100 <= kwargs["max_tokens"] < 1700
    with open_ledger_sync(store) as led:
        [r] = led.list_reservations()
        assert r.caps is not None and r.caps.max_tokens == kwargs["max_tokens"]
        assert r.reserved.amount <= 100_000


async def test_stream_commits_at_the_end_and_subject_from_context(store: str) -> None:
    """A stream commits when it ends; the subject comes from the current budget scope."""
    guard = Guard(Settings(), store=store)
    token = subject_var.set(Subject(tenant="sdk"))
    try:
        stream = await guard.acall(
            "acompletion",
            litellm.acompletion,
            {"model": "gpt-4o-mini", "messages": MSGS, "mock_response": "one two three", "stream": True},
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
    finally:
        subject_var.reset(token)
    assert "one" in text
    spent, reserved = balance(store)
    assert reserved == 0 and spent > 0


def test_sync_completion(store: str) -> None:
    """The sync wrapper meters litellm.completion the same way."""
    guard = Guard(Settings(), store=store)
    guard.call(
        "completion", litellm.completion, {"model": "gpt-4o-mini", "messages": MSGS, "mock_response": "x"}, "tenant:sdk"
    )
    spent, reserved = balance(store)
    assert reserved == 0 and spent > 0
    with pytest.raises(BudgetDenied) as info:
        guard.call("completion", litellm.completion, {"model": "gpt-4o-mini", "messages": MSGS})
    assert info.value.reason_code == "SUBJECT_MISSING"


async def test_gate_meters_third_party_calls(store: str) -> None:
    """CyclesGate in litellm.callbacks reserves before a plain litellm.acompletion, commits after, and blocks DENY."""
    import asyncio

    from cycles_litellm import CyclesGate

    gate = CyclesGate(Guard(Settings(), store=store))
    saved = list(litellm.callbacks)
    litellm.callbacks = [gate]
    try:
        await litellm.acompletion(
            model="gpt-4o-mini", messages=MSGS, mock_response="yo", metadata={"cycles": {"tenant": "sdk"}}
        )
        for _ in range(100):
            if balance(store)[0] > 0:
                break
            await asyncio.sleep(0.05)
        spent, reserved = balance(store)
        assert spent > 0 and reserved == 0
        with open_ledger_sync(store) as led:
            [r] = led.list_reservations()
            assert (r.status.value, r.action.name) == ("COMMITTED", "openai:gpt-4o-mini")
            led.set_budget("tenant:sdk", {"unit": "USD_MICROCENTS", "amount": spent + 10})
        with pytest.raises(BudgetDenied):
            await litellm.acompletion(
                model="gpt-4o-mini", messages=MSGS, mock_response="yo", metadata={"cycles": {"tenant": "sdk"}}
            )
    finally:
        litellm.callbacks = saved


async def test_the_sdk_guard_holds_a_call_up_to_max_hold(store: str) -> None:
    """`Guard` and `CyclesGate` read the same Settings as the proxy hook: a call's hold is extended up to
    `max_hold_ms` (TTL 1 s + 3 x 0.5 s = 2.5 s), past the ledger's own 10 extensions and no further."""
    guard = Guard(Settings(ttl_ms=1_000, max_hold_ms=2_500), store=store)
    kwargs = {"model": "gpt-4o-mini", "messages": MSGS, "max_tokens": 20}
    hold, _est, _group = await guard.reserve("acompletion", kwargs, {"tenant": "sdk"})
    try:
        assert hold.max_extensions == 3
    finally:
        await guard.lifecycle().release(hold, "test")
        await guard.ledger().aclose()
