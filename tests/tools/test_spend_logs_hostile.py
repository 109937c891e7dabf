"""The spend-log reader (`cycles replay`, `cycles suggest`) on hostile or corrupt logs: a line it cannot use is
skipped with its line number, never fatal, and what it accepts replay and suggest can run; the payer is the one
the proxy charged, never one a client header names for a virtual key."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cycles_ledger.config import load_budgets
from cycles_ledger.replay import render_replay, replay
from cycles_ledger.suggest import render_suggest, suggest
from cycles_litellm.settings import SubjectMapping
from cycles_litellm.spend_logs import read_spend_logs
from cycles_litellm.subject import payer_from_request

T = 1_795_802_400.0  # 2026-11-27 18:00:00 UTC, epoch seconds as LiteLLM logs them


def _payload(call_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": call_id,
        "litellm_call_id": call_id,
        "call_type": "acompletion",
        "response_cost": 0.01,
        "custom_llm_provider": "openai",
        "prompt_tokens": 20,
        "completion_tokens": 40,
        "startTime": T,
        "endTime": T + 1.5,
        "model": "gpt-4o",
        "model_group": "gpt-4o",
        "metadata": {"requester_metadata": {"cycles": {"tenant": "acme"}}},
        "model_parameters": {"max_tokens": 1024},
        **fields,
    }


def _write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "spend.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "bad_line",
    [
        json.dumps(_payload("bad", response_cost=1e20)),  # decimal.InvalidOperation in usd_to_microcents
        json.dumps(_payload("bad", response_cost="1e20")),
        json.dumps(_payload("bad", response_cost=10**400)),  # OverflowError in float()
        json.dumps(_payload("bad", prompt_tokens=float("inf"))),  # `Infinity`: OverflowError in _int
        json.dumps(_payload("bad", prompt_tokens=10**30)),  # pydantic ValidationError (SoftLanding > int64)
        json.dumps(_payload("bad", prompt_tokens=float("nan"))),
        '{"id": "bad", "response_cost": ' + "9" * 5000 + "}",  # json.loads: a plain ValueError (digit limit)
    ],
    ids=["cost-1e20", "cost-str-1e20", "cost-huge-int", "tokens-infinity", "tokens-huge", "tokens-nan", "5000-digits"],
)
def test_a_bad_number_in_one_line_is_skipped_not_fatal(tmp_path: Path, bad_line: str) -> None:
    """The reader promises that a line it cannot use is skipped with its line number, never fatal."""
    path = _write(tmp_path, json.dumps(_payload("good")), bad_line)
    log = read_spend_logs([path])
    assert [r.call_id for r in log.records] == ["good"]
    assert [s.line for s in log.skipped] == [2]


@pytest.mark.parametrize(
    "bad",
    [
        {"startTime": 1e15, "endTime": 1e15},  # read as epoch ms: the year 33658
        {"response_cost": 1e12},  # 10^20 USD_MICROCENTS, above int64
        {
            "metadata": {
                "requester_metadata": {"cycles": {"tenant": "acme"}},
                "spend_logs_metadata": {"cycles": {"estimate": 10**30}},
            }
        },
    ],
    ids=["time-out-of-range", "cost-above-int64", "logged-estimate-above-int64"],
)
async def test_a_line_the_reader_accepts_cannot_crash_replay_or_suggest(tmp_path: Path, bad: dict[str, Any]) -> None:
    """What the reader accepts, replay and suggest must be able to run: one out-of-range value in a log of
    thousands must not take the whole report down with a traceback."""
    path = _write(tmp_path, json.dumps(_payload("good")), json.dumps(_payload("bad", **bad)))
    log = read_spend_logs([path])
    budgets_file = tmp_path / "budgets.yaml"
    budgets_file.write_text("budgets:\n  - scope: tenant:acme\n    allocated: 10usd\n")
    budgets = load_budgets(budgets_file)
    problems = []
    try:
        render_replay(await replay(log, budgets))
    except Exception as exc:  # noqa: BLE001 - the finding is that anything escapes
        problems.append(f"replay: {type(exc).__name__}: {str(exc)[:120]}")
    try:
        render_suggest(suggest(log))
    except Exception as exc:  # noqa: BLE001
        problems.append(f"suggest: {type(exc).__name__}: {str(exc)[:120]}")
    assert problems == []


def test_the_reader_charges_a_virtual_key_without_team_as_the_proxy_did(tmp_path: Path) -> None:
    """A virtual key with no team, organization, alias or user pays as itself (`tenant:key-<hash>`) in the proxy,
    whatever x-cycles-tenant says; the reader must not take it for the master key and let the client's header
    name the payer (replay and suggest would put that key's spend on the tenant the client named)."""
    hashed = "88dc28d0" * 8  # LiteLLM logs the key's hashed token as user_api_key_hash
    key = SimpleNamespace(
        token=hashed,
        api_key=hashed,
        org_id=None,
        team_id=None,
        team_alias=None,
        key_alias=None,
        user_id=None,
        end_user_id=None,
        user_role=None,
        metadata={},
        team_metadata={},
    )
    request = {"metadata": {}, "proxy_server_request": {"headers": {"x-cycles-tenant": "victim"}}}
    charged = payer_from_request(request, key, SubjectMapping())[0].scope_path
    assert charged == "tenant:key-" + hashlib.sha256(hashed.encode()).hexdigest()[:12]

    metadata = {
        "user_api_key_hash": hashed,
        "user_api_key_alias": None,
        "user_api_key_team_id": None,
        "user_api_key_org_id": None,
        "user_api_key_user_id": None,
        "requester_custom_headers": {"x-cycles-tenant": "victim"},
    }
    log_path = _write(tmp_path, json.dumps(_payload("k1", metadata=metadata)))
    [record] = read_spend_logs([log_path]).records
    assert record.subject.scope_path == charged


def test_a_truncated_gzip_file_in_a_log_directory_is_reported_not_fatal(tmp_path: Path) -> None:
    """A directory of logs where one `.gz` is cut short (a logger or an upload still writing it) or not gzip at all:
    the other files are still read, and that file is reported."""
    (tmp_path / "a.jsonl").write_text(json.dumps(_payload("good")) + "\n")
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress((json.dumps(_payload("cut")) + "\n").encode())[:15])
    log = read_spend_logs([tmp_path])
    assert [r.call_id for r in log.records] == ["good"]
    assert len(log.skipped) == 1 and log.skipped[0].source.endswith("b.jsonl.gz")
