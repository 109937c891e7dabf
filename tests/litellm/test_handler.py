"""The proxy callback's hooks called directly (no proxy): subjects, denials, settle retries."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from litellm.proxy._types import ProxyException

from cycles_ledger import ConfigError, open_ledger, open_ledger_sync
from cycles_litellm import CyclesCallback, Settings

MSGS = [{"role": "user", "content": "hello there"}]


def request(call_id: str, tenant: str = "h", **extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "messages": MSGS,
        "max_tokens": 20,
        "litellm_call_id": call_id,
        "proxy_server_request": {"headers": {"x-cycles-tenant": tenant}},
        **extra,
    }


async def test_pre_call_hook_is_defined_on_the_class() -> None:
    """LiteLLM only calls hooks defined on the registered class itself, so none may be inherited."""
    for hook in (
        "async_pre_call_hook",
        "async_post_call_streaming_iterator_hook",
        "async_post_call_failure_hook",
        "async_post_call_response_headers_hook",
    ):
        assert hook in vars(CyclesCallback), hook


async def test_settle_is_retried_then_counted_when_the_ledger_is_gone(tmp_path: Path) -> None:
    """A commit that cannot reach the ledger is retried with back-off, logged and counted; the hold stays
    for TTL expiry instead of being lost silently."""
    url = f"sqlite:///{tmp_path / 'h.db'}"
    with open_ledger_sync(url) as led:
        led.set_budget("tenant:h", "1usd")
    ledger = open_ledger(url)
    cb = CyclesCallback(Settings(settle_retries=2), ledger=ledger)
    data = await cb.async_pre_call_hook(None, None, request("call-1"), "acompletion")
    assert data["max_tokens"] == 20
    await ledger.aclose()  # the store goes away between the call and its settlement
    await cb.async_log_success_event({"litellm_call_id": "call-1", "response_cost": 0.00001}, None, None, None)
    for _ in range(100):
        if cb.counters["settle_failures"]:
            break
        await asyncio.sleep(0.05)
    assert (cb.counters["settle_retries"], cb.counters["settle_failures"]) == (3, 1)
    with open_ledger_sync(url) as led:
        [res] = led.list_reservations()
        assert res.status.value == "ACTIVE" and res.idempotency_key == "call-1"


async def test_success_commits_the_reported_cost(tmp_path: Path) -> None:
    """LiteLLM's float response_cost becomes exact microcents (float noise removed, rounded up)."""
    url = f"sqlite:///{tmp_path / 'h.db'}"
    with open_ledger_sync(url) as led:
        led.set_budget("tenant:h", "1usd")
    async with open_ledger(url) as ledger:
        cb = CyclesCallback(Settings(), ledger=ledger)
        await cb.async_pre_call_hook(None, None, request("call-2"), "acompletion")
        await cb.async_log_success_event(
            {"litellm_call_id": "call-2", "response_cost": 0.00026250000000000004}, None, None, None
        )
        for _ in range(100):
            if (await ledger.balance("tenant:h")).reserved == 0:
                break
            await asyncio.sleep(0.02)
        assert (await ledger.balance("tenant:h")).spent == 26_250
        # a second success event for the same call (LiteLLM retries logging) changes nothing
        await cb.async_log_success_event({"litellm_call_id": "call-2", "response_cost": 1.0}, None, None, None)
        await asyncio.sleep(0.1)
        assert (await ledger.balance("tenant:h")).spent == 26_250


@pytest.mark.parametrize("mode", ["enforce", "shadow"])
async def test_unavailable_store_policy(tmp_path: Path, mode: str) -> None:
    """A store that cannot be opened follows on_unavailable: enforce refuses (503), shadow passes; both counted."""
    from litellm.proxy._types import ProxyException

    cb = CyclesCallback(Settings(mode=mode, store="sqlite:////no-such-dir/x.db"))
    if mode == "enforce":
        with pytest.raises(ProxyException) as info:
            await cb.async_pre_call_hook(None, None, request("call-3"), "acompletion")
        assert info.value.code == "503"
        assert cb.counters["fail_closed"] == 1
    else:
        data = await cb.async_pre_call_hook(None, None, request("call-3"), "acompletion")
        assert data["max_tokens"] == 20
        assert cb.counters["fail_open"] == 1


async def test_a_client_chosen_call_id_pays_once(tmp_path: Path) -> None:
    """LiteLLM uses the client's x-litellm-call-id as the call id: such an id may come again (a retry, a
    replay, two requests at once). One call id is one paid call: a repeat is refused with 409 while the
    first is in flight (this process) and after it settled (any process: the ledger's idempotency record).
    An id LiteLLM made is a fresh UUID nobody can repeat: that reserve skips the replay record."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    with open_ledger_sync(url) as led:
        led.set_budget("tenant:h", "1usd")
    ledger = open_ledger(url)
    cb = CyclesCallback(Settings(), ledger=ledger)
    other = CyclesCallback(Settings(), ledger=ledger)  # another proxy process on the same ledger
    try:
        client = {"x-cycles-tenant": "h", "x-litellm-call-id": "client-7"}
        await cb.async_pre_call_hook(
            None, None, request("client-7", proxy_server_request={"headers": client}), "acompletion"
        )
        for hook in (cb, other):
            with pytest.raises(ProxyException) as info:
                await hook.async_pre_call_hook(
                    None, None, request("client-7", proxy_server_request={"headers": client}), "acompletion"
                )
            assert info.value.code == "409" and "CALL_ID_REUSED" in str(info.value.to_dict())
        for _ in range(2):  # the same id without the header: as if LiteLLM had made it
            await cb.async_pre_call_hook(None, None, request("made-by-litellm"), "acompletion")
        held = await ledger.list_reservations()
        assert sorted(r.idempotency_key for r in held) == ["client-7", "made-by-litellm", "made-by-litellm"]
    finally:
        await ledger.aclose()


async def test_the_deployment_gate_refuses_a_client_request_that_skipped_the_pre_call_hook(tmp_path: Path) -> None:
    """The last gate before a provider: a proxied request of a metered call type whose call id our pre-call
    hook never saw is refused; one it saw, a free call type, and LiteLLM's own calls (no client request:
    health checks) pass. Shadow mode logs instead of refusing."""
    from litellm.types.utils import CallTypes

    url = f"sqlite:///{tmp_path / 'g.db'}"
    with open_ledger_sync(url) as led:
        led.set_budget("tenant:h", "1usd")
    ledger = open_ledger(url)
    try:
        cb = CyclesCallback(Settings(), ledger=ledger)
        proxied = {"proxy_server_request": {"url": "http://proxy/v1/threads/t/runs"}, "litellm_call_id": "unseen"}
        with pytest.raises(ProxyException) as info:
            await cb.async_pre_call_deployment_hook(dict(proxied), CallTypes.acompletion)
        assert info.value.code == "402" and "ROUTE_NOT_METERED" in str(info.value.to_dict())
        assert "/v1/threads/t/runs" in info.value.message
        seen = await cb.async_pre_call_hook(None, None, request("seen"), "acompletion")
        attempt = {**proxied, "litellm_call_id": "seen", "metadata": seen["metadata"]}  # what LiteLLM carries on
        assert await cb.async_pre_call_deployment_hook(attempt, CallTypes.acompletion) is None
        with pytest.raises(ProxyException):  # the id alone (a client sending it on a hook-less route) is not enough
            await cb.async_pre_call_deployment_hook({**proxied, "litellm_call_id": "seen"}, CallTypes.acompletion)
        assert await cb.async_pre_call_deployment_hook(dict(proxied), CallTypes.afile_retrieve) is None
        assert await cb.async_pre_call_deployment_hook({"litellm_call_id": "health"}, CallTypes.acompletion) is None
        shadow = CyclesCallback(Settings(mode="shadow"), ledger=ledger)
        assert await shadow.async_pre_call_deployment_hook(dict(proxied), CallTypes.acompletion) is not None
        assert shadow.counters["shadow_would_deny"] == 1
    finally:
        await ledger.aclose()


async def test_refused_routes_and_free_routes(tmp_path: Path) -> None:
    """A call type the plugin cannot meter is refused before anything else (even without a subject); a
    free one passes untouched; `unmetered_routes` lets a refused one through, counted."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    ledger = open_ledger(url)
    try:
        cb = CyclesCallback(Settings(), ledger=ledger)
        with pytest.raises(ProxyException) as info:
            await cb.async_pre_call_hook(None, None, {"model": "x"}, "pass_through_endpoint")
        assert info.value.code == "402" and "unmetered_routes: [pass_through_endpoint]" in info.value.message
        data = {"file_id": "f"}
        assert await cb.async_pre_call_hook(None, None, data, "afile_retrieve") is data
        opened = CyclesCallback(Settings(unmetered_routes=frozenset({"pass_through_endpoint"})), ledger=ledger)
        passed = await opened.async_pre_call_hook(None, None, {"model": "x", "metadata": {}}, "pass_through_endpoint")
        assert passed["model"] == "x"  # let through, its decision in the logging metadata (observe.py)
        assert passed["metadata"]["spend_logs_metadata"]["cycles"]["reason"] == "UNMETERED_ROUTE"
        assert opened.counters["unmetered:pass_through_endpoint"] == 1
        assert await ledger.list_reservations() == []
    finally:
        await ledger.aclose()


async def test_a_retry_that_succeeds_after_the_failure_grace_is_still_paid(tmp_path: Path) -> None:
    """An attempt fails; nothing succeeds within the grace, so the hold goes back; then a slow retry or
    fallback succeeds: its real cost is recorded as a direct debit, never lost."""
    url = f"sqlite:///{tmp_path / 'f.db'}"
    with open_ledger_sync(url) as led:
        led.set_budget("tenant:h", "1usd")
    ledger = open_ledger(url)
    try:
        cb = CyclesCallback(Settings(), ledger=ledger)
        await cb.async_pre_call_hook(None, None, request("slow-1"), "acompletion")
        assert (await ledger.balance("tenant:h")).reserved > 0
        await cb._release_if_pending("slow-1", cb._pending["slow-1"])  # what the grace timer runs after a failure
        b = await ledger.balance("tenant:h")
        assert (b.reserved, b.spent) == (0, 0)
        await cb.async_log_success_event({"litellm_call_id": "slow-1", "response_cost": 0.0005}, None, None, None)
        for _ in range(100):
            if (await ledger.balance("tenant:h")).spent:
                break
            await asyncio.sleep(0.02)
        assert (await ledger.balance("tenant:h")).spent == 50_000
    finally:
        await ledger.aclose()


async def test_a_duplicate_call_id_let_through_in_shadow_never_settles_the_enforced_one(tmp_path: Path) -> None:
    """The enforced request holds under call id X; a second request with X in a shadow scope goes on with an
    id of its own, so its success settles nothing of the first; the first commits its own cost."""
    url = f"sqlite:///{tmp_path / 'd.db'}"
    with open_ledger_sync(url) as led:
        led.set_budget("tenant:h", "1usd")
    ledger = open_ledger(url)
    try:
        cb = CyclesCallback(Settings(shadow_scopes=["tenant:h/workflow:trial"]), ledger=ledger)
        first = request("X", proxy_server_request={"headers": {"x-cycles-tenant": "h", "x-litellm-call-id": "X"}})
        await cb.async_pre_call_hook(None, None, first, "acompletion")
        headers = {"x-cycles-tenant": "h", "x-cycles-workflow": "trial", "x-litellm-call-id": "X"}
        dup = await cb.async_pre_call_hook(
            None, None, request("X", proxy_server_request={"headers": headers}), "acompletion"
        )
        assert dup["litellm_call_id"] != "X"
        await cb.async_log_success_event(
            {"litellm_call_id": dup["litellm_call_id"], "response_cost": 0.0001}, None, None, None
        )
        await cb.async_log_success_event({"litellm_call_id": "X", "response_cost": 0.0009}, None, None, None)
        for _ in range(100):
            if (await ledger.balance("tenant:h")).reserved == 0:
                break
            await asyncio.sleep(0.02)
        [held] = await ledger.list_reservations()
        assert held.status.value == "COMMITTED" and held.committed and held.committed.amount == 90_000
    finally:
        await ledger.aclose()


@pytest.mark.parametrize("policy", ["deny", "allow", "shadow"])
async def test_unbudgeted_payers(tmp_path: Path, policy: str) -> None:
    """`unbudgeted:` deny refuses a payer nobody budgets (402 BUDGET_NOT_FOUND); allow lets it pass; shadow
    lets it pass and logs would_deny BUDGET_NOT_FOUND with the call id."""
    url = f"sqlite:///{tmp_path / 'u.db'}"
    settings = Settings(unbudgeted=policy)  # type: ignore[arg-type]
    ledger = open_ledger(url, allow_unbudgeted=settings.ledger_allows_unbudgeted())
    try:
        cb = CyclesCallback(settings, ledger=ledger)
        if policy == "deny":
            with pytest.raises(ProxyException) as info:
                await cb.async_pre_call_hook(None, None, request("u-1", tenant="nobody"), "acompletion")
            assert info.value.code == "402" and "BUDGET_NOT_FOUND" in str(info.value.to_dict())
            return
        await cb.async_pre_call_hook(None, None, request("u-1", tenant="nobody"), "acompletion")
        for _ in range(100):
            if policy == "allow" or cb._tasks == set():
                break
            await asyncio.sleep(0.02)
        notes = [e for e in await ledger.events(scope="tenant:nobody") if e.type == "would_deny"]
        if policy == "shadow":
            assert [(n.reason_code, n.data["call_id"]) for n in notes] == [("BUDGET_NOT_FOUND", "u-1")]
        else:
            assert notes == []
    finally:
        await ledger.aclose()


async def test_a_clamp_lands_in_every_cap_field_the_request_names(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    with open_ledger_sync(url) as led:
        led.set_budget("tenant:h", "0.0005usd")  # 50,000 microcents: well under 10,000 output tokens
        led.set_budget("tenant:h2", "10usd")
    ledger = open_ledger(url)
    try:
        cb = CyclesCallback(Settings(), ledger=ledger)
        data = await cb.async_pre_call_hook(
            None, None, request("c-1", max_tokens=10_000, max_completion_tokens=10_000), "acompletion"
        )
        assert data["max_tokens"] == data["max_completion_tokens"] < 10_000
        huge = await cb.async_pre_call_hook(None, None, request("c-2", "h2", max_tokens=10**7), "acompletion")
        assert huge["max_tokens"] == 16_384  # never above the model's maximum, whatever was asked
    finally:
        await ledger.aclose()


async def test_a_client_cannot_switch_shadow_on_by_naming_a_level(tmp_path: Path) -> None:
    """shadow_scopes match the levels the key fixed: a team-h key whose tenant is spent out is still refused
    when it names the shadow workflow (a master-key request names every level and is matched as a whole)."""
    from litellm.proxy._types import UserAPIKeyAuth

    url = f"sqlite:///{tmp_path / 's.db'}"
    with open_ledger_sync(url) as led:
        led.set_budget("tenant:h", "0.00000001usd")
    ledger = open_ledger(url)
    try:
        cb = CyclesCallback(Settings(shadow_scopes=["tenant:h/workflow:trial"]), ledger=ledger)
        key = UserAPIKeyAuth(api_key="sk-h", team_id="h")
        named = request("s-1", proxy_server_request={"headers": {"x-cycles-workflow": "trial"}})
        with pytest.raises(ProxyException) as info:
            await cb.async_pre_call_hook(key, None, named, "acompletion")
        assert info.value.code == "402"
        open_all = CyclesCallback(Settings(shadow_scopes=["tenant:h"]), ledger=ledger)
        assert await open_all.async_pre_call_hook(key, None, request("s-2"), "acompletion")  # the key's own scope
    finally:
        await ledger.aclose()


async def test_shadow_never_raises_for_ledger_errors_and_adds_no_headers(tmp_path: Path) -> None:
    """A payer budgeted only in TOKENS (UNIT_MISMATCH), and a dead ledger under on_unavailable: fail_closed,
    still pass in shadow; a shadow response carries no x-cycles-* header."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    with open_ledger_sync(url) as led:
        led.set_budget("tenant:t", "1000tokens")
        led.set_budget("tenant:h", "1usd")
    ledger = open_ledger(url)
    try:
        cb = CyclesCallback(Settings(mode="shadow", on_unavailable="fail_closed"), ledger=ledger)
        data = await cb.async_pre_call_hook(None, None, request("m-1", tenant="t"), "acompletion")
        assert data["litellm_call_id"] == "m-1"
        await cb.async_pre_call_hook(None, None, request("m-2"), "acompletion")
        assert await cb.async_post_call_response_headers_hook({"litellm_call_id": "m-2"}, None, None) is None
        await ledger.aclose()  # the ledger goes away
        assert await cb.async_pre_call_hook(None, None, request("m-3"), "acompletion")
    finally:
        await ledger.aclose()


async def test_a_commit_the_overage_policy_refuses_still_charges_the_hold(tmp_path: Path) -> None:
    """Under REJECT a commit above the hold is refused by the ledger: the plugin charges what was held
    instead of leaving the hold to expire with nothing charged."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    with open_ledger_sync(url) as led:
        led.set_budget("tenant:h", "1usd")
    ledger = open_ledger(url)
    try:
        cb = CyclesCallback(Settings(overage_policy="REJECT"), ledger=ledger)  # type: ignore[arg-type]
        await cb.async_pre_call_hook(None, None, request("r-1"), "acompletion")
        held = (await ledger.balance("tenant:h")).reserved
        await cb.async_log_success_event({"litellm_call_id": "r-1", "response_cost": 1.0}, None, None, None)
        for _ in range(100):
            if (await ledger.balance("tenant:h")).reserved == 0:
                break
            await asyncio.sleep(0.02)
        b = await ledger.balance("tenant:h")
        assert (b.reserved, b.spent) == (0, held) and cb.counters["settle_capped"] == 1
        with pytest.raises(ConfigError):
            load_settings_from({"overage_policy": "RECORD_ALL"}, tmp_path)
    finally:
        await ledger.aclose()


def load_settings_from(values: dict[str, Any], tmp_path: Path) -> Settings:
    import yaml

    from cycles_litellm.settings import load_settings

    path = tmp_path / "cycles.yaml"
    path.write_text(yaml.safe_dump(values))
    return load_settings(path)


async def test_a_lone_calls_commit_rides_in_the_next_reserve(tmp_path: Path) -> None:
    """One call at a time: its commit waits for the next call's transaction (the store's window is a minute
    here, so only the next reserve can write it). With another call in flight it is written at once, for the
    store's writer to group-commit with the others."""
    url = f"sqlite:///{tmp_path / 'c.db'}"
    with open_ledger_sync(url) as led:
        led.set_budget("tenant:h", "1usd")
    async with open_ledger(url, coalesce_ms=60_000) as ledger:
        cb = CyclesCallback(Settings(), ledger=ledger)

        async def success(call_id: str) -> None:
            await cb.async_log_success_event({"litellm_call_id": call_id, "response_cost": 0.00001}, None, None, None)
            await asyncio.sleep(0.05)

        await cb.async_pre_call_hook(None, None, request("lone-1"), "acompletion")
        await success("lone-1")
        assert cb._tasks  # the settle waits: its commit is held back
        assert (await ledger.balance("tenant:h")).spent == 1_000  # a read carries it (read-your-writes)
        await asyncio.sleep(0.01)
        assert not cb._tasks

        await cb.async_pre_call_hook(None, None, request("busy-1"), "acompletion")
        await cb.async_pre_call_hook(None, None, request("busy-2"), "acompletion")
        await success("busy-1")  # busy-2 is in flight: written now, no other operation needed
        assert not cb._tasks
        await success("busy-2")  # the last one in flight: held back again
        assert cb._tasks
