"""The seed's weekend as LiteLLM would have logged it: the runaway agent's loop, unchecked, for 4,700 calls.

    python examples/weekend_log.py --out weekend.jsonl           # Friday 18:00 UTC to Monday 08:00, 4,700 calls
    cycles replay weekend.jsonl --budgets run-budget.yaml         # which call a $30 budget would have refused
    cycles suggest weekend.jsonl                                  # budgets and burn-rate limits from the spend

The calls are the live demo's (`runaway_agent.py`): the same seed, documents, OCR failures and request
bodies, the fake provider's usage (25 prompt tokens, 40 completion tokens per answer) priced by LiteLLM,
and the agent's own parser deciding to call the OCR tool again. Each line is a `StandardLoggingPayload`
as LiteLLM's loggers write it: the LLM calls as `acompletion` through the proxy with the master key and
`x-cycles-tenant` / `x-cycles-workflow` headers (`metadata.requester_custom_headers`), the OCR attempts
as MCP tool calls (`call_mcp_tool`, `metadata.mcp_tool_call_metadata`) billed per page. Call number n of
the live demo is the log's n-th line, with id `weekend-<n>-llm` or `weekend-<n>-ocr`. The whole run has one
trace id (`litellm_session_id` = the run), which is what `cycles suggest` counts as a run.

At the demo's prices the 4,700 calls cost about $460 (the seed's weekend cost $2,800: dearer documents).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runaway_agent as demo  # the demo's own loop pieces, beside this file

from cycles_litellm.fake_provider import PROMPT_TOKENS, completion_tokens_for, expected_content

START = "2026-11-27T18:00:00Z"  # a Friday evening
HOURS = 62.0  # to Monday 08:00
RUN_ID = "runaway-weekend"
MASTER_KEY_HASH = hashlib.sha256(b"sk-master").hexdigest()
LLM_SECONDS, OCR_SECONDS = 1.8, 6.0


def _llm_cost(completion_tokens: int) -> float:
    """What LiteLLM logs as response_cost for one answer (its own price map)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # the prices the demo's proxy uses
    import litellm

    prompt_usd, completion_usd = litellm.cost_per_token(
        model=demo.MODEL, prompt_tokens=PROMPT_TOKENS, completion_tokens=completion_tokens
    )
    return float(prompt_usd + completion_usd)


def _metadata(route: str, mcp: dict[str, Any] | None = None) -> dict[str, Any]:
    """The standard logging metadata of a call the demo makes through the proxy with the master key."""
    return {
        "user_api_key_hash": MASTER_KEY_HASH,
        "user_api_key_alias": None,
        "user_api_key_org_id": None,
        "user_api_key_team_id": None,
        "user_api_key_user_id": "default_user_id",
        "user_api_key_team_alias": None,
        "user_api_key_end_user_id": None,
        "user_api_key_request_route": route,
        "spend_logs_metadata": None,
        "requester_ip_address": "127.0.0.1",
        "requester_metadata": {},
        "requester_custom_headers": {"x-cycles-tenant": demo.TENANT, "x-cycles-workflow": demo.WORKFLOW},
        "mcp_tool_call_metadata": mcp,
        "applied_guardrails": [],
    }


def _payload(n: int, start_s: float, seconds: float, **fields: Any) -> dict[str, Any]:
    call_id = f"weekend-{n:05d}-{'ocr' if fields.get('call_type') == 'call_mcp_tool' else 'llm'}"
    base: dict[str, Any] = {
        "id": call_id,
        "litellm_call_id": call_id,
        "trace_id": RUN_ID,  # litellm_session_id wins as the trace id (LiteLLM's default)
        "session_id": "",
        "stream": False,
        "status": "success",
        "startTime": round(start_s, 3),
        "endTime": round(start_s + seconds, 3),
        "completionStartTime": round(start_s + seconds, 3),
        "response_time": seconds,
        "cache_hit": False,
        "cache_key": None,
        "saved_cache_cost": 0.0,
        "request_tags": [],
        "end_user": "",
        "error_str": None,
        "api_base": "http://127.0.0.1:4001/v1",
    }
    return base | fields


def weekend_payloads(
    calls: int = demo.SEED_CALLS, seed: int = 7, start: str = START, hours: float = HOURS
) -> Iterator[dict[str, Any]]:
    """The demo's loop (`runaway_agent.agent_loop`) without a budget, as `calls` logged calls spread over `hours`."""
    t0 = dt.datetime.fromisoformat(start.replace("Z", "+00:00")).timestamp()
    step = hours * 3600 / calls
    rng = random.Random(seed)
    api = demo.FlakyOcrApi(random.Random(seed + 1))
    n = 0
    llm_costs: dict[int, float] = {}
    for doc in demo.inbox(rng):
        error: str | None = None
        while True:
            if n >= calls:
                return
            n += 1
            body = demo.llm_body(doc, error)
            words = completion_tokens_for(body)
            if words not in llm_costs:
                llm_costs[words] = _llm_cost(words)
            answer = expected_content(words)
            yield _payload(
                n,
                t0 + (n - 1) * step,
                LLM_SECONDS,
                call_type="acompletion",
                response_cost=llm_costs[words],
                custom_llm_provider="openai",
                prompt_tokens=PROMPT_TOKENS,
                completion_tokens=words,
                total_tokens=PROMPT_TOKENS + words,
                model=demo.MODEL,
                model_group=demo.MODEL,
                model_id="gpt-4o-deployment",
                metadata=_metadata("/v1/chat/completions"),
                messages=body["messages"],
                response={"choices": [{"message": {"role": "assistant", "content": answer}}]},
                model_parameters={"max_tokens": body["max_tokens"]},
                hidden_params={"model_id": "gpt-4o-deployment", "litellm_model_name": f"openai/{demo.MODEL}"},
            )
            if demo.parse_plan(answer) != "ocr.extract":
                break
            if n >= calls:
                return
            n += 1
            result = api.extract(doc)
            mcp = {
                "name": demo.OCR_ACTION.name,
                "mcp_server_name": "ocr",
                "namespaced_tool_name": demo.OCR_ACTION.name,
                "arguments": {"doc": doc.id, "pages": doc.pages},
                "result": {"ok": result.ok, "error": result.error},
            }
            yield _payload(
                n,
                t0 + (n - 1) * step,
                OCR_SECONDS,
                call_type="call_mcp_tool",
                response_cost=result.billed / demo.USD,
                custom_llm_provider=None,
                prompt_tokens=0,
                completion_tokens=0,
                total_tokens=0,
                model=demo.OCR_ACTION.name,
                model_group=None,
                model_id=None,
                metadata=_metadata("/mcp/tools/call", mcp),
                messages=None,
                response=None,
                model_parameters={},
                hidden_params={},
            )
            if result.ok:
                break
            error = result.error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="-", help="JSONL file to write (default: stdout)")
    parser.add_argument("--calls", type=int, default=demo.SEED_CALLS, help="calls to log (default 4,700)")
    parser.add_argument("--seed", type=int, default=7, help="the demo's --seed")
    parser.add_argument("--start", default=START, help="the first call's time (ISO 8601)")
    parser.add_argument("--hours", type=float, default=HOURS, help="the calls are spread over this many hours")
    args = parser.parse_args(argv)
    out = sys.stdout if args.out == "-" else open(args.out, "w")  # noqa: SIM115 - stdout is not ours to close
    total, n = 0.0, 0
    try:
        for payload in weekend_payloads(args.calls, args.seed, args.start, args.hours):
            out.write(json.dumps(payload) + "\n")
            total += payload["response_cost"]
            n += 1
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"wrote {n:,} calls, ${total:,.2f} (LLM and OCR), from {args.start} over {args.hours:g} h", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
