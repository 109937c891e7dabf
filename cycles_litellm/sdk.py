"""Budget authority for code that calls LiteLLM as a library (no proxy, so no pre-call hook).

    from cycles_litellm import acompletion
    resp = await acompletion(model="gpt-4o-mini", messages=[...], cycles_subject={"tenant": "acme"})

The wrappers reserve the worst case, call LiteLLM (with `max_tokens` clamped on ALLOW_WITH_CAPS and
usage requested on streams), commit the real cost, release on error or cancellation, and raise
`BudgetDenied` on DENY. The subject comes from `cycles_subject=`, else `metadata={"cycles": {...}}`, else
the current `budget_scope` (contextvars). Settling follows `cycles_ledger.lifecycle` like every other
edge: a call that outlived its hold is debited, a settle the ledger misses is retried and logged, and
neither ever replaces the call's answer or error.

`CyclesGate` is for third-party code that calls `litellm.acompletion` itself: register it in
`litellm.callbacks`; its `async_pre_call_deployment_hook` reserves per attempt and raises on DENY.
Not covered by the gate: sync `litellm.completion` (LiteLLM runs no blocking hook there) and
streams whose consumer stops early (no event reports the partial output).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import litellm
from litellm.integrations.custom_logger import CustomLogger

from cycles_ledger import (
    Action,
    Amount,
    BudgetDenied,
    Decision,
    Ledger,
    ReserveResult,
    Subject,
    SyncLedger,
    Unit,
    format_amount,
    open_ledger,
    open_ledger_sync,
)
from cycles_ledger.context import current_subject
from cycles_ledger.lifecycle import Hold, HoldState, Lifecycle, SyncLifecycle

from .calls import action_kind, action_name, chunk_text, usd_to_microcents
from .estimate import Estimate, PriceUnknown, cost_of_usage, estimate_call, price_of_group, soft_landing
from .routes import classify
from .settings import Settings, load_settings

__all__ = ["CyclesGate", "Guard", "acompletion", "aembedding", "completion", "configure"]

log = logging.getLogger("cycles_litellm")

_USD = Unit.USD_MICROCENTS
_SOFT_LANDING = frozenset({"acompletion", "completion"})  # calls whose output a smaller max_tokens can cap


def _usd(amount: int) -> Amount:
    return Amount(unit=_USD, amount=amount)


def _subject(explicit: Any, kwargs: Mapping[str, Any], settings: Settings) -> Subject:
    if explicit is not None:
        return (
            explicit
            if isinstance(explicit, Subject)
            else (Subject.parse(explicit) if isinstance(explicit, str) else Subject.model_validate(dict(explicit)))
        )
    meta = kwargs.get("metadata") or {}
    if isinstance(meta, Mapping) and isinstance(meta.get("cycles"), Mapping):
        return Subject.model_validate(dict(meta["cycles"]))
    ctx = current_subject()
    if ctx is not None:
        return ctx
    if settings.subject.defaults:
        return Subject.model_validate(dict(settings.subject.defaults))
    raise BudgetDenied(
        "no budget subject: pass cycles_subject=..., metadata={'cycles': {...}} or call inside budget_scope(...)",
        reason_code="SUBJECT_MISSING",
    )


def _denied(r: ReserveResult, est: int) -> BudgetDenied:
    left = format_amount(r.remaining, _USD) if r.remaining is not None else "unknown"
    return BudgetDenied(
        f"budget denied ({r.reason_code}) at {r.scope}: remaining {left}, call needs up to {format_amount(est, _USD)}",
        reason_code=r.reason_code or "BUDGET_EXCEEDED",
        scope=r.scope,
        remaining=r.remaining,
        estimate=est,
        unit=_USD.value,
    )


def _actual(response: Any, est: Estimate, group: str, settings: Settings) -> int:
    try:
        cost = litellm.completion_cost(completion_response=response)
    except Exception:  # noqa: BLE001 - unpriced models raise; fall back to usage x our price
        cost = None
    if cost:
        return usd_to_microcents(cost)
    usage = getattr(response, "usage", None)
    prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
    completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
    try:
        return cost_of_usage(prompt, completion_tokens, price_of_group(group, settings)[1])
    except PriceUnknown:
        return est.amount


class Guard:
    """Reserve → call → settle around LiteLLM SDK calls, on one ledger and one settings file."""

    def __init__(self, settings: Settings | None = None, ledger: Ledger | None = None, store: str | None = None):
        self.settings = settings or load_settings()
        self._store = store
        self._ledger = self._given = ledger
        self._sync: SyncLedger | None = None
        self._life: Lifecycle | None = None
        self._sync_life: SyncLifecycle | None = None

    def _url(self) -> str:
        return self._store or self.settings.store_url()

    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = open_ledger(self._url(), allow_unbudgeted=self.settings.ledger_allows_unbudgeted())
        return self._ledger

    def sync_ledger(self) -> SyncLedger:
        """The blocking face: the ledger this guard was given (on a private loop), else one opened from the URL."""
        if self._sync is None:
            if self._given is not None:
                given = self._given
                self._sync = SyncLedger(lambda: given)
            else:
                self._sync = open_ledger_sync(self._url(), allow_unbudgeted=self.settings.ledger_allows_unbudgeted())
        return self._sync

    def lifecycle(self) -> Lifecycle:
        """The settle flow every async call (and `CyclesGate`) goes through."""
        if self._life is None:
            self._life = Lifecycle(self.ledger(), retries=self.settings.settle_retries, log=log)
        return self._life

    def sync_lifecycle(self) -> SyncLifecycle:
        if self._sync_life is None:
            self._sync_life = SyncLifecycle(self.sync_ledger(), retries=self.settings.settle_retries, log=log)
        return self._sync_life

    def _plan(self, call_type: str, kwargs: dict[str, Any], subject: Any) -> tuple[Subject, Action, Estimate, str]:
        group = str(kwargs.get("model"))
        subj = _subject(subject, kwargs, self.settings)
        route = classify(call_type)
        if not route.metered:
            raise BudgetDenied(
                f"{call_type} calls are not metered", reason_code="ROUTE_NOT_METERED", scope=subj.scope_path
            )
        try:
            est = estimate_call(group, kwargs, route.kind, self.settings)
        except PriceUnknown as exc:
            raise BudgetDenied(str(exc), reason_code="PRICE_UNKNOWN", scope=subj.scope_path) from None
        return subj, Action(kind=action_kind(route.kind), name=action_name(est.model)), est, group

    def _options(self, call_type: str, est: Estimate, key: str) -> dict[str, Any]:
        """Reserve options shared by the async and sync calls and the gate."""
        soft = soft_landing(est, self.settings.min_output_tokens) if call_type in _SOFT_LANDING else None
        return {
            "idempotency_key": key,
            "label": key,
            "ttl_ms": self.settings.ttl_ms,
            "max_hold_ms": self.settings.max_hold_ms,
            "overage_policy": self.settings.overage_policy,
            "soft_landing": soft,
        }

    def _apply(self, hold: Hold, est: Estimate, kwargs: dict[str, Any]) -> None:
        r = hold.result
        if r.decision is Decision.DENY:
            raise _denied(r, est.amount)
        if r.decision is Decision.ALLOW_WITH_CAPS and r.caps and r.caps.max_tokens is not None and est.cap_field:
            kwargs[est.cap_field] = max(1, min(r.caps.max_tokens, est.output_cap))

    async def reserve(
        self, call_type: str, kwargs: dict[str, Any], subject: Any = None, key: str | None = None
    ) -> tuple[Hold, Estimate, str]:
        """Reserve the worst case of one call (raising BudgetDenied on DENY) and clamp `kwargs` to its caps."""
        subj, action, est, group = self._plan(call_type, kwargs, subject)
        key = key or f"sdk:{uuid.uuid4().hex}"
        hold = await self.lifecycle().reserve(subj, action, _usd(est.amount), **self._options(call_type, est, key))
        self._apply(hold, est, kwargs)
        return hold, est, group

    async def acall(self, call_type: str, fn: Any, kwargs: dict[str, Any], subject: Any = None) -> Any:
        hold, est, group = await self.reserve(call_type, kwargs, subject)
        life = self.lifecycle()
        if not kwargs.get("stream"):
            return await life.call(
                hold,
                lambda: fn(**kwargs),
                lambda response: _usd(_actual(response, est, group, self.settings)),
                reason="call failed",
            )
        kwargs["stream_options"] = {**(kwargs.get("stream_options") or {}), "include_usage": True}
        try:
            stream = await fn(**kwargs)
        except BaseException as exc:
            await asyncio.shield(life.release(hold, f"call failed: {type(exc).__name__}"))
            raise
        return self._stream(stream, hold, est, group)

    async def _stream(self, stream: Any, hold: Hold, est: Estimate, group: str) -> AsyncIterator[Any]:
        """Yield the chunks; commit usage x price at the end, or prompt + output so far if abandoned."""
        parts: list[str] = []
        usage = None
        try:
            async for chunk in stream:
                parts.append(chunk_text(chunk))
                usage = getattr(chunk, "usage", None) or usage
                yield chunk
        finally:
            if usage is not None:
                prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
                out = int(getattr(usage, "completion_tokens", 0) or 0)
            else:
                prompt = est.input_tokens
                text = "".join(parts)
                out = int(litellm.token_counter(model=est.model, text=text)) if text else 0
            try:
                actual = cost_of_usage(prompt, out, price_of_group(group, self.settings)[1])
            except PriceUnknown:
                actual = est.amount
            await asyncio.shield(self.lifecycle().commit(hold, _usd(actual)))

    def call(self, call_type: str, fn: Any, kwargs: dict[str, Any], subject: Any = None) -> Any:
        if kwargs.get("stream"):
            raise NotImplementedError("sync streaming is not metered; use cycles_litellm.acompletion(stream=True)")
        subj, action, est, group = self._plan(call_type, kwargs, subject)
        life = self.sync_lifecycle()
        key = f"sdk:{uuid.uuid4().hex}"
        hold = life.reserve(subj, action, _usd(est.amount), **self._options(call_type, est, key))
        self._apply(hold, est, kwargs)
        return life.call(
            hold,
            lambda: fn(**kwargs),
            lambda response: _usd(_actual(response, est, group, self.settings)),
            reason="call failed",
        )


_default: Guard | None = None


def configure(settings: Settings | None = None, *, store: str | None = None, ledger: Ledger | None = None) -> Guard:
    """Set the ledger and settings the module-level wrappers use (default: $CYCLES_CONFIG / $CYCLES_STORE)."""
    global _default
    _default = Guard(settings, ledger, store)
    return _default


def _guard() -> Guard:
    return _default or configure()


async def acompletion(*, cycles_subject: Any = None, **kwargs: Any) -> Any:
    """`litellm.acompletion` under budget authority (streams included)."""
    return await _guard().acall("acompletion", litellm.acompletion, kwargs, cycles_subject)


async def aembedding(*, cycles_subject: Any = None, **kwargs: Any) -> Any:
    """`litellm.aembedding` under budget authority."""
    return await _guard().acall("aembedding", litellm.aembedding, kwargs, cycles_subject)


def completion(*, cycles_subject: Any = None, **kwargs: Any) -> Any:
    """`litellm.completion` under budget authority (non-streaming)."""
    return _guard().call("completion", litellm.completion, kwargs, cycles_subject)


@dataclass
class _GateCall:
    hold: Hold
    est: Estimate
    group: str
    task: asyncio.Task[Any] | None = None
    on_done: Callable[[asyncio.Task[Any]], None] | None = None


class CyclesGate(CustomLogger):
    """For third-party code calling `litellm.acompletion` directly: `litellm.callbacks.append(CyclesGate())`.

    LiteLLM reports a call's end in separate callbacks, so the hold made before the call is settled by
    them. A call whose task is cancelled gets no callback at all: the gate then gives its hold back
    itself (a success reported after that is still debited)."""

    def __init__(self, guard: Guard | None = None) -> None:
        super().__init__()
        self.guard = guard or _guard()
        # LiteLLM takes loggers of one class with equal public scalar attributes for one and sends the events of
        # every call to the first registered: without an id of its own, a second gate would never settle.
        self.gate_id = uuid.uuid4().hex
        self._held: dict[str, _GateCall] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    async def async_pre_call_deployment_hook(self, kwargs: dict[str, Any], call_type: Any) -> dict[str, Any]:
        call_id = str(kwargs.get("litellm_call_id") or uuid.uuid4().hex)
        ctype = str(getattr(call_type, "value", call_type))
        hold, est, group = await self.guard.reserve(ctype, kwargs, None, key=f"gate:{call_id}")
        if hold.state is HoldState.HELD:
            self._pop(call_id)  # a retry of the same call id replays the same reservation
            entry = _GateCall(hold, est, group, asyncio.current_task())
            if entry.task is not None:
                entry.on_done = functools.partial(self._task_done, call_id, entry)
                entry.task.add_done_callback(entry.on_done)
            self._held[call_id] = entry
        return kwargs

    def _pop(self, call_id: str) -> _GateCall | None:
        entry = self._held.pop(call_id, None)
        if entry is not None and entry.task is not None and entry.on_done is not None:
            entry.task.remove_done_callback(entry.on_done)  # a long-lived task must not collect callbacks
            entry.task = None
        return entry

    def _task_done(self, call_id: str, entry: _GateCall, task: asyncio.Task[Any]) -> None:
        """The task that made the call ended; cancelled, no LiteLLM callback will report it."""
        entry.task = None
        if not task.cancelled() or self._held.get(call_id) is not entry:
            self.guard.lifecycle().stop_heartbeat(entry.hold)  # its callback is on the way
            return
        loop = asyncio.get_running_loop()
        release = loop.create_task(self.guard.lifecycle().release(entry.hold, "call cancelled"))
        self._tasks.add(release)
        release.add_done_callback(self._tasks.discard)

        def forget() -> None:
            if self._held.get(call_id) is entry:
                del self._held[call_id]

        loop.call_later(self.guard.settings.ttl_ms / 1000, forget)

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        entry = self._pop(str(kwargs.get("litellm_call_id")))
        if entry is not None:
            cost = kwargs.get("response_cost")
            actual = (
                usd_to_microcents(cost) if cost else _actual(response_obj, entry.est, entry.group, self.guard.settings)
            )
            await self.guard.lifecycle().commit(entry.hold, _usd(actual))

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        entry = self._pop(str(kwargs.get("litellm_call_id")))
        if entry is not None:
            await self.guard.lifecycle().release(entry.hold, "call failed")
