"""The seed story, replayed and stopped: a document agent whose paid OCR tool keeps failing retries forever.

Once, over a weekend, such a loop made 4,700 calls and cost $2,800. Here the same loop runs against a real
LiteLLM proxy with the Cycles callback (in front of a fake OpenAI upstream on loopback: no key, no network)
and an `@metered` OCR tool, both drawing on one run budget on tenant:acme/workflow:doc-processing.

    make demo                                          # = python examples/runaway_agent.py ($30 budget)
    python examples/runaway_agent.py --quick           # $2 budget: a few seconds after the proxy is up
    python examples/runaway_agent.py --mode shadow     # never blocks; reports the call enforcement would stop
    python examples/runaway_agent.py --budget 50usd --max-iterations 2000 --keep

Each iteration: ask gpt-4o (through the proxy) what to do with the document, parse the answer, call the paid
OCR API, which bills every attempt and fails on most of these scans; on failure, go round again.

Exit code 0 when enforcement stopped the run within its budget (or, in shadow mode, when the ledger names the
call enforcement would have stopped); 1 otherwise. The last line is machine-readable:
`RESULT mode=<m> stopped_at_call=<n> spent_usd=<x> budget_usd=<y> ...`.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

import cycles_tools
from cycles_ledger import (
    Action,
    Amount,
    BudgetDenied,
    InvalidRequestError,
    ReservationStatus,
    SyncLedger,
    Unit,
    open_ledger_sync,
)
from cycles_tools import budget_scope, litellm_headers, metered

TENANT, WORKFLOW = "acme", "doc-processing"
SCOPE = f"tenant:{TENANT}/workflow:{WORKFLOW}"
USD = 100_000_000  # USD_MICROCENTS per dollar
MODEL = "gpt-4o"  # LiteLLM's price map: $2.50 / $10 per million input / output tokens
MAX_TOKENS = 1024  # the agent asks for room to think: the proxy reserves the worst case
PRICE_PER_PAGE = 6_500_000  # $0.065 per page, what a forms-and-tables extraction API charges
FAILURE_RATE = 0.9  # these scans are bad: nine attempts in ten fail (and are billed)
SEED_CALLS, SEED_USD = 4_700, 2_800  # the weekend this demo replays
OCR_ACTION = Action(kind="tool.ocr", name="ocr.extract")


def micro(n: int) -> Amount:
    return Amount(unit=Unit.USD_MICROCENTS, amount=n)


def usd(n: int, digits: int = 2) -> str:
    return f"${n / USD:,.{digits}f}"


def parse_budget(text: str) -> int:
    """`30usd`, `$30`, `30` (dollars) -> USD_MICROCENTS."""
    text = text.strip()
    try:
        amount = Amount.parse(text + "usd" if text.replace(".", "", 1).isdigit() else text)
    except InvalidRequestError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if amount.unit is not Unit.USD_MICROCENTS or amount.amount <= 0:
        raise argparse.ArgumentTypeError(f"budget must be a positive dollar amount like 30usd, got {text!r}")
    return amount.amount


# -- the agent's world: documents and a flaky paid OCR API --------------------------------------


@dataclass(frozen=True)
class Doc:
    id: str
    pages: int


@dataclass(frozen=True)
class OcrResult:
    """What the OCR provider answers. A failed attempt is still billed: it processed the pages."""

    ok: bool
    pages: int
    billed: int  # USD_MICROCENTS
    error: str | None = None


def inbox(rng: random.Random) -> Iterator[Doc]:
    """An endless queue of scanned contracts, 1-5 pages each."""
    n = 7700
    while True:
        n += 1
        yield Doc(f"contract-{n}.pdf", rng.randint(1, 5))


class FlakyOcrApi:
    """Stands in for the paid provider (no network): charges per page per attempt, usually fails."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def extract(self, doc: Doc) -> OcrResult:
        billed = doc.pages * PRICE_PER_PAGE
        if self.rng.random() < FAILURE_RATE:
            return OcrResult(False, doc.pages, billed, "UNPROCESSABLE_DOCUMENT: low-confidence scan, try again")
        return OcrResult(True, doc.pages, billed)


def metered_ocr(api: FlakyOcrApi, run: Run) -> Callable[[Doc], OcrResult]:
    """The tool as the agent sees it: reserve the page price before the call, commit what was billed. In
    shadow mode (`cycles_tools.configure(mode="shadow")`) the same decorator only evaluates: the ledger logs
    would_allow / would_deny under the call's key, the tool always runs, and what it billed is debited."""

    def key(doc: Doc) -> str:
        k = f"{run.run_id}:ocr:{run.current}"
        run.keys[k] = run.current
        return k

    @metered(
        kind=OCR_ACTION.kind,
        name=OCR_ACTION.name,
        estimate=lambda doc: doc.pages * PRICE_PER_PAGE,
        actual=lambda result: result.billed,
        idempotency_key=key,
    )
    def ocr_extract(doc: Doc) -> OcrResult:
        return api.extract(doc)  # a failed attempt comes back as a result (and is paid), not as an exception

    return ocr_extract


# -- the run's bookkeeping ----------------------------------------------------------------------


class LlmRefused(Exception):
    """The proxy answered 402: the budget authority refused this LLM call before it reached the model."""

    def __init__(self, body: dict[str, Any]) -> None:
        error = body.get("error") or {}
        details = error.get("cycles") or {}
        super().__init__(error.get("message", "402"))
        self.code = str(error.get("code") or "?")
        self.scope = details.get("scope")
        self.remaining = details.get("remaining")
        self.estimate = details.get("estimate")


@dataclass
class Stop:
    call: int  # the number of the refused call (1-based, LLM and tool calls counted together)
    elapsed: float
    by: str
    reason: str
    scope: str | None
    remaining: int | None
    estimate: int | None
    spent_before: int


@dataclass
class Run:
    mode: str
    budget: int
    run_id: str
    started: float = field(default_factory=time.monotonic)
    iterations: int = 0
    llm_calls: int = 0
    tool_calls: int = 0
    tool_failures: int = 0
    docs_done: int = 0
    llm_spend: int = 0
    tool_spend: int = 0
    clamped: int = 0
    keys: dict[str, int] = field(default_factory=dict)  # idempotency key / LLM call id -> call number
    timeline: dict[int, tuple[float, int]] = field(default_factory=dict)  # call number -> (elapsed, spent before)
    current: int = 0  # the number of the call in progress
    event_cursor: int = 0  # the last ledger event settled_cost has looked at (shadow mode)
    stop: Stop | None = None
    interrupted: bool = False
    ended: float = 0.0

    @property
    def calls(self) -> int:
        return self.llm_calls + self.tool_calls

    @property
    def spent(self) -> int:
        return self.llm_spend + self.tool_spend

    def elapsed(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def next_call(self) -> int:
        self.current = self.calls + 1
        self.timeline[self.current] = (self.elapsed(), self.spent)
        return self.current


# -- one LLM call through the proxy -------------------------------------------------------------


def llm_body(doc: Doc, last_error: str | None) -> dict[str, Any]:
    """The agent's chat request for one step (also what `weekend_log.py` writes into its log)."""
    user = f"Document {doc.id} ({doc.pages} pages) needs its fields extracted."
    if last_error:
        user += f" The OCR tool failed: {last_error}."
    return {
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "messages": [
            {"role": "system", "content": "You process scanned contracts. Tools: ocr.extract(doc). Never give up."},
            {"role": "user", "content": user},
        ],
    }


def ask_llm(client: httpx.Client, ledger: SyncLedger, run: Run, doc: Doc, last_error: str | None) -> str:
    """POST /v1/chat/completions with the budget subject in `x-cycles-*` headers; wait for the proxy's
    background settle so this run's numbers are exact and reproducible (a real agent would not wait:
    the hold covers the gap)."""
    n = run.next_call()
    r = client.post("/v1/chat/completions", json=llm_body(doc, last_error), headers=litellm_headers())
    if r.status_code == 402:
        raise LlmRefused(r.json())
    r.raise_for_status()
    run.llm_calls += 1
    call_id = r.headers["x-litellm-call-id"]
    run.keys[call_id] = n
    if r.headers.get("x-cycles-decision") == "ALLOW_WITH_CAPS" and run.mode == "enforce":
        run.clamped += 1
    run.llm_spend += settled_cost(ledger, run, r.headers.get("x-cycles-reservation-id"), call_id)
    return str(r.json()["choices"][0]["message"]["content"])


def settled_cost(ledger: SyncLedger, run: Run, reservation_id: str | None, call_id: str, timeout: float = 10.0) -> int:
    """What the ledger charged for one proxied call, once the plugin has settled it: the commit of its
    reservation (enforce) or the debit recorded under `actual:<call id>` (shadow)."""
    deadline = time.monotonic() + timeout
    while True:
        if reservation_id is not None:
            res = ledger.get_reservation(reservation_id)
            if res.status is not ReservationStatus.ACTIVE:
                return res.committed.amount if res.committed else 0
        else:
            for ev in ledger.events(scope=SCOPE, after=run.event_cursor, limit=1000):
                run.event_cursor = ev.event_id  # the log only grows: an event seen once need not be seen again
                if ev.type == "debited" and ev.data.get("key") == f"actual:{call_id}":
                    return int(ev.data.get("actual", ev.amount or 0))
        if time.monotonic() >= deadline:
            raise TimeoutError(f"the proxy did not settle {call_id} within {timeout:.0f} s")
        time.sleep(0.002)


def parse_plan(answer: str) -> str:
    """The agent's parser: anything but an explicit "give up" means call the OCR tool again (the weekend's
    bug). The fake model answers filler words, so it never gives up; the real one didn't either."""
    return "give_up" if "give up" in answer.lower() else "ocr.extract"


# -- the loop -----------------------------------------------------------------------------------


def agent_loop(
    run: Run,
    client: httpx.Client,
    ledger: SyncLedger,
    ocr: Callable[[Doc], OcrResult],
    iterations: int,
    progress: Callable[[Run], None],
    seed: int,
) -> None:
    """The weekend's loop: LLM, parse, paid tool; on a tool error, go round again. Budget denials propagate."""
    rng = random.Random(seed)
    with budget_scope(tenant=TENANT, workflow=WORKFLOW):
        for doc in inbox(rng):
            error: str | None = None
            while True:
                if run.iterations >= iterations:
                    return
                run.iterations += 1
                plan = parse_plan(ask_llm(client, ledger, run, doc, error))
                if plan != "ocr.extract":
                    break
                run.next_call()
                result = ocr(doc)
                run.tool_calls += 1
                run.tool_spend += result.billed
                run.docs_done += int(result.ok)
                run.tool_failures += int(not result.ok)
                progress(run)
                if result.ok:
                    break
                error = result.error


def run_loop(run: Run, *args: Any) -> None:
    """agent_loop, turning whatever stopped it into `run.stop` / `run.interrupted`."""
    try:
        agent_loop(run, *args)
    except LlmRefused as exc:
        run.stop = _stop(
            run, f"LLM call ({MODEL} via the proxy): HTTP 402", exc.code, exc.scope, exc.remaining, exc.estimate
        )
    except BudgetDenied as exc:
        run.stop = _stop(
            run,
            f"tool {OCR_ACTION.name} (@metered): BudgetDenied",
            exc.reason_code,
            exc.scope,
            exc.remaining,
            exc.estimate,
        )
    except KeyboardInterrupt:
        run.interrupted = True
    finally:
        run.ended = time.monotonic()


def _stop(run: Run, by: str, reason: str, scope: Any, remaining: Any, estimate: Any) -> Stop:
    n = max(run.timeline)  # the refused call was the last one started
    elapsed, spent_before = run.timeline[n]
    return Stop(n, elapsed, by, reason, scope, remaining, estimate, spent_before)


def shadow_stop(run: Run, ledger: SyncLedger) -> Stop | None:
    """The first would_deny on the run's scope, mapped back to the call that produced it."""
    after = 0
    while True:
        events = ledger.events(scope=SCOPE, after=after, limit=1000)
        if not events:
            return None
        for ev in events:
            key = str(ev.data.get("key", "")).removeprefix("shadow:")  # @metered's shadow keys
            if ev.type == "would_deny" and key in run.keys:
                n = run.keys[key]
                elapsed, spent_before = run.timeline[n]
                kind = (ev.data.get("action") or {}).get("kind", "")
                by = (
                    f"LLM call ({MODEL} via the proxy): would be 402"
                    if kind.startswith("llm")
                    else f"tool {OCR_ACTION.name}: would raise BudgetDenied"
                )
                return Stop(
                    n, elapsed, by, ev.reason_code or "?", ev.scope, ev.data.get("remaining"), ev.amount, spent_before
                )
        after = events[-1].event_id


# -- output -------------------------------------------------------------------------------------


def progress_printer(every: int) -> Callable[[Run], None]:
    tty = sys.stdout.isatty()

    def show(run: Run) -> None:
        if not tty and run.iterations % every:
            return
        line = (
            f"  call {run.calls:>5} | LLM {run.llm_calls:>4} calls {usd(run.llm_spend, 4):>8} | "
            f"OCR {run.tool_calls:>4} attempts, {run.tool_failures:>4} failed {usd(run.tool_spend):>8} | "
            f"spent {usd(run.spent)} of {usd(run.budget)} | {run.elapsed():5.1f} s"
        )
        print("\r" + line if tty else line, end="" if tty else "\n", flush=True)

    return show


def report(run: Run, ledger: SyncLedger, proxy_start_s: float) -> int:
    """Print the table and the RESULT line; return the exit code."""
    if sys.stdout.isatty():
        print()
    balance = ledger.balance(SCOPE)
    stop = run.stop
    per_call = run.spent / run.calls if run.calls else 0.0
    rows: list[tuple[str, str]] = [
        (
            "mode",
            "enforce: the proxy and @metered refuse what does not fit"
            if run.mode == "enforce"
            else "shadow: nothing blocked; the ledger logs would_deny",
        ),
        ("budget", f"{usd(run.budget)} on {SCOPE}"),
        (
            "calls made",
            f"{run.calls:,} ({run.llm_calls:,} LLM via the proxy, {run.tool_calls:,} OCR tool; "
            f"{run.tool_failures:,} OCR attempts failed, {run.docs_done:,} documents done)",
        ),
        (
            "LLM spend",
            f"{usd(run.llm_spend, 4)} ({MODEL}, {MAX_TOKENS} max_tokens asked"
            + (f"; {run.clamped} clamped to fit" if run.clamped else "")
            + ")",
        ),
        ("tool spend", f"{usd(run.tool_spend)} (${PRICE_PER_PAGE / USD:.3f}/page, every attempt billed)"),
        ("total spent", _ledger_check(run, ledger)),
    ]
    if run.mode == "enforce":
        if stop is not None:
            rows += [
                (
                    "stopped at",
                    f"call {stop.call:,} (after {stop.call - 1:,} calls), {stop.elapsed:.1f} s into the run",
                ),
                ("stopped by", stop.by),
                ("why", _why(stop)),
            ]
        else:
            rows.append(
                (
                    "stopped at",
                    "not stopped by the budget: " + ("Ctrl-C" if run.interrupted else "--max-iterations cap"),
                )
            )
    else:
        if stop is not None:
            rows += [
                (
                    "would stop at",
                    f"call {stop.call:,}, {stop.elapsed:.1f} s into the run, with {usd(stop.spent_before)} spent",
                ),
                ("would stop by", stop.by),
                ("why", _why(stop)),
                (
                    "overspend",
                    f"{usd(max(run.spent - run.budget, 0))} over the budget, in the {run.calls - stop.call + 1:,} "
                    "calls from there on",
                ),
            ]
        else:
            rows.append(("would stop at", "nowhere: the run stayed within budget (raise --iterations)"))
    rows += [
        ("cost per call", f"{usd(round(per_call), 4)} measured in this run"),
        (
            f"unchecked, {SEED_CALLS:,} calls",
            f"{usd(round(per_call * SEED_CALLS))} at this run's rate "
            f"(the seed's weekend: {SEED_CALLS:,} calls, ${SEED_USD:,})",
        ),
        ("runtime", f"{run.elapsed():.1f} s loop + {proxy_start_s:.1f} s proxy start-up"),
    ]
    width = max(len(k) for k, _ in rows)
    title = f" Runaway agent: {run.mode} "
    print(f"\n{title:=^{width + 60}}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print("=" * (width + 60))

    if run.mode == "enforce":
        ok = stop is not None and balance.spent <= run.budget and not run.interrupted
        spent = balance.spent
    else:
        ok = stop is not None
        spent = stop.spent_before if stop else run.spent
    result = {
        "mode": run.mode,
        "stopped_at_call": stop.call if stop else "none",
        "spent_usd": f"{spent / USD:.2f}",
        "budget_usd": f"{run.budget / USD:.2f}",
        "calls": run.calls,
        "reason": stop.reason if stop else "none",
        "elapsed_s": f"{stop.elapsed if stop else run.elapsed():.2f}",
    }
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))
    return 0 if ok else 1


def _ledger_check(run: Run, ledger: SyncLedger) -> str:
    """The run's own tally beside the ledger's: committed spend (enforce) or the debits' actuals (shadow)."""
    b = ledger.balance(SCOPE)
    if run.mode == "enforce":
        same = "= ledger spent" if b.spent == run.spent else f"but ledger spent {usd(b.spent, 8)}"
        if run.interrupted:
            same += ", with the interrupted call"
        return f"{usd(run.spent)} {same} (reserved {usd(b.reserved)}, remaining {usd(b.remaining)})"
    debits, after = 0, 0
    while events := ledger.events(scope=SCOPE, after=after, limit=1000):
        debits += sum(int(ev.data.get("actual", 0)) for ev in events if ev.type == "debited")
        after = events[-1].event_id
    same = "= the ledger's debits" if debits == run.spent else f"but ledger debits {usd(debits, 8)}"
    return (
        f"{usd(run.spent)} {same} (its balance: spent {usd(b.spent)} + debt {usd(b.debt)}; "
        "past the allocation the excess is debt)"
    )


def _why(stop: Stop) -> str:
    left = usd(stop.remaining, 4) if isinstance(stop.remaining, int) else "?"
    need = usd(stop.estimate, 4) if isinstance(stop.estimate, int) else "?"
    return f"{stop.reason} at {stop.scope}: remaining {left}, the call needed up to {need}"


# -- lifecycle ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["enforce", "shadow"], default="enforce")
    parser.add_argument("--budget", type=parse_budget, help="run budget (default 30usd, 2usd with --quick)")
    parser.add_argument("--quick", action="store_true", help="a $2 budget: done in seconds (for CI)")
    parser.add_argument("--max-iterations", type=int, default=5_000, help="safety cap on loop iterations")
    parser.add_argument(
        "--iterations", type=int, help="shadow mode: iterations to run (default: enough to spend 1.5x the budget)"
    )
    parser.add_argument("--seed", type=int, default=7, help="seed for page counts and OCR failures")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (ledger, cycles.yaml, proxy.log)")
    args = parser.parse_args(argv)
    budget = args.budget or parse_budget("2usd" if args.quick else "30usd")
    iterations = args.max_iterations
    if args.mode == "shadow":
        mean_iteration = 3 * PRICE_PER_PAGE  # 3 pages on average; the LLM's share is small
        iterations = min(args.iterations or math.ceil(1.5 * budget / mean_iteration), args.max_iterations)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)  # `kill` stops the proxy too, like Ctrl-C

    from cycles_litellm.fake_provider import FakeUpstream
    from cycles_litellm.launch import ProxyStartError, start_proxy

    workdir = Path(tempfile.mkdtemp(prefix="cycles-runaway-"))
    upstream = FakeUpstream()
    proxy = None
    code = 1
    try:
        upstream.start()
        print(f"fake OpenAI upstream on {upstream.base_url}")
        print(
            f"starting the LiteLLM proxy (litellm --config configs/litellm.yaml, mode: {args.mode}); ~10-20 s ...",
            flush=True,
        )
        t0 = time.monotonic()
        try:
            proxy = start_proxy(upstream.base_url, workdir, cycles_overrides={"mode": args.mode})
        except ProxyStartError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        proxy_start_s = time.monotonic() - t0
        kept = "" if args.keep else " (removed at exit; --keep keeps it)"
        print(f"proxy live at {proxy.url} after {proxy_start_s:.1f} s; ledger {proxy.store_url}{kept}")

        with open_ledger_sync(proxy.store_url) as ledger:
            ledger.set_budget(SCOPE, micro(budget))
            cycles_tools.configure(store=proxy.store_url, mode=args.mode)
            run = Run(args.mode, budget, run_id=workdir.name)
            api = FlakyOcrApi(random.Random(args.seed + 1))
            ocr = metered_ocr(api, run)
            limit = "until the budget says no" if args.mode == "enforce" else f"for {iterations} iterations"
            print(f"\nbudget {usd(budget)} on {SCOPE}; running the agent {limit} (cap {args.max_iterations}) ...")
            every = max(1, iterations // 10) if args.mode == "shadow" else 10 if budget <= 5 * USD else 25
            with httpx.Client(base_url=proxy.url, headers=proxy.auth_headers, timeout=60.0) as client:
                run_loop(run, client, ledger, ocr, iterations, progress_printer(every), args.seed)
            if args.mode == "shadow":
                run.stop = shadow_stop(run, ledger)
            code = report(run, ledger, proxy_start_s)
            if run.interrupted:
                code = 130
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave the proxy running
        if proxy is not None:
            proxy.stop()
        upstream.stop()
        if args.keep:
            print(
                f"kept {workdir} (try: .venv/bin/cycles --store sqlite:///{workdir}/ledger.db events)", file=sys.stderr
            )
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
