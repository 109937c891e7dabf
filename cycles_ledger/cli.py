"""`cycles`: budgets, balances, reservations and the event log from the command line.

The store is the one the proxy uses: `--store`, else `$CYCLES_STORE`, else `store:` of the settings file
(`--config`, else `$CYCLES_CONFIG`, else `./cycles.yaml` or `./configs/cycles.yaml`; a relative SQLite
path lives beside that file), else `sqlite:///cycles.db`. Every command names the store it used (on
stderr). Read commands never create a ledger. Exit status: 0 done, 1 a reservation was denied, 2 the
request failed (the message says why).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from .config import SettingsFile, apply_budgets, find_settings, load_budgets, settings_section, store_url
from .errors import ConfigError, CyclesError
from .ledger import Ledger, open_ledger
from .models import Amount, Balance, LedgerEvent, Reservation, Unit, format_amount
from .notify import Notifier, webhooks_from_settings
from .replay import render_replay, replay
from .report import build_report, parse_by, render_csv, render_json, render_table
from .report_html import render_html
from .spendlog import SpendLog
from .suggest import render_suggest, suggest
from .top import run as run_top

__all__ = ["main"]


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ts(ms: int | None) -> str:
    if ms is None:
        return ""
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _balances_table(rows: list[Balance]) -> str:
    """One row per budget; period, burn-rate and alert columns only when some budget has them."""
    timed = any(b.period or b.rate_limits or b.alerts for b in rows)
    headers = ["scope", "unit", "allocated", "spent", "reserved", "debt", "remaining", "status"]
    if timed:
        headers += ["period (resets)", "burn / limit", "alerts"]
    table = []
    for b in rows:
        row = [
            b.scope,
            b.unit.value,
            format_amount(b.allocated, b.unit),
            format_amount(b.spent, b.unit),
            format_amount(b.reserved, b.unit),
            format_amount(b.debt, b.unit),
            format_amount(b.remaining, b.unit),
            b.status.value + (" OVER-LIMIT" if b.is_over_limit else ""),
        ]
        if timed:
            row += [_period_text(b), _burn_text(b), ", ".join(f"{t}%" for t in b.alerts or [])]
        table.append(row)
    return _table(headers, table)


def _period_text(b: Balance) -> str:
    if not b.period:
        return ""
    every = b.period.get("every") or f"every {_duration(int(b.period['every_ms']))}"
    tz = f" {b.period['tz']}" if b.period.get("tz") and b.period["tz"] != "UTC" else ""
    return f"{every}{tz} ({_ts(b.period_end_ms)})" if b.period_end_ms else f"{every}{tz}"


def _burn_text(b: Balance) -> str:
    parts = []
    for lim, used in zip(b.rate_limits or [], b.burn or [0] * len(b.rate_limits or []), strict=False):
        freeze = " freeze" if lim.on_exceed == "freeze" else ""
        alert = f" alert {lim.alert_at}%" if lim.alert_at else ""
        parts.append(
            f"{format_amount(used, b.unit)}/{format_amount(lim.amount, b.unit)} per {_duration(lim.window_ms)}"
            f"{freeze}{alert}"
        )
    return "; ".join(parts)


def _duration(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def _reservations_table(rows: list[Reservation]) -> str:
    return _table(
        ["reservation", "status", "scope", "action", "reserved", "committed", "created", "expires"],
        [
            [
                r.reservation_id,
                r.status.value,
                r.scope_path,
                f"{r.action.kind}:{r.action.name}",
                str(r.reserved),
                str(r.committed) if r.committed else "",
                _ts(r.created_at_ms),
                _ts(r.expires_at_ms),
            ]
            for r in rows
        ],
    )


def _event_rows(rows: list[LedgerEvent]) -> list[list[Any]]:
    return [
        [
            e.event_id,
            _ts(e.ts_ms),
            e.type,
            e.scope,
            format_amount(e.amount, e.unit) if e.amount is not None and e.unit else "",
            e.model or "",
            e.route or "",
            e.call_id or "",
            e.reason_code or "",
        ]
        for e in rows
    ]


_EVENT_HEADERS = ["id", "time", "type", "scope", "amount", "model", "route", "call id", "reason"]
_EVENT_WIDTHS = [8, 23, 12, 36, 14, 28, 16, 36, 20]  # --follow pads to these (or the first table's, if wider)


def _line(row: list[Any], widths: list[int]) -> str:
    return "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()


async def _apply(ledger: Ledger, args: argparse.Namespace) -> int:
    entries = load_budgets(args.file)
    await apply_budgets(ledger, entries)
    print(f"applied {len(entries)} budgets from {args.file}")
    print(_balances_table(await ledger.balances()))
    return 0


async def _budget(ledger: Ledger, args: argparse.Namespace) -> int:
    if args.op == "set":
        bal = await ledger.set_budget(args.scope, args.amount, overdraft_limit=args.overdraft)
    elif args.op == "fund":
        bal = await ledger.fund(args.scope, args.amount)
    else:
        op = {"freeze": ledger.freeze, "unfreeze": ledger.unfreeze, "close": ledger.close}[args.op]
        bal = await op(args.scope, args.unit)
    print(_balances_table([bal]))
    return 0


async def _balances(ledger: Ledger, args: argparse.Namespace) -> int:
    rows = await ledger.balances(args.scope, unit=args.unit)
    print(json.dumps([b.model_dump(mode="json") for b in rows], indent=2) if args.json else _balances_table(rows))
    return 0


async def _reservations(ledger: Ledger, args: argparse.Namespace) -> int:
    rows = await ledger.list_reservations(status=args.status, scope=args.scope, limit=args.limit)
    print(json.dumps([r.model_dump(mode="json") for r in rows], indent=2) if args.json else _reservations_table(rows))
    return 0


async def _events(ledger: Ledger, args: argparse.Namespace) -> int:
    """Without --after: the newest --tail events, newest first (with --follow: oldest first, then new ones as
    they come, like `tail -f`). With --after: --limit events after that id, oldest first (paging)."""
    filters = {"scope": args.scope, "reservation_id": args.reservation}
    if args.after:
        rows = await ledger.events(after=args.after, limit=args.limit, **filters)
    else:
        rows = await ledger.events(limit=args.tail, newest=True, **filters)
        if args.follow:
            rows.reverse()
    last = max((e.event_id for e in rows), default=args.after)
    if args.json:
        for e in rows:
            print(json.dumps(e.model_dump(mode="json")))
    else:
        table = _event_rows(rows)
        widths = [
            max([w, len(h)] + [len(str(r[i])) for r in table])
            for i, (h, w) in enumerate(zip(_EVENT_HEADERS, _EVENT_WIDTHS, strict=True))
        ]
        print(_line(_EVENT_HEADERS, widths))
        print(_line(["-" * w for w in widths], widths))
        for row in table:
            print(_line(row, widths))
    while args.follow:
        sys.stdout.flush()
        await asyncio.sleep(0.5)
        rows = await ledger.events(after=last, limit=1000, **filters)
        for e in rows:
            if args.json:
                print(json.dumps(e.model_dump(mode="json")))
            else:
                print(_line(_event_rows([e])[0], widths))
            last = e.event_id
    return 0


async def _reserve(ledger: Ledger, args: argparse.Namespace) -> int:
    r = await ledger.reserve(
        args.subject,
        {"kind": args.kind, "name": args.name},
        args.amount,
        ttl_ms=args.ttl_ms,
        dry_run=args.dry_run,
        idempotency_key=args.key,
    )
    if args.json:
        print(json.dumps(r.model_dump(mode="json"), indent=2))
    elif r.allowed:
        what = "would be allowed" if r.dry_run else f"reserved {r.reserved} as {r.reservation_id}"
        print(f"{r.decision.value}: {what}")
    else:
        unit = Amount.parse(args.amount).unit
        left = format_amount(r.remaining, unit) if r.remaining is not None else "?"
        print(f"{'dry run, would ' if r.dry_run else ''}DENY: {r.reason_code} at {r.scope} (remaining {left})")
    return 0 if r.allowed else 1


async def _commit(ledger: Ledger, args: argparse.Namespace) -> int:
    c = await ledger.commit(args.reservation_id, args.amount)
    print(f"COMMITTED {c.charged}" + (f", released {c.released}" if c.released else ""))
    return 0


async def _release(ledger: Ledger, args: argparse.Namespace) -> int:
    r = await ledger.release(args.reservation_id, reason=args.reason)
    print(f"RELEASED {r.released}")
    return 0


async def _sweep(ledger: Ledger, args: argparse.Namespace) -> int:
    print(f"expired {await ledger.sweep()} reservations")
    return 0


async def _verify(ledger: Ledger, args: argparse.Namespace) -> int:
    problems = await ledger.verify()
    for p in problems:
        print(p)
    print("books agree" if not problems else f"{len(problems)} discrepancies")
    return 0 if not problems else 2


def _notifier(ledger: Ledger, args: argparse.Namespace) -> Notifier:
    found = find_settings(args.config)
    hooks = webhooks_from_settings(settings_section(found, "notify"), f"{found.path or 'settings'}: notify")
    if not hooks:
        raise ConfigError(f"no webhooks: add `notify: {{webhooks: [...]}}` to the settings ({found.found_by})")
    return Notifier(ledger, hooks)


async def _notify(ledger: Ledger, args: argparse.Namespace) -> int:
    notifier = _notifier(ledger, args)
    if args.once:
        try:
            print(f"delivered {await notifier.run_once()}")
        finally:
            await notifier.aclose()
        return 0
    print(f"delivering to {', '.join(h.name for h in notifier.webhooks)} (Ctrl-C stops)", file=sys.stderr)
    await notifier.run_forever(args.interval)
    return 0


async def _alerts(ledger: Ledger, args: argparse.Namespace) -> int:
    notifier = _notifier(ledger, args)
    try:
        if args.op == "replay":
            ok, failed = await notifier.replay(args.webhook, args.event)
            print(f"delivered {ok}, still failing {failed}")
            return 0 if not failed else 1
        letters = await notifier.dead_letters()
        if args.json:
            print(json.dumps([dataclasses.asdict(d) for d in letters], indent=2))
        else:
            rows = [
                [d.webhook, d.event_id, d.event.get("type", ""), d.attempts, _ts(d.failed_at_ms), d.error]
                for d in letters
            ]
            print(_table(["webhook", "event", "type", "attempts", "failed at", "error"], rows))
        return 0
    finally:
        await notifier.aclose()


async def _report(ledger: Ledger, args: argparse.Namespace) -> int:
    report = await build_report(
        ledger, by=parse_by(args.by), scope=args.scope, since=args.since, until=args.until, depth=args.depth
    )
    if args.html:
        Path(args.html).write_text(render_html(report, stack=args.stack), encoding="utf-8")
        print(f"wrote {args.html}", file=sys.stderr)
    print(render_csv(report) if args.csv else render_json(report) if args.json else render_table(report))
    return 0


async def _top(ledger: Ledger, args: argparse.Namespace) -> int:
    await run_top(ledger, scope=args.scope, minutes=args.minutes, interval=args.interval, once=args.once)
    return 0


def _spend_log(args: argparse.Namespace) -> SpendLog:
    """The log files through the LiteLLM / Langfuse readers of cycles_litellm (imported only here)."""
    try:
        from cycles_litellm.spend_logs import read_for_cli
    except ImportError as exc:
        needs = "reading spend logs needs cycles_litellm (pip install 'cycles-litellm[litellm]')"
        raise ConfigError(f"{needs}: {exc}") from None
    log = read_for_cli(
        args.log,
        log_format=args.format,
        config=args.config,
        subject_fields=args.subject_field,
        subject_defaults=args.subject_default,
        run_field=args.run_field,
        estimates=args.estimates,
    )
    print(f"read {len(log.records):,} calls, skipped {len(log.skipped)} bad lines", file=sys.stderr)
    return log


def _replay(args: argparse.Namespace) -> int:
    report = asyncio.run(replay(_spend_log(args), load_budgets(args.budgets), unbudgeted=args.unbudgeted))
    print(json.dumps(report.to_json(), indent=2) if args.json else render_replay(report))
    return 0


def _suggest(args: argparse.Namespace) -> int:
    s = suggest(_spend_log(args), headroom=args.headroom, window=args.window, tz=args.tz, scope_prefixes=args.scope)
    if args.json:
        print(json.dumps(s.to_json(), indent=2))
    elif args.out:
        Path(args.out).write_text(s.yaml(), encoding="utf-8")
        print(render_suggest(s) + f"\n\nwrote {args.out} (apply with: cycles budgets apply {args.out})")
    else:
        print(render_suggest(s) + "\n", file=sys.stderr)
        print(s.yaml(), end="")
    return 0


async def _metrics(ledger: Ledger, args: argparse.Namespace) -> int:
    # The exporter lives with the plugin (it reads the plugin's settings); it imports no litellm.
    from cycles_litellm.metrics import serve
    from cycles_litellm.settings import load_settings

    text = await serve(ledger, load_settings(args.config), port=args.port, host=args.host, once=args.once)
    if text is not None:
        print(text, end="")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cycles", description="Budget authority ledger for AI agents.")
    p.add_argument("--store", help="store URL (default: $CYCLES_STORE, else store: of the settings file)")
    p.add_argument("--config", help="the settings file (default: $CYCLES_CONFIG, ./cycles.yaml, ./configs/cycles.yaml)")
    sub = p.add_subparsers(dest="command", required=True)

    units = [u.value for u in Unit]

    budgets = sub.add_parser("budgets", help="apply a budgets file").add_subparsers(dest="op", required=True)
    ap = budgets.add_parser("apply", help="create or update every budget in a YAML file")
    ap.add_argument("file")
    ap.set_defaults(fn=_apply)

    budget = sub.add_parser("budget", help="change one budget").add_subparsers(dest="op", required=True)
    s = budget.add_parser("set", help="set the allocation, e.g. `cycles budget set tenant:acme 25usd`")
    s.add_argument("scope")
    s.add_argument("amount")
    s.add_argument("--overdraft", help="overdraft limit, e.g. 5usd")
    s.set_defaults(fn=_budget)
    f = budget.add_parser("fund", help="add to the allocation (repays debt first)")
    f.add_argument("scope")
    f.add_argument("amount")
    f.set_defaults(fn=_budget)
    for op in ("freeze", "unfreeze", "close"):
        x = budget.add_parser(op, help=f"{op} a budget")
        x.add_argument("scope")
        x.add_argument("--unit", default="USD_MICROCENTS", choices=units)
        x.set_defaults(fn=_budget)

    b = sub.add_parser("balances", help="show budgets at a scope and below")
    b.add_argument("scope", nargs="?")
    b.add_argument("--unit", choices=units)
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=_balances)

    r = sub.add_parser("reservations", help="list reservations, newest first")
    r.add_argument("--status", choices=["ACTIVE", "COMMITTED", "RELEASED", "EXPIRED"])
    r.add_argument("--scope")
    r.add_argument("--limit", type=int, default=50)
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=_reservations)

    e = sub.add_parser("events", help="the audit log: the newest events first, with model and call id")
    e.add_argument("--tail", type=int, default=20, help="how many of the newest events (default 20)")
    e.add_argument("--follow", "-f", action="store_true", help="then keep printing new events as they come")
    e.add_argument("--after", type=int, default=0, help="page instead: events after this id, oldest first")
    e.add_argument("--limit", type=int, default=100, help="with --after: how many")
    e.add_argument("--scope")
    e.add_argument("--reservation")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=_events)

    rv = sub.add_parser("reserve", help="reserve an amount for a subject, e.g. tenant:acme/workflow:docs 0.5usd")
    rv.add_argument("subject")
    rv.add_argument("amount")
    rv.add_argument("--kind", default="cli.manual")
    rv.add_argument("--name", default="cycles-cli")
    rv.add_argument("--ttl-ms", type=int)
    rv.add_argument("--key", help="idempotency key")
    rv.add_argument("--dry-run", action="store_true")
    rv.add_argument("--json", action="store_true")
    rv.set_defaults(fn=_reserve)

    c = sub.add_parser("commit", help="commit the actual amount of a reservation")
    c.add_argument("reservation_id")
    c.add_argument("amount")
    c.set_defaults(fn=_commit)

    rl = sub.add_parser("release", help="release a reservation")
    rl.add_argument("reservation_id")
    rl.add_argument("--reason")
    rl.set_defaults(fn=_release)

    sub.add_parser("sweep", help="expire overdue reservations now").set_defaults(fn=_sweep)
    n = sub.add_parser("notify", help="deliver events to the webhooks of the settings' notify: section")
    n.add_argument("--once", action="store_true", help="one pass to the end of the log, then exit")
    n.add_argument("--interval", type=float, default=1.0, help="seconds between passes (default 1)")
    n.set_defaults(fn=_notify)
    al = sub.add_parser("alerts", help="webhook deliveries that failed (dead letters); `replay` sends them again")
    al.add_argument("op", nargs="?", choices=["list", "replay"], default="list")
    al.add_argument("--webhook", help="only this webhook's")
    al.add_argument("--event", type=int, help="only this event id")
    al.add_argument("--json", action="store_true")
    al.set_defaults(fn=_alerts)
    sub.add_parser("verify", help="reconcile balances with reservations and events").set_defaults(fn=_verify)
    rp = sub.add_parser("report", help="spend by scope, model, route and day from the event log")
    rp.add_argument("--scope", help="only this scope and below")
    rp.add_argument("--since", help="from this UTC date (2026-12-01) or ISO date-time")
    rp.add_argument("--until", help="up to this UTC date (included) or ISO date-time (excluded)")
    rp.add_argument("--by", action="append", help="group keys, combinable: scope,model,route,day (default scope,model)")
    rp.add_argument("--depth", type=int, help="cut scopes to this many levels (1: tenants)")
    out = rp.add_mutually_exclusive_group()
    out.add_argument("--csv", action="store_true")
    out.add_argument("--json", action="store_true")
    rp.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report with charts")
    rp.add_argument("--stack", choices=["model", "scope"], default="model", help="what the HTML chart stacks by")
    rp.set_defaults(fn=_report)
    tp = sub.add_parser("top", help="live balances, burn rates and spend per minute (Ctrl-C quits)")
    tp.add_argument("--scope", help="only this scope and below")
    tp.add_argument("--minutes", type=int, default=10, help="spend per minute over this many minutes (default 10)")
    tp.add_argument("--interval", type=float, default=1.0, help="seconds between frames (default 1)")
    tp.add_argument("--once", action="store_true", help="print one frame and exit")
    tp.set_defaults(fn=_top)
    mt = sub.add_parser("metrics", help="serve the ledger's Prometheus metrics on http://HOST:PORT/metrics")
    mt.add_argument("--port", type=int, default=9464, help="port to listen on (default 9464)")
    mt.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    mt.add_argument("--once", action="store_true", help="print the metrics once and exit")
    mt.set_defaults(fn=_metrics)
    logs = argparse.ArgumentParser(add_help=False)  # reading past spend: LiteLLM's logging payload, Langfuse exports
    logs.add_argument("log", nargs="+", help="JSONL / JSON files or directories of them (.gz too)")
    logs.add_argument("--format", choices=["auto", "litellm", "langfuse"], default="auto")
    logs.add_argument("--subject-field", action="append", default=[], metavar="LEVEL=PATH", help="e.g. tenant=user_id")
    logs.add_argument("--subject-default", action="append", default=[], metavar="LEVEL=VALUE", help="e.g. tenant=acme")
    logs.add_argument("--run-field", metavar="PATH", help="what a run is (default: run dimension, session, trace)")
    logs.add_argument("--estimates", choices=["auto", "logged", "actual"], default="auto", help="what a call holds")
    logs.add_argument("--json", action="store_true")
    ry = sub.add_parser("replay", parents=[logs], help="a past spend log through a budgets file, on no real ledger")
    ry.add_argument("--budgets", required=True, help="budgets file (configs/budgets.yaml format)")
    ry.add_argument("--unbudgeted", choices=["allow", "deny"], default="allow", help="calls no budget applies to")
    ry.set_defaults(offline=_replay)
    sg = sub.add_parser("suggest", parents=[logs], help="budgets and burn-rate limits from the percentiles of a log")
    sg.add_argument("--headroom", type=float, default=1.5, help="multiplier on the percentiles (default 1.5)")
    sg.add_argument("--window", default="10m", help="rate-limit window (default 10m)")
    sg.add_argument("--tz", default="UTC", help="time zone of days and daily periods (default UTC)")
    sg.add_argument("--scope", action="append", default=[], help="only this scope and below (repeatable)")
    sg.add_argument("--out", "-o", help="write the budgets YAML here (default: stdout, the table on stderr)")
    sg.set_defaults(offline=_suggest)
    return p


_READS = frozenset({"balances", "reservations", "events", "verify", "notify", "alerts", "report", "top", "metrics"})


def _missing_sqlite_file(url: str) -> Path | None:
    """The file of a `sqlite:///` URL that does not exist yet (None for other stores and :memory:)."""
    if not url.startswith("sqlite:///") or ":memory:" in url:
        return None
    path = Path(url[len("sqlite:///") :].split("?", 1)[0])
    return None if path.exists() else path


def _store_for(args: argparse.Namespace) -> tuple[str, str]:
    """The store URL and where it came from, as the proxy would find it."""
    found: SettingsFile = find_settings(args.config)
    url = store_url(args.store, found)
    if args.store:
        origin = "--store"
    elif os.environ.get("CYCLES_STORE"):
        origin = "$CYCLES_STORE"
    elif found.path is not None:
        origin = f"store: of {found.path}"
    else:
        origin = f"default; {found.found_by}"
    return url, origin


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "offline", None) is not None:  # replay, suggest: private in-process ledgers, no store
        try:
            return int(args.offline(args))
        except CyclesError as exc:
            print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
            return 2
    fn: Callable[[Ledger, argparse.Namespace], Awaitable[int]] = args.fn

    async def run(url: str) -> int:
        async with open_ledger(url) as ledger:
            return await fn(ledger, args)

    try:
        url, origin = _store_for(args)
        print(f"store: {url} ({origin})", file=sys.stderr)
        if url.lower().startswith("memory://"):
            print(
                "error: memory:// lives inside one process and every `cycles` command is a new one; "
                "point --store at sqlite:///… or redis://… to keep budgets between commands",
                file=sys.stderr,
            )
            return 2
        missing = _missing_sqlite_file(url)
        reading = args.command in _READS or (args.command == "reserve" and args.dry_run)
        if missing is not None and reading:
            print(
                f"error: no ledger at {missing}: nothing to show. Check --config / --store, or create it with "
                "`cycles budget set` or `cycles budgets apply`",
                file=sys.stderr,
            )
            return 2
        return asyncio.run(run(url))
    except CyclesError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
