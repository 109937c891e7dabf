"""Reading past spend: LiteLLM's standard logging payload and Langfuse exports become SpendRecords, with the
payer the proxy would have charged; bad lines are skipped with their line number, never fatal."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from cycles_litellm.estimate import estimate_call, soft_landing
from cycles_litellm.settings import Settings
from cycles_litellm.spend_logs import ReadOptions, read_spend_logs
from cycles_litellm.subject import scope_value

T = 1_795_802_400.0  # 2026-11-27 18:00:00 UTC, epoch seconds as LiteLLM logs them
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Extract the fields."}]


def payload(call_id: str, *, at: float = T, cost: float = 0.01, **fields: Any) -> dict[str, Any]:
    """A StandardLoggingPayload of a chat call (the fields the readers use, and a few they do not)."""
    base: dict[str, Any] = {
        "id": call_id,
        "litellm_call_id": call_id,
        "trace_id": f"trace-{call_id}",
        "session_id": "",
        "call_type": "acompletion",
        "status": "success",
        "response_cost": cost,
        "custom_llm_provider": "openai",
        "prompt_tokens": 20,
        "completion_tokens": 40,
        "total_tokens": 60,
        "startTime": at,
        "endTime": at + 1.5,
        "model": "gpt-4o",
        "model_group": "gpt-4o",
        "metadata": {"user_api_key_hash": "ab" * 32, "user_api_key_user_id": "default_user_id"},
        "messages": MESSAGES,
        "model_parameters": {"max_tokens": 1024},
        "cache_hit": False,
    }
    return base | fields


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_a_virtual_keys_team_pays_and_the_client_refines_only_below_it(tmp_path: Path) -> None:
    """Key fields (team, alias) fix tenant and app; the client's metadata `cycles` adds the workflow and a run
    dimension but cannot name another tenant, as on the proxy."""
    meta = {
        "user_api_key_hash": "cd" * 32,
        "user_api_key_team_id": "team-a",
        "user_api_key_alias": "bot key",
        "user_api_key_user_id": "u-1",
        "requester_metadata": {"cycles": {"tenant": "evil", "workflow": "docs", "dimensions": {"run": "r-1"}}},
    }
    log = read_spend_logs([write_jsonl(tmp_path / "a.jsonl", [payload("c1", metadata=meta)])])
    (rec,) = log.records
    assert rec.subject.scopes() == [
        "tenant:team-a",
        f"tenant:team-a/app:{scope_value('bot key')}",
        f"tenant:team-a/app:{scope_value('bot key')}/workflow:docs",
    ]
    assert (
        rec.run == "r-1"
        and rec.call_id == "c1"
        and rec.start_ms == int(T * 1000)
        and rec.end_ms == int(T * 1000) + 1500
    )
    assert (rec.actual, rec.tokens, rec.kind, rec.name, rec.model) == (
        1_000_000,
        60,
        "llm.completion",
        "openai:gpt-4o",
        "gpt-4o",
    )


def test_the_master_key_is_named_by_headers_and_the_run_is_the_trace(tmp_path: Path) -> None:
    """With the master key, `x-cycles-*` headers name every level; without a run dimension the trace is the run."""
    headers = {"x-cycles-tenant": "acme", "x-cycles-workflow": "doc-processing", "x-other": "1"}
    meta = {
        "user_api_key_hash": "ab" * 32,
        "user_api_key_user_id": "default_user_id",
        "requester_custom_headers": headers,
    }
    log = read_spend_logs([write_jsonl(tmp_path / "a.jsonl", [payload("c1", metadata=meta, trace_id="run-9")])])
    assert log.records[0].subject.scope_path == "tenant:acme/workflow:doc-processing"
    assert log.records[0].run == "run-9"


def test_the_estimate_is_the_proxys_worst_case_unless_the_log_has_one(tmp_path: Path) -> None:
    """Recomputed as the proxy's pre-call hook does (LiteLLM prices, logged messages, max_tokens), with its
    soft landing; the plugin's logged decision (spend_logs_metadata.cycles, also as a JSON string) wins;
    `estimates="actual"` holds the cost itself."""
    headers = {"x-cycles-tenant": "acme"}
    meta = {"requester_custom_headers": headers}
    decision = {"decision": "ALLOW", "estimate": 123_456, "unit": "USD_MICROCENTS"}
    logged = payload("c2", metadata=meta | {"spend_logs_metadata": {"cycles": decision}})
    flattened = payload("c4", metadata=meta | {"spend_logs_metadata": {"cycles": json.dumps(decision)}})
    no_messages = payload("c3", metadata=meta, messages="redacted-by-litellm", prompt_tokens=1000)
    path = write_jsonl(tmp_path / "a.jsonl", [payload("c1", metadata=meta), logged, no_messages, flattened])
    by_id = {r.call_id: r for r in read_spend_logs([path]).records}
    settings = Settings()
    est = estimate_call("gpt-4o", {"model": "gpt-4o", "max_tokens": 1024, "messages": MESSAGES}, "chat", settings)
    assert by_id["c1"].estimate == est.amount and by_id["c1"].soft_landing == soft_landing(est, 256)
    assert by_id["c1"].token_estimate == est.input_tokens + 1024
    assert by_id["c2"].estimate == by_id["c4"].estimate == 123_456 and by_id["c2"].soft_landing is None
    # no messages in the log: the logged prompt tokens at gpt-4o's $2.50 in, 1024 out at $10 per million
    assert by_id["c3"].estimate == 1000 * 250 + 1024 * 1000
    actual = read_spend_logs([path], ReadOptions(estimates="actual")).records
    assert [r.estimate for r in actual] == [None, 123_456, None, 123_456]


def test_mcp_tool_calls_are_tool_spend_holding_their_cost(tmp_path: Path) -> None:
    """LiteLLM's MCP gateway logs a tool call with its cost: a `tool.mcp` action named by the tool."""
    mcp = {"name": "ocr.extract", "mcp_server_name": "ocr", "namespaced_tool_name": "ocr/ocr.extract"}
    meta = {"requester_custom_headers": {"x-cycles-tenant": "acme"}, "mcp_tool_call_metadata": mcp}
    row = payload("t1", cost=0.195, call_type="call_mcp_tool", model="ocr.extract", model_group=None, metadata=meta)
    (rec,) = read_spend_logs([write_jsonl(tmp_path / "t.jsonl", [row])]).records
    assert (rec.kind, rec.name, rec.actual, rec.estimate, rec.tokens) == (
        "tool.mcp",
        "ocr/ocr.extract",
        19_500_000,
        None,
        None,
    )


def test_bad_lines_are_skipped_with_their_line_numbers_and_counted(tmp_path: Path) -> None:
    """Not JSON, not an object, no time, a negative cost, no cost: each skipped with its line; duplicates,
    free calls and payer-less calls are counted apart; the good calls are read."""
    meta = {"requester_custom_headers": {"x-cycles-tenant": "acme"}}
    rows: list[Any] = [
        payload("ok1", metadata=meta),
        "{not json",
        "[1, 2]",
        payload("no-time", metadata=meta, startTime=None),
        payload("neg", metadata=meta, cost=-1),
        {k: v for k, v in payload("no-cost", metadata=meta).items() if k != "response_cost"},
        payload("ok1", metadata=meta),  # the same call logged twice
        payload("free", metadata=meta, call_type="alist_batches", cost=0),
        payload("nobody", metadata={}),
        "",
        payload("ok2", metadata=meta, at=T - 60),
    ]
    log = read_spend_logs([write_jsonl(tmp_path / "mixed.jsonl", rows)])
    assert [r.call_id for r in log.records] == ["ok2", "ok1"]  # time order
    assert [(s.line, s.error.split(":")[0]) for s in log.skipped] == [
        (2, "not JSON"),
        (3, "not a JSON object"),
        (4, "no startTime"),
        (5, "response_cost -1 is not a cost"),
        (6, "no response_cost"),
    ]
    assert log.skipped[0].where() == f"{tmp_path / 'mixed.jsonl'}:2"
    assert (log.duplicates, log.ignored, len(log.unattributed)) == (1, 1, 1)
    assert log.unattributed[0].line == 9
    defaults = read_spend_logs([tmp_path / "mixed.jsonl"], ReadOptions(subject_defaults={"tenant": "house"}))
    assert {r.subject.scope_path for r in defaults.records} == {"tenant:acme", "tenant:house"}


def test_a_directory_of_per_call_files_as_the_s3_logger_writes(tmp_path: Path) -> None:
    """One JSON object per file (S3 / GCS loggers), gzip too, read from a directory tree."""
    meta = {"requester_custom_headers": {"x-cycles-tenant": "acme"}}
    day = tmp_path / "2026-11-27"
    day.mkdir()
    (day / "a.json").write_text(json.dumps(payload("a", metadata=meta), indent=2))
    (day / "b.json.gz").write_bytes(gzip.compress(json.dumps(payload("b", metadata=meta, at=T + 5)).encode()))
    (day / "notes.txt").write_text("not a log")
    log = read_spend_logs([tmp_path])
    assert [r.call_id for r in log.records] == ["a", "b"] and len(log.sources) == 2 and not log.skipped


# --- Langfuse -------------------------------------------------------------------------------------------------


def test_langfuse_enriched_observations_export(tmp_path: Path) -> None:
    """Blob storage `observations_v2/` rows (snake_case): generations with total_cost are calls, paid by the
    LiteLLM key fields in their metadata; spans are not calls; a generation without a cost is a bad line."""
    meta = {"user_api_key_team_id": "team-a", "requester_metadata": {"cycles": {"workflow": "docs"}}}
    rows = [
        {
            "id": "obs-1",
            "trace_id": "tr-1",
            "type": "GENERATION",
            "start_time": "2026-11-27 18:00:00.250000",
            "end_time": "2026-11-27 18:00:02.000000",
            "provided_model_name": "gpt-4o",
            "usage_details": {"input": 100, "output": 50, "total": 150},
            "cost_details": {"input": 0.00025, "output": 0.0005, "total": 0.00075},
            "total_cost": 0.00075,
            "metadata": meta,
            "user_id": "end-user",
            "session_id": "sess-1",
            "trace_name": "agent-run",
        },
        {"id": "span-1", "trace_id": "tr-1", "type": "SPAN", "start_time": "2026-11-27 18:00:00.000000"},
        {"id": "obs-2", "trace_id": "tr-1", "type": "GENERATION", "start_time": "2026-11-27 18:01:00.000000"},
        {
            "id": "obs-3",
            "trace_id": "tr-1",
            "type": "GENERATION",
            "start_time": "2026-11-27T18:02:00Z",
            "cost_details": {"input": 0.001, "output": 0.002},
            "metadata": json.dumps(meta),
        },
    ]
    log = read_spend_logs([write_jsonl(tmp_path / "observations_v2.jsonl", rows)])
    assert log.formats == ["langfuse"] and log.ignored == 1
    assert [(s.line, s.error) for s in log.skipped] == [
        (3, "generation without a cost (total_cost, cost_details or calculatedTotalCost)")
    ]
    first, third = log.records
    assert first.subject.scope_path == "tenant:team-a/workflow:docs" and first.run == "tr-1"
    assert (first.actual, first.tokens, first.model, first.start_ms) == (75_000, 150, "gpt-4o", 1_795_802_400_250)
    assert first.end_ms == 1_795_802_402_000 and first.estimate is None
    assert third.actual == 300_000 and third.subject.scope_path == "tenant:team-a/workflow:docs"


def test_langfuse_legacy_traces_joined_and_a_payer_from_a_field(tmp_path: Path) -> None:
    """Legacy `traces/` rows give their observations the trace's user; `subject_fields` makes it the tenant."""
    rows = [
        {"id": "g1", "trace_id": "tr-9", "type": "GENERATION", "start_time": "2026-11-27 18:00:00", "total_cost": 0.5},
        {"id": "tr-9", "timestamp": "2026-11-27 17:59:59", "name": "run", "user_id": "cust-7", "metadata": {}},
    ]
    path = write_jsonl(tmp_path / "legacy.jsonl", rows)
    assert len(read_spend_logs([path]).unattributed) == 1  # nothing names a payer by default
    log = read_spend_logs([path], ReadOptions(subject_fields={"tenant": "user_id"}, run_field="trace_name"))
    (rec,) = log.records
    assert rec.subject.scope_path == "tenant:cust-7" and rec.actual == 50_000_000 and log.ignored == 1


def test_langfuse_ui_and_api_json(tmp_path: Path) -> None:
    """The UI export (a JSON array, camelCase), the API's `{"data": [...]}` and a downloaded trace with its
    observations are read alike."""
    meta = {"cycles": {"tenant": "acme"}}
    obs = {
        "id": "o1",
        "traceId": "t1",
        "type": "GENERATION",
        "model": "gpt-4o-mini",
        "startTime": "2026-11-27T18:00:00.000Z",
        "endTime": "2026-11-27T18:00:01.000Z",
        "usage": {"input": 10, "output": 5, "total": 15, "unit": "TOKENS"},
        "totalCost": 0.000183,
        "metadata": meta,
    }
    (tmp_path / "ui.json").write_text(json.dumps([obs], indent=2))
    (tmp_path / "api.json").write_text(json.dumps({"data": [obs | {"id": "o2", "calculatedTotalCost": 0.1}]}))
    in_trace = {k: v for k, v in obs.items() if k not in ("traceId", "metadata")} | {"id": "o3"}
    trace = {"id": "t3", "timestamp": "2026-11-27T18:05:00Z", "metadata": meta, "observations": [in_trace]}
    (tmp_path / "trace-t3.json").write_text(json.dumps(trace, indent=1))
    log = read_spend_logs([tmp_path / "ui.json", tmp_path / "api.json", tmp_path / "trace-t3.json"])
    assert sorted((r.call_id, r.actual, r.tokens, r.run) for r in log.records) == [
        ("o1", 18_300, 15, "t1"),
        ("o2", 18_300, 15, "t1"),  # totalCost comes first, calculatedTotalCost after it
        ("o3", 18_300, 15, "t3"),  # the trace's id and metadata (its payer) given to its observations
    ]
    assert {r.subject.scope_path for r in log.records} == {"tenant:acme"} and log.formats == ["langfuse"]
