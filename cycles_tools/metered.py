"""`@metered`: put any sync or async function (a search API, an e-mail, a deploy) under the ledger.

    @metered(kind="tool.search", estimate="0.02usd", actual=lambda result: result.cost)
    async def search(query: str) -> Result: ...

Before the body runs: reserve (DENY raises `BudgetDenied`, and the body never runs). While it runs:
the reservation is kept alive (heartbeat `extend`) and its caps are readable via `current_caps()`.
Afterwards: commit `actual` (default: the estimate); if the body raises: release and re-raise.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

from cycles_ledger import (
    Action,
    Amount,
    BudgetDenied,
    Caps,
    CyclesError,
    Decision,
    IdempotencyMismatchError,
    InvalidRequestError,
    Ledger,
    ReservationExpiredError,
    ReservationFinalizedError,
    ReserveResult,
    Subject,
    SyncLedger,
    Unit,
    format_amount,
    open_ledger,
    open_ledger_sync,
)
from cycles_ledger.config import store_url
from cycles_ledger.context import current_subject

__all__ = ["configure", "current_caps", "metered"]

log = logging.getLogger("cycles_tools")

P = ParamSpec("P")
R = TypeVar("R")

AmountSpec = Amount | str | int | Callable[..., Any]

_caps_var: contextvars.ContextVar[Caps | None] = contextvars.ContextVar("cycles_caps", default=None)


def current_caps() -> Caps | None:
    """The caps of the reservation the running @metered function holds (None without caps)."""
    return _caps_var.get()


class _Runtime:
    """The ledger shared by every @metered function of this process (async and sync faces)."""

    def __init__(self, store: str | None = None, ledger: Ledger | None = None, **settings: Any) -> None:
        self.url = store_url(store)
        self.settings = settings
        self._ledger = ledger
        self._sync: SyncLedger | None = None
        self._lock = threading.Lock()

    def ledger(self) -> Ledger:
        with self._lock:
            if self._ledger is None:
                self._ledger = open_ledger(self.url, **self.settings)
            return self._ledger

    def sync(self) -> SyncLedger:
        with self._lock:
            if self._sync is None:
                if self._ledger is not None:
                    shared = self._ledger
                    self._sync = SyncLedger(lambda: shared)
                else:
                    self._sync = open_ledger_sync(self.url, **self.settings)
            return self._sync


_runtime: _Runtime | None = None


def configure(store: str | None = None, *, ledger: Ledger | None = None, **settings: Any) -> None:
    """Choose the ledger for @metered: a store URL (default `$CYCLES_STORE` or `sqlite:///cycles.db`),
    or an already open `Ledger`. Extra settings go to `open_ledger`."""
    global _runtime
    _runtime = _Runtime(store, ledger, **settings)


def _rt() -> _Runtime:
    global _runtime
    if _runtime is None:
        _runtime = _Runtime()
    return _runtime


def _resolve(spec: AmountSpec, unit: Unit, call: Callable[[], Any], what: str) -> Amount:
    value: Any = call() if callable(spec) else spec
    if isinstance(value, Amount):
        return value
    if isinstance(value, (bool, float)):
        raise InvalidRequestError(f"{what} must be an integer in {unit.value}, an Amount or text like '0.02usd'")
    if isinstance(value, int):
        return Amount(unit=unit, amount=value)
    if isinstance(value, str):
        return Amount.parse(value, default_unit=unit)
    raise InvalidRequestError(f"{what} gave {type(value).__name__}; expected an Amount, int or text amount")


@dataclass(frozen=True)
class _Meter:
    kind: str
    name: str
    estimate: AmountSpec
    actual: AmountSpec | None
    unit: Unit
    subject: Subject | None
    idempotency_key: str | Callable[..., str] | None
    ttl_ms: int | None
    heartbeat: bool

    def plan(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Subject, Action, Amount, str | None]:
        subject = self.subject or current_subject()
        if subject is None:
            raise InvalidRequestError(
                f"{self.name}: no budget subject; call it inside budget_scope(...) or pass subject= to @metered"
            )
        estimate = _resolve(self.estimate, self.unit, lambda: self.estimate(*args, **kwargs), "estimate")  # type: ignore[operator]
        key = self.idempotency_key(*args, **kwargs) if callable(self.idempotency_key) else self.idempotency_key
        return subject, Action(kind=self.kind, name=self.name), estimate, key

    def actual_amount(self, result: Any, estimate: Amount) -> Amount:
        if self.actual is None:
            return estimate
        return _resolve(self.actual, estimate.unit, lambda: self.actual(result), "actual")  # type: ignore[misc,operator]

    def check(self, r: ReserveResult, estimate: Amount) -> None:
        """Turn a DENY, or caps that forbid this tool, into BudgetDenied."""
        if r.decision is Decision.DENY:
            left = format_amount(r.remaining, estimate.unit) if r.remaining is not None else "unknown"
            raise BudgetDenied(
                f"{self.name} denied ({r.reason_code}) at {r.scope}: remaining {left}, needs {estimate}",
                reason_code=r.reason_code or "BUDGET_EXCEEDED",
                scope=r.scope,
                remaining=r.remaining,
                estimate=estimate.amount,
                unit=estimate.unit.value,
                caps=r.caps.model_dump(exclude_none=True) if r.caps else None,
            )

    def denied_by_caps(self, r: ReserveResult, estimate: Amount) -> BudgetDenied | None:
        if r.caps is not None and not r.caps.allows_tool(self.name):
            return BudgetDenied(
                f"{self.name} is not allowed by the caps on {r.scope_path}",
                reason_code="TOOL_DENIED",
                scope=r.scope_path,
                estimate=estimate.amount,
                unit=estimate.unit.value,
                caps=r.caps.model_dump(exclude_none=True),
            )
        return None


def _key_opts(key: str | None, ttl_ms: int | None) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if key is not None:
        opts["idempotency_key"] = key
    if ttl_ms is not None:
        opts["ttl_ms"] = ttl_ms
    return opts


def _ttl(r: ReserveResult, meter: _Meter) -> float:
    ttl_ms = r.remaining_ttl_ms or meter.ttl_ms or 60_000
    return max(ttl_ms / 2 / 1000, 0.05)


async def _run_async(
    meter: _Meter, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    subject, action, estimate, key = meter.plan(args, kwargs)
    ledger = _rt().ledger()
    r = await ledger.reserve(subject, action, estimate, **_key_opts(key, meter.ttl_ms))
    meter.check(r, estimate)
    rid = r.reservation_id or ""
    refused = meter.denied_by_caps(r, estimate)
    if refused is not None:
        await ledger.release(rid, reason="tool denied by caps")
        raise refused
    beat = asyncio.get_running_loop().create_task(_beat_async(ledger, rid, _ttl(r, meter))) if meter.heartbeat else None
    token = _caps_var.set(r.caps)
    try:
        result = await fn(*args, **kwargs)
    except BaseException:
        await asyncio.shield(_release_async(ledger, rid))
        raise
    finally:
        _caps_var.reset(token)
        if beat is not None:
            beat.cancel()
    try:
        actual = meter.actual_amount(result, estimate)
    except BaseException:
        # The body ran, so its cost is real: charge the estimate, then surface the broken `actual`.
        await _commit_async(ledger, meter, rid, subject, action, estimate, key)
        raise
    await _commit_async(ledger, meter, rid, subject, action, actual, key)
    return result


async def _beat_async(ledger: Ledger, rid: str, interval_s: float) -> None:
    """Keep a long call's reservation alive: every half TTL, push expiry out by half a TTL."""
    try:
        while True:
            await asyncio.sleep(interval_s)
            await ledger.extend(rid, max(int(interval_s * 1000), 1))
    except asyncio.CancelledError:
        raise
    except CyclesError as exc:
        log.warning("cycles: heartbeat for %s stopped: %s", rid, exc)


async def _release_async(ledger: Ledger, rid: str) -> None:
    try:
        await ledger.release(rid, reason="tool raised")
    except CyclesError as exc:
        log.warning("cycles: release of %s failed: %s", rid, exc)


async def _commit_async(
    ledger: Ledger, meter: _Meter, rid: str, subject: Subject, action: Action, actual: Amount, key: str | None
) -> None:
    try:
        await ledger.commit(rid, actual)
    except IdempotencyMismatchError:
        pass  # a retry of a call already committed (same idempotency key): charged once
    except (ReservationFinalizedError, ReservationExpiredError):
        # The hold is gone (released by an earlier failed attempt under a reused key, or expired while
        # the body ran) but the work happened: pay for it once, as a direct debit under the same key.
        await ledger.record_event(subject, action, actual, idempotency_key=f"{key or rid}:late")


def _run_sync(meter: _Meter, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    subject, action, estimate, key = meter.plan(args, kwargs)
    ledger = _rt().sync()
    r = ledger.reserve(subject, action, estimate, **_key_opts(key, meter.ttl_ms))
    meter.check(r, estimate)
    rid = r.reservation_id or ""
    refused = meter.denied_by_caps(r, estimate)
    if refused is not None:
        ledger.release(rid, reason="tool denied by caps")
        raise refused
    stop = threading.Event()
    beat = None
    if meter.heartbeat:
        beat = threading.Thread(target=_beat_sync, args=(ledger, rid, _ttl(r, meter), stop), daemon=True)
        beat.start()
    token = _caps_var.set(r.caps)
    try:
        result = fn(*args, **kwargs)
    except BaseException:
        try:
            ledger.release(rid, reason="tool raised")
        except CyclesError as exc:
            log.warning("cycles: release of %s failed: %s", rid, exc)
        raise
    finally:
        _caps_var.reset(token)
        stop.set()
    try:
        actual = meter.actual_amount(result, estimate)
    except BaseException:
        _commit_sync(ledger, rid, subject, action, estimate, key)
        raise
    _commit_sync(ledger, rid, subject, action, actual, key)
    return result


def _commit_sync(
    ledger: SyncLedger, rid: str, subject: Subject, action: Action, actual: Amount, key: str | None
) -> None:
    try:
        ledger.commit(rid, actual)
    except IdempotencyMismatchError:
        pass
    except (ReservationFinalizedError, ReservationExpiredError):
        ledger.record_event(subject, action, actual, idempotency_key=f"{key or rid}:late")


def _beat_sync(ledger: SyncLedger, rid: str, interval_s: float, stop: threading.Event) -> None:
    while not stop.wait(interval_s):
        try:
            ledger.extend(rid, max(int(interval_s * 1000), 1))
        except CyclesError as exc:
            log.warning("cycles: heartbeat for %s stopped: %s", rid, exc)
            return


def metered(
    *,
    kind: str,
    estimate: AmountSpec,
    name: str | None = None,
    actual: AmountSpec | None = None,
    unit: Unit | str = Unit.USD_MICROCENTS,
    subject: Subject | dict[str, Any] | str | None = None,
    idempotency_key: str | Callable[..., str] | None = None,
    ttl_ms: int | None = None,
    heartbeat: bool = True,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Meter a sync or async function: reserve `estimate` before it runs, commit `actual` after.

    `estimate` is an Amount, text (`"0.02usd"`), an int in `unit`, or a callable of the call's
    arguments; `actual` likewise, or a callable of the result. `idempotency_key` (text or a callable of
    the arguments) makes a retried call charge once. Generators are refused: their cost is not known
    when they return.
    """
    try:
        unit_ = Unit(unit)
    except ValueError:
        raise InvalidRequestError(f"unknown unit {unit!r}; known: {', '.join(u.value for u in Unit)}") from None
    if isinstance(subject, str):
        subj: Subject | None = Subject.parse(subject)
    elif isinstance(subject, dict):
        subj = Subject.model_validate(subject)
    else:
        subj = subject

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(f"@metered cannot wrap generator {fn.__qualname__}: meter the function that consumes it")
        meter = _Meter(kind, name or fn.__qualname__, estimate, actual, unit_, subj, idempotency_key, ttl_ms, heartbeat)
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await _run_async(meter, fn, args, kwargs)

            return cast(Callable[P, R], async_wrapper)

        @functools.wraps(fn)
        def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            return cast(R, _run_sync(meter, fn, args, kwargs))

        return sync_wrapper

    return decorate
