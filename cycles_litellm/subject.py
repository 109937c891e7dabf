"""Who pays for a proxied call: the authenticated key fixes the payer, the client only refines below it.

A virtual key's fields (team, organization, user, alias) are the identity: they fill their levels and
no header or metadata can replace them. The client may add the levels `client_levels` leaves open
(workflow, agent, toolset by default), from request metadata `cycles` or `x-cycles-<level>` headers.
Without a virtual key (master key only) metadata and headers fill every level, as before keys existed.

Names become scope values by one deterministic rule (`scope_value`): a LiteLLM team id, alias or user
id with spaces or other characters is a valid scope, never a 400.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from typing import Any

from cycles_ledger import InvalidRequestError, Subject

from .settings import SubjectMapping

__all__ = ["LEVELS", "payer_from_request", "scope_value", "subject_from_request"]

LEVELS = ("tenant", "workspace", "app", "workflow", "agent", "toolset")
# What LiteLLM fills in for the master key or keyless calls: not anyone's identity.
# (and the team LiteLLM's admin UI puts on every dashboard session, which would pool all their users).
_PLACEHOLDERS = frozenset(
    {"default_user_id", "litellm_proxy_master_key", "litellm-proxy-master-key", "litellm-dashboard"}
)
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
_VALID = re.compile(r"^[a-zA-Z0-9_.-]{1,128}$")
_INVALID_RUN = re.compile(r"[^a-zA-Z0-9_.-]+")


@functools.lru_cache(maxsize=4096)
def scope_value(name: str) -> str:
    """A scope value for any name: a valid one (`[a-zA-Z0-9_.-]`, at most 128 characters) is kept as is;
    any other becomes its valid characters with each run of others as `_`, then `.` and the first 8 hex
    digits of the name's SHA-256 (`CI bot` -> `CI_bot.4f1c2b9a`), at most 128 characters. Two different
    names map to the same value only if a valid name is spelled exactly like another's mapped form."""
    if _VALID.match(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    readable = _INVALID_RUN.sub("_", name).strip("_")[:119] or "_"
    return f"{readable}.{digest}"


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
        if not isinstance(headers, Mapping):
            continue
        for name, value in headers.items():
            lowered = str(name).lower()
            if lowered.startswith(_HEADER_PREFIX):
                out[lowered] = value
    return out


@functools.lru_cache(maxsize=1024)
def _subject(fields: tuple[tuple[str, str], ...]) -> Subject:
    """One validated Subject per set of levels: the same callers come back on every request."""
    return Subject.model_validate(dict(fields))


def _key_value(name: str, key_info: Any) -> str | None:
    """A virtual-key field, from the key object the proxy authenticated. Never from request metadata: the
    proxy copies the key's fields there (`user_api_key_team_id`, ...), but a client can send metadata."""
    value = getattr(key_info, _KEY_ATTRS.get(name, name), None) if key_info is not None else None
    if value in (None, "") or value in _PLACEHOLDERS:
        return None
    return str(value)


def _opened_levels(key_info: Any) -> set[str]:
    """Levels a key's or its team's metadata lets the client choose: `{"cycles": {"client_levels": [...]}}`."""
    opened: set[str] = set()
    for attr in ("metadata", "team_metadata"):
        cycles = (getattr(key_info, attr, None) or {}).get("cycles") if key_info is not None else None
        levels = cycles.get("client_levels") if isinstance(cycles, Mapping) else None
        if isinstance(levels, list):
            opened |= {str(level) for level in levels if level in LEVELS}
    return opened


_MASTER_KEY_ALIASES = frozenset({"litellm_proxy_master_key"})  # what LiteLLM puts as api_key for the master key


def _virtual_key(key_info: Any) -> str | None:
    """A label for the virtual key that authenticated the request (its alias, else `key-` and 12 hex digits
    of its hashed token), or None for no key object and for the master key."""
    if key_info is None:
        return None
    api_key, token = getattr(key_info, "api_key", None), getattr(key_info, "token", None)
    if not (api_key or token) or api_key in _MASTER_KEY_ALIASES:
        return None
    role = str(getattr(getattr(key_info, "user_role", None), "value", getattr(key_info, "user_role", "")) or "")
    named = any(getattr(key_info, a, None) for a in ("team_id", "org_id", "key_alias"))
    if role == "proxy_admin" and getattr(key_info, "user_id", None) in _PLACEHOLDERS and not named:
        return None  # the master key as a custom_auth hook or an older LiteLLM presents it
    alias = getattr(key_info, "key_alias", None)
    if alias:
        return str(alias)
    secret = str(token or api_key)
    return "key-" + hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def subject_from_request(data: Mapping[str, Any], key_info: Any, mapping: SubjectMapping) -> Subject:
    """The payer of one request (see `payer_from_request`)."""
    return payer_from_request(data, key_info, mapping)[0]


def payer_from_request(data: Mapping[str, Any], key_info: Any, mapping: SubjectMapping) -> tuple[Subject, list[str]]:
    """The payer of one request, and the scopes of it no client chose (the key's levels; every scope when
    no virtual key authenticated the request): what shadow scopes are matched against, so a client cannot
    switch shadow mode on by naming a level. Raises InvalidRequestError when no level can be filled or
    the metadata is malformed (the caller answers 400 when enforcing, lets the call through in shadow)."""
    meta = _Metadata(data)
    explicit = meta.get("cycles") if mapping.from_metadata else None
    if explicit is not None and not isinstance(explicit, Mapping):
        raise InvalidRequestError("metadata.cycles must be an object such as {'tenant': 'acme'}")
    headers = (
        _cycles_headers(meta.get("headers"), (data.get("proxy_server_request") or {}).get("headers"))
        if mapping.from_headers
        else {}
    )
    fixed: dict[str, str] = {}
    for level in LEVELS:
        for name in mapping.key_fields.get(level, []):
            value = _key_value(name, key_info)
            if value is not None:
                fixed[level] = value
                break
    key = _virtual_key(key_info)
    if key is not None and "tenant" not in fixed:
        fixed["tenant"] = key  # a key with no team, organization or user pays as itself, never as a header says
    # A key that names the payer restricts the client to the levels left open for it.
    allowed = set(LEVELS) if "tenant" not in fixed else set(mapping.client_levels) | _opened_levels(key_info)
    fields: dict[str, str] = dict(fixed)
    for level in LEVELS:
        if level in fixed:
            continue
        value = None
        if level in allowed:
            value = explicit.get(level) if explicit is not None else None
            if value is None:
                value = headers.get(_HEADER_PREFIX + level)
        if value is None:
            value = mapping.defaults.get(level)
        if value not in (None, ""):
            fields[level] = str(value)
    if not any(level in fields for level in LEVELS):
        raise InvalidRequestError(
            "cannot tell who pays for this call: send metadata {'cycles': {'tenant': ...}} or an "
            "x-cycles-tenant header, use a virtual key with a team, or set subject.defaults in cycles.yaml"
        )
    values = {level: scope_value(fields[level]) for level in LEVELS if level in fields}
    dimensions = explicit.get("dimensions") if explicit is not None else None
    try:
        if isinstance(dimensions, Mapping):
            subject = Subject.model_validate({**values, "dimensions": {str(k): str(v) for k, v in dimensions.items()}})
        else:
            subject = _subject(tuple(values.items()))
    except ValueError as exc:
        raise InvalidRequestError(f"invalid budget subject {values}: {exc}") from None
    if "tenant" not in fixed:
        return subject, subject.scopes()
    return subject, _subject(tuple((lv, scope_value(fixed[lv])) for lv in LEVELS if lv in fixed)).scopes()
