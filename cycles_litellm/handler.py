"""The LiteLLM proxy callback: reserve before routing, commit real usage, release on failure.

LiteLLM calls `async_pre_call_hook` only when it is defined on the registered class itself (not
inherited), so every hook lives on `CyclesCallback` directly. Each client request is settled once:
the pending reservation is popped by whichever settle path runs first (success, final failure,
aborted stream); TTL expiry is the last resort.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any

from litellm.integrations.custom_logger import CustomLogger

from cycles_ledger import (
    Action,
    Amount,
    CyclesError,
    Decision,
    IdempotencyMismatchError,
    InvalidRequestError,
    Ledger,
    StoreUnavailableError,
    Subject,
    Unit,
    format_amount,
    open_ledger,
)
from cycles_ledger.lifecycle import Hold, HoldState, Lifecycle
from cycles_ledger.notify import Notifier

from .calls import action_kind, action_name, chunk_text, usd_to_microcents
from .estimate import (
    MIN_CAP,
    Estimate,
    PriceUnknown,
    RequestInvalid,
    cap_to_send,
    cost_of_usage,
    counting_model,
    estimate_call,
    moderation_is_free,
    price_of_group,
    set_cap,
    soft_landing,
    token_hold,
)
from .health import LedgerHealth, install_routes
from .metrics import Collector, LedgerView, Stats, register
from .metrics_workers import for_collector, workers_share_metrics
from .observe import DecisionFields, attach, not_a_deployment_failure, record_committed, scrub, spare_prometheus
from .routes import Route, classify
from .settings import Settings, load_settings
from .subject import payer_from_request

__all__ = ["CyclesCallback", "budget_error"]

log = logging.getLogger("cycles_litellm")

_USD = Unit.USD_MICROCENTS
# Where refusals of requests without a payer are logged (no tenant could be told).
UNIDENTIFIED_SCOPE = "tenant:_unidentified"
_MODERATION = frozenset({"moderation", "amoderation"})
_GATE_KEY = "cycles_pass"  # in the request metadata: the secret the deployment gate checks (see `_passed`)
_FAILURE_GRACE_ROUNDS = 120  # graces waited for an attempt still running (an hour): then it is given up
_FAILURE_GRACE_S = 30.0  # a failed attempt may still be retried or fall back inside the same request


@dataclass
class _Pending:
    call_id: str
    hold: Hold  # in shadow mode nothing is held: the spend is recorded as a debit
    estimate: Estimate
    group: str
    kind: str = "chat"
    request_id: str = ""  # this request's own id: a client may send the same call id twice
    streamed: list[str] = field(default_factory=list)
    tokens: int | None = None  # the tokens held next to the dollars (None: a route not counted in tokens)
    actual: tuple[int, dict[str, Any]] | None = None  # the charge and usage, once LiteLLM logs the success
    fields: DecisionFields | None = None  # the decision as the loggers get it (observe.py)
    answer: Any = None  # the provider's answer, before post-call guardrails judged it
    attempts: int = 0  # provider attempts started (LiteLLM's deployment hook runs before each) ...
    failures: int = 0  # ... and failed: while more started than failed, one is still running


_ANTHROPIC_CALL_TYPES = frozenset({"anthropic_messages", "aanthropic_messages"})


def budget_error(
    status: int,
    error_type: str,
    code: str,
    message: str,
    details: Mapping[str, Any] | None = None,
    call_type: str | None = None,
) -> Exception:
    """An error in the shape of the API the client called, which the proxy returns as is. OpenAI routes:
    {"error": {"type": "budget_exceeded", "code": "<reason>", "message": ..., "cycles": {scope, remaining, ...}}};
    Anthropic's /v1/messages: {"type": "error", "error": {"type": "budget_exceeded", "message": ..., ...}}."""
    from litellm.proxy._types import ProxyException

    if call_type in _ANTHROPIC_CALL_TYPES:
        # LiteLLM's /v1/messages handler passes a message that already is an Anthropic error through unchanged.
        error: dict[str, Any] = {"type": error_type, "message": message, "code": code}
        if details:
            error["cycles"] = dict(details)
        message = json.dumps({"type": "error", "error": error})

    class CyclesProxyError(ProxyException):
        # Routes that re-raise a hook's error as their own (audio transcription) read the status here.
        status_code = status
        cycles_refusal = True  # the failure hooks LiteLLM runs for a refused request know it holds nothing

        def to_dict(self) -> dict[str, Any]:
            body: dict[str, Any] = {"message": self.message, "type": self.type, "param": None, "code": code}
            if details:
                body["cycles"] = dict(details)
            return body

    refusal = CyclesProxyError(
        message=message,
        type=error_type,
        param=None,
        code=status,
        # 402 is not retried by OpenAI or Anthropic SDKs; this header makes sure no client retries it.
        headers={"x-should-retry": "false"},
    )
    not_a_deployment_failure(refusal)  # the router must not count it against, or cool down, a deployment
    return refusal


@functools.lru_cache(maxsize=1024)
def _action(kind: str, name: str) -> Action:
    return Action(kind=kind, name=name)  # frozen: one instance per (kind, model) serves every request


def _client_call_id(data: Mapping[str, Any]) -> Any:
    """The `x-litellm-call-id` header the client sent, if any (LiteLLM then uses it as the call id).
    The proxy keeps request headers under lowercase names."""
    return ((data.get("proxy_server_request") or {}).get("headers") or {}).get("x-litellm-call-id")


_THREAD_ESTIMATE_BYTES = 256_000


def _body_bytes(data: Mapping[str, Any]) -> int:
    headers = (data.get("proxy_server_request") or {}).get("headers") or {}
    try:
        return int(headers.get("content-length") or 0) if isinstance(headers, Mapping) else 0
    except (TypeError, ValueError):
        return 0


def _announce(settings: Settings) -> None:
    """One line at start: which settings file, mode, store and payer sources are in force. Printed even
    when nobody configured logging (the proxy configures only LiteLLM's own loggers)."""
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    if settings.source.path is None and settings.source.found_by != "built in code":
        log.warning("%s - no settings file: defaults apply", settings.describe())
    else:
        log.info("%s", settings.describe())


def _route_name(data: Mapping[str, Any], call_type: str) -> str:
    """The request's path (`/anthropic/v1/messages`) when the proxy recorded it, else its call type."""
    url = (data.get("proxy_server_request") or {}).get("url")
    if isinstance(url, str) and url:
        path = url.split("://", 1)[-1]
        path = "/" + path.split("/", 1)[1] if "/" in path else path
        return f"{path.split('?', 1)[0]} ({call_type})"
    return call_type


@functools.cache
def _proxy_server() -> Any:
    try:
        from litellm.proxy import proxy_server
    except Exception:  # noqa: BLE001 - outside the proxy there is no router
        return None
    return proxy_server


def _router() -> Any:
    """The proxy's router, read on every call (a config reload replaces it); None outside the proxy."""
    return getattr(_proxy_server(), "llm_router", None)


class CyclesCallback(CustomLogger):
    """Budget authority for the LiteLLM proxy. Register an instance: `callbacks: cycles_litellm.proxy_handler`."""

    def __init__(self, settings: Settings | None = None, ledger: Ledger | None = None) -> None:
        super().__init__()
        self.settings = settings or load_settings()
        _announce(self.settings)
        self._ledger = ledger
        self._ledger_lock = asyncio.Lock()
        self._pending: dict[str, _Pending] = {}
        self._headers: collections.OrderedDict[str, dict[str, str]] = collections.OrderedDict()
        # call id -> the secret the pre-call hook wrote into the request it let through (`_GATE_KEY`): the
        # deployment gate opens only for a call carrying it, which a client cannot forge (a denied or settled id,
        # or one sent on a route that skips the pre-call hook, carries none)
        self._passed: collections.OrderedDict[str, str] = collections.OrderedDict()
        # streams the client left, settled at what it saw: the proxy may still read them to the end and log
        # what the provider billed in full (Anthropic /v1/messages), and the rest is charged then
        self._aborted: collections.OrderedDict[str, tuple[_Pending, int]] = collections.OrderedDict()
        self._backlog: collections.deque[tuple[str, str, bool, dict[str, Any]]] = collections.deque(maxlen=10_000)
        self._flushing = False
        self.counters: collections.Counter[str] = collections.Counter()
        self._tasks: set[asyncio.Task[Any]] = set()
        # Reserve, heartbeat and settle as every other edge does; its retries and refusals count here.
        self.lifecycle = Lifecycle(self.ledger, retries=self.settings.settle_retries, counters=self.counters, log=log)
        self.notifier: Notifier | None = None
        # Observability (metrics.py, health.py, observe.py): decisions and latencies counted here, the ledger's
        # state kept by its sweeper, exposed on LiteLLM's /metrics, /cycles/health and /health/readiness.
        self.stats = Stats(counters=self.counters)
        self.health = LedgerHealth(self.ledger, self.settings)
        self.view = LedgerView(self.ledger, self.settings.metrics, [h.name for h in self.settings.webhooks()])
        self._prometheus_spared = spare_prometheus()
        self._collector: Collector | None = None
        self._expose()

    def _expose(self) -> None:
        """Register the metrics collector (when prometheus_client is installed) and the health routes (when this
        process runs LiteLLM's proxy)."""
        try:
            self._collector = register(Collector(self.stats, self.view, self.health))
        except CyclesError as exc:  # no prometheus_client: nothing can scrape metrics anyway
            log.debug("cycles: metrics not exposed: %s", exc.message)
        install_routes(self.health)

    async def ledger(self) -> Ledger:
        if self._ledger is None:
            async with self._ledger_lock:
                if self._ledger is None:
                    try:
                        led = open_ledger(
                            self.settings.store_url(), allow_unbudgeted=self.settings.ledger_allows_unbudgeted()
                        )
                    except CyclesError as exc:  # a store we cannot open is an unavailable ledger
                        raise StoreUnavailableError(
                            f"cannot open the ledger {self.settings.store_url()}: {exc}"
                        ) from exc
                    self._ledger = led
                    self.view.loop = asyncio.get_running_loop()
                    self._spawn(self.health.run_forever())  # the sweeper, and the ledger's health
                    if self._collector is not None and workers_share_metrics():  # LiteLLM with several workers
                        writer = for_collector(self._collector)
                        if writer.running is None or writer.running.done():
                            writer.running = self._spawn(writer.run_forever())
                    self._start_notifier(led)
        elif self.view.loop is None:
            self.view.loop = asyncio.get_running_loop()
        return self._ledger

    def _start_notifier(self, ledger: Ledger) -> None:
        """Deliver the webhooks of `notify:` from this process while it runs (a lease in the ledger makes one
        of several proxies the sender; `cycles notify` does the same outside the proxy)."""
        hooks = self.settings.webhooks()
        if hooks:
            self.notifier = Notifier(ledger, hooks)
            self._spawn(self.notifier.run_forever(1.0))
            log.info("cycles: delivering ledger events to webhooks %s", ", ".join(h.name for h in hooks))

    # --- before routing ----------------------------------------------------------------------

    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict[str, Any], call_type: str
    ) -> dict[str, Any]:
        out = await self._pre_call(user_api_key_dict, data, call_type)
        self._let_through(out)  # reached only for a request that goes on (a refusal raised)
        return out

    def _let_through(self, data: dict[str, Any]) -> None:
        """Mark a request the pre-call hook lets through, so the deployment gate knows its attempts (LiteLLM
        carries the metadata to every retry and fallback)."""
        call_id = str(data.get("litellm_call_id"))
        metadata = next((m for k in ("litellm_metadata", "metadata") if isinstance(m := data.get(k), dict)), None)
        if metadata is None and data.get("proxy_server_request"):  # the proxy always has one; LiteLLM keeps it
            metadata = data["metadata"] = {}
        secret = os.urandom(8).hex() if metadata is not None else ""
        if metadata is not None:
            metadata[_GATE_KEY] = secret
        self._passed[call_id] = secret
        while len(self._passed) > 100_000:
            self._passed.popitem(last=False)

    async def _pre_call(self, user_api_key_dict: Any, data: dict[str, Any], call_type: str) -> dict[str, Any]:
        started = time.perf_counter()
        if not self._prometheus_spared:
            self._prometheus_spared = spare_prometheus()
        route = classify(str(call_type), self.settings.unmetered_routes)
        if route.kind == "free":
            if call_type in self.settings.unmetered_routes:
                self.counters[f"unmetered:{call_type}"] += 1
                self._decided(data, "ALLOW", "UNMETERED_ROUTE", self.settings.mode == "shadow")
                log.info(
                    "cycles: %s let through unmetered (unmetered_routes in cycles.yaml)", _route_name(data, call_type)
                )
            elif call_type in _MODERATION and not moderation_is_free(
                str(data.get("model", "")), self.settings, _router()
            ):
                # free at OpenAI only: another provider behind the group may bill it (refused, like any route the
                # plugin cannot price; unmetered_routes or free_models let it through)
                return self._refuse_route(Route(str(call_type), "refused"), data, self.settings.mode == "shadow")
            else:
                # nothing decided here: no decision a client wrote may pass for the plugin's
                scrub(data, shadow=self.settings.mode == "shadow")
            return data
        call_id = data.get("litellm_call_id") or uuid.uuid4().hex
        data.setdefault("litellm_call_id", call_id)
        try:
            subject: Subject | None
            subject, unchosen = payer_from_request(data, user_api_key_dict, self.settings.subject)
            subject_error = None
        except InvalidRequestError as exc:
            subject, unchosen, subject_error = None, [], exc
        # Shadow scopes are matched against the levels no client chose: naming a level cannot switch it on.
        shadow = self.settings.is_shadow(unchosen) if subject is not None else self.settings.mode == "shadow"
        if route.kind == "refused":
            return self._refuse_route(route, data, shadow, subject)
        if subject is None:
            assert subject_error is not None
            return self._refuse(
                "SUBJECT_INVALID",
                400,
                "invalid_request_error",
                subject_error.message,
                data,
                call_type,
                shadow,
                code="cycles_subject_invalid",
            )
        group = str(data.get("model", ""))
        try:
            if _body_bytes(data) > _THREAD_ESTIMATE_BYTES:  # counting megabytes of text must not stall the loop
                est = await asyncio.to_thread(estimate_call, group, data, route.kind, self.settings, _router())
            else:
                est = estimate_call(group, data, route.kind, self.settings, _router())
        except RequestInvalid as exc:
            return self._refuse(
                "REQUEST_INVALID", 400, "invalid_request_error", f"{exc}", data, call_type, shadow, subject
            )
        except PriceUnknown as exc:
            details = {"reason": "PRICE_UNKNOWN", "model": group, "route": _route_name(data, call_type)}
            return self._refuse(
                "PRICE_UNKNOWN", 402, "budget_exceeded", f"{exc}", data, call_type, shadow, subject, details
            )
        # A call id the client chose can come again (a retry, a replay, two requests at once): one call id,
        # one paid call. A repeat is refused with 409, in this process at once and across processes and
        # replicas by the ledger (same idempotency key, another request's payload -> mismatch).
        client_id = client_chosen = _client_call_id(data) == call_id
        request_id = uuid.uuid4().hex if client_id else call_id
        if client_id and call_id in self._pending:
            self._call_id_reused(call_id, data, shadow, call_type, subject)  # raises unless shadow
            call_id = str(data["litellm_call_id"])  # shadow: evaluated and recorded under an id of its own
        if client_id and shadow:
            # Shadow holds nothing: no replay record is needed, and a repeat is recorded like any call.
            client_id, request_id = False, call_id
        action = _action(action_kind(route.kind), action_name(est.model))
        # Shadow evaluates the soft landing too (so its would-be decision is enforce's), but never clamps.
        soft = soft_landing(est, self.settings.min_output_tokens)
        # `model` and `route` name the call in the ledger's events (Ledger.events): who spent what on which model.
        metadata: dict[str, Any] = {"model": group, "route": call_type, "input_tokens": est.input_tokens}
        if client_id:
            metadata["request"] = request_id
        # The key of a direct debit of this call (shadow, or a hold that is gone): one per call, whatever its call
        # id (which a client may repeat, or make longer than a key may be); an id LiteLLM made is unique, and what
        # a reader looks for.
        debit_key = f"actual:{call_id}" if not client_chosen and len(call_id) <= 200 else f"actual:{uuid.uuid4().hex}"
        # The tokens the call may use are held in the same decision, for TOKENS budgets on any of its scopes.
        tokens = token_hold(est, route.kind)
        reserving = time.perf_counter()
        try:
            hold = await self.lifecycle.reserve(
                subject,
                action,
                Amount(unit=_USD, amount=est.amount),
                also=[Amount(unit=Unit.TOKENS, amount=tokens)] if tokens is not None else [],
                shadow=shadow,
                idempotency_key=call_id,
                # LiteLLM made the call id (a fresh UUID) unless the client sent x-litellm-call-id: only a
                # client's id can come again, so only then is the replay record worth its cost.
                key_is_unique=not client_id,
                debit_key=debit_key,
                label=call_id,
                ttl_ms=self.settings.ttl_ms,
                max_hold_ms=self.settings.max_hold_ms,
                overage_policy=self.settings.overage_policy,
                soft_landing=soft,
                metadata=metadata,
            )
        except StoreUnavailableError as exc:
            self.health.mark(False, exc)
            return self._unavailable(call_id, data, exc, subject, call_type, shadow)
        except IdempotencyMismatchError:
            return self._call_id_reused(call_id, data, shadow, call_type, subject)
        except CyclesError as exc:
            return self._refuse(
                exc.code, exc.http_status, "invalid_request_error", exc.message, data, call_type, shadow, subject
            )
        self.stats.reserve.observe(time.perf_counter() - reserving)
        self.health.mark(True)
        if self._backlog and not self._flushing:  # the ledger is back: write the refusals that waited
            self._spawn(self._flush())
        r = hold.result
        headers = {"x-cycles-decision": r.decision.value, "x-cycles-scope": r.scope or subject.scope_path}
        left_after = r.remaining - (r.reserved.amount if r.reserved else 0) if r.remaining is not None else None
        if left_after is not None:
            headers["x-cycles-remaining"] = format_amount(left_after, _USD)
        fields = self._decided(data, r.decision.value, r.reason_code, shadow, r.scope or subject.scope_path)
        fields["call_id"] = str(call_id)
        fields["reservation_id"] = r.reservation_id
        fields["remaining"] = left_after if r.decision is not Decision.DENY else r.remaining
        fields["estimate"] = r.reserved.amount if r.reserved else est.amount
        clamped = False
        if r.decision is Decision.DENY:
            if shadow:
                self.counters["shadow_would_deny"] += 1
                log.info("cycles shadow: would deny %s (%s at %s)", call_id, r.reason_code, r.scope)
            else:
                self.counters["denied"] += 1
                unit = r.unit or _USD  # a TOKENS budget can be the one that refused
                needs = tokens if unit is Unit.TOKENS and tokens is not None else est.amount
                fields["unit"], fields["estimate"], fields["committed"] = unit.value, needs, 0
                left = format_amount(r.remaining, unit) if r.remaining is not None else "unknown"
                refusal: dict[str, Any] = {
                    "reason": r.reason_code,
                    "scope": r.scope,
                    "remaining": r.remaining,
                    "estimate": needs,
                    "unit": unit.value,
                }
                message = (
                    f"Budget denied ({r.reason_code}) at scope {r.scope}: remaining {left}, "
                    f"this call needs up to {format_amount(needs, unit)}"
                )
                if r.reason_code == "RATE_EXCEEDED":
                    # A burn-rate limit: 402 like every budget refusal, with x-should-retry: false (an SDK
                    # retrying on its own would drive a loop into the wall); retry_after_ms says when the
                    # window has room, for a caller that decides to wait.
                    refusal["retry_after_ms"] = r.retry_after_ms
                    message = f"Budget denied (RATE_EXCEEDED) at scope {r.scope}: spending faster than its limit" + (
                        f"; room again in {r.retry_after_ms} ms" if r.retry_after_ms is not None else ""
                    )
                raise budget_error(
                    402, "budget_exceeded", r.reason_code or "BUDGET_EXCEEDED", message, refusal, call_type
                )
        elif (
            r.decision is Decision.ALLOW_WITH_CAPS
            and not shadow
            and r.caps
            and r.caps.max_tokens is not None
            and est.cap_field is not None
        ):
            # The clamp goes into the field this route sends to the provider, never above the model's maximum.
            cap = max(MIN_CAP.get(est.cap_field, 1), min(r.caps.max_tokens, est.output_cap))
            set_cap(data, est, cap)
            headers["x-cycles-max-tokens"] = str(cap)
            fields["max_tokens"] = cap
            held = r.reserved.amount if r.reserved else est.amount
            est = dataclasses.replace(est, output_cap=cap, amount=held)
            clamped = True
        elif not r.balances and self.settings.unbudgeted_policy() == "shadow":
            # Nobody budgets this payer: it passes, and the log says enforcement would have refused it.
            self.counters["unbudgeted_would_deny"] += 1
            note = {"call_id": str(call_id), "route": _route_name(data, call_type), "model": group}
            self._spawn(self._note(subject.scope_path, "BUDGET_NOT_FOUND", True, note))
        if r.decision is not Decision.DENY and not shadow and not clamped:
            # The hold assumed this cap: the provider must not be asked for more (a cap above the model's
            # maximum, or none where the maximum is unknown).
            bound = cap_to_send(data, est)
            if bound is not None:
                set_cap(data, est, bound)
        headers["x-cycles-hook-ms"] = f"{(time.perf_counter() - started) * 1000:.3f}"
        if not shadow:  # shadow never changes a response, its headers included: the decision is in the log
            self._remember_headers(
                call_id, headers | ({"x-cycles-reservation-id": r.reservation_id} if r.reservation_id else {})
            )
        self._pending[call_id] = _Pending(
            call_id, hold, est, group, route.kind, request_id, tokens=tokens, fields=fields
        )
        return data

    async def async_pre_call_deployment_hook(self, kwargs: dict[str, Any], call_type: Any) -> dict[str, Any] | None:
        """The last gate before a provider: a client request (one the proxy received) whose call type is
        metered but whose call id never passed the pre-call hook took a route that skips LiteLLM's hooks
        (/v1/threads/{id}/runs, ...): refused, like a call type the plugin cannot meter. Health checks and
        LiteLLM's own calls carry no client request and pass. Each attempt at a provider (a retry, a fallback)
        passes here: counted, so a failed attempt's grace timer does not free the hold of one still running."""
        pending = self._pending.get(str(kwargs.get("litellm_call_id")))
        if pending is not None:
            pending.attempts += 1
        if not kwargs.get("proxy_server_request"):
            return None
        name = str(getattr(call_type, "value", call_type))
        route = classify(name, self.settings.unmetered_routes)
        if route.kind == "free" or self._carries_pass(kwargs):
            return None
        # No key object reaches this hook, so the payer is unknown here; a client-named shadow scope must not
        # open the gate, so only a proxy wholly in shadow mode lets such a call through.
        return self._refuse_route(Route(name, "refused"), kwargs, self.settings.mode == "shadow")

    def _carries_pass(self, kwargs: Mapping[str, Any]) -> bool:
        """True for an attempt of a request the pre-call hook let through: its call id is known and it carries
        that request's secret (or the hook had no metadata to write it in)."""
        secret = self._passed.get(str(kwargs.get("litellm_call_id")))
        if secret is None:
            return False
        if not secret:
            return True
        return any(
            isinstance(m, Mapping) and m.get(_GATE_KEY) == secret
            for m in (kwargs.get("metadata"), kwargs.get("litellm_metadata"))
        )

    def _refuse_route(
        self, route: Route, data: dict[str, Any], shadow: bool, subject: Subject | None = None
    ) -> dict[str, Any]:
        """A call type the plugin can neither price nor settle: refused before the provider (shadow: logged)."""
        name = _route_name(data, route.call_type)
        message = (
            f"route {name} is not metered by the budget plugin, so it is refused before the provider; "
            f"an operator can let it through with unmetered_routes: [{route.call_type}] in cycles.yaml"
        )
        details = {"reason": "ROUTE_NOT_METERED", "route": name, "call_type": route.call_type}
        return self._refuse(
            "ROUTE_NOT_METERED", 402, "budget_exceeded", message, data, route.call_type, shadow, subject, details
        )

    def _call_id_reused(
        self, call_id: str, data: dict[str, Any], shadow: bool, call_type: str, subject: Subject | None = None
    ) -> dict[str, Any]:
        message = (
            f"x-litellm-call-id {call_id!r} was already used by another request; send a new call id for a new call"
        )
        # LiteLLM runs the success or failure hooks of this request with its call id, which is the id of the
        # request in flight: give this one an id of its own (refused, or let through in shadow) so that it never
        # touches the other's hold.
        own = f"{call_id}#dup-{uuid.uuid4().hex[:8]}"
        data["litellm_call_id"] = own
        logging_obj = data.get("litellm_logging_obj")  # made before the hook, with the shared id
        if logging_obj is not None and hasattr(logging_obj, "litellm_call_id"):
            logging_obj.litellm_call_id = own
        details = {"reason": "CALL_ID_REUSED", "call_id": call_id}
        return self._refuse(
            "CALL_ID_REUSED", 409, "invalid_request_error", message, data, call_type, shadow, subject, details
        )

    def _refuse(
        self,
        reason: str,
        status: int,
        error_type: str,
        message: str,
        data: dict[str, Any],
        call_type: str,
        shadow: bool,
        subject: Subject | None = None,
        details: Mapping[str, Any] | None = None,
        *,
        code: str | None = None,
    ) -> dict[str, Any]:
        """A refusal decided before any budget was read. It is logged in the ledger (`denied`, or in shadow
        mode `would_deny`, on the payer's scope or tenant:_unidentified) with the call id, route and model;
        enforcing, the client gets the error, in shadow the request goes on unchanged."""
        call_id = str(data.get("litellm_call_id"))
        scope = subject.scope_path if subject is not None else UNIDENTIFIED_SCOPE
        note = {"call_id": call_id, "route": _route_name(data, call_type), "message": message[:500]}
        if data.get("model"):
            note["model"] = str(data["model"])[:200]
        self._spawn(self._note(scope, reason, shadow, note))
        self._decided(data, "DENY", reason, shadow, scope)["call_id"] = call_id
        if shadow:
            self.counters["shadow_would_deny"] += 1
            log.warning("cycles shadow: would refuse %s (%s): %s", call_id, reason, message)
            return data
        self.counters[reason.lower()] += 1
        raise budget_error(status, error_type, code or reason, message, details, call_type)

    async def _note(self, scope: str, reason: str, shadow: bool, data: dict[str, Any]) -> None:
        """Log a refusal in the ledger. While the ledger is away the note waits in memory (the newest 10,000)
        and is written, with any others waiting, once a later note reaches the ledger."""
        self._backlog.append((scope, reason, shadow, data))
        await self._flush()

    async def _flush(self) -> None:
        if self._flushing or not self._backlog:
            return
        self._flushing = True
        try:
            while self._backlog:
                s, r, w, d = self._backlog[0]

                async def attempt(s: str = s, r: str = r, w: bool = w, d: dict[str, Any] = d) -> None:
                    await (await self.ledger()).note(s, r, would=w, data=d)

                try:
                    if not await self.lifecycle.retry("note", str(d.get("call_id")), attempt):
                        log.warning("cycles: %d refusal(s) wait for the ledger to be logged", len(self._backlog))
                        return
                except CyclesError as exc:  # a note must never fail a request; say why it is missing
                    log.error("cycles: could not log %s for %s: %s", r, d.get("call_id"), exc)
                self._backlog.popleft()
        finally:
            self._flushing = False

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # keep a reference until done, or the task may be collected mid-flight
        task.add_done_callback(self._tasks.discard)
        return task

    def _unavailable(
        self, call_id: str, data: dict[str, Any], exc: Exception, subject: Subject, call_type: str, shadow: bool
    ) -> dict[str, Any]:
        self.counters["ledger_unavailable"] += 1
        fail_open = self.settings.fail_open() or shadow  # a shadow request passes whatever on_unavailable says
        # The decision goes into the log once the ledger answers again (kept in memory until then).
        note = {"call_id": str(call_id), "route": _route_name(data, call_type), "message": str(exc)[:300]}
        if data.get("model"):
            note["model"] = str(data["model"])[:200]
        self._spawn(self._note(subject.scope_path, "LEDGER_UNAVAILABLE", fail_open, note))
        fields = self._decided(data, "ALLOW" if fail_open else "DENY", "LEDGER_UNAVAILABLE", shadow, subject.scope_path)
        fields["call_id"] = str(call_id)
        if fail_open:
            self.counters["fail_open"] += 1
            log.warning("cycles: ledger unavailable (%s); on_unavailable=fail_open lets %s through", exc, call_id)
            return data
        self.counters["fail_closed"] += 1
        log.error("cycles: ledger unavailable (%s); on_unavailable=fail_closed refuses %s", exc, call_id)
        raise budget_error(503, "cycles_unavailable", "LEDGER_UNAVAILABLE", f"budget ledger unavailable: {exc}")

    def _decided(
        self, data: dict[str, Any], decision: str, reason: str | None, shadow: bool, scope: str | None = None
    ) -> DecisionFields:
        """Count a decision and put it in the request's logging metadata (observe.py), where every logger LiteLLM
        runs for this call finds it; the caller fills in what else it knows. A refusal commits nothing."""
        self.stats.decision(decision, reason, shadow)
        fields: DecisionFields = {
            "decision": decision,
            "reason": reason,
            "scope": scope,
            "remaining": None,
            "unit": _USD.value,
            "reservation_id": None,
            "estimate": None,
            "committed": 0 if decision == "DENY" and not shadow else None,
            "shadow": shadow,
        }
        attach(data, fields)
        return fields

    def _remember_headers(self, call_id: str, headers: dict[str, str]) -> None:
        self._headers[call_id] = headers
        while len(self._headers) > 10_000:
            self._headers.popitem(last=False)

    async def async_post_call_response_headers_hook(
        self,
        data: dict[str, Any],
        user_api_key_dict: Any,
        response: Any,
        request_headers: dict[str, str] | None = None,
        litellm_call_info: dict[str, Any] | None = None,
    ) -> dict[str, str] | None:
        return self._headers.get(str(data.get("litellm_call_id")))

    # --- after the call ------------------------------------------------------------------------

    async def async_logging_hook(
        self, kwargs: dict[str, Any], result: Any, call_type: str
    ) -> tuple[dict[str, Any], Any]:
        """LiteLLM runs this on every success before any logger sees it: the charge is worked out here, once, so
        the payload every logger gets says what the call committed (the commit itself follows the success)."""
        pending = self._pending.get(str(kwargs.get("litellm_call_id")))
        if pending is not None and kwargs.get("standard_logging_object") is not None:
            streamed = bool(pending.streamed) or bool(kwargs.get("stream"))
            if not streamed or kwargs.get("async_complete_streaming_response") is not None:
                pending.actual = self._actual(pending, kwargs, result)
                if pending.fields is not None:
                    record_committed(kwargs, pending.fields, pending.actual[0])
        return kwargs, result

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        call_id = str(kwargs.get("litellm_call_id"))
        pending = self._pending.pop(call_id, None)
        if pending is None:
            aborted = self._aborted.pop(call_id, None)
            if aborted is not None:  # a stream the client left, read to its end by the proxy: charge the rest
                billed = (aborted[0].actual or self._actual(aborted[0], kwargs, response_obj))[0]
                self._spawn(self._charge_rest(aborted[0], billed - aborted[1]))
            return
        actual, metrics = pending.actual or self._actual(pending, kwargs, response_obj)
        # Settle in the background: the client's answer never waits for the ledger's write.
        self._spawn(self._settle(pending, actual, metrics))

    def _actual(self, pending: _Pending, kwargs: Mapping[str, Any], response_obj: Any) -> tuple[int, dict[str, Any]]:
        """What the call cost, and its token usage, from what LiteLLM reports."""
        prompt, completion = _usage(kwargs, response_obj)
        cost = kwargs.get("response_cost")
        if pending.streamed and not completion and any(pending.streamed):
            # A stream that never reported usage (a text completion without include_usage): the provider
            # still billed what it streamed, so count the text rather than commit $0.
            completion = _count_text(pending, "".join(pending.streamed))
            actual = pending.estimate.input_cost + _output_cost(pending, completion)
            prompt = prompt or pending.estimate.input_tokens
        elif cost:
            actual = usd_to_microcents(cost)
        elif pending.estimate.output_per_million or pending.kind == "embedding":
            try:
                _, price = price_of_group(pending.group, self.settings, _router())
                actual = cost_of_usage(prompt, completion, price)
            except PriceUnknown:
                actual = pending.estimate.amount
        else:  # priced per image, character, second or query, and LiteLLM computed no cost: the estimate
            actual = pending.estimate.amount
        return actual, {"tokens_input": prompt, "tokens_output": completion}

    async def async_post_call_success_deployment_hook(
        self, request_data: dict[str, Any], response: Any, call_type: Any
    ) -> Any:
        """LiteLLM runs this right after a provider answers, before post-call guardrails judge the answer (they
        run first among the proxy's post-call hooks). One that blocks it ends the request with the failure hook
        and no success event, though the provider billed the call: the answer is kept (a reference: this runs on
        every call) so that the failure hook charges what it cost."""
        pending = self._pending.get(str(request_data.get("litellm_call_id")))
        if pending is not None:
            pending.answer = response
        return None

    async def async_post_call_failure_hook(
        self,
        request_data: dict[str, Any],
        original_exception: Exception,
        user_api_key_dict: Any,
        traceback_str: str | None = None,
    ) -> None:
        """The whole request failed (after retries and fallbacks): give the hold back now; or, when the provider did
        answer and something after it refused the answer (a post-call guardrail), charge what the answer cost. A
        request this plugin refused holds nothing, and must not release the hold of another request with its id."""
        if getattr(original_exception, "cycles_refusal", False):
            return
        pending = self._pending.pop(str(request_data.get("litellm_call_id")), None)
        if pending is None:
            return
        actual = pending.actual or self._answered(pending)
        if actual is not None:
            self._spawn(self._settle(pending, *actual))
            return
        await self._release(pending, f"call failed: {type(original_exception).__name__}")

    def _answered(self, pending: _Pending) -> tuple[int, dict[str, Any]] | None:
        """What the answer the provider gave cost, if one came and says what it used (a stream's does not)."""
        hidden = getattr(pending.answer, "_hidden_params", None)
        cost = hidden.get("response_cost") if isinstance(hidden, dict) else None
        if pending.answer is None or not (cost or any(_usage({}, pending.answer))):
            return None
        return self._actual(pending, {"response_cost": cost}, pending.answer)

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """One attempt failed; a retry or fallback may still succeed, so release only if none does."""
        if getattr(kwargs.get("exception"), "cycles_refusal", False):
            return  # our own refusal of a request: it holds nothing
        call_id = str(kwargs.get("litellm_call_id"))
        failed = self._pending.get(call_id)
        if failed is not None:
            failed.failures += 1
            self._grace(call_id, failed, _FAILURE_GRACE_ROUNDS)

    def _grace(self, call_id: str, failed: _Pending, rounds: int) -> None:
        asyncio.get_running_loop().call_later(
            _FAILURE_GRACE_S, lambda: asyncio.ensure_future(self._release_if_pending(call_id, failed, rounds))
        )

    async def _release_if_pending(self, call_id: str, failed: _Pending, rounds: int = 0) -> None:
        """No success within the grace after a failed attempt: give the hold back, but keep the call known.
        A retry or fallback that still succeeds later (a long Retry-After, a slow model) is then recorded as
        a direct debit of its real cost instead of being lost; the entry goes after the reservation TTL."""
        pending = self._pending.get(call_id)
        if pending is not failed or pending.hold.state is not HoldState.HELD:
            return  # settled, or another request's since (an id a client sent again): not this timer's to free
        if pending.attempts > pending.failures and rounds > 0:
            self._grace(call_id, pending, rounds - 1)  # a retry or fallback is still at a provider: wait for it
            return
        await self._release(pending, "call failed")  # from now on a success debits directly

        def forget() -> None:
            if self._pending.get(call_id) is pending:
                del self._pending[call_id]

        asyncio.get_running_loop().call_later(self.settings.ttl_ms / 1000, forget)

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: Any, response: Any, request_data: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        """Pass the stream through, remembering the text; if the client goes away before the end,
        commit the prompt plus the output generated so far (no success event comes then)."""
        call_id = str(request_data.get("litellm_call_id"))
        pending = self._pending.get(call_id)
        finished = False
        try:
            async for chunk in response:
                if pending is not None:
                    pending.streamed.append(chunk_text(chunk))
                yield chunk
            finished = True
        finally:
            if not finished and pending is not None and self._pending.pop(call_id, None) is not None:
                self._settle_aborted(pending)

    def _settle_aborted(self, pending: _Pending) -> None:
        """Charge a stream the client left at the prompt plus what it saw, and remember what was charged: the
        proxy may still read the stream to its end and log its full cost (`async_log_success_event`)."""
        text = "".join(pending.streamed)
        out_tokens = _count_text(pending, text) if text else 0
        actual = pending.estimate.input_cost + _output_cost(pending, out_tokens)
        self.counters["aborted_streams"] += 1
        pending.streamed = []  # counted: only what was charged is kept for the rest
        self._aborted[pending.call_id] = (pending, actual)
        while len(self._aborted) > 10_000:
            self._aborted.popitem(last=False)
        metrics = {"tokens_input": pending.estimate.input_tokens, "tokens_output": out_tokens}
        self._spawn(self._settle(pending, actual, metrics))

    async def _charge_rest(self, pending: _Pending, rest: int) -> None:
        """Debit what a left stream cost beyond what was charged when the client left (once: its own key)."""
        drained = {"model": pending.group, "route": pending.kind, "drained": True}
        await self.lifecycle.debit_more(pending.hold, Amount(unit=_USD, amount=rest), metadata=drained)

    async def _settle(self, pending: _Pending, actual: int, metrics: dict[str, Any]) -> None:
        """Commit the actual cost (in shadow mode, or once the hold is gone: debit it), retrying while the
        ledger is away; the lifecycle logs and counts what it cannot record."""
        also = []
        if pending.tokens is not None:
            used = int(metrics.get("tokens_input") or 0) + int(metrics.get("tokens_output") or 0)
            # No usage reported at all: the tokens held stand (the worst case), as for the dollars.
            also = [Amount(unit=Unit.TOKENS, amount=used if used > 0 else pending.tokens)]
        settling = time.perf_counter()
        # With no other call in flight, the commit rides in the next call's transaction (one SQLite transaction
        # per call instead of two). With others in flight it goes now: the store's writer group-commits it with
        # their reserves, which measured cheaper under concurrency than a reserve carrying it inline.
        await self.lifecycle.commit(
            pending.hold, Amount(unit=_USD, amount=actual), metrics=metrics, also=also, background=not self._pending
        )
        self.stats.commit.observe(time.perf_counter() - settling)

    async def _release(self, pending: _Pending, reason: str) -> None:
        await self.lifecycle.release(pending.hold, reason)


def _count_text(pending: _Pending, text: str) -> int:
    """Output tokens of streamed text, never more than the request could produce (its cap on every output):
    the hold was sized for exactly that, and a counter's tokens are an estimate of the provider's."""
    import litellm

    counted = int(litellm.token_counter(model=counting_model(pending.estimate.model), text=text))
    est = pending.estimate
    return min(counted, est.output_cap * est.outputs) if est.output_cap else counted


def _output_cost(pending: _Pending, tokens: int) -> int:
    return -(-tokens * pending.estimate.output_per_million // 10**6)


def _usage(kwargs: Mapping[str, Any], response_obj: Any) -> tuple[int, int]:
    slo = kwargs.get("standard_logging_object") or {}
    prompt, completion = slo.get("prompt_tokens"), slo.get("completion_tokens")
    if prompt is None:
        usage = getattr(response_obj, "usage", None) or {}
        get = usage.get if isinstance(usage, Mapping) else lambda k, d=None: getattr(usage, k, d)
        prompt, completion = get("prompt_tokens", 0), get("completion_tokens", 0)
    return int(prompt or 0), int(completion or 0)
