"""`@metered` and `budget_scope` against a real SQLite ledger file.

Every test points `cycles_tools` at a fresh file (`configure(store=...)`, reset by the autouse fixture),
sets budgets through `open_ledger_sync(url)` and reads balances, reservations and the event log back the
same way, so each assertion is about what the books say, not about what the wrapper returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import inspect
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import cycles_tools
from cycles_ledger import (
    Amount,
    BudgetDenied,
    Caps,
    CyclesError,
    InvalidRequestError,
    Reservation,
    ReservationStatus,
    SyncLedger,
    Unit,
    open_ledger_sync,
)
from cycles_tools import (
    BudgetExceeded,
    budget_scope,
    current_caps,
    current_subject,
    litellm_headers,
    litellm_metadata,
    metered,
)

_metered_module: Any = importlib.import_module("cycles_tools.metered")  # the package re-exports `metered` the function

CENT = 1_000_000  # USD_MICROCENTS in one US cent
ACME = "tenant:acme"
BOT = "tenant:acme/agent:bot"
MODES = ["sync", "async"]


# --- fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/t.db"


def _close_runtime() -> None:
    """Close the ledgers the previous runtime opened (their writer threads), then forget it."""
    rt = _metered_module._runtime
    _metered_module._runtime = None
    if rt is None:
        return
    if rt._sync is not None:
        rt._sync.close()
    if rt._ledger is not None:
        led = rt._ledger
        SyncLedger(lambda: led).close()  # closes the async Ledger on a private loop; a no-op if already closed


@pytest.fixture(autouse=True)
def runtime(url: str) -> Iterator[None]:
    _close_runtime()
    cycles_tools.configure(store=url)
    yield
    _close_runtime()


@pytest.fixture
def admin(url: str) -> Iterator[SyncLedger]:
    """A second, independent ledger on the same file: sets budgets and reads the books."""
    with open_ledger_sync(url) as led:
        yield led


def make_tool(mode: str, body: Callable[..., Any], **opts: Any) -> Callable[..., Any]:
    """A @metered tool (sync or async flavour) whose body is `body(*args, **kwargs)`."""
    if mode == "sync":

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


def spent(admin: SyncLedger, scope: str = ACME) -> int:
    return admin.balance(scope).spent


def money(admin: SyncLedger, scope: str = ACME) -> tuple[int, int, int]:
    """(spent, reserved, remaining) of the budget at `scope`."""
    b = admin.balance(scope)
    return b.spent, b.reserved, b.remaining


def types(admin: SyncLedger) -> list[str]:
    return [e.type for e in admin.events(limit=10_000)]


def only_reservation(admin: SyncLedger) -> Reservation:
    rs = admin.list_reservations(limit=1000)
    assert len(rs) == 1, rs
    return rs[0]


# --- signatures, return values, amounts ----------------------------------------------------------


async def test_sync_and_async_functions_keep_signature_name_and_return_value(admin: SyncLedger) -> None:
    """Wrapping keeps the signature, name, docstring and coroutine-ness, and hands back the body's result."""
    admin.set_budget(ACME, "1usd")

    def search(query: str, *, limit: int = 3) -> list[str]:
        """Search the web."""
        return [f"{query}-{i}" for i in range(limit)]

    async def asearch(query: str, *, limit: int = 3) -> list[str]:
        """Search the web, asynchronously."""
        return [f"{query}-{i}" for i in range(limit)]

    m_search = metered(kind="tool.search", name="web", estimate="0.02usd")(search)
    m_asearch = metered(kind="tool.search", name="web", estimate="0.02usd")(asearch)

    assert inspect.signature(m_search) == inspect.signature(search)
    assert inspect.signature(m_asearch) == inspect.signature(asearch)
    assert (m_search.__name__, m_search.__doc__) == ("search", "Search the web.")
    assert (m_asearch.__name__, m_asearch.__doc__) == ("asearch", "Search the web, asynchronously.")
    assert not inspect.iscoroutinefunction(m_search)
    assert inspect.iscoroutinefunction(m_asearch)

    with budget_scope(tenant="acme"):
        assert m_search("cats", limit=2) == ["cats-0", "cats-1"]
        assert await m_asearch("dogs") == ["dogs-0", "dogs-1", "dogs-2"]
    assert money(admin) == (4 * CENT, 0, 96 * CENT)
    assert admin.verify() == []


class OCR:
    """A class whose methods are metered; the estimate reads the instance's price."""

    def __init__(self, price: int) -> None:
        self.price = price
        self.scanned: list[int] = []

    def scan(self, pages: int, *, lang: str = "en") -> str:
        self.scanned.append(pages)
        return f"{pages} pages ({lang})"

    async def ascan(self, pages: int, *, lang: str = "en") -> str:
        await asyncio.sleep(0)
        self.scanned.append(pages)
        return f"{pages} pages ({lang})"

    raw_scan, raw_ascan = scan, ascan
    scan = metered(kind="tool.ocr", estimate=lambda self, pages, **kw: self.price * pages)(scan)
    ascan = metered(kind="tool.ocr", estimate=lambda self, pages, **kw: self.price * pages, actual=1_000)(ascan)


async def test_instance_methods_keep_signature_and_bind_self(admin: SyncLedger) -> None:
    """Metered instance methods (sync and async) keep their signature, get `self`, and charge per instance."""
    admin.set_budget(ACME, "1usd")
    assert inspect.signature(OCR.scan) == inspect.signature(OCR.raw_scan)
    assert inspect.signature(OCR.ascan) == inspect.signature(OCR.raw_ascan)
    ocr = OCR(price=5_000)
    assert inspect.signature(ocr.scan) == inspect.signature(ocr.raw_scan)
    assert inspect.signature(ocr.ascan) == inspect.signature(ocr.raw_ascan)
    assert inspect.iscoroutinefunction(ocr.ascan)

    with budget_scope(tenant="acme"):
        assert ocr.scan(3, lang="de") == "3 pages (de)"
        assert await ocr.ascan(7) == "7 pages (en)"
    assert ocr.scanned == [3, 7]
    # scan: no actual -> the estimate 3 x 5000 is committed; ascan: actual 1000 of a 35000 hold
    assert money(admin)[:2] == (15_000 + 1_000, 0)
    by_name = {r.action.name: r for r in admin.list_reservations(limit=10)}
    assert set(by_name) == {"OCR.scan", "OCR.ascan"}
    assert by_name["OCR.scan"].reserved.amount == 15_000
    assert by_name["OCR.ascan"].reserved.amount == 35_000
    assert by_name["OCR.ascan"].committed == Amount(unit=Unit.USD_MICROCENTS, amount=1_000)


AMOUNT_SPECS = {
    "text": ("0.02usd", "0.015usd", 2 * CENT, 1_500_000),
    "int": (5_000, 3_000, 5_000, 3_000),
    "Amount": (Amount.usd("0.05"), Amount(unit=Unit.USD_MICROCENTS, amount=1_234), 5 * CENT, 1_234),
    # estimate: a callable of the call's arguments; actual: a callable of the result
    "callable": (lambda n, *, unit_price=1_000: n * unit_price, lambda result: result["cost"], 40_000, 12_345),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spec", list(AMOUNT_SPECS))
async def test_estimate_and_actual_forms_charge_exact_amounts(admin: SyncLedger, mode: str, spec: str) -> None:
    """Text, int-in-unit, Amount and callable estimates/actuals hold and charge exactly the amounts they name."""
    admin.set_budget(ACME, "1usd")
    estimate, actual, held, charged = AMOUNT_SPECS[spec]
    tool = make_tool(
        mode,
        lambda n, *, unit_price=1_000: {"n": n, "cost": 12_345},
        kind="tool.calc",
        name="calc",
        estimate=estimate,
        actual=actual,
    )
    with budget_scope(tenant="acme"):
        assert await call(tool, 10, unit_price=4_000) == {"n": 10, "cost": 12_345}
    r = only_reservation(admin)
    assert r.status is ReservationStatus.COMMITTED
    assert r.reserved == Amount(unit=Unit.USD_MICROCENTS, amount=held)
    assert r.committed == Amount(unit=Unit.USD_MICROCENTS, amount=charged)
    assert money(admin) == (charged, 0, 100 * CENT - charged)
    assert types(admin) == ["budget_set", "reserved", "committed"]


@pytest.mark.parametrize("mode", MODES)
async def test_without_actual_the_estimate_is_committed(admin: SyncLedger, mode: str) -> None:
    """No `actual=`: the whole estimate is charged and nothing stays held."""
    admin.set_budget(ACME, "1usd")
    tool = make_tool(mode, lambda: "ok", kind="tool.x", name="x", estimate="0.07usd")
    with budget_scope(tenant="acme"):
        assert await call(tool) == "ok"
    r = only_reservation(admin)
    assert (r.status, r.committed) == (ReservationStatus.COMMITTED, Amount.usd("0.07"))
    assert money(admin) == (7 * CENT, 0, 93 * CENT)


@pytest.mark.parametrize("mode", MODES)
async def test_tokens_unit_charges_a_tokens_budget(admin: SyncLedger, mode: str) -> None:
    """`unit="TOKENS"` with int amounts holds and charges the TOKENS budget, leaving the USD one alone."""
    admin.set_budget(ACME, "1usd")
    admin.set_budget(ACME, "1000tokens")
    tool = make_tool(
        mode, lambda: 7, kind="tool.embed", name="embed", estimate=300, actual=lambda n: n * 10, unit="TOKENS"
    )
    with budget_scope(tenant="acme"):
        assert await call(tool) == 7
    t = admin.balance(ACME, Unit.TOKENS)
    assert (t.spent, t.reserved, t.remaining) == (70, 0, 930)
    assert money(admin) == (0, 0, 100 * CENT)


def test_invalid_amount_specs_raise_invalid_request_before_anything_is_held(admin: SyncLedger) -> None:
    """A float estimate or an unknown unit is an InvalidRequestError; the body never runs and nothing is held."""
    admin.set_budget(ACME, "1usd")
    ran: list[int] = []
    with pytest.raises(InvalidRequestError, match="unknown unit"):
        metered(kind="tool.x", estimate=1, unit="DOLLARS")
    tool = make_tool("sync", ran.append, kind="tool.x", name="x", estimate=0.5)
    with budget_scope(tenant="acme"), pytest.raises(InvalidRequestError, match="estimate must be an integer"):
        tool(1)
    assert ran == []
    assert admin.list_reservations() == []
    assert money(admin) == (0, 0, 100 * CENT)


# --- failures and denials ------------------------------------------------------------------------


class ToolBroke(RuntimeError):
    pass


@pytest.mark.parametrize("mode", MODES)
async def test_exception_in_body_releases_and_is_reraised_unchanged(admin: SyncLedger, mode: str) -> None:
    """The body raising gives the whole hold back (RELEASED, reserved 0, nothing spent) and re-raises that error."""
    admin.set_budget(ACME, "1usd")
    boom = ToolBroke("upstream 500")

    def body() -> None:
        raise boom

    tool = make_tool(mode, body, kind="tool.x", name="x", estimate="0.30usd")
    with budget_scope(tenant="acme"), pytest.raises(ToolBroke) as info:
        await call(tool)
    assert info.value is boom
    r = only_reservation(admin)
    assert (r.status, r.committed) == (ReservationStatus.RELEASED, None)
    assert money(admin) == (0, 0, 100 * CENT)
    assert types(admin) == ["budget_set", "reserved", "released"]
    assert admin.verify() == []


async def test_cancelled_async_call_releases_its_hold(admin: SyncLedger) -> None:
    """Cancelling the task running an async tool releases its reservation (CancelledError propagates)."""
    admin.set_budget(ACME, "1usd")
    started = asyncio.Event()

    @metered(kind="tool.slow", name="slow", estimate="0.10usd")
    async def slow() -> None:
        started.set()
        await asyncio.sleep(30)

    with budget_scope(tenant="acme"):
        task = asyncio.get_running_loop().create_task(slow())
    await asyncio.wait_for(started.wait(), 10)
    assert money(admin) == (0, 10 * CENT, 90 * CENT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert only_reservation(admin).status is ReservationStatus.RELEASED
    assert money(admin) == (0, 0, 100 * CENT)


@pytest.mark.parametrize("mode", MODES)
async def test_budget_too_small_denies_before_the_body_runs(admin: SyncLedger, mode: str) -> None:
    """A budget short of the estimate raises BudgetDenied (== BudgetExceeded) with reason, scope and remaining;
    the body's side effects never happen and nothing is held or spent."""
    admin.set_budget(ACME, "0.01usd")
    effects: list[str] = []
    tool = make_tool(mode, lambda to: effects.append(to), kind="tool.email", name="email", estimate="0.02usd")
    with budget_scope(tenant="acme"), pytest.raises(BudgetExceeded) as info:
        await call(tool, "ceo@example.com")
    err = info.value
    assert BudgetExceeded is BudgetDenied
    assert isinstance(err, CyclesError)
    assert (err.reason_code, err.scope, err.remaining, err.estimate, err.unit) == (
        "BUDGET_EXCEEDED",
        ACME,
        CENT,
        2 * CENT,
        "USD_MICROCENTS",
    )
    assert "email" in str(err) and ACME in str(err)
    assert effects == []
    assert admin.list_reservations() == []
    assert money(admin) == (0, 0, CENT)
    denied = [e for e in admin.events() if e.type == "denied"]
    assert [(e.scope, e.reason_code, e.amount) for e in denied] == [(ACME, "BUDGET_EXCEEDED", 2 * CENT)]


async def test_denial_names_the_tightest_scope(admin: SyncLedger) -> None:
    """With a roomy tenant and a short agent budget, the denial names the agent scope and its remaining."""
    admin.set_budget(ACME, "1usd")
    admin.set_budget(BOT, "0.015usd")
    effects: list[int] = []
    tool = make_tool("async", effects.append, kind="tool.x", name="x", estimate="0.01usd")
    async with budget_scope(tenant="acme", agent="bot"):
        await tool(1)
        with pytest.raises(BudgetDenied) as info:
            await tool(2)
    assert (info.value.reason_code, info.value.scope, info.value.remaining) == ("BUDGET_EXCEEDED", BOT, CENT // 2)
    assert effects == [1]
    assert money(admin, BOT) == (CENT, 0, CENT // 2)
    assert money(admin, ACME) == (CENT, 0, 99 * CENT)


async def test_no_budget_anywhere_is_denied_budget_not_found(admin: SyncLedger) -> None:
    """A subject with no budget at any of its scopes is denied BUDGET_NOT_FOUND and the body does not run."""
    admin.set_budget("tenant:other", "1usd")
    effects: list[int] = []
    tool = make_tool("sync", effects.append, kind="tool.x", name="x", estimate=10)
    with budget_scope(tenant="acme"), pytest.raises(BudgetDenied) as info:
        tool(1)
    assert (info.value.reason_code, info.value.scope) == ("BUDGET_NOT_FOUND", ACME)
    assert effects == []


def test_generators_are_refused_at_decoration_time() -> None:
    """Sync and async generator functions raise TypeError when decorated (their cost is not known on return)."""

    def gen() -> Iterator[int]:
        yield 1

    async def agen() -> Any:
        yield 1

    with pytest.raises(TypeError, match="generator"):
        metered(kind="tool.x", estimate=1)(gen)
    with pytest.raises(TypeError, match="generator"):
        metered(kind="tool.x", estimate=1)(agen)


# --- who pays: budget_scope ------------------------------------------------------------------------


async def test_nested_scope_refines_the_parent_and_charges_both_budgets(admin: SyncLedger) -> None:
    """An inner budget_scope(agent=...) keeps the tenant and adds the agent: charges land on both budgets;
    leaving the inner scope charges the tenant only again."""
    admin.set_budget(ACME, "1usd")
    admin.set_budget(BOT, "0.10usd")
    tool = make_tool("sync", lambda: None, kind="tool.x", name="x", estimate="0.02usd")
    with budget_scope(tenant="acme") as outer:
        assert outer.scope_path == ACME
        with budget_scope(agent="bot") as inner:
            assert current_subject() == inner
            assert (inner.tenant, inner.agent) == ("acme", "bot")
            tool()
        assert current_subject() == outer
        tool()
    assert current_subject() is None
    assert money(admin, BOT) == (2 * CENT, 0, 8 * CENT)
    assert money(admin, ACME) == (4 * CENT, 0, 96 * CENT)
    paths = sorted(r.scope_path for r in admin.list_reservations())
    assert paths == [ACME, BOT]


async def test_async_scope_and_restore_on_exception() -> None:
    """budget_scope works as an async context manager, and both forms restore the parent when the body raises."""
    assert current_subject() is None
    async with budget_scope(tenant="acme", workflow="docs") as s:
        assert current_subject() == s
        assert s.scope_path == "tenant:acme/workflow:docs"
        with pytest.raises(ToolBroke):
            async with budget_scope(agent="bot"):
                assert current_subject().scope_path == "tenant:acme/workflow:docs/agent:bot"  # type: ignore[union-attr]
                raise ToolBroke
        assert current_subject() == s
        with pytest.raises(ToolBroke), budget_scope(tenant="other"):
            assert current_subject().scope_path == "tenant:other/workflow:docs"  # type: ignore[union-attr]
            raise ToolBroke
        assert current_subject() == s
    assert current_subject() is None


async def test_gathered_tasks_in_different_scopes_charge_their_own_budgets(admin: SyncLedger) -> None:
    """asyncio.gather of tasks that each enter their own scope: every charge lands on its task's budgets."""
    admin.set_budget(ACME, "1usd")
    admin.set_budget("tenant:acme/agent:a", "1usd")
    admin.set_budget("tenant:acme/agent:b", "1usd")
    admin.set_budget("tenant:zeta", "1usd")

    @metered(kind="tool.search", name="search", estimate=lambda who, n: n * CENT)
    async def search(who: str, n: int) -> str | None:
        await asyncio.sleep(0.01)
        return current_subject().scope_path  # type: ignore[union-attr]

    async def agent(name: str, n: int) -> list[str | None]:
        async with budget_scope(agent=name):
            out = [await search(name, n)]
            await asyncio.sleep(0.005)
            out.append(await search(name, n))
            return out

    async def other_tenant() -> str | None:
        async with budget_scope(tenant="zeta"):
            return await search("zeta", 5)

    async with budget_scope(tenant="acme"):
        a, b, z = await asyncio.gather(agent("a", 1), agent("b", 3), other_tenant())
        assert current_subject().scope_path == ACME  # type: ignore[union-attr]
    assert a == ["tenant:acme/agent:a"] * 2
    assert b == ["tenant:acme/agent:b"] * 2
    assert z == "tenant:zeta"
    assert spent(admin, "tenant:acme/agent:a") == 2 * CENT
    assert spent(admin, "tenant:acme/agent:b") == 6 * CENT
    assert spent(admin, ACME) == 8 * CENT
    assert spent(admin, "tenant:zeta") == 5 * CENT
    assert all(b.reserved == 0 for b in admin.balances())
    assert admin.verify() == []


async def test_thread_started_with_copied_context_sees_the_scope(admin: SyncLedger) -> None:
    """A thread run through contextvars.copy_context().run charges the scope it was copied in; a bare thread
    has no scope and gets InvalidRequestError."""
    admin.set_budget(BOT, "1usd")
    tool = make_tool("sync", lambda: current_subject(), kind="tool.x", name="x", estimate="0.03usd")
    seen: list[Any] = []

    def worker() -> None:
        try:
            seen.append(tool())
        except CyclesError as exc:
            seen.append(exc)

    with budget_scope(tenant="acme", agent="bot"):
        ctx = contextvars.copy_context()
        bare = threading.Thread(target=worker)
        bare.start()
        bare.join()
    copied = threading.Thread(target=ctx.run, args=(worker,))  # started after the scope closed: still sees it
    copied.start()
    copied.join()

    assert isinstance(seen[0], InvalidRequestError)
    assert seen[1].scope_path == BOT
    assert money(admin, BOT) == (3 * CENT, 0, 97 * CENT)


@pytest.mark.parametrize("mode", MODES)
async def test_no_scope_and_no_subject_is_a_clear_invalid_request(admin: SyncLedger, mode: str) -> None:
    """Outside any scope and without subject=, the call raises InvalidRequestError (a CyclesError) naming the
    fix; the body does not run and the books do not change."""
    admin.set_budget(ACME, "1usd")
    effects: list[int] = []
    tool = make_tool(mode, effects.append, kind="tool.x", name="lonely", estimate="0.01usd")
    assert current_subject() is None
    with pytest.raises(InvalidRequestError) as info:
        await call(tool, 1)
    assert isinstance(info.value, CyclesError)
    assert info.value.code == "INVALID_REQUEST"
    assert "lonely" in str(info.value) and "budget_scope" in str(info.value)
    assert effects == []
    assert admin.list_reservations() == []
    assert types(admin) == ["budget_set"]
    assert money(admin) == (0, 0, 100 * CENT)


@pytest.mark.parametrize("subject", ["tenant:acme/agent:bot", {"tenant": "acme", "agent": "bot"}])
def test_explicit_subject_needs_no_scope_and_wins_over_it(admin: SyncLedger, subject: Any) -> None:
    """`subject=` (scope path text or dict) charges that subject without a scope, and even inside another scope."""
    admin.set_budget(ACME, "1usd")
    admin.set_budget(BOT, "1usd")
    admin.set_budget("tenant:zeta", "1usd")
    tool = make_tool("sync", lambda: None, kind="tool.x", name="x", estimate=1_000, subject=subject)
    tool()
    with budget_scope(tenant="zeta"):
        tool()
    assert spent(admin, BOT) == 2_000
    assert spent(admin, "tenant:zeta") == 0


# --- heartbeat -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_heartbeat_keeps_a_slow_call_alive_past_its_ttl(admin: SyncLedger, url: str, mode: str) -> None:
    """A 2.5 s call with ttl_ms=1000 and no grace is extended while it runs (>= 2 times) and commits."""
    cycles_tools.configure(store=url, max_extensions=100, default_grace_period_ms=0)
    admin.set_budget(ACME, "1usd")

    if mode == "sync":

        @metered(kind="tool.slow", name="slow", estimate="0.05usd", actual="0.04usd", ttl_ms=1000)
        def slow() -> str:
            time.sleep(2.5)
            return "done"

    else:

        @metered(kind="tool.slow", name="slow", estimate="0.05usd", actual="0.04usd", ttl_ms=1000)
        async def slow() -> str:  # type: ignore[misc]
            await asyncio.sleep(2.5)
            return "done"

    with budget_scope(tenant="acme"):
        assert await call(slow) == "done"
    r = only_reservation(admin)
    assert r.status is ReservationStatus.COMMITTED
    assert r.committed == Amount.usd("0.04")
    assert r.extension_count >= 2
    # each beat pushes the expiry out by half the TTL, counted from the previous expiry
    assert r.expires_at_ms - r.created_at_ms == 1000 + 500 * r.extension_count
    kinds = types(admin)
    assert kinds.count("extended") == r.extension_count
    assert "expired" not in kinds
    assert money(admin) == (4 * CENT, 0, 96 * CENT)


@pytest.mark.parametrize("mode", MODES)
async def test_call_that_outlives_its_hold_still_pays_for_what_ran(admin: SyncLedger, url: str, mode: str) -> None:
    """A call that ran to completion after its hold expired (no heartbeat here) returns its result and is charged
    its actual once, as a direct debit, instead of raising after the side effect happened."""
    cycles_tools.configure(store=url, default_grace_period_ms=0)
    admin.set_budget(ACME, "1usd")
    effects: list[str] = []

    def body() -> str:
        time.sleep(1.3)
        effects.append("sent")
        return "done"

    tool = make_tool(
        mode, body, kind="tool.slow", name="slow", estimate="0.05usd", actual="0.04usd", ttl_ms=1000, heartbeat=False
    )
    with budget_scope(tenant="acme"):
        assert await call(tool) == "done"
    assert effects == ["sent"]
    assert only_reservation(admin).status is ReservationStatus.EXPIRED
    assert money(admin) == (4 * CENT, 0, 96 * CENT)
    assert admin.verify() == []


# --- idempotent retries ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_same_text_key_twice_is_charged_once(admin: SyncLedger, mode: str) -> None:
    """Two calls with the same idempotency_key text share one reservation and one charge."""
    admin.set_budget(ACME, "1usd")
    tool = make_tool(
        mode,
        lambda q: q.upper(),
        kind="tool.x",
        name="x",
        estimate="0.05usd",
        actual="0.02usd",
        idempotency_key="job-1",
    )
    with budget_scope(tenant="acme"):
        assert await call(tool, "a") == "A"
        assert await call(tool, "a") == "A"
    r = only_reservation(admin)
    assert (r.idempotency_key, r.status) == ("job-1", ReservationStatus.COMMITTED)
    assert money(admin) == (2 * CENT, 0, 98 * CENT)
    assert types(admin) == ["budget_set", "reserved", "committed"]


@pytest.mark.parametrize("mode", MODES)
async def test_callable_key_charges_once_per_distinct_key(admin: SyncLedger, mode: str) -> None:
    """idempotency_key as a callable of the arguments: repeats of one argument charge once, another argument again."""
    admin.set_budget(ACME, "1usd")
    tool = make_tool(
        mode,
        lambda doc, *, lang="en": f"{doc}/{lang}",
        kind="tool.x",
        name="translate",
        estimate="0.03usd",
        idempotency_key=lambda doc, *, lang="en": f"translate:{doc}:{lang}",
    )
    with budget_scope(tenant="acme"):
        assert [await call(tool, "d1"), await call(tool, "d1"), await call(tool, "d1", lang="en")] == ["d1/en"] * 3
        assert await call(tool, "d2", lang="fr") == "d2/fr"
    keys = sorted(r.idempotency_key for r in admin.list_reservations())
    assert keys == ["translate:d1:en", "translate:d2:fr"]
    assert money(admin) == (6 * CENT, 0, 94 * CENT)


@pytest.mark.parametrize("key", ["job-7", lambda n: f"job-{n}"], ids=["text", "callable"])
@pytest.mark.parametrize("mode", MODES)
async def test_failed_attempt_then_successful_retry_is_charged_exactly_once(
    admin: SyncLedger, mode: str, key: Any
) -> None:
    """First attempt raises (hold released), the retry with the same key succeeds: charged its actual exactly once
    (a direct debit under `<key>:late`), and a further retry charges nothing more."""
    admin.set_budget(ACME, "1usd")
    attempts: list[int] = []

    def flaky(n: int) -> str:
        attempts.append(n)
        if len(attempts) == 1:
            raise ToolBroke("timeout")
        return f"ok {n}"

    tool = make_tool(mode, flaky, kind="tool.x", name="x", estimate="0.05usd", actual="0.02usd", idempotency_key=key)
    with budget_scope(tenant="acme"):
        with pytest.raises(ToolBroke):
            await call(tool, 7)
        assert money(admin) == (0, 0, 100 * CENT)
        assert await call(tool, 7) == "ok 7"
        assert money(admin) == (2 * CENT, 0, 98 * CENT)
        assert await call(tool, 7) == "ok 7"
    assert attempts == [7, 7, 7]
    assert only_reservation(admin).status is ReservationStatus.RELEASED
    assert money(admin) == (2 * CENT, 0, 98 * CENT)
    assert types(admin) == ["budget_set", "reserved", "released", "debited"]
    debit = admin.events()[-1]
    assert (debit.scope, debit.amount) == (ACME, 2 * CENT)
    assert admin.verify() == []


async def test_denied_call_retried_after_funding_runs(admin: SyncLedger) -> None:
    """A DENY is not remembered under the key: the same keyed call succeeds once the budget is funded."""
    admin.set_budget(ACME, "0.01usd")
    effects: list[int] = []
    tool = make_tool("async", effects.append, kind="tool.x", name="x", estimate="0.02usd", idempotency_key="k")
    async with budget_scope(tenant="acme"):
        with pytest.raises(BudgetDenied):
            await tool(1)
        admin.fund(ACME, "0.01usd")
        await tool(1)
    assert effects == [1]
    assert money(admin) == (2 * CENT, 0, 0)


# --- caps ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_denylisted_tool_is_refused_and_others_see_the_caps(admin: SyncLedger, mode: str) -> None:
    """With caps tool_denylist=[deploy] on the budget, `deploy` is refused (TOOL_DENIED, body not run, hold
    released); another tool runs and reads those caps via current_caps(), which is None outside a call."""
    admin.set_budget(ACME, "1usd", caps={"tool_denylist": ["deploy"]})
    deployed: list[str] = []
    seen: list[Caps | None] = []
    deploy = make_tool(mode, deployed.append, kind="tool.deploy", name="deploy", estimate="0.10usd")

    def look(q: str) -> str:
        seen.append(current_caps())
        return q

    search = make_tool(mode, look, kind="tool.search", name="search", estimate=7)

    assert current_caps() is None
    with budget_scope(tenant="acme"):
        with pytest.raises(BudgetDenied) as info:
            await call(deploy, "prod")
        assert current_caps() is None
        assert await call(search, "q") == "q"
        assert current_caps() is None
    assert current_caps() is None

    err = info.value
    assert (err.reason_code, err.scope) == ("TOOL_DENIED", ACME)
    assert err.details["caps"] == {"tool_denylist": ["deploy"]}
    assert deployed == []
    assert seen == [Caps(tool_denylist=["deploy"])]
    statuses = {r.action.name: r.status for r in admin.list_reservations()}
    assert statuses == {"deploy": ReservationStatus.RELEASED, "search": ReservationStatus.COMMITTED}
    assert money(admin) == (7, 0, 100 * CENT - 7)


def test_allowlist_caps_refuse_every_other_tool(admin: SyncLedger) -> None:
    """caps tool_allowlist=[search]: only `search` may run; any other tool is TOOL_DENIED before its body."""
    admin.set_budget(ACME, "1usd", caps={"tool_allowlist": ["search"]})
    ran: list[str] = []
    search = make_tool("sync", lambda: ran.append("search"), kind="tool.search", name="search", estimate=5)
    email = make_tool("sync", lambda: ran.append("email"), kind="tool.email", name="email", estimate=5)
    with budget_scope(tenant="acme"):
        search()
        with pytest.raises(BudgetDenied) as info:
            email()
    assert info.value.reason_code == "TOOL_DENIED"
    assert ran == ["search"]
    assert money(admin)[:2] == (5, 0)


# --- LiteLLM hand-off --------------------------------------------------------------------------------


def test_litellm_headers_and_metadata_follow_the_current_scope() -> None:
    """litellm_headers()/litellm_metadata() give exactly the current subject's levels (and dimensions), {} outside."""
    assert litellm_headers() == {}
    assert litellm_metadata() == {}
    with budget_scope(tenant="acme", workflow="docs"):
        assert litellm_headers() == {"x-cycles-tenant": "acme", "x-cycles-workflow": "docs"}
        assert litellm_metadata() == {"cycles": {"tenant": "acme", "workflow": "docs"}}
        with budget_scope(agent="bot", run="r-42"):
            assert litellm_headers() == {
                "x-cycles-tenant": "acme",
                "x-cycles-workflow": "docs",
                "x-cycles-agent": "bot",
            }
            assert litellm_metadata() == {
                "cycles": {"tenant": "acme", "workflow": "docs", "agent": "bot", "dimensions": {"run": "r-42"}}
            }
        assert litellm_headers() == {"x-cycles-tenant": "acme", "x-cycles-workflow": "docs"}
    assert litellm_headers() == {}
    explicit = budget_scope(tenant="zeta", app="crm").subject()
    assert litellm_headers(explicit) == {"x-cycles-tenant": "zeta", "x-cycles-app": "crm"}
    assert litellm_metadata(explicit) == {"cycles": {"tenant": "zeta", "app": "crm"}}


# --- robustness of settlement ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_failing_actual_does_not_leave_the_hold_active(admin: SyncLedger, mode: str) -> None:
    """If `actual` cannot be computed from the result, the hold is still settled (committed or released), not
    left ACTIVE to block the budget until its TTL runs out."""
    admin.set_budget(ACME, "1usd")
    tool = make_tool(
        mode, lambda: {"cost": 0.5}, kind="tool.x", name="x", estimate="0.50usd", actual=lambda r: r["cost"]
    )
    with budget_scope(tenant="acme"), contextlib.suppress(InvalidRequestError):
        await call(tool)
    r = only_reservation(admin)
    assert r.status is not ReservationStatus.ACTIVE
    assert admin.balance(ACME).reserved == 0
