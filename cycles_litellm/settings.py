"""The plugin's own settings, from one YAML file (`configs/cycles.yaml`, or `$CYCLES_CONFIG`).

store: sqlite:///cycles.db          # or $CYCLES_STORE
mode: enforce                       # enforce | shadow
on_unavailable: fail_closed         # default: fail_closed when enforcing, fail_open in shadow
shadow_scopes: [tenant:trial]       # shadow for these scopes (and below), enforce elsewhere
subject: {...}                      # where tenant/workspace/... come from (see SubjectMapping)
min_output_tokens: 256              # smallest useful answer when clamping max_tokens
prices: {my-model: {input_per_million: "0.15usd", output_per_million: "0.60usd"}}
free_models: [local-llama]
unmetered_routes: [pass_through_endpoint]   # call types let through unmetered (default: refused, 402)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cycles_ledger import Amount, ConfigError, OveragePolicy, Unit
from cycles_ledger.models import parse_scope

__all__ = ["CONFIG_ENV", "DEFAULT_CONFIG", "ModelPrice", "Settings", "SubjectMapping", "load_settings"]

CONFIG_ENV = "CYCLES_CONFIG"
DEFAULT_CONFIG = "configs/cycles.yaml"

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


class Settings(_Strict):
    store: str | None = None
    mode: Literal["enforce", "shadow"] = "enforce"
    on_unavailable: Literal["fail_closed", "fail_open"] | None = None
    shadow_scopes: list[str] = Field(default_factory=list)
    subject: SubjectMapping = Field(default_factory=SubjectMapping)
    min_output_tokens: Annotated[int, Field(ge=1)] = 256
    ttl_ms: Annotated[int, Field(ge=1_000, le=86_400_000)] = 600_000
    overage_policy: OveragePolicy = OveragePolicy.ALLOW_IF_AVAILABLE
    allow_unbudgeted: bool = False
    prices: dict[str, ModelPrice] = Field(default_factory=dict)
    free_models: list[str] = Field(default_factory=list)
    # LiteLLM call types (routes.py) the plugin cannot price or settle, let through without a hold by the
    # operator's choice; every other unmetered call type is refused with 402 ROUTE_NOT_METERED.
    unmetered_routes: frozenset[str] = frozenset()
    settle_retries: Annotated[int, Field(ge=0, le=10)] = 3

    @field_validator("shadow_scopes")
    @classmethod
    def _scopes(cls, v: list[str]) -> list[str]:
        for scope in v:
            parse_scope(scope)
        return v

    def store_url(self) -> str:
        return os.environ.get("CYCLES_STORE") or self.store or "sqlite:///cycles.db"

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


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read the settings file named by `path`, `$CYCLES_CONFIG`, or `configs/cycles.yaml`; defaults if
    that default file does not exist. A broken file is a ConfigError that names it."""
    explicit = path or os.environ.get(CONFIG_ENV)
    p = Path(explicit or DEFAULT_CONFIG)
    if not p.exists():
        if explicit:
            raise ConfigError(f"cycles settings file {p} does not exist")
        return Settings()
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of settings")
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{p}: {problems}") from None
    except ValueError as exc:
        raise ConfigError(f"{p}: {exc}") from None
