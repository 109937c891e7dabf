"""Who pays for a proxied call: build the ledger Subject from request metadata, headers and the key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cycles_ledger import InvalidRequestError, Subject

from .settings import SubjectMapping

__all__ = ["LEVELS", "subject_from_request"]

LEVELS = ("tenant", "workspace", "app", "workflow", "agent", "toolset")
# What LiteLLM fills in for the master key or keyless calls: not anyone's identity.
_PLACEHOLDERS = frozenset({"default_user_id", "litellm_proxy_master_key", "litellm-proxy-master-key"})


def _lower_keys(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    return {str(k).lower(): v for k, v in (headers or {}).items()}


def _metadata(data: Mapping[str, Any]) -> dict[str, Any]:
    """The client's metadata: LiteLLM keeps it in `metadata` (or `litellm_metadata` on some routes)."""
    merged: dict[str, Any] = {}
    for key in ("litellm_metadata", "metadata"):
        value = data.get(key)
        if isinstance(value, Mapping):
            merged.update(value)
    return merged


def subject_from_request(data: Mapping[str, Any], key_info: Any, mapping: SubjectMapping) -> Subject:
    """Fill each level from, in order: metadata `cycles`, `x-cycles-<level>` headers, the virtual key's
    fields, then configured defaults. Raises InvalidRequestError when no level can be filled or a
    value is malformed, so the caller answers 400 instead of letting the call pass."""
    meta = _metadata(data)
    explicit = meta.get("cycles") if mapping.from_metadata else None
    if explicit is not None and not isinstance(explicit, Mapping):
        raise InvalidRequestError("metadata.cycles must be an object such as {'tenant': 'acme'}")
    headers = _lower_keys(meta.get("headers")) | _lower_keys((data.get("proxy_server_request") or {}).get("headers"))
    fields: dict[str, Any] = {}
    for level in LEVELS:
        value = None
        if explicit is not None:
            value = explicit.get(level)
        if value is None and mapping.from_headers:
            value = headers.get(f"x-cycles-{level}")
        if value is None:
            for name in mapping.key_fields.get(level, []):
                value = meta.get(name) or getattr(key_info, name.removeprefix("user_api_key_"), None)
                if value in _PLACEHOLDERS:
                    value = None
                if value:
                    break
        if value is None:
            value = mapping.defaults.get(level)
        if value not in (None, ""):
            fields[level] = str(value)
    if explicit is not None and isinstance(explicit.get("dimensions"), Mapping):
        fields["dimensions"] = {str(k): str(v) for k, v in explicit["dimensions"].items()}
    if not any(level in fields for level in LEVELS):
        raise InvalidRequestError(
            "cannot tell who pays for this call: send metadata {'cycles': {'tenant': ...}} or an "
            "x-cycles-tenant header, use a virtual key with a team, or set subject.defaults in cycles.yaml"
        )
    try:
        return Subject.model_validate(fields)
    except ValueError as exc:
        raise InvalidRequestError(f"invalid budget subject {fields}: {exc}") from None
