"""`bench/proxy_overhead.py --bounds` measures the plugin with part of its ledger work cut out
(`bench/bounds/sitecustomize.py`). Its figures mean something only if each cut does what its name says: here
one call goes through the plugin's hooks on a real SQLite ledger under each cut."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cycles_ledger import open_ledger
from cycles_ledger.lifecycle import Lifecycle
from cycles_litellm import CyclesCallback, Settings

BOUNDS = Path(__file__).resolve().parents[2] / "bench" / "bounds" / "sitecustomize.py"
COST_USD = 0.0000133  # what LiteLLM says the call cost: 1,330 microcents


@pytest.fixture
def install() -> Iterator[Any]:
    """The module's install(), with Lifecycle's methods put back afterwards."""
    saved = Lifecycle.reserve, Lifecycle.commit
    spec = importlib.util.spec_from_file_location("bench_bounds", BOUNDS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # $CYCLES_BOUND unset: installs nothing
    assert (Lifecycle.reserve, Lifecycle.commit) == saved
    try:
        yield module.install
    finally:
        Lifecycle.reserve, Lifecycle.commit = saved  # type: ignore[method-assign]


async def one_call(tmp_path: Path) -> tuple[list[Any], int, int, list[str]]:
    """One chat call through the hooks as the proxy makes it: (reservations, spent, reserved, event types)."""
    ledger = open_ledger(f"sqlite:///{tmp_path}/bounds.db")
    try:
        await ledger.set_budget("tenant:bench", "10usd")
        cb = CyclesCallback(Settings(), ledger=ledger)
        data = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 16,
            "litellm_call_id": "call-1",
            "metadata": {},
            "proxy_server_request": {"headers": {"x-cycles-tenant": "bench"}},
        }
        await cb.async_pre_call_hook(None, None, data, "acompletion")
        kwargs = {"litellm_call_id": "call-1", "response_cost": COST_USD, "standard_logging_object": {}}
        await cb.async_log_success_event(kwargs, None, None, None)
        while cb._tasks:
            await asyncio.sleep(0.005)
        balance = await ledger.balance("tenant:bench")
        events = [e.type for e in await ledger.events(scope="tenant:bench")]
        return await ledger.list_reservations(), balance.spent, balance.reserved, events
    finally:
        await ledger.aclose()


def test_without_a_cut_the_call_reserves_then_commits(tmp_path: Path, install: Any) -> None:
    reservations, spent, reserved, events = asyncio.run(one_call(tmp_path))
    assert len(reservations) == 1 and spent == 1330 and reserved == 0
    assert events == ["budget_set", "reserved", "committed"]


def test_no_reserve_decides_without_the_ledger_and_debits_the_cost(tmp_path: Path, install: Any) -> None:
    install("no-reserve")
    reservations, spent, reserved, events = asyncio.run(one_call(tmp_path))
    assert reservations == [] and spent == 1330 and reserved == 0
    assert events == ["budget_set", "debited"]


def test_no_ledger_writes_nothing(tmp_path: Path, install: Any) -> None:
    install("no-ledger")
    reservations, spent, reserved, events = asyncio.run(one_call(tmp_path))
    assert reservations == [] and spent == 0 and reserved == 0
    assert events == ["budget_set"]


def test_an_unknown_cut_is_refused(install: Any) -> None:
    with pytest.raises(SystemExit, match="CYCLES_BOUND must be one of"):
        install("no-sweeper")
