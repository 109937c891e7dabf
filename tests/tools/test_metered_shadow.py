"""`@metered` in shadow mode: evaluated as enforcement would, logged exactly, never blocking.

Each test points `cycles_tools` at a fresh SQLite file and reads the books back through a second ledger,
as tests/tools/test_metered.py does.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import cycles_tools
from cycles_ledger import BudgetDenied, ConfigError, CyclesError, LedgerEvent, SyncLedger, open_ledger_sync
from cycles_tools import budget_scope, metered

_metered_module: Any = importlib.import_module("cycles_tools.metered")

CENT = 1_000_000  # USD_MICROCENTS in one US cent
ACME = "tenant:acme"
MODES = ["sync", "async"]


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/shadow.db"


def _close_runtime() -> None:
    rt = _metered_module._runtime
    _metered_module._runtime = None
    if rt is None:
        return
    if rt._sync is not None:
        rt._sync.close()
    if rt._ledger is not None:
        led = rt._ledger
        SyncLedger(lambda: led).close()


@pytest.fixture(autouse=True)
def runtime(url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("CYCLES_MODE", raising=False)
    _close_runtime()
    cycles_tools.configure(store=url)
    yield
    _close_runtime()


@pytest.fixture
def admin(url: str) -> Iterator[SyncLedger]:
    with open_ledger_sync(url) as led:
        yield led


def make_tool(flavour: str, body: Callable[..., Any], **opts: Any) -> Callable[..., Any]:
    if flavour == "sync":

        def fn(*args: Any, **kwargs: Any) -> Any:
            return body(*args, **kwargs)

    else:

        async def fn(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
            await asyncio.sleep(0)
            return body(*args, **kwargs)

    return metered(**opts)(fn)


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    out = fn(*args, **kwargs)
    return await out if inspect.isawaitable(out) else out


def events(admin: SyncLedger, *kinds: str) -> list[LedgerEvent]:
    return [e for e in admin.events(limit=1000) if not kinds or e.type in kinds]


@pytest.mark.parametrize("flavour", MODES)
async def test_shadow_runs_past_the_budget_and_logs_the_exact_would_deny(admin: SyncLedger, flavour: str) -> None:
    """A call enforcement would refuse runs; the ledger logs would_deny (reason, scope, estimate, remaining,
    key) as enforce's `denied` would, and debits every unit spent with RECORD_ALL: the part past the budget is
    debt, so the balance shows how far past it the tool went. Nothing is held; a retry with the key pays once."""
    admin.set_budget(ACME, "0.01usd")
    ran: list[int] = []

    def send(n: int) -> str:
        ran.append(n)
        return "sent"

    tool = make_tool(
        flavour,
        send,
        kind="tool.email",
        name="email",
        estimate="0.02usd",
        actual="0.03usd",
        idempotency_key=lambda n: f"mail-{n}",
        mode="shadow",
    )
    with budget_scope(tenant="acme"):
        assert await call(tool, 1) == "sent"
        assert await call(tool, 1) == "sent"  # a retry of the same keyed call
    assert ran == [1, 1]
    [would] = events(admin, "would_deny")
    assert (would.scope, would.reason_code, would.amount) == (ACME, "BUDGET_EXCEEDED", 2 * CENT)
    assert (would.data["key"], would.data["remaining"]) == ("shadow:mail-1", CENT)
    [debit] = events(admin, "debited")
    assert (debit.amount, debit.data["key"]) == (3 * CENT, "shadow:mail-1:actual")
    b = admin.balance(ACME)
    assert (b.spent, b.debt, b.reserved, b.remaining) == (CENT, 2 * CENT, 0, -2 * CENT)
    assert admin.list_reservations() == []
    assert events(admin, "denied", "reserved") == []


@pytest.mark.parametrize("flavour", MODES)
async def test_shadow_within_budget_logs_would_allow_and_debits_the_actual(admin: SyncLedger, flavour: str) -> None:
    """Within the budget shadow logs would_allow and records the actual spend; the balance is what enforce's
    commit would leave."""
    admin.set_budget(ACME, "1usd")
    tool = make_tool(flavour, lambda: "ok", kind="tool.x", name="x", estimate="0.05usd", actual=1_234, mode="shadow")
    with budget_scope(tenant="acme"):
        assert await call(tool) == "ok"
    assert [e.type for e in events(admin)] == ["budget_set", "would_allow", "debited"]
    b = admin.balance(ACME)
    assert (b.spent, b.reserved, b.debt) == (1_234, 0, 0)


@pytest.mark.parametrize("flavour", MODES)
async def test_shadow_never_blocks_on_an_unreachable_ledger_or_a_missing_subject(
    flavour: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A ledger that cannot be reached, or a call outside any budget_scope, lets the tool run in shadow
    (logged), where enforce raises."""
    cycles_tools.configure(store="sqlite:////no-such-dir/x.db", mode="shadow")
    ran: list[str] = []

    def work() -> str:
        ran.append("ran")
        return "ok"

    tool = make_tool(flavour, work, kind="tool.x", name="x", estimate="0.05usd")
    with budget_scope(tenant="acme"):
        assert await call(tool) == "ok"
    assert await call(tool) == "ok"  # no subject at all
    assert ran == ["ran", "ran"]
    assert "x runs unmetered" in caplog.text
    _close_runtime()
    cycles_tools.configure(store="sqlite:////no-such-dir/x.db")
    with budget_scope(tenant="acme"), pytest.raises(CyclesError):
        await call(tool)


@pytest.mark.parametrize("flavour", MODES)
async def test_shadow_logs_a_tool_the_caps_forbid_and_runs_it(admin: SyncLedger, flavour: str) -> None:
    """Caps that forbid the tool (TOOL_DENIED under enforce) are logged as would_deny TOOL_DENIED; it runs."""
    admin.set_budget(ACME, "1usd", caps={"tool_denylist": ["deploy"]})
    tool = make_tool(
        flavour, lambda: "deployed", kind="tool.deploy", name="deploy", estimate=5, idempotency_key="d-1", mode="shadow"
    )
    with budget_scope(tenant="acme"):
        assert await call(tool) == "deployed"
    [would] = events(admin, "would_deny")
    assert (would.scope, would.reason_code, would.data["key"]) == (ACME, "TOOL_DENIED", "shadow:d-1")
    assert admin.balance(ACME).spent == 5


@pytest.mark.parametrize("flavour", MODES)
async def test_shadow_error_in_the_body_is_the_callers_and_records_nothing(admin: SyncLedger, flavour: str) -> None:
    """The tool's own exception propagates in shadow as in enforce; nothing ran to completion, nothing is debited."""
    admin.set_budget(ACME, "1usd")

    def body() -> None:
        raise LookupError("upstream 404")

    tool = make_tool(flavour, body, kind="tool.x", name="x", estimate=5, mode="shadow")
    with budget_scope(tenant="acme"), pytest.raises(LookupError):
        await call(tool)
    assert events(admin, "debited") == []
    assert admin.balance(ACME).spent == 0


async def test_mode_precedence_argument_then_configure_then_env(
    admin: SyncLedger, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """@metered(mode=) beats configure(mode=), which beats $CYCLES_MODE, which beats the default (enforce)."""
    admin.set_budget(ACME, "0.01usd")
    plain = make_tool("sync", lambda: "ran", kind="tool.x", name="plain", estimate="0.02usd")
    shadowed = make_tool("sync", lambda: "ran", kind="tool.x", name="shadowed", estimate="0.02usd", mode="shadow")
    enforced = make_tool("sync", lambda: "ran", kind="tool.x", name="enforced", estimate="0.02usd", mode="enforce")
    with budget_scope(tenant="acme"):
        with pytest.raises(BudgetDenied):
            plain()  # nothing set: enforce
        assert shadowed() == "ran"
        monkeypatch.setenv("CYCLES_MODE", "shadow")
        assert plain() == "ran"
        with pytest.raises(BudgetDenied):
            enforced()
        cycles_tools.configure(store=url, mode="enforce")  # beats the environment
        with pytest.raises(BudgetDenied):
            plain()
        assert shadowed() == "ran"
        monkeypatch.setenv("CYCLES_MODE", "enforce")
        cycles_tools.configure(store=url, mode="shadow")
        assert plain() == "ran"


def test_unknown_modes_are_refused_where_they_are_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mode other than enforce / shadow is a ConfigError: at decoration, at configure(), at the call for the
    environment."""
    with pytest.raises(ConfigError, match="enforce"):
        metered(kind="tool.x", estimate=1, mode="dry")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="configure"):
        cycles_tools.configure(mode="audit")  # type: ignore[arg-type]
    monkeypatch.setenv("CYCLES_MODE", "Shadow")
    tool = make_tool("sync", lambda: None, kind="tool.x", name="x", estimate=1)
    with budget_scope(tenant="acme"), pytest.raises(ConfigError, match="CYCLES_MODE"):
        tool()
