"""The plugin's own settings, from one YAML file (`configs/cycles.yaml`, or `$CYCLES_CONFIG`).

store: sqlite:///cycles.db          # or $CYCLES_STORE
mode: enforce                       # enforce | shadow
on_unavailable: fail_closed         # default: fail_closed when enforcing, fail_open in shadow
shadow_scopes: [tenant:trial]       # shadow for these scopes (and below), enforce elsewhere
subject: {...}                      # where tenant/workspace/... come from (see SubjectMapping)
min_output_tokens: 256              # smallest useful answer when clamping max_tokens
ttl_ms: 600000                      # a hold's TTL; the heartbeat extends it while the call runs...
max_hold_ms: 21600000               # ...up to this in all (6 h; a call that never settles is freed then)
prices: {my-model: {input_per_million: "0.15usd", output_per_million: "0.60usd"}}
free_models: [local-llama]
unmetered_routes: [pass_through_endpoint]   # call types let through unmetered (default: refused, 402)
metrics: {scopes: [tenant:acme], burn_window_minutes: 5}   # budgets exported as gauges (default: top level)
readiness: true                     # /health/readiness answers 503 while a fail-closed ledger is down
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from cycles_ledger import Amount, ConfigError, OveragePolicy, Unit
from cycles_ledger.config import SETTINGS_ENV, SettingsFile, find_settings, settings_store_url
from cycles_ledger.models import parse_scope
from cycles_ledger.notify import Webhook, webhooks_from_settings

__all__ = ["CONFIG_ENV", "MetricsSettings", "ModelPrice", "Settings", "SubjectMapping", "load_settings"]

CONFIG_ENV = SETTINGS_ENV

_LEVELS = ("tenant", "workspace", "app", "workflow", "agent", "toolset")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SubjectMapping(_Strict):
    """Who pays. The authenticated virtual key is the identity: its fields (`key_fields`, by LiteLLM's
    metadata names) fix their levels, and a client may only add the levels in `client_levels` that the key
    left open (from request metadata `cycles.<level>` or `x-cycles-<level>` headers). A key's or its team's
    metadata `{"cycles": {"client_levels": [...]}}` may open more levels for that key. Without a virtual
    key (the master key), metadata and headers choose every level. `defaults` fill what is still empty."""

    from_metadata: bool = True
    from_headers: bool = True
    key_fields: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "tenant": ["user_api_key_org_id", "user_api_key_team_id", "user_api_key_user_id"],
            "app": ["user_api_key_alias"],
        }
    )
    client_levels: list[str] = Field(default_factory=lambda: ["workflow", "agent", "toolset"])
    defaults: dict[str, str] = Field(default_factory=dict)

    @field_validator("key_fields", "defaults")
    @classmethod
    def _levels(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = set(v) - set(_LEVELS)
        if unknown:
            raise ValueError(f"unknown subject level(s) {sorted(unknown)}; known: {', '.join(_LEVELS)}")
        return v

    @field_validator("key_fields")
    @classmethod
    def _trusted_fields(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        # The end user comes from the request's own `user` field: a client could name any payer with it.
        for level, names in v.items():
            if "user_api_key_end_user_id" in names and level in ("tenant", "workspace", "app"):
                raise ValueError(
                    f"key_fields.{level}: user_api_key_end_user_id is set by the client (the request's `user`), "
                    "so it cannot fix an upper level; use it for workflow, agent or toolset"
                )
        return v

    @field_validator("client_levels")
    @classmethod
    def _client_levels(cls, v: list[str]) -> list[str]:
        unknown = set(v) - set(_LEVELS)
        if unknown:
            raise ValueError(f"unknown subject level(s) {sorted(unknown)}; known: {', '.join(_LEVELS)}")
        return v


class ModelPrice(_Strict):
    """A price for a model LiteLLM does not know (or to override it), per million tokens."""

    input_per_million: str
    output_per_million: str
    max_output_tokens: int | None = None

    @field_validator("input_per_million", "output_per_million")
    @classmethod
    def _usd(cls, v: str) -> str:
        Amount.parse(v, default_unit=Unit.USD_MICROCENTS)
        return v

    def per_million(self) -> tuple[int, int]:
        inp = Amount.parse(self.input_per_million, default_unit=Unit.USD_MICROCENTS)
        out = Amount.parse(self.output_per_million, default_unit=Unit.USD_MICROCENTS)
        return inp.amount, out.amount


class MetricsSettings(_Strict):
    """Which budgets become Prometheus series. Every series is one (scope, unit), so the set must stay
    bounded whatever the traffic: the scopes listed here, or else every top-level budget (`tenant:x`),
    at most `max_scopes` of them (the first by name)."""

    scopes: list[str] = Field(default_factory=list)
    max_scopes: Annotated[int, Field(ge=1, le=10_000)] = 200
    burn_window_minutes: Annotated[int, Field(ge=1, le=60)] = 5  # burn rate = spend in this window / its length

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, v: list[str]) -> list[str]:
        for scope in v:
            parse_scope(scope)
        return v


class Settings(_Strict):
    store: str | None = None
    mode: Literal["enforce", "shadow"] = "enforce"
    on_unavailable: Literal["fail_closed", "fail_open"] | None = None
    shadow_scopes: list[str] = Field(default_factory=list)
    subject: SubjectMapping = Field(default_factory=SubjectMapping)
    min_output_tokens: Annotated[int, Field(ge=1)] = 256
    ttl_ms: Annotated[int, Field(ge=1_000, le=86_400_000)] = 600_000
    # How long a call may stay held while it runs: its heartbeat extends the hold by half a TTL every half TTL,
    # up to this in all (a longer call's hold expires mid-call; a call that never settles frees its hold here).
    max_hold_ms: Annotated[int, Field(ge=1_000, le=7 * 86_400_000)] = 6 * 3_600_000
    overage_policy: OveragePolicy = OveragePolicy.ALLOW_IF_AVAILABLE
    allow_unbudgeted: bool = False  # the older spelling of `unbudgeted: allow`
    # A payer with no budget at any of its scopes: deny (402 BUDGET_NOT_FOUND, the default), allow (pass,
    # nothing recorded), or shadow (pass, and a would_deny BUDGET_NOT_FOUND event names the call).
    unbudgeted: Literal["deny", "allow", "shadow"] | None = None
    prices: dict[str, ModelPrice] = Field(default_factory=dict)
    free_models: list[str] = Field(default_factory=list)
    # LiteLLM call types (routes.py) the plugin cannot price or settle, let through without a hold by the
    # operator's choice; every other unmetered call type is refused with 402 ROUTE_NOT_METERED.
    unmetered_routes: frozenset[str] = frozenset()
    settle_retries: Annotated[int, Field(ge=0, le=10)] = 3
    # Webhooks for chosen ledger events (cycles_ledger.notify): `notify: {webhooks: [{name, url, secret_env,
    # events, format, scope}]}`; the proxy delivers them while it runs, as `cycles notify` does.
    notify: dict[str, Any] | None = None
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    # The proxy's /health/readiness answers 503 while the ledger is unreachable and the plugin fails closed,
    # so a load balancer stops sending it calls it would refuse (/cycles/health says why either way).
    readiness: bool = True
    _source: SettingsFile = PrivateAttr(default_factory=lambda: SettingsFile(None, "built in code"))

    @field_validator("notify")
    @classmethod
    def _notify(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        webhooks_from_settings(v)  # a broken webhook is a start-up error, not a silent non-delivery
        return v

    def webhooks(self) -> list[Webhook]:
        return webhooks_from_settings(self.notify)

    @field_validator("overage_policy")
    @classmethod
    def _protocol_policy(cls, v: OveragePolicy) -> OveragePolicy:
        if v is OveragePolicy.RECORD_ALL:
            raise ValueError("RECORD_ALL is what shadow mode records, not a policy for enforced commits")
        return v

    @field_validator("shadow_scopes")
    @classmethod
    def _scopes(cls, v: list[str]) -> list[str]:
        for scope in v:
            parse_scope(scope)
        return v

    @property
    def source(self) -> SettingsFile:
        """The file these settings came from (`path` None: defaults), and how it was found."""
        return self._source

    def store_url(self) -> str:
        """`$CYCLES_STORE`, else `store:` (a relative SQLite path lives beside the settings file, so the
        proxy and the CLI open the same ledger wherever they start), else ./cycles.db."""
        return settings_store_url(self.store, self._source.path)

    def describe(self) -> str:
        """One line for the proxy's log at start: which settings, mode, store and payer sources are in force."""
        where = f"{self._source.path} ({self._source.found_by})" if self._source.path else self._source.found_by
        keys = ", ".join(f"{level} <- {'|'.join(fields)}" for level, fields in self.subject.key_fields.items())
        return (
            f"cycles: settings {where}; mode {self.mode}"
            + (f" (shadow for {', '.join(self.shadow_scopes)})" if self.shadow_scopes else "")
            + f"; store {self.store_url()}; payer: virtual key ({keys}), client may add "
            f"{', '.join(self.subject.client_levels)}; without a key: metadata.cycles and x-cycles-* headers"
        )

    def unbudgeted_policy(self) -> str:
        return self.unbudgeted or ("allow" if self.allow_unbudgeted else "deny")

    def ledger_allows_unbudgeted(self) -> bool:
        return self.unbudgeted_policy() != "deny"

    def fail_open(self) -> bool:
        """What to do when the ledger cannot be reached: never silent, always logged and counted."""
        if self.on_unavailable is not None:
            return self.on_unavailable == "fail_open"
        return self.mode == "shadow"

    def is_shadow(self, scopes: list[str]) -> bool:
        """Shadow when the whole plugin is, or when any of the request's scopes is listed."""
        if self.mode == "shadow":
            return True
        return any(s == sh or s.startswith(sh + "/") for s in scopes for sh in self.shadow_scopes)


def litellm_config_path() -> str | None:
    """LiteLLM's `--config` file when this process is its proxy: the proxy module's own record of it, else
    what its CLI handed the workers (`$WORKER_CONFIG`), else `$CONFIG_FILE_PATH`."""
    module = sys.modules.get("litellm.proxy.proxy_server")
    path = getattr(module, "user_config_file_path", None) if module is not None else None
    if not path:
        try:
            path = (json.loads(os.environ.get("WORKER_CONFIG") or "{}") or {}).get("config")
        except (ValueError, AttributeError):
            path = None
    return str(path or os.environ.get("CONFIG_FILE_PATH") or "") or None


def load_settings(path: str | os.PathLike[str] | None = None, *, beside: str | None = None) -> Settings:
    """The plugin's settings, found as `cycles_ledger.config.find_settings` says (an explicit path, else
    `$CYCLES_CONFIG`, else `cycles.yaml` beside LiteLLM's config file, else the working directory's);
    defaults when there is none (`Settings.source` says so). A broken file is a ConfigError that names it."""
    found = find_settings(path, beside if beside is not None else litellm_config_path())
    if found.path is None:
        settings = Settings()
        settings._source = found
        return settings
    p = found.path
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of settings")
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{p}: {problems}") from None
    except ValueError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    settings._source = found
    return settings
