"""`@metered`: put any sync or async function (a search API, an e-mail, a deploy) under the ledger.

    @metered(kind="tool.search", estimate="0.02usd", actual=lambda result: result.cost)
    async def search(query: str) -> Result: ...

Before the body runs: reserve (DENY raises `BudgetDenied`, and the body never runs). While it runs:
the reservation is kept alive (heartbeat `extend`) and its caps are readable via `current_caps()`.
Afterwards: commit `actual` (default: the estimate); if the body raises: release and re-raise. The flow
and its rules (expired holds debited, settle retried, never raising after the body ran) are
`cycles_ledger.lifecycle`'s, shared with the LiteLLM edges.

Shadow mode (`mode="shadow"`, else `configure(mode=...)`, else `$CYCLES_MODE`, else enforce): the reserve
is a dry run the ledger logs as `would_deny` / `would_allow`, the body always runs, its cost is debited
with RECORD_ALL (balances show how far past the budget it went), and neither the budget nor an
unreachable ledger ever raises or blocks.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import inspect
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec, TypeVar, cast

from cycles_ledger import (
    Action,
    Amount,
    BudgetDenied,
    Caps,
    ConfigError,
    CyclesError,
    Decision,
    InvalidRequestError,
    Ledger,
    Subject,
    SyncLedger,
    Unit,
    format_amount,
    open_ledger,
    open_ledger_sync,
)
from cycles_ledger.config import store_url
from cycles_ledger.context import current_subject
from cycles_ledger.lifecycle import Hold, Lifecycle, SyncLifecycle

__all__ = ["MODE_ENV", "Mode", "configure", "current_caps", "metered"]

log = logging.getLogger("cycles_tools")

P = ParamSpec("P")
R = TypeVar("R")

AmountSpec = Amount | str | int | Callable[..., Any]
Mode = Literal["enforce", "shadow"]
MODE_ENV = "CYCLES_MODE"

_caps_var: contextvars.ContextVar[Caps | None] = contextvars.ContextVar("cycles_caps", default=None)


def current_caps() -> Caps | None:
    """The caps of the reservation the running @metered function holds (None without caps)."""
    return _caps_var.get()


def _mode(value: str | None, where: str) -> Mode | None:
    if value is None or value == "":
        return None
    if value in ("enforce", "shadow"):
        return cast(Mode, value)
    raise ConfigError(f"{where}: mode must be 'enforce' or 'shadow', got {value!r}")


class _Runtime:
    """The ledger shared by every @metered function of this process (async and sync faces)."""

    def __init__(
        self, store: str | None = None, ledger: Ledger | None = None, mode: Mode | None = None, **settings: Any
    ) -> None:
        self.url = store_url(store)
        self.mode = mode
        self.settings = settings
        self._ledger = ledger
        self._sync: SyncLedger | None = None
        self._life: Lifecycle | None = None
        self._sync_life: SyncLifecycle | None = None
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

    def lifecycle(self) -> Lifecycle:
        ledger = self.ledger()
        with self._lock:
            if self._life is None:
                self._life = Lifecycle(ledger, log=log)
            return self._life

    def sync_lifecycle(self) -> SyncLifecycle:
        sync = self.sync()
        with self._lock:
            if self._sync_life is None:
                self._sync_life = SyncLifecycle(sync, log=log)
            return self._sync_life


_runtime: _Runtime | None = None


def configure(
    store: str | None = None, *, ledger: Ledger | None = None, mode: Mode | None = None, **settings: Any
) -> None:
    """Choose the ledger for @metered: a store URL (default `$CYCLES_STORE` or `sqlite:///cycles.db`),
    or an already open `Ledger`; and the mode of every @metered function that names none (default
    `$CYCLES_MODE`, else enforce). Extra settings go to `open_ledger`."""
    global _runtime
    _runtime = _Runtime(store, ledger, _mode(mode, "configure"), **settings)


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
    mode: Mode | None

    def shadow(self) -> bool:
        """The decorator's mode, else configure()'s, else $CYCLES_MODE's, else enforce."""
        mode = self.mode or _rt().mode or _mode(os.environ.get(MODE_ENV), f"${MODE_ENV}") or "enforce"
        return mode == "shadow"

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

    def refusal(self, hold: Hold) -> BudgetDenied | None:
        """What enforcement raises for this hold: a DENY, or caps that forbid this tool (None: it may run)."""
        r, estimate = hold.result, hold.estimate
        if r.decision is Decision.DENY:
            left = format_amount(r.remaining, estimate.unit) if r.remaining is not None else "unknown"
            return BudgetDenied(
                f"{self.name} denied ({r.reason_code}) at {r.scope}: remaining {left}, needs {estimate}",
                reason_code=r.reason_code or "BUDGET_EXCEEDED",
                scope=r.scope,
                remaining=r.remaining,
                estimate=estimate.amount,
                unit=estimate.unit.value,
                caps=r.caps.model_dump(exclude_none=True) if r.caps else None,
            )
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

    def note(self, hold: Hold) -> dict[str, Any]:
        """The data of a shadow `would_deny` decided here, not by the ledger (a tool the caps forbid)."""
        data: dict[str, Any] = {
            "action": {"kind": self.kind, "name": self.name},
            "key": hold.idempotency_key,
            "estimate": hold.estimate.amount,
        }
        if hold.result.caps is not None:
            data["caps"] = hold.result.caps.model_dump(exclude_none=True)
        return data


def _shadow_key(key: str | None) -> str | None:
    """A shadow evaluation's key lives apart from enforce's, so switching modes never replays the other's answer."""
    if key is None:
        return None
    shadow = f"shadow:{key}"
    return (
        shadow if len(shadow) <= 256 else f"shadow:{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()}"
    )


def _unmetered(meter: _Meter, exc: CyclesError) -> None:
    log.warning("cycles shadow: %s runs unmetered (%s): %s", meter.name, exc.code, exc.message)


async def _run_async(
    meter: _Meter, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    shadow = meter.shadow()
    try:
        subject, action, estimate, key = meter.plan(args, kwargs)
        life = _rt().lifecycle()
        hold = await life.reserve(
            subject,
            action,
            estimate,
            shadow=shadow,
            idempotency_key=_shadow_key(key) if shadow else key,
            ttl_ms=meter.ttl_ms,
            heartbeat=meter.heartbeat,
            label=meter.name,
        )
        refused = meter.refusal(hold)
        if refused is not None and shadow:
            if hold.decision is not Decision.DENY:  # the ledger logged its own would_deny; the caps' is ours
                await _note_async(life, meter, refused, hold)
            refused = None
    except CyclesError as exc:
        if not shadow:
            raise
        _unmetered(meter, exc)  # shadow never blocks: not for a missing subject, nor for a ledger that is away
        return await fn(*args, **kwargs)
    if refused is not None:
        await life.release(hold, "tool denied by caps")
        raise refused

    async def work() -> Any:
        token = _caps_var.set(hold.caps)
        try:
            return await fn(*args, **kwargs)
        finally:
            _caps_var.reset(token)

    return await life.call(hold, work, lambda result: meter.actual_amount(result, estimate), reason="tool raised")


async def _note_async(life: Lifecycle, meter: _Meter, refused: BudgetDenied, hold: Hold) -> None:
    """Shadow: log the refusal enforcement would have made here (the caps forbid this tool) as would_deny."""
    try:
        ledger = await life.ledger()
        await ledger.note(hold.result.scope_path, refused.reason_code, would=True, data=meter.note(hold))
    except CyclesError as exc:
        log.warning("cycles shadow: could not log would_deny %s of %s: %s", refused.reason_code, meter.name, exc)


def _run_sync(meter: _Meter, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    shadow = meter.shadow()
    try:
        subject, action, estimate, key = meter.plan(args, kwargs)
        life = _rt().sync_lifecycle()
        hold = life.reserve(
            subject,
            action,
            estimate,
            shadow=shadow,
            idempotency_key=_shadow_key(key) if shadow else key,
            ttl_ms=meter.ttl_ms,
            heartbeat=meter.heartbeat,
            label=meter.name,
        )
        refused = meter.refusal(hold)
        if refused is not None and shadow:
            if hold.decision is not Decision.DENY:  # the ledger logged its own would_deny; the caps' is ours
                _note_sync(life, meter, refused, hold)
            refused = None
    except CyclesError as exc:
        if not shadow:
            raise
        _unmetered(meter, exc)
        return fn(*args, **kwargs)
    if refused is not None:
        life.release(hold, "tool denied by caps")
        raise refused

    def work() -> Any:
        token = _caps_var.set(hold.caps)
        try:
            return fn(*args, **kwargs)
        finally:
            _caps_var.reset(token)

    return life.call(hold, work, lambda result: meter.actual_amount(result, estimate), reason="tool raised")


def _note_sync(life: SyncLifecycle, meter: _Meter, refused: BudgetDenied, hold: Hold) -> None:
    try:
        life.ledger.note(hold.result.scope_path, refused.reason_code, would=True, data=meter.note(hold))
    except CyclesError as exc:
        log.warning("cycles shadow: could not log would_deny %s of %s: %s", refused.reason_code, meter.name, exc)


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
    mode: Mode | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Meter a sync or async function: reserve `estimate` before it runs, commit `actual` after.

    `estimate` is an Amount, text (`"0.02usd"`), an int in `unit`, or a callable of the call's
    arguments; `actual` likewise, or a callable of the result. `idempotency_key` (text or a callable of
    the arguments) makes a retried call charge once. `mode="shadow"` only records what enforcement would
    do (default: `configure(mode=...)`, else `$CYCLES_MODE`, else enforce). Generators are refused: their
    cost is not known when they return.
    """
    mode_ = _mode(mode, "@metered")
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
        meter = _Meter(
            kind, name or fn.__qualname__, estimate, actual, unit_, subj, idempotency_key, ttl_ms, heartbeat, mode_
        )
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
