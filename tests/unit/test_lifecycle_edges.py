"""Every settle outcome through every edge: the books come out the same whichever way the work was metered.

One unit of work runs through one edge: the SDK wrappers (async and sync, on LiteLLM's own mock_response),
`CyclesGate` (in `litellm.callbacks`), `@metered` (async and sync) and the proxy hook (its callbacks called
as LiteLLM calls them). The work can raise, be cancelled, outlive its hold (it moves the ledger's clock past
the TTL and the grace), or take long enough to need heartbeats; the ledger can refuse, cap, or be away while
the edge settles. Then the books are read back: reservation status, balance, event log.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import litellm
import pytest
from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy._types import ProxyException

import cycles_tools
from cycles_ledger import Amount, BudgetDenied, Ledger, StoreUnavailableError, SyncLedger, Unit, open_ledger
from cycles_ledger.lifecycle import Lifecycle, SyncLifecycle
from cycles_litellm import CyclesCallback, CyclesGate, Guard, Settings
from cycles_litellm.calls import usd_to_microcents
from cycles_tools import budget_scope, current_caps, metered
from tests.conftest import FakeClock

TENANT = "e"
SCOPE = f"tenant:{TENANT}"
TTL_MS = 1_000
PAST_HOLD_MS = TTL_MS + 5_000 + 1  # past the TTL and the ledger's default grace: the hold has expired
HEARTBEAT_S = 1.3  # long enough for at least two beats at half the TTL
CAP = 7  # operator caps on the budget: ALLOW_WITH_CAPS, max_tokens 7
TOOL_ESTIMATE, ACTUAL = 5_000, 1_234  # @metered holds the estimate, the proxy is told the cost; microcents
MSGS = [{"role": "user", "content": "hello there"}]

EDGES = ["sdk_async", "sdk_sync", "gate", "metered_async", "metered_sync", "proxy"]
OUTCOMES = [
    "allow",
    "deny",
    "caps",
    "error",
    "cancel",
    "expired",
    "settle_retried",
    "settle_down",
    "release_down",
    "heartbeat",
]


class Boom(RuntimeError):
    """The work's own failure."""


@dataclass
class Work:
    """What the metered work does while its hold is live, and what it saw."""

    outcome: str
    clock: FakeClock
    cap: int | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)

    def saw(self, cap: int | None) -> None:
        self.cap = cap

    async def during(self) -> None:
        self.started.set()
        if self.outcome == "expired":
            self.clock.advance(PAST_HOLD_MS)
        elif self.outcome in ("error", "release_down"):
            raise Boom("the work failed")
        elif self.outcome == "heartbeat":
            await asyncio.sleep(HEARTBEAT_S)
        elif self.outcome == "cancel":
            await asyncio.sleep(60)  # cancelled long before

    def during_sync(self) -> None:
        if self.outcome == "expired":
            self.clock.advance(PAST_HOLD_MS)
        elif self.outcome in ("error", "release_down"):
            raise Boom("the work failed")
        elif self.outcome == "heartbeat":
            time.sleep(HEARTBEAT_S)
        elif self.outcome == "cancel":
            raise KeyboardInterrupt  # what stops blocking work


def llm_request(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": MSGS, "max_tokens": 20, "mock_response": "hi back", **extra}


def llm_cost(response: Any) -> int:
    return usd_to_microcents(litellm.completion_cost(completion_response=response))


class Edge:
    """One way into the ledger. `run` does one unit of work through it and returns the cost it reports."""

    async def setup(self, url: str, clock: FakeClock) -> None:
        self.ledger = open_ledger(url, clock=clock)

    async def run(self, work: Work) -> int:
        raise NotImplementedError

    async def teardown(self) -> None:
        await self.ledger.aclose()


class SdkAsync(Edge):
    async def run(self, work: Work) -> int:
        guard = Guard(Settings(ttl_ms=TTL_MS), ledger=self.ledger)

        async def call_llm(**kwargs: Any) -> Any:
            work.saw(kwargs.get("max_tokens"))
            await work.during()
            return await litellm.acompletion(**kwargs)

        return llm_cost(await guard.acall("acompletion", call_llm, llm_request(), {"tenant": TENANT}))


class SdkSync(Edge):
    async def run(self, work: Work) -> int:
        self.guard = Guard(Settings(ttl_ms=TTL_MS), ledger=self.ledger)

        def call_llm(**kwargs: Any) -> Any:
            work.saw(kwargs.get("max_tokens"))
            work.during_sync()
            return litellm.completion(**kwargs)

        return llm_cost(self.guard.call("completion", call_llm, llm_request(), {"tenant": TENANT}))

    async def teardown(self) -> None:
        if hasattr(self, "guard") and self.guard._sync is not None:
            self.guard._sync.close()
        await self.ledger.aclose()


class Gate(Edge):
    async def setup(self, url: str, clock: FakeClock) -> None:
        await super().setup(url, clock)
        self.work: Work | None = None
        edge = self

        class During(CustomLogger):  # runs after the gate's reserve, before the provider: the work's time
            async def async_pre_call_deployment_hook(self, kwargs: dict[str, Any], call_type: Any) -> dict[str, Any]:
                assert edge.work is not None
                edge.work.saw(kwargs.get("max_tokens"))
                await edge.work.during()
                return kwargs

        self.saved = list(litellm.callbacks)
        litellm.callbacks = [CyclesGate(Guard(Settings(ttl_ms=TTL_MS), ledger=self.ledger)), During()]

    async def run(self, work: Work) -> int:
        self.work = work
        response = await litellm.acompletion(**llm_request(metadata={"cycles": {"tenant": TENANT}}))
        return llm_cost(response)

    async def teardown(self) -> None:
        litellm.callbacks = self.saved
        await super().teardown()


class MeteredAsync(Edge):
    async def setup(self, url: str, clock: FakeClock) -> None:
        await super().setup(url, clock)
        cycles_tools.configure(store=url, clock=clock)

    async def run(self, work: Work) -> int:
        @metered(kind="tool.x", name="x", estimate=TOOL_ESTIMATE, actual=ACTUAL, ttl_ms=TTL_MS)
        async def tool() -> str:
            caps = current_caps()
            work.saw(caps.max_tokens if caps else None)
            await work.during()
            return "done"

        async with budget_scope(tenant=TENANT):
            assert await tool() == "done"
        return ACTUAL

    async def teardown(self) -> None:
        close_tools_runtime()
        await super().teardown()


class MeteredSync(MeteredAsync):
    async def run(self, work: Work) -> int:
        @metered(kind="tool.x", name="x", estimate=TOOL_ESTIMATE, actual=ACTUAL, ttl_ms=TTL_MS)
        def tool() -> str:
            caps = current_caps()
            work.saw(caps.max_tokens if caps else None)
            work.during_sync()
            return "done"

        with budget_scope(tenant=TENANT):
            assert tool() == "done"
        return ACTUAL


class Proxy(Edge):
    async def setup(self, url: str, clock: FakeClock) -> None:
        await super().setup(url, clock)
        self.cb = CyclesCallback(Settings(ttl_ms=TTL_MS), ledger=self.ledger)

    async def run(self, work: Work) -> int:
        request = {
            **llm_request(litellm_call_id="call-1"),
            "proxy_server_request": {"headers": {"x-cycles-tenant": TENANT}},
        }
        data = await self.cb.async_pre_call_hook(None, None, request, "acompletion")
        work.saw(data.get("max_tokens"))
        try:
            await work.during()
        except BaseException as exc:  # LiteLLM reports the request's failure, then the client gets it
            await self.cb.async_post_call_failure_hook(data, exc, None)  # type: ignore[arg-type]
            raise
        cost = {"litellm_call_id": "call-1", "response_cost": ACTUAL / 10**8}
        await self.cb.async_log_success_event(cost, None, None, None)
        return ACTUAL


EDGE_TYPES: dict[str, type[Edge]] = {
    "sdk_async": SdkAsync,
    "sdk_sync": SdkSync,
    "gate": Gate,
    "metered_async": MeteredAsync,
    "metered_sync": MeteredSync,
    "proxy": Proxy,
}


def close_tools_runtime() -> None:
    """Close the ledgers @metered opened (their writer threads and loops), then forget them."""
    import importlib

    module: Any = importlib.import_module("cycles_tools.metered")
    rt, module._runtime = module._runtime, None
    if rt is None:
        return
    if rt._sync is not None:
        rt._sync.close()
    if rt._ledger is not None:
        led = rt._ledger
        SyncLedger(lambda: led).close()


def ledger_away(monkeypatch: pytest.MonkeyPatch, method: str, failures: int | None) -> None:
    """`Ledger.<method>` finds the store unreachable `failures` times (None: always), then works again."""
    real: Callable[..., Awaitable[Any]] = getattr(Ledger, method)
    calls = [0]

    async def away(self: Ledger, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if failures is None or calls[0] <= failures:
            raise StoreUnavailableError("injected: the ledger is away")
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(Ledger, method, away)


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "the edge never settled"
        await asyncio.sleep(0.02)


@pytest.fixture(autouse=True)
def _fresh_tools_runtime() -> Any:
    close_tools_runtime()
    yield
    close_tools_runtime()


@pytest.mark.parametrize("outcome", OUTCOMES)
@pytest.mark.parametrize("edge_name", EDGES)
async def test_every_outcome_is_the_same_on_every_edge(
    edge_name: str, outcome: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """allow commits the actual; deny holds nothing and raises the edge's refusal; caps reach the work; an error
    or a cancellation releases and propagates; a hold that expired under the work is debited, never raised; a
    settle the ledger misses is retried, logged and never masks the result or the caller's error; long work is
    extended by the heartbeat. Same reservation status, balance and event log on every edge."""
    caplog.set_level(logging.INFO)
    url = f"sqlite:///{tmp_path / 'edges.db'}"
    clock = FakeClock()
    async with open_ledger(url, clock=clock) as admin:
        if outcome == "deny":
            await admin.set_budget(SCOPE, "0.00000001usd")  # one microcent: not even the prompt fits
        else:
            await admin.set_budget(SCOPE, "1usd", caps={"max_tokens": CAP} if outcome == "caps" else None)
    monkeypatch.setattr(Lifecycle, "backoff_s", 0.001)
    if outcome == "settle_retried":
        ledger_away(monkeypatch, "commit", 2)
    elif outcome == "settle_down":
        ledger_away(monkeypatch, "commit", None)
    elif outcome == "release_down":
        ledger_away(monkeypatch, "release", None)

    edge = EDGE_TYPES[edge_name]()
    await edge.setup(url, clock)
    try:
        work = Work(outcome, clock)
        raised: BaseException | None = None
        actual = None
        if outcome == "cancel" and edge_name not in ("sdk_sync", "metered_sync"):
            task = asyncio.get_running_loop().create_task(edge.run(work))
            await asyncio.wait_for(work.started.wait(), 10)
            task.cancel()
            try:
                await task
            except BaseException as exc:  # noqa: BLE001 - whatever the edge raised is what the caller sees
                raised = exc
        else:
            try:
                actual = await edge.run(work)
            except BaseException as exc:  # noqa: BLE001 - whatever the edge raised is what the caller sees
                raised = exc
        await check(edge, outcome, work, raised, actual, caplog)
    finally:
        await edge.teardown()


async def check(
    edge: Edge, outcome: str, work: Work, raised: BaseException | None, actual: int | None, caplog: Any
) -> None:
    """The caller's view, then the books."""
    led = edge.ledger

    async def reservations() -> list[Any]:
        return await led.list_reservations(limit=10)

    async def settled() -> bool:
        if outcome == "deny":
            return True
        if outcome == "settle_down":
            return "could not settle" in caplog.text
        if outcome == "release_down":
            return "could not release" in caplog.text
        held = await reservations()
        if any(r.status.value == "ACTIVE" for r in held):
            return False
        return outcome != "expired" or any(e.type == "debited" for e in await led.events(scope=SCOPE))

    # What the caller sees.
    if outcome in ("allow", "caps", "expired", "settle_retried", "settle_down", "heartbeat"):
        assert raised is None, repr(raised)
        assert actual is not None and actual > 0
    elif outcome == "deny":
        if isinstance(edge, Proxy):
            assert isinstance(raised, ProxyException) and raised.code == "402", repr(raised)
        else:
            assert isinstance(raised, BudgetDenied) and raised.reason_code == "BUDGET_EXCEEDED", repr(raised)
    elif outcome in ("error", "release_down"):
        assert isinstance(raised, Boom), repr(raised)  # the caller's own error, never the ledger's
    elif outcome == "cancel":
        sync = isinstance(edge, (SdkSync, MeteredSync))
        assert isinstance(raised, KeyboardInterrupt if sync else asyncio.CancelledError), repr(raised)
    if outcome == "caps":
        assert work.cap == CAP

    await until(settled)
    held = await reservations()
    statuses = [r.status.value for r in held]
    balance = await led.balance(SCOPE)
    kinds = [e.type for e in await led.events(scope=SCOPE)]
    beats = kinds.count("extended")
    kinds = [k for k in kinds if k != "extended"]
    estimate = held[0].reserved.amount if held else 0
    spent = 0 if actual is None else actual

    if outcome in ("allow", "caps", "settle_retried", "heartbeat"):
        assert statuses == ["COMMITTED"]
        assert held[0].committed is not None and held[0].committed.amount == spent
        assert (balance.spent, balance.reserved) == (spent, 0)
        assert kinds == ["budget_set", "reserved", "committed"]
    elif outcome == "deny":
        assert statuses == []
        assert (balance.spent, balance.reserved) == (0, 0)
        assert kinds == ["budget_set", "denied"]
    elif outcome in ("error", "cancel"):
        assert statuses == ["RELEASED"]
        assert (balance.spent, balance.reserved) == (0, 0)
        assert kinds == ["budget_set", "reserved", "released"]
    elif outcome == "expired":
        assert statuses == ["EXPIRED"]
        assert (balance.spent, balance.reserved) == (spent, 0)
        assert kinds == ["budget_set", "reserved", "expired", "debited"]
        debit = (await led.events(scope=SCOPE))[-1]
        assert debit.amount == spent
    elif outcome in ("settle_down", "release_down"):
        assert statuses == ["ACTIVE"]  # left to its TTL, the caller's result or error untouched
        assert (balance.spent, balance.reserved) == (0, estimate)
        assert kinds == ["budget_set", "reserved"]
    if outcome == "heartbeat":
        assert beats >= 2 and held[0].extension_count == beats
    elif outcome not in ("settle_down", "release_down"):
        assert beats == 0
    failed = [r.getMessage() for r in caplog.records if "failed (injected" in r.getMessage()]
    assert len(failed) == {"settle_retried": 2, "settle_down": 4, "release_down": 4}.get(outcome, 0), failed


@pytest.mark.parametrize("driver", ["async", "sync"])
async def test_one_heartbeat_task_extends_every_live_hold(tmp_path: Path, driver: str) -> None:
    """Forty live holds of one driver are extended by a single task on its loop (no thread or task per hold);
    the task ends once every hold is settled."""
    url = f"sqlite:///{tmp_path / 'beats.db'}"
    action, estimate = {"kind": "tool.x", "name": "x"}, Amount(unit=Unit.USD_MICROCENTS, amount=10)
    async with open_ledger(url) as led:
        await led.set_budget(SCOPE, "1usd")
        threads = threading.active_count()
        if driver == "async":
            life = Lifecycle(led)
            holds = [await life.reserve({"tenant": TENANT}, action, estimate, ttl_ms=TTL_MS) for _ in range(40)]
            beats = [t for t in asyncio.all_tasks() if t.get_name() == "cycles-heartbeat"]
            assert len(beats) == 1 and threading.active_count() == threads
            await asyncio.sleep(HEARTBEAT_S)
            for hold in holds:
                await life.commit(hold, estimate)
            await asyncio.wait_for(beats[0], 5)  # nothing left to beat: the task ends
        else:
            with SyncLedger(lambda: open_ledger(url)) as sync_ledger:
                slife = SyncLifecycle(sync_ledger)
                holds = [slife.reserve({"tenant": TENANT}, action, estimate, ttl_ms=TTL_MS) for _ in range(40)]
                beats = sync_ledger.run(_heartbeat_tasks())
                assert len(beats) == 1 and threading.active_count() <= threads + 2  # its loop, its SQLite writer
                time.sleep(HEARTBEAT_S)
                for hold in holds:
                    slife.commit(hold, estimate)
        held = await led.list_reservations(limit=100)
        assert len(held) == 40
        assert all(r.status.value == "COMMITTED" and r.extension_count >= 2 for r in held)


async def _heartbeat_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "cycles-heartbeat"]
