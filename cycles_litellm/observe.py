"""What the plugin tells LiteLLM's loggers, router and metrics about each call's budget decision.

**The decision rides in LiteLLM's standard logging payload** under one key,
`standard_logging_object["metadata"]["spend_logs_metadata"]["cycles"]` (`LOGGING_KEY`), as `DecisionFields`.
Why `spend_logs_metadata`: of the metadata LiteLLM keeps in the payload (`StandardLoggingMetadata`), it is
the one meant for a caller's own key-value pairs, it reaches every logger unchanged (OpenTelemetry as the
span attribute `metadata.spend_logs_metadata`, Langfuse, Datadog, S3/GCS and custom loggers as payload
metadata, LiteLLM's SpendLogs table and UI as the log row's metadata), and it survives the failure LiteLLM
logs for a request a pre-call hook refused: the proxy then keeps only `tags`, guardrail information and
what the request's logging object already holds, which is this request metadata dict. The alternatives
fall short: `requester_metadata` is whatever the client sent (anyone could write a decision there), and
guardrail information would show a budget as a guardrail and count in LiteLLM's guardrail metrics.

The pairs dict is a `_JsonDict`: loggers that flatten metadata values with `str()` (LiteLLM's OTel
integration) export JSON, not a Python repr, so a trace backend can parse the attribute.

**A refusal is not a deployment failure.** LiteLLM's router cools a deployment down after `allowed_fails`
failures with a status it blames on the deployment, 402 among them, and its Prometheus logger counts every
logged failure as an LLM API and deployment failure. A refusal from the plugin says nothing about a
deployment: `not_a_deployment_failure` tags it with LiteLLM's own marker for a failure the selected
deployment did not cause (the router then neither counts nor cools it down), and `spare_prometheus`
keeps LiteLLM's Prometheus logger from counting it (the proxy-level `litellm_proxy_failed_requests_metric`
still counts the 402 the client got, and `cycles_decisions_total` says why).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TypedDict

__all__ = [
    "LOGGING_KEY",
    "DecisionFields",
    "attach",
    "fields_of",
    "is_refusal",
    "not_a_deployment_failure",
    "record_committed",
    "scrub",
    "spare_prometheus",
]

LOGGING_KEY = "cycles"  # standard_logging_object.metadata.spend_logs_metadata.<LOGGING_KEY>


class DecisionFields(TypedDict, total=False):
    """One call's budget decision as every LiteLLM logger sees it. Amounts are integers in `unit`
    (USD_MICROCENTS: 10^8 per dollar)."""

    decision: str  # ALLOW | ALLOW_WITH_CAPS | DENY (in shadow mode: what enforcing would have decided)
    reason: str | None  # BUDGET_EXCEEDED, PRICE_UNKNOWN, LEDGER_UNAVAILABLE, ... (None when allowed)
    scope: str | None  # the scope that decided (a denying budget's, else the payer's)
    remaining: int | None  # what that scope has left after this call's hold
    unit: str
    reservation_id: str | None
    estimate: int | None  # what the call holds (its worst case, or the clamped amount)
    committed: int | None  # what the call is charged: set when LiteLLM logs its success, 0 for a refusal
    shadow: bool  # evaluated only: nothing was held or refused
    call_id: str
    max_tokens: int  # the cap the provider was sent, when the plugin clamped it


class _JsonDict(dict[str, Any]):
    """A dict whose str() is JSON, for loggers that turn metadata values into strings with str()."""

    def __str__(self) -> str:
        return json.dumps(self, default=str, separators=(",", ":"))


def _with_decision(pairs: Any, fields: DecisionFields) -> _JsonDict:
    """The spend_logs_metadata pairs `pairs` (any other value: none) with the decision under LOGGING_KEY."""
    logged = _JsonDict(pairs if isinstance(pairs, Mapping) else {})
    logged[LOGGING_KEY] = fields
    return logged


def _metadata(data: MutableMapping[str, Any]) -> MutableMapping[str, Any] | None:
    """The request's metadata dict the way LiteLLM names it for this route (`litellm_metadata` on
    /v1/messages, /v1/responses and newer routes, `metadata` elsewhere). The proxy makes one for every
    request; none is made here, since in a provider call's parameters `metadata` would be sent on."""
    for key in ("litellm_metadata", "metadata"):
        found = data.get(key)
        if isinstance(found, MutableMapping):
            return found
    return None


def attach(data: MutableMapping[str, Any], fields: DecisionFields) -> None:
    """Put `fields` under spend_logs_metadata.cycles of the request, replacing whatever a client sent there.

    On the routes where the proxy keeps its own metadata in `litellm_metadata` (/v1/messages, /v1/responses,
    batches, files, ...), the client's `metadata` sits beside it and wins LiteLLM's merge of the two into the
    logging payload: a `spend_logs_metadata` the client put there would replace the decision. An object there
    gets the decision too (that dict may go on to the provider: the same JSON object, one pair more, where
    an object was sent anyway); any other value is replaced only when the call is refused, since a refused
    call goes nowhere. Shadow mode leaves the client's dict alone. An allowed call's success payload gets the
    decision back in `record_committed` in every case; the failure payload of a provider error after a shadow
    allow, or after an allow whose client sent a string there, keeps what the client sent (the ledger's
    event log has the decision either way)."""
    metadata = _metadata(data)
    if metadata is None:
        return
    pairs = metadata.get("spend_logs_metadata")
    if isinstance(pairs, _JsonDict):
        pairs[LOGGING_KEY] = fields
    metadata["spend_logs_metadata"] = logged = pairs if isinstance(pairs, _JsonDict) else _with_decision(pairs, fields)
    client = data.get("metadata")
    if client is metadata or not isinstance(client, MutableMapping) or "spend_logs_metadata" not in client:
        return
    if fields.get("shadow"):
        return  # shadow changes nothing a provider gets; its success payload is mended in `record_committed`
    theirs = client["spend_logs_metadata"]
    if isinstance(theirs, Mapping):
        client["spend_logs_metadata"] = _with_decision(theirs, fields)
    elif fields.get("decision") == "DENY":
        client["spend_logs_metadata"] = logged


def scrub(data: MutableMapping[str, Any], shadow: bool = False) -> None:
    """Take a decision a client wrote under spend_logs_metadata.cycles out of a request the plugin does not
    decide (a free route): no logger may read it as the plugin's. In shadow mode the client's own `metadata`
    beside LiteLLM's `litellm_metadata` is left alone: it may go on to the provider."""
    for key in ("litellm_metadata", "metadata"):
        if shadow and key == "metadata" and isinstance(data.get("litellm_metadata"), Mapping):
            continue
        found = data.get(key)
        pairs = found.get("spend_logs_metadata") if isinstance(found, Mapping) else None
        if isinstance(pairs, MutableMapping):
            pairs.pop(LOGGING_KEY, None)


def fields_of(payload: Mapping[str, Any] | None) -> DecisionFields | None:
    """The decision in a standard logging payload (what a logger reads), or None."""
    metadata = (payload or {}).get("metadata") or {}
    pairs = metadata.get("spend_logs_metadata") if isinstance(metadata, Mapping) else None
    found = pairs.get(LOGGING_KEY) if isinstance(pairs, Mapping) else None
    return found if isinstance(found, dict) else None  # type: ignore[return-value]


def record_committed(kwargs: Mapping[str, Any], fields: DecisionFields, amount: int) -> None:
    """Write the amount charged into the call's decision, and that decision into the payload LiteLLM is about
    to hand its loggers, wherever a client's metadata put something else in its place (see `attach`)."""
    fields["committed"] = amount
    payload = kwargs.get("standard_logging_object")
    metadata = payload.get("metadata") if isinstance(payload, MutableMapping) else None
    if not isinstance(metadata, MutableMapping) or fields_of(payload) is fields:
        return
    metadata["spend_logs_metadata"] = _with_decision(metadata.get("spend_logs_metadata"), fields)


def is_refusal(exc: object) -> bool:
    """True for an error the plugin raised to refuse a call (see `budget_error`)."""
    return bool(getattr(exc, "cycles_refusal", False))


def not_a_deployment_failure(exc: BaseException) -> None:
    """Tag a refusal so LiteLLM's router does not count it against, or cool down, the deployment it was
    routed to (the marker LiteLLM sets on failures the selected deployment did not cause)."""
    try:
        from litellm.router_utils.cooldown_handlers import mark_advisor_orchestration_failure
    except ImportError:  # an older LiteLLM without the marker: its router never sees the pre-call refusals
        return
    mark_advisor_orchestration_failure(exc)


def spare_prometheus() -> bool:
    """Keep LiteLLM's Prometheus logger from counting the plugin's refusals as LLM API and deployment
    failures (`litellm_llm_api_failed_requests_metric`, `litellm_deployment_failure_responses`, the
    deployment's outage state). Wraps `PrometheusLogger.async_log_failure_event` once, when LiteLLM has
    loaded that logger; False while it has not (the caller tries again later)."""
    module = sys.modules.get("litellm.integrations.prometheus")
    cls = getattr(module, "PrometheusLogger", None)
    if cls is None:
        return False
    original = cls.async_log_failure_event
    if getattr(original, "_cycles_spared", False):
        return True

    @functools.wraps(original)
    async def async_log_failure_event(self: Any, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> Any:
        if isinstance(kwargs, Mapping) and is_refusal(kwargs.get("exception")):
            return None
        return await original(self, kwargs, response_obj, start_time, end_time)

    async_log_failure_event._cycles_spared = True  # type: ignore[attr-defined]
    cls.async_log_failure_event = async_log_failure_event
    return True
