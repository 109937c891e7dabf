"""Budgets from a YAML file (`configs/budgets.yaml`), with errors that name the file and line.

budgets:
  - scope: tenant:acme
    allocated: 100usd
    overdraft_limit: 5usd
  - scope: tenant:acme/workflow:doc-processing
    allocated: 30usd
    caps: {tool_denylist: [deploy]}
    period: {every: monthly, tz: Europe/Paris}   # spent starts again on the 1st
    rate_limits: [{amount: 5usd, window: 10m, on_exceed: freeze}]
    alerts: [50%, 80%, 100%]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import ConfigError, CyclesError
from .models import Amount, Caps, Unit, parse_scope
from .timing import parse_alerts, parse_period, parse_rate_limits

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .ledger import Ledger

__all__ = [
    "DEFAULT_STORE_URL",
    "SETTINGS_ENV",
    "BudgetEntry",
    "apply_budgets",
    "SettingsFile",
    "find_settings",
    "load_budgets",
    "resolve_store",
    "settings_section",
    "settings_store_url",
    "store_url",
]

DEFAULT_STORE_URL = "sqlite:///cycles.db"
SETTINGS_ENV = "CYCLES_CONFIG"
SETTINGS_NAME = "cycles.yaml"
_ENTRY_KEYS = {"scope", "allocated", "unit", "overdraft_limit", "caps", "period", "rate_limits", "alerts"}


@dataclass(frozen=True)
class SettingsFile:
    """Where the settings came from: `path` (None: none found, defaults apply) and how it was found."""

    path: Path | None
    found_by: str


def find_settings(explicit: str | os.PathLike[str] | None = None, beside: str | None = None) -> SettingsFile:
    """The settings file (`cycles.yaml`) the proxy and the CLI share, found the same way by both: an explicit
    path (`--config`), else `$CYCLES_CONFIG`, else `cycles.yaml` beside LiteLLM's `--config` file (`beside`),
    else `./cycles.yaml` or `./configs/cycles.yaml`; none of these: defaults. A named file that does not
    exist is a ConfigError, never a silent fallback."""
    for value, how in ((explicit, "--config"), (os.environ.get(SETTINGS_ENV), f"${SETTINGS_ENV}")):
        if value:
            path = Path(value).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"cycles settings file {path} ({how}) does not exist")
            return SettingsFile(path, how)
    candidates: list[tuple[Path, str]] = []
    beside = beside or os.environ.get("CONFIG_FILE_PATH")  # LiteLLM's own variable for its config file
    if beside:
        candidates.append((Path(beside).expanduser().resolve().parent / SETTINGS_NAME, f"beside {beside}"))
    cwd = Path.cwd()
    candidates += [(cwd / SETTINGS_NAME, "working directory"), (cwd / "configs" / SETTINGS_NAME, "working directory")]
    for path, how in candidates:
        if path.is_file():
            return SettingsFile(path.resolve(), how)
    looked = ", ".join(str(p) for p, _ in candidates)
    return SettingsFile(None, f"no {SETTINGS_NAME} found (looked at {looked})")


def resolve_store(url: str, base_dir: Path | None) -> str:
    """A relative SQLite path in a settings file means beside that file, wherever the process was started:
    `sqlite:///cycles.db` in /etc/litellm/cycles.yaml is /etc/litellm/cycles.db. Other URLs are unchanged."""
    prefix = "sqlite:///"
    if base_dir is None or not url.startswith(prefix):
        return url
    rest = url[len(prefix) :]
    if not rest or rest.startswith("/") or rest.startswith(":memory:"):
        return url
    return prefix + str((base_dir / rest).resolve())


def store_url(explicit: str | None = None, settings: SettingsFile | None = None) -> str:
    """The store URL: an explicit value (`--store`), else what `settings_store_url` says for the settings
    file's `store:`."""
    if explicit:
        return explicit
    path = settings.path if settings is not None else None
    return settings_store_url(_settings_store(path) if path is not None else None, path)


def settings_store_url(store: str | None, settings_path: Path | None) -> str:
    """`$CYCLES_STORE`, else `store` (a relative SQLite path resolved beside the settings file; `cycles.db`
    beside it when the file names none), else a SQLite file in the working directory. The one rule the
    CLI and the proxy's settings share, so both open the same ledger."""
    env = os.environ.get("CYCLES_STORE")
    if env:
        return env
    return resolve_store(store or DEFAULT_STORE_URL, settings_path.parent if settings_path is not None else None)


def settings_section(found: SettingsFile, name: str) -> Any:
    """One top-level section of the settings file (None when absent, or without a file)."""
    if found.path is None:
        return None
    try:
        raw = yaml.safe_load(found.path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{found.path}: cannot read the settings: {exc}") from None
    return raw.get(name) if isinstance(raw, dict) else None


def _settings_store(path: Path) -> str | None:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the settings: {exc}") from None
    store = raw.get("store") if isinstance(raw, dict) else None
    if store is not None and not isinstance(store, str):
        raise ConfigError(f"{path}: store must be a URL such as sqlite:///cycles.db")
    return store


@dataclass(frozen=True)
class BudgetEntry:
    scope: str
    allocated: Amount
    overdraft_limit: int | None
    caps: Caps | None
    line: int
    period: dict[str, Any] | None = None
    rate_limits: list[dict[str, Any]] | None = None
    alerts: list[int] | None = None


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping as `__line__`."""


def _mapping_with_line(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping  # type: ignore[return-value]


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_with_line)


def _amount(value: Any, unit: Unit | None, where: str, field: str) -> Amount:
    if isinstance(value, (bool, float)):
        raise ConfigError(f"{where}: {field} {value!r} must be text like '25usd' or a whole number with `unit`")
    if isinstance(value, int):
        if unit is None:
            raise ConfigError(f"{where}: {field} {value} has no unit; write e.g. '25usd' or add `unit: TOKENS`")
        if value < 0:
            raise ConfigError(f"{where}: {field} must not be negative, got {value}")
        return Amount(unit=unit, amount=value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {field} must be an amount such as '25usd', got {type(value).__name__}")
    try:
        return Amount.parse(value, default_unit=unit)
    except CyclesError as exc:
        raise ConfigError(f"{where}: {field}: {exc.message}") from None


async def apply_budgets(ledger: Ledger, entries: Sequence[BudgetEntry]) -> None:
    """Set every budget as its entry says. The file is the truth: a period, rate limits or alerts an entry no
    longer names are removed from its budget."""
    for e in entries:
        await ledger.set_budget(
            e.scope,
            e.allocated,
            overdraft_limit=e.overdraft_limit,
            caps=e.caps,
            period=e.period if e.period is not None else {},
            rate_limits=e.rate_limits if e.rate_limits is not None else [],
            alerts=e.alerts if e.alerts is not None else [],
        )


def _strip_lines(value: Any) -> Any:
    """The value without the `__line__` marks the loader put in its mappings."""
    if isinstance(value, dict):
        return {k: _strip_lines(v) for k, v in value.items() if k != "__line__"}
    if isinstance(value, list):
        return [_strip_lines(v) for v in value]
    return value


def load_budgets(path: str | Path) -> list[BudgetEntry]:
    """Read and check a budgets file; the first problem raises ConfigError naming `file:line`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read budgets file {path}: {exc.strerror}") from None
    try:
        doc = yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("budgets"), list):
        raise ConfigError(f"{path}:1: expected a top-level `budgets:` list")
    entries: list[BudgetEntry] = []
    seen: dict[tuple[str, Unit], int] = {}
    for item in doc["budgets"]:
        if not isinstance(item, dict):
            raise ConfigError(f"{path}: each entry under `budgets:` must be a mapping with scope and allocated")
        line = item.pop("__line__", 0)
        where = f"{path}:{line}"
        unknown = set(item) - _ENTRY_KEYS
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_ENTRY_KEYS))}"
            )
        for required in ("scope", "allocated"):
            if required not in item:
                raise ConfigError(f"{where}: missing `{required}`")
        scope = item["scope"]
        try:
            parse_scope(scope)
        except CyclesError as exc:
            raise ConfigError(f"{where}: {exc.message}") from None
        unit = None
        if "unit" in item:
            try:
                unit = Unit(str(item["unit"]).upper())
            except ValueError:
                raise ConfigError(
                    f"{where}: unknown unit {item['unit']!r}; known: {', '.join(u.value for u in Unit)}"
                ) from None
        allocated = _amount(item["allocated"], unit, where, "allocated")
        limit = None
        if item.get("overdraft_limit") is not None:
            lim = _amount(item["overdraft_limit"], allocated.unit, where, "overdraft_limit")
            if lim.unit is not allocated.unit:
                raise ConfigError(
                    f"{where}: overdraft_limit is in {lim.unit.value}, allocated in {allocated.unit.value}"
                )
            limit = lim.amount
        caps = None
        if item.get("caps") is not None:
            raw = item["caps"]
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}: caps must be a mapping")
            raw.pop("__line__", None)
            try:
                caps = Caps.model_validate(raw)
            except ValueError as exc:
                raise ConfigError(f"{where}: invalid caps: {exc}") from None
        try:
            period = parse_period(_strip_lines(item.get("period")))
            rate_limits = parse_rate_limits(_strip_lines(item.get("rate_limits")), allocated.unit)
            alerts = parse_alerts(item.get("alerts"))
        except CyclesError as exc:
            raise ConfigError(f"{where}: {exc.message}") from None
        key = (scope, allocated.unit)
        if key in seen:
            raise ConfigError(f"{where}: {scope} in {allocated.unit.value} is already defined at line {seen[key]}")
        seen[key] = line
        entries.append(BudgetEntry(scope, allocated, limit, caps, line, period, rate_limits, alerts))
    return entries
