"""Budget authority for code that calls LiteLLM as a library (no proxy, so no pre-call hook).

    from cycles_litellm import acompletion
    resp = await acompletion(model="gpt-4o-mini", messages=[...], cycles_subject={"tenant": "acme"})

The wrappers reserve the worst case, call LiteLLM (with `max_tokens` clamped on ALLOW_WITH_CAPS and
usage requested on streams), commit the real cost, release on error, and raise `BudgetDenied` on
DENY. The subject comes from `cycles_subject=`, else `metadata={"cycles": {...}}`, else the current
`budget_scope` (contextvars).

`CyclesGate` is for third-party code that calls `litellm.acompletion` itself: register it in
`litellm.callbacks`; its `async_pre_call_deployment_hook` reserves per attempt and raises on DENY.
Not covered by the gate: sync `litellm.completion` (LiteLLM runs no blocking hook there) and
streams whose consumer stops early (no event reports the partial output).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping
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

from .calls import action_kind, action_name, chunk_text, usd_to_microcents
from .estimate import Estimate, PriceUnknown, cost_of_usage, estimate_call, price_of_group, soft_landing
from .routes import classify
from .settings import Settings, load_settings

__all__ = ["CyclesGate", "Guard", "acompletion", "aembedding", "completion", "configure"]

_USD = Unit.USD_MICROCENTS


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
        self._ledger = ledger
        self._sync: SyncLedger | None = None

    def _url(self) -> str:
        return self._store or self.settings.store_url()

    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = open_ledger(self._url(), allow_unbudgeted=self.settings.ledger_allows_unbudgeted())
        return self._ledger

    def sync_ledger(self) -> SyncLedger:
        if self._sync is None:
            self._sync = open_ledger_sync(self._url(), allow_unbudgeted=self.settings.ledger_allows_unbudgeted())
        return self._sync

    def _plan(
        self, call_type: str, kwargs: dict[str, Any], subject: Any
    ) -> tuple[Subject, Action, Estimate, str, dict[str, Any]]:
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
        action = Action(kind=action_kind(route.kind), name=action_name(est.model))
        return subj, action, est, group, {"idempotency_key": f"sdk:{uuid.uuid4().hex}", "ttl_ms": self.settings.ttl_ms}

    def _apply(self, r: ReserveResult, est: Estimate, kwargs: dict[str, Any]) -> None:
        if r.decision is Decision.DENY:
            raise _denied(r, est.amount)
        if r.decision is Decision.ALLOW_WITH_CAPS and r.caps and r.caps.max_tokens is not None and est.cap_field:
            kwargs[est.cap_field] = max(1, min(r.caps.max_tokens, est.output_cap))

    async def acall(self, call_type: str, fn: Any, kwargs: dict[str, Any], subject: Any = None) -> Any:
        subj, action, est, group, opts = self._plan(call_type, kwargs, subject)
        ledger = self.ledger()
        soft = soft_landing(est, self.settings.min_output_tokens) if call_type == "acompletion" else None
        r = await ledger.reserve(subj, action, Amount(unit=_USD, amount=est.amount), soft_landing=soft, **opts)
        self._apply(r, est, kwargs)
        rid = r.reservation_id or ""
        if kwargs.get("stream"):
            kwargs["stream_options"] = {**(kwargs.get("stream_options") or {}), "include_usage": True}
        try:
            response = await fn(**kwargs)
        except BaseException:
            await asyncio.shield(ledger.release(rid, reason="call failed"))
            raise
        if kwargs.get("stream"):
            return self._stream(response, rid, est, group)
        await ledger.commit(rid, Amount(unit=_USD, amount=_actual(response, est, group, self.settings)))
        return response

    async def _stream(self, stream: Any, rid: str, est: Estimate, group: str) -> AsyncIterator[Any]:
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
            await asyncio.shield(self.ledger().commit(rid, Amount(unit=_USD, amount=actual)))

    def call(self, call_type: str, fn: Any, kwargs: dict[str, Any], subject: Any = None) -> Any:
        if kwargs.get("stream"):
            raise NotImplementedError("sync streaming is not metered; use cycles_litellm.acompletion(stream=True)")
        subj, action, est, group, opts = self._plan(call_type, kwargs, subject)
        ledger = self.sync_ledger()
        soft = soft_landing(est, self.settings.min_output_tokens) if call_type == "completion" else None
        r = ledger.reserve(subj, action, Amount(unit=_USD, amount=est.amount), soft_landing=soft, **opts)
        self._apply(r, est, kwargs)
        rid = r.reservation_id or ""
        try:
            response = fn(**kwargs)
        except BaseException:
            ledger.release(rid, reason="call failed")
            raise
        ledger.commit(rid, Amount(unit=_USD, amount=_actual(response, est, group, self.settings)))
        return response


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


class CyclesGate(CustomLogger):
    """For third-party code calling `litellm.acompletion` directly: `litellm.callbacks.append(CyclesGate())`."""

    def __init__(self, guard: Guard | None = None) -> None:
        super().__init__()
        self.guard = guard or _guard()
        self._held: dict[str, tuple[str, Estimate, str]] = {}

    async def async_pre_call_deployment_hook(self, kwargs: dict[str, Any], call_type: Any) -> dict[str, Any]:
        call_id = str(kwargs.get("litellm_call_id") or uuid.uuid4().hex)
        ctype = str(getattr(call_type, "value", call_type))
        subj, action, est, group, opts = self.guard._plan(ctype, kwargs, None)
        opts["idempotency_key"] = f"gate:{call_id}"
        r = await self.guard.ledger().reserve(subj, action, Amount(unit=_USD, amount=est.amount), **opts)
        self.guard._apply(r, est, kwargs)
        if r.reservation_id:
            self._held[call_id] = (r.reservation_id, est, group)
        return kwargs

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        held = self._held.pop(str(kwargs.get("litellm_call_id")), None)
        if held is not None:
            rid, est, group = held
            cost = kwargs.get("response_cost")
            actual = usd_to_microcents(cost) if cost else _actual(response_obj, est, group, self.guard.settings)
            await self.guard.ledger().commit(rid, Amount(unit=_USD, amount=actual))

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        held = self._held.pop(str(kwargs.get("litellm_call_id")), None)
        if held is not None:
            await self.guard.ledger().release(held[0], reason="call failed")
