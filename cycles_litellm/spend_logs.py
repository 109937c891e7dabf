"""Read past spend for `cycles replay` and `cycles suggest`: LiteLLM's standard logging payload and Langfuse exports.

LiteLLM: the `StandardLoggingPayload` dicts its loggers write (a JSONL file, one JSON file per call as the
S3 and GCS loggers write, or a directory of them). The payer is derived as the proxy derives it
(`subject.payer_from_request`, the settings' subject mapping): the virtual key's organization, team or
user is the tenant and its alias the app (`metadata.user_api_key_*`); the client's levels come from its
request metadata `cycles` (`metadata.requester_metadata`) or `x-cycles-*` headers
(`metadata.requester_custom_headers`). A call made with the master key (user `default_user_id`, no team,
organization or alias) is named by metadata and headers alone, as the proxy names it. The estimate is the
one the log carries (the plugin's decision: `metadata.spend_logs_metadata.cycles.estimate`), else the proxy's
own worst case recomputed from LiteLLM's prices (the logged messages or prompt tokens, `model_parameters`
max tokens), with the same soft landing; MCP tool calls (`call_mcp_tool`) hold their cost.

Langfuse: the blob storage export (`observations_v2/` enriched observations, or legacy `observations/` with
`traces/` rows in the same input, snake_case), and the UI / API JSON (camelCase; an array, `{"data": [...]}`,
or a downloaded trace with its `observations`). A generation's cost is `total_cost` / `totalCost` /
`calculatedTotalCost` / `cost_details`; spans and events without cost are not calls. The payer comes from
the metadata LiteLLM's Langfuse logger writes (the same fields as above), or from `subject_fields`.

Runs (for `suggest`): a `run` dimension (`metadata.cycles.dimensions.run`, what `budget_scope(run=...)`
sends), else LiteLLM's `session_id` / `trace_id`, else Langfuse's `trace_id`; `run_field` overrides.
A line that is not JSON, or a call without a time or cost, is skipped with its line number, never fatal.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import json
import math
import os
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cycles_ledger import InvalidRequestError, SoftLanding, Subject
from cycles_ledger.spendlog import SkippedLine, SpendLog, SpendRecord

from .calls import action_kind, usd_to_microcents
from .observe import LOGGING_KEY
from .routes import classify
from .settings import Settings
from .subject import LEVELS, payer_from_request, scope_value

__all__ = ["ReadOptions", "read_for_cli", "read_spend_logs"]

Format = Literal["auto", "litellm", "langfuse"]
Estimates = Literal["auto", "logged", "actual"]

# Where the plugin logs its decision, estimate included (observe.py): in LiteLLM's payload and in the metadata
# LiteLLM's Langfuse logger writes; a JSON string there (a logger that flattened it) is read as well.
_LOGGED = f"metadata.spend_logs_metadata.{LOGGING_KEY}"
_MASTER_USERS = frozenset({"default_user_id", "litellm_proxy_admin_name", "litellm_proxy_master_key"})
_MAX_AMOUNT = 2**63 - 1  # the ledger's largest amount (and token count): a line above it is skipped
_LAST_MS = 253_402_300_800_000  # 10000-01-01: a time after it is no time a log was written
_TOKEN_KINDS = frozenset({"chat", "text", "messages", "responses", "embedding"})
_GENERATION_TYPES = frozenset({"GENERATION", "EMBEDDING"})


@dataclass(frozen=True)
class ReadOptions:
    """How to read a log: its format, whose the calls are, which estimate a call holds.

    `subject_fields` {level: dotted path in the record} wins over the derived payer for that level
    (e.g. {"tenant": "user_id"} for a Langfuse export without LiteLLM's key fields); `subject_defaults`
    fill levels still empty. `estimates`: "auto" (logged, else recomputed from prices, else the actual
    cost), "logged" (logged, else actual), "actual" (every call holds exactly its cost)."""

    format: Format = "auto"
    settings: Settings = field(default_factory=Settings)
    subject_fields: Mapping[str, str] = field(default_factory=dict)
    subject_defaults: Mapping[str, str] = field(default_factory=dict)
    run_field: str | None = None
    estimates: Estimates = "auto"


class _Skip(Exception):
    """A line that cannot be used; the message says why."""


class _Ignore(Exception):
    """A well-formed line that is not a paid call."""


def read_spend_logs(paths: Iterable[str | Path], options: ReadOptions | None = None) -> SpendLog:
    """Every paid call in the files (or directories of `.json` / `.jsonl`, optionally `.gz`), in time order."""
    opts = options or ReadOptions()
    log = SpendLog()
    seen: set[str] = set()
    for path in paths:
        for file in _files(Path(path)):
            log.sources.append(str(file))
            items = list(_items(file, log))
            fmt = opts.format if opts.format != "auto" else _detect(obj for _, obj in items)
            if fmt not in log.formats:
                log.formats.append(fmt)
            reader = _LiteLLM(opts) if fmt == "litellm" else _Langfuse(opts, items)
            for line, obj in items:
                try:
                    rec = reader.record(obj, str(file), line)
                except _Ignore:
                    log.ignored += 1
                    continue
                except _Skip as exc:
                    log.skipped.append(SkippedLine(str(file), line, str(exc)))
                    continue
                except _NoPayer as exc:
                    log.unattributed.append(SkippedLine(str(file), line, str(exc)))
                    continue
                except (ValueError, ArithmeticError) as exc:  # a value no check above foresaw: never fatal
                    log.skipped.append(SkippedLine(str(file), line, f"unusable: {type(exc).__name__}: {exc}"[:300]))
                    continue
                key = f"{fmt}:{rec.call_id}"
                if key in seen:
                    log.duplicates += 1
                    continue
                seen.add(key)
                log.records.append(rec)
    log.sort()
    return log


# --- files and lines -------------------------------------------------------------------------------------


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and _is_log(p))
    return [path]


def _is_log(p: Path) -> bool:
    name = p.name.removesuffix(".gz")
    return name.endswith((".json", ".jsonl", ".ndjson"))


def _text(path: Path) -> str | None:
    """The file's text; None for a `.gz` that does not decompress (cut short, or not gzip at all)."""
    data = path.read_bytes()
    if path.suffix == ".gz" or data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, zlib.error, gzip.BadGzipFile):
            return None
    return data.decode("utf-8", errors="replace")


def _items(path: Path, log: SpendLog) -> Iterator[tuple[int, Any]]:
    """(line or item number, object) of a JSONL file or a JSON document (an array, `{"data": [...]}`, one
    object); a line that is not JSON becomes a SkippedLine."""
    text = _text(path)
    if text is None:
        log.skipped.append(SkippedLine(str(path), 0, "not a readable gzip file (cut short, or not gzip)"))
        return
    stripped = text.lstrip()
    lines = text.splitlines()
    whole: Any = None
    if stripped.startswith("[") or (stripped.startswith("{") and sum(1 for x in lines if x.strip()) > 1):
        try:
            whole = json.loads(text)
        except ValueError:
            whole = None  # not one document: read it line by line
    if whole is None and len([x for x in lines if x.strip()]) == 1 and stripped.startswith("{"):
        try:
            whole = json.loads(text)
        except ValueError:
            whole = None
    if whole is not None:
        if isinstance(whole, Mapping) and isinstance(whole.get("data"), list):
            whole = whole["data"]
        for n, item in enumerate(whole if isinstance(whole, list) else [whole], 1):
            yield from ((n, part) for part in _expand(item))
        return
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            yield n, json.loads(raw)
        except json.JSONDecodeError as exc:
            log.skipped.append(SkippedLine(str(path), n, f"not JSON: {exc.msg} at column {exc.colno}"))
        except ValueError as exc:  # an integer of more than 4,300 digits
            log.skipped.append(SkippedLine(str(path), n, f"not usable JSON: {exc}"[:300]))


def _expand(item: Any) -> Iterator[Any]:
    """A downloaded Langfuse trace (`{..., "observations": [...]}`) as its trace row and its observations."""
    observations = item.get("observations") if isinstance(item, Mapping) else None
    if not isinstance(observations, list):
        yield item
        return
    trace = {k: v for k, v in item.items() if k not in ("observations", "scores")}
    yield {**trace, "timestamp": trace.get("timestamp") or trace.get("createdAt") or ""}
    for obs in observations:
        yield {**obs, "traceId": obs.get("traceId") or trace.get("id")} if isinstance(obs, Mapping) else obs


def _detect(objects: Iterable[Any]) -> Format:
    """LiteLLM's payload has call_type / response_cost / model_parameters; anything else is read as Langfuse."""
    for obj in objects:
        if not isinstance(obj, Mapping):
            continue
        if "call_type" in obj or "response_cost" in obj or ("startTime" in obj and "model_parameters" in obj):
            return "litellm"
        return "langfuse"
    return "litellm"


# --- shared: paths, the payer, the run ----------------------------------------------------------------------


def _path(obj: Any, dotted: str) -> Any:
    """`metadata.requester_metadata.team` in nested mappings (JSON strings inside are parsed)."""
    cur = obj
    for part in dotted.split("."):
        if isinstance(cur, str) and cur.startswith("{"):
            cur = _json_object(cur)
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(part)
    return cur


def _json_object(value: Any) -> Mapping[str, Any]:
    """A mapping, or a JSON-encoded mapping (CSV-style exports), else {}."""
    if isinstance(value, Mapping):
        return value
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return {}
        return parsed if isinstance(parsed, Mapping) else {}
    return {}


class _NoPayer(Exception):
    """A paid call the proxy could not have charged to anyone."""


@dataclass(frozen=True)
class _KeyInfo:
    """The virtual key's fields as LiteLLM logs them (`metadata.user_api_key_*`), shaped like the proxy's
    UserAPIKeyAuth for `payer_from_request`."""

    token: str | None = None
    api_key: str | None = None
    org_id: str | None = None
    team_id: str | None = None
    team_alias: str | None = None
    key_alias: str | None = None
    user_id: str | None = None
    end_user_id: str | None = None
    user_role: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    team_metadata: Mapping[str, Any] = field(default_factory=dict)


def _key_info(meta: Mapping[str, Any]) -> _KeyInfo | None:
    def s(name: str) -> str | None:
        value = meta.get(name)
        return str(value) if value not in (None, "") else None

    info = _KeyInfo(
        token=s("user_api_key_hash") or s("user_api_key"),
        org_id=s("user_api_key_org_id"),
        team_id=s("user_api_key_team_id"),
        team_alias=s("user_api_key_team_alias"),
        key_alias=s("user_api_key_alias"),
        user_id=s("user_api_key_user_id"),
        end_user_id=s("user_api_key_end_user_id"),
    )
    named = info.org_id or info.team_id or info.key_alias
    if not named and (info.token in _MASTER_USERS or info.user_id in _MASTER_USERS or not (info.token or info.user_id)):
        return None  # the master key (or no key): metadata and headers name the payer
    # A key with no team, org, alias or user pays as itself (`tenant:key-<hash>`), as in the proxy: never
    # as a header names it.
    return dataclasses.replace(info, api_key=info.token)


def _payer(
    record: Mapping[str, Any], meta: Mapping[str, Any], requester: Mapping[str, Any], opts: ReadOptions
) -> Subject:
    """The payer as the proxy derives it, then `subject_fields` and `subject_defaults` applied."""
    headers: dict[str, Any] = {}
    for source in (requester.get("headers"), meta.get("headers"), meta.get("requester_custom_headers")):
        if isinstance(source, Mapping):
            headers.update(source)
    cycles = requester.get("cycles", meta.get("cycles"))
    data: dict[str, Any] = {"metadata": {"headers": headers, **({"cycles": cycles} if cycles is not None else {})}}
    fields: dict[str, str] = {}
    dimensions: dict[str, str] | None = None
    try:
        subject = payer_from_request(data, _key_info(meta), opts.settings.subject)[0]
        fields = {lv: v for lv in LEVELS if (v := getattr(subject, lv))}
        dimensions = subject.dimensions
    except InvalidRequestError as exc:
        if not opts.subject_fields and not opts.subject_defaults:
            raise _NoPayer(exc.message) from None
    for level, dotted in opts.subject_fields.items():
        value = _path(record, dotted)
        if value not in (None, ""):
            fields[level] = scope_value(str(value))
    for level, value in opts.subject_defaults.items():
        fields.setdefault(level, scope_value(value))
    if not fields:
        raise _NoPayer("no payer: no key, metadata, header or --subject-field names one")
    try:
        return Subject.model_validate({**fields, **({"dimensions": dimensions} if dimensions else {})})
    except ValueError as exc:
        raise _Skip(f"invalid payer {fields}: {exc}") from None


def _run(record: Mapping[str, Any], cycles: Any, fallbacks: Iterable[Any], opts: ReadOptions) -> str | None:
    if opts.run_field:
        value = _path(record, opts.run_field)
        return str(value) if value not in (None, "") else None
    dims = cycles.get("dimensions") if isinstance(cycles, Mapping) else None
    if isinstance(dims, Mapping) and dims.get("run"):
        return str(dims["run"])
    return next((str(v) for v in fallbacks if v not in (None, "")), None)


def _logged_estimate(record: Mapping[str, Any]) -> int | None:
    """The estimate the plugin held (USD_MICROCENTS), if the payload carries its decision."""
    fields = _json_object(_path(record, _LOGGED))
    est = fields.get("estimate") if fields.get("unit", "USD_MICROCENTS") == "USD_MICROCENTS" else None
    return est if isinstance(est, int) and not isinstance(est, bool) and 0 <= est <= _MAX_AMOUNT else None


def _epoch_ms(value: Any, what: str) -> int:
    """Epoch seconds (LiteLLM), or ISO 8601 / `YYYY-MM-DD HH:MM:SS.ffffff` in UTC (Langfuse) -> ms."""
    if isinstance(value, bool) or value in (None, ""):
        raise _Skip(f"no {what}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value <= 0:
            raise _Skip(f"{what} {value!r} is not a time")
        ms = round(value * 1000) if value < 1e11 else int(value)  # seconds, or already milliseconds
        if ms >= _LAST_MS:
            raise _Skip(f"{what} {value!r} is not a time")
        return ms
    try:
        parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise _Skip(f"{what} {value!r} is not a time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return int(parsed.timestamp() * 1000)


def _usd(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Skip(f"{what} {value!r} is not a number")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise _Skip(f"{what} {str(value)[:40]!r} is not a number") from None
    if not math.isfinite(number) or number < 0:
        raise _Skip(f"{what} {value!r} is not a cost")
    try:
        amount = usd_to_microcents(str(value) if isinstance(value, str) else value)
    except ArithmeticError:
        amount = _MAX_AMOUNT + 1
    if amount > _MAX_AMOUNT:
        raise _Skip(f"{what} {str(value)[:40]!r} is out of range")
    return amount


def _int(value: Any) -> int | None:
    """A token count, None when absent or negative; a count no call can have makes the line unusable."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value > _MAX_AMOUNT:
        raise _Skip(f"token count {str(value)[:40]!r} is out of range")
    return int(value) if value >= 0 else None


# --- LiteLLM -------------------------------------------------------------------------------------------------


class _LiteLLM:
    def __init__(self, opts: ReadOptions) -> None:
        self.opts = opts

    def record(self, p: Any, source: str, line: int) -> SpendRecord:
        if not isinstance(p, Mapping):
            raise _Skip("not a JSON object")
        call_id = p.get("litellm_call_id") or p.get("id")
        if not call_id:
            raise _Skip("no id or litellm_call_id")
        call_type = str(p.get("call_type") or "")
        if "response_cost" not in p:
            raise _Skip("no response_cost")
        actual = _usd(p.get("response_cost") or 0, "response_cost")
        start = _epoch_ms(p.get("startTime"), "startTime")
        end = max(start, _epoch_ms(p["endTime"], "endTime")) if p.get("endTime") else start
        meta = _json_object(p.get("metadata"))
        requester = _json_object(meta.get("requester_metadata"))
        route = classify(call_type)
        mcp = _json_object(meta.get("mcp_tool_call_metadata")) or None
        if route.kind == "free" and not actual:
            raise _Ignore
        subject = _payer(p, meta, requester, self.opts)
        model = str(p.get("model_group") or p.get("model") or "")
        tokens = _int(p.get("prompt_tokens")), _int(p.get("completion_tokens"))
        used = tokens[0] + tokens[1] if tokens[0] is not None and tokens[1] is not None else None
        if mcp is not None or route.kind not in _TOKEN_KINDS:
            tool = str((mcp or {}).get("namespaced_tool_name") or (mcp or {}).get("name") or model or call_type)
            kind, name, model = "tool.mcp" if mcp is not None else f"llm.{route.kind}", tool, model or tool
            estimate, token_hold, soft = _logged_estimate(p), None, None
            used = None
        else:
            kind = action_kind(route.kind)
            provider = p.get("custom_llm_provider")
            name = f"{provider}:{p.get('model') or model}" if provider else f"litellm:{model}"
            estimate, token_hold, soft = self._estimate(p, model, route.kind)
        cycles = requester.get("cycles", meta.get("cycles"))
        return SpendRecord(
            call_id=str(call_id),
            start_ms=start,
            end_ms=end,
            subject=subject,
            actual=actual,
            estimate=estimate,
            model=model,
            kind=kind,
            name=name,
            run=_run(p, cycles, (p.get("session_id"), p.get("trace_id")), self.opts),
            tokens=used,
            token_estimate=token_hold,
            soft_landing=soft,
            line=line,
            source=source,
        )

    def _estimate(
        self, p: Mapping[str, Any], group: str, kind: str
    ) -> tuple[int | None, int | None, SoftLanding | None]:
        """(estimate, tokens held, soft landing) as the proxy would have reserved them."""
        logged = _logged_estimate(p)
        if logged is not None or self.opts.estimates != "auto" or not group:
            return logged, None, None
        # LiteLLM's prices (its bundled map, as the demo's proxy, unless told otherwise): imported only here, so
        # that a log with logged estimates is read without litellm.
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        try:
            from .estimate import (
                Estimate,
                PriceUnknown,
                RequestInvalid,
                cap_field,
                estimate_call,
                output_cap,
                price_of_group,
                soft_landing,
                token_hold,
            )
        except ImportError:
            return None, None, None
        params = _json_object(p.get("model_parameters"))
        data: dict[str, Any] = {**params, "model": group}
        messages = p.get("messages")
        settings = self.opts.settings
        try:
            if kind == "chat" and isinstance(messages, list) and messages:
                est = estimate_call(group, {**data, "messages": messages}, kind, settings)
            else:  # the request is not in the log (redacted, or another route): its logged prompt tokens
                _, price = price_of_group(group, settings)
                prompt = _int(p.get("prompt_tokens")) or 0
                cap = output_cap(data, price, kind) if kind != "embedding" else 0
                input_cost = -(-prompt * price.input_per_million // 10**6)
                amount = input_cost + -(-cap * price.output_per_million // 10**6)
                est = Estimate(
                    amount, input_cost, price.output_per_million, cap, prompt, group, 1, cap_field(data, kind), kind
                )
        except (PriceUnknown, RequestInvalid):
            return None, None, None
        return est.amount, token_hold(est, kind), soft_landing(est, settings.min_output_tokens)


# --- Langfuse ------------------------------------------------------------------------------------------------


def _first(obj: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        value = obj.get(name)
        if value not in (None, ""):
            return value
    return None


class _Langfuse:
    """Observations with a cost are calls; trace rows (legacy `traces/`) and downloaded traces give their
    observations the trace's user, session, name and metadata."""

    def __init__(self, opts: ReadOptions, items: list[tuple[int, Any]]) -> None:
        self.opts = opts
        self.traces: dict[str, Mapping[str, Any]] = {}
        for _, obj in items:
            if isinstance(obj, Mapping) and self._is_trace(obj):
                self.traces[str(obj.get("id"))] = obj

    @staticmethod
    def _is_trace(obj: Mapping[str, Any]) -> bool:
        return "timestamp" in obj and not any(k in obj for k in ("start_time", "startTime", "type", "trace_id"))

    def record(self, obj: Any, source: str, line: int) -> SpendRecord:
        if not isinstance(obj, Mapping):
            raise _Skip("not a JSON object")
        if self._is_trace(obj):
            raise _Ignore
        trace = self.traces.get(str(_first(obj, "trace_id", "traceId")), {})
        cost = self._cost(obj)
        kind = str(obj.get("type") or "").upper()
        if cost is None:
            if kind in _GENERATION_TYPES:
                raise _Skip(f"{kind.lower()} without a cost (total_cost, cost_details or calculatedTotalCost)")
            raise _Ignore
        if not cost and kind not in _GENERATION_TYPES:
            raise _Ignore
        obs_id = _first(obj, "id")
        if not obs_id:
            raise _Skip("no observation id")
        start = _epoch_ms(_first(obj, "start_time", "startTime"), "start_time")
        end_value = _first(obj, "end_time", "endTime")
        end = max(start, _epoch_ms(end_value, "end_time")) if end_value is not None else start
        meta = {**_json_object(trace.get("metadata")), **_json_object(obj.get("metadata"))}
        requester = _json_object(meta.get("requester_metadata"))
        context = {**trace, **{k: v for k, v in obj.items() if v not in (None, "")}, "metadata": meta}
        subject = _payer(context, meta, requester, self.opts)
        model = str(_first(obj, "provided_model_name", "providedModelName", "model") or obj.get("name") or "")
        usage = _json_object(_first(obj, "usage_details", "usageDetails")) or _json_object(obj.get("usage"))
        inp, out = _int(usage.get("input")), _int(usage.get("output"))
        cycles = requester.get("cycles", meta.get("cycles"))
        trace_id = _first(obj, "trace_id", "traceId")
        return SpendRecord(
            call_id=str(obs_id),
            start_ms=start,
            end_ms=end,
            subject=subject,
            actual=cost,
            estimate=_logged_estimate(context),
            model=model,
            kind="llm.completion" if kind in _GENERATION_TYPES else f"langfuse.{kind.lower() or 'observation'}",
            name=model,
            run=_run(context, cycles, (trace_id, _first(context, "session_id", "sessionId")), self.opts),
            tokens=inp + out if inp is not None and out is not None else None,
            line=line,
            source=source,
        )

    @staticmethod
    def _cost(obj: Mapping[str, Any]) -> int | None:
        value = _first(obj, "total_cost", "totalCost", "calculatedTotalCost")
        if value is not None:
            return _usd(value, "total_cost")
        details = _json_object(_first(obj, "cost_details", "costDetails"))
        if details:
            if "total" in details:
                return _usd(details["total"], "cost_details.total")
            total = sum(_usd(v, f"cost_details.{k}") for k, v in details.items())
            if total > _MAX_AMOUNT:
                raise _Skip("cost_details add up to more than any call can cost")
            return total
        usage = _json_object(obj.get("usage"))
        if usage.get("totalCost") is not None:
            return _usd(usage["totalCost"], "usage.totalCost")
        return None


def read_for_cli(
    paths: Iterable[str],
    *,
    log_format: Format = "auto",
    config: str | None = None,
    subject_fields: Iterable[str] = (),
    subject_defaults: Iterable[str] = (),
    run_field: str | None = None,
    estimates: Estimates = "auto",
) -> SpendLog:
    """`cycles replay` / `cycles suggest`: the plugin's settings (subject mapping, prices) found as the proxy
    finds them, `level=value` options checked, then `read_spend_logs`."""
    from cycles_ledger import ConfigError

    from .settings import load_settings

    def pairs(items: Iterable[str], what: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in items:
            level, sep, value = item.partition("=")
            if not sep or level not in LEVELS or not value:
                raise ConfigError(f"{what} {item!r}: write <level>=<value> with a level of {', '.join(LEVELS)}")
            out[level] = value
        return out

    options = ReadOptions(
        format=log_format,
        settings=load_settings(config),
        subject_fields=pairs(subject_fields, "--subject-field"),
        subject_defaults=pairs(subject_defaults, "--subject-default"),
        run_field=run_field,
        estimates=estimates,
    )
    for path in paths:
        if not Path(path).exists():
            raise ConfigError(f"no such log file or directory: {path}")
    return read_spend_logs(paths, options)
