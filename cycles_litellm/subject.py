"""Who pays for a proxied call: build the ledger Subject from request metadata, headers and the key."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from cycles_ledger import InvalidRequestError, Subject

from .settings import SubjectMapping

__all__ = ["LEVELS", "subject_from_request"]

LEVELS = ("tenant", "workspace", "app", "workflow", "agent", "toolset")
# What LiteLLM fills in for the master key or keyless calls: not anyone's identity.
_PLACEHOLDERS = frozenset({"default_user_id", "litellm_proxy_master_key", "litellm-proxy-master-key"})
_HEADER_PREFIX = "x-cycles-"
# The proxy's metadata names for the virtual key's fields -> the attributes of its UserAPIKeyAuth.
_KEY_ATTRS = {
    "user_api_key_org_id": "org_id",
    "user_api_key_team_id": "team_id",
    "user_api_key_team_alias": "team_alias",
    "user_api_key_alias": "key_alias",
    "user_api_key_user_id": "user_id",
    "user_api_key_end_user_id": "end_user_id",
}


class _Metadata:
    """The client's metadata: LiteLLM keeps it in `metadata` (or `litellm_metadata` on some routes);
    `metadata` wins. Looked up in place: the proxy's metadata has ~50 keys, merging them costs more
    than the few lookups we make."""

    __slots__ = ("_first", "_second")

    def __init__(self, data: Mapping[str, Any]) -> None:
        first, second = data.get("metadata"), data.get("litellm_metadata")
        self._first = first if isinstance(first, Mapping) else None
        self._second = second if isinstance(second, Mapping) else None

    def get(self, key: str) -> Any:
        if self._first is not None and key in self._first:
            return self._first[key]
        return self._second.get(key) if self._second is not None else None


def _cycles_headers(*sources: Any) -> dict[str, Any]:
    """The `x-cycles-*` headers, names lowercased; a later source wins over an earlier one."""
    out: dict[str, Any] = {}
    for headers in sources:
        for name, value in (headers or {}).items():
            lowered = str(name).lower()
            if lowered.startswith(_HEADER_PREFIX):
                out[lowered] = value
    return out


@functools.lru_cache(maxsize=1024)
def _subject(fields: tuple[tuple[str, str], ...]) -> Subject:
    """One validated Subject per set of levels: the same callers come back on every request."""
    return Subject.model_validate(dict(fields))


def subject_from_request(data: Mapping[str, Any], key_info: Any, mapping: SubjectMapping) -> Subject:
    """Fill each level from, in order: metadata `cycles`, `x-cycles-<level>` headers, the virtual key's
    fields, then configured defaults. Raises InvalidRequestError when no level can be filled or a
    value is malformed, so the caller answers 400 instead of letting the call pass."""
    meta = _Metadata(data)
    explicit = meta.get("cycles") if mapping.from_metadata else None
    if explicit is not None and not isinstance(explicit, Mapping):
        raise InvalidRequestError("metadata.cycles must be an object such as {'tenant': 'acme'}")
    headers = (
        _cycles_headers(meta.get("headers"), (data.get("proxy_server_request") or {}).get("headers"))
        if mapping.from_headers
        else {}
    )
    fields: dict[str, Any] = {}
    for level in LEVELS:
        value = None
        if explicit is not None:
            value = explicit.get(level)
        if value is None and mapping.from_headers:
            value = headers.get(_HEADER_PREFIX + level)
        if value is None:
            for name in mapping.key_fields.get(level, []):
                value = meta.get(name) or getattr(key_info, _KEY_ATTRS.get(name, name), None)
                if value in _PLACEHOLDERS:
                    value = None
                if value:
                    break
        if value is None:
            value = mapping.defaults.get(level)
        if value not in (None, ""):
            fields[level] = str(value)
    dimensions = explicit.get("dimensions") if explicit is not None else None
    if not any(level in fields for level in LEVELS):
        raise InvalidRequestError(
            "cannot tell who pays for this call: send metadata {'cycles': {'tenant': ...}} or an "
            "x-cycles-tenant header, use a virtual key with a team, or set subject.defaults in cycles.yaml"
        )
    try:
        if isinstance(dimensions, Mapping):
            fields["dimensions"] = {str(k): str(v) for k, v in dimensions.items()}
            return Subject.model_validate(fields)
        return _subject(tuple(fields.items()))
    except ValueError as exc:
        raise InvalidRequestError(f"invalid budget subject {fields}: {exc}") from None
