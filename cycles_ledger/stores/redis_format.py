"""The Redis store's texts, read in Python: budgets, reservation records and their holds in other units,
events, and the script replies built from them. `redis.lua` writes them (its header draws each format);
this module turns them into the dicts the Python engine returns, so both stores answer alike.
"""

from __future__ import annotations

import json
from typing import Any

from ..rules import ReservationState

__all__ = [
    "SEP",
    "alerts_text",
    "amounts_text",
    "balance",
    "balances",
    "event",
    "event_id",
    "holds",
    "limits_text",
    "period_text",
    "read_balances",
    "record",
    "reservation",
    "stream_id",
]

SEP = "\x1f"  # joins the fields of a script's arguments and of the answers kept for replays
_PLAIN: dict[str, Any] = {}  # a budget without time policies shows no time fields (BudgetState.as_balance)
_ON_EXCEED = {"t": "throttle", "f": "freeze"}


def balance(field: str, text: str) -> dict[str, Any]:
    """One budget from its hash field `scope|unit` and text `a s r d o x STATUS[ ~time][ caps JSON]`."""
    return balances([field, text], 0)[0]


def balances(flat: list[Any], start: int, step: int = 2) -> list[dict[str, Any]]:
    """The budgets a script reply lists from `start` as (field, text) pairs (or longer groups: `step`),
    parsed in one loop: every reply carries them, so this is one of the hottest paths of the client."""
    out = []
    for i in range(start, len(flat), step):
        scope, _, unit = flat[i].rpartition("|")
        parts = flat[i + 1].split(" ", 7)
        a, s, r, d = int(parts[0]), int(parts[1]), int(parts[2]), int(parts[3])
        caps: Any = None
        timed = _PLAIN
        if len(parts) > 7:
            rest = parts[7]
            if rest[0] == "~":
                token, _, rest = rest.partition(" ")
                timed = _timing(token)
            caps = json.loads(rest) if rest else None
        out.append(
            {
                "scope": scope,
                "unit": unit,
                "allocated": a,
                "spent": s,
                "reserved": r,
                "debt": d,
                "overdraft_limit": int(parts[4]),
                "remaining": a - s - r - d,
                "is_over_limit": parts[5] == "1",
                "status": parts[6],
                "caps": caps,
                **timed,
            }
        )
    return out


def read_balances(flat: list[Any]) -> list[dict[str, Any]]:
    """The budgets of a `read` reply (field, text, burn), with `burn` for the rate-limited ones."""
    out = balances(flat, 1, 3)
    for b, i in zip(out, range(3, len(flat), 3), strict=True):
        if flat[i]:
            b["burn"] = [int(n) for n in flat[i].split(",")]
    return out


def _timing(token: str) -> dict[str, Any]:
    """A budget's time text `~period;start;end;limits;alerts;fired;[rate_fired;]window` as its balance fields
    (none when it keeps only what fired before its alerts were removed)."""
    period, start, end, limits, alerts = token[1:].split(";", 5)[:5]
    if not (period or limits or alerts):
        return _PLAIN
    spec: dict[str, Any] | None = None
    if period:
        every, plus, anchor = period.partition("+")
        if plus:
            spec = {"every_ms": int(every), "anchor_ms": int(anchor)}
        else:
            every, _, tz = period.partition(":")
            spec = {"every": every, "tz": tz}
    return {
        "period": spec,
        "period_start_ms": int(start) if start else None,
        "period_end_ms": int(end) if end else None,
        "rate_limits": [_limit(lim) for lim in limits.split(",")] if limits else None,
        "alerts": [int(t) for t in alerts.split(",")] if alerts else None,
    }


def _limit(text: str) -> dict[str, Any]:
    """One rate limit `amount:window_ms:t|f[:alert_at]` as stored by the Python engine."""
    a, w, how, *at = text.split(":")
    out: dict[str, Any] = {"amount": int(a), "window_ms": int(w), "on_exceed": _ON_EXCEED[how]}
    if at:
        out["alert_at"] = int(at[0])
    return out


def period_text(spec: dict[str, Any] | None) -> str:
    """A command's period for a script: `daily:<tz>` (weekly, monthly) or `<every_ms>+<anchor_ms>`; `-` for
    none (removed), '' when not given."""
    if spec is None:
        return ""
    if not spec:
        return "-"
    if "every_ms" in spec:
        return f"{int(spec['every_ms'])}+{int(spec.get('anchor_ms') or 0)}"
    return f"{spec['every']}:{spec.get('tz') or 'UTC'}"


def limits_text(limits: list[dict[str, Any]] | None) -> str:
    """Rate limits for a script: `amount:window_ms:t|f[:alert_at]`, comma-separated; `-` for none, '' when not
    given."""
    if limits is None:
        return ""
    if not limits:
        return "-"
    return ",".join(
        f"{int(lim['amount'])}:{int(lim['window_ms'])}:{'f' if lim.get('on_exceed') == 'freeze' else 't'}"
        + (f":{int(lim['alert_at'])}" if lim.get("alert_at") else "")
        for lim in limits
    )


def alerts_text(alerts: list[int] | None) -> str:
    """Alert thresholds for a script, comma-separated; `-` for none, '' when not given."""
    if alerts is None:
        return ""
    return ",".join(str(int(t)) for t in sorted(alerts)) or "-"


def holds(text: str | None) -> list[tuple[str, int, int | None, list[str]]]:
    """Holds in other units, `UNIT|amount|charged|scope,…` each, space-separated: (unit, amount, charged or
    None, scopes). A debit's charges come the same way (amount: what was asked)."""
    out = []
    for token in (text or "").split():
        unit, amount, charged, scopes = token.split("|")
        out.append((unit, int(amount), int(charged) if charged != "-1" else None, scopes.split(",") if scopes else []))
    return out


def amounts_text(also: tuple[tuple[str, int], ...]) -> str:
    """A command's amounts in other units for a script: `UNIT|amount`, space-separated."""
    return " ".join(f"{unit}|{amount}" for unit, amount in also)


def record(rid: str, text: str) -> ReservationState:
    """A reservation from its record alone; its key, subject, action and affected scopes live in `<rid>|s`
    (read for listings only) and are left empty here."""
    st, u, e, op, c0, x, g, _dl, n, ch, fin, sp, *rest = text.split(" ")
    op, windowed, _ = op.partition(":")
    budgeted = rest[0] if rest else ""
    extra = {
        unit: {"amount": amount, "scopes": scopes, "charged": charged}
        for unit, amount, charged, scopes in holds(" ".join(rest[1:]))
    }
    return ReservationState(
        reservation_id=rid,
        status=st,
        idempotency_key="",
        subject_json="null",
        action_json="null",
        unit=u,
        estimate=int(e),
        overage_policy=op,
        created_at_ms=int(c0),
        expires_at_ms=int(x),
        grace_ms=int(g),
        scope_path=sp,
        affected_json="[]",
        budgeted_scopes=budgeted.split(",") if budgeted else [],
        charged=int(ch) if ch != "-1" else None,
        finalized_at_ms=int(fin) if fin != "-1" else None,
        extension_count=int(n),
        extra=extra or None,
        windowed=bool(windowed),
    )


def reservation(r: ReservationState, static: dict[str, Any], caps: str | None) -> dict[str, Any]:
    """A reservation as the Python engine shows it (`operations.reservation_dict`), from its record, its
    static JSON and its caps."""
    unit = r.unit
    body: dict[str, Any] = {
        "reservation_id": r.reservation_id,
        "status": r.status,
        "idempotency_key": static["idempotency_key"],
        "subject": static["subject"],
        "action": static["action"],
        "reserved": {"unit": unit, "amount": r.estimate},
        "committed": {"unit": unit, "amount": r.charged} if r.charged is not None else None,
        "overage_policy": r.overage_policy,
        "created_at_ms": r.created_at_ms,
        "expires_at_ms": r.expires_at_ms,
        "grace_period_ms": r.grace_ms,
        "finalized_at_ms": r.finalized_at_ms,
        "scope_path": r.scope_path,
        "affected_scopes": static["affected_scopes"],
        "budgeted_scopes": r.budgeted_scopes,
        "extension_count": r.extension_count,
        "caps": json.loads(caps) if caps else None,
        "metadata": static.get("metadata"),
    }
    if r.extra:
        body["also_reserved"] = [{"unit": u, "amount": h["amount"]} for u, h in r.extra.items()]
        charged = [{"unit": u, "amount": h["charged"]} for u, h in r.extra.items() if h["charged"] is not None]
        if charged:
            body["also_committed"] = charged
    return body


def event_id(entry_id: str | bytes) -> int:
    """A stream entry id `ms-seq` as one increasing integer."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return (int(ms) << 20) | int(seq)


def stream_id(number: int) -> str:
    return f"{number >> 20}-{number & 0xFFFFF}"


def event(entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    data = fields.get("data")
    amount = fields.get("amount")
    return {
        "event_id": event_id(entry_id),
        "ts_ms": int(fields["ts"]),
        "type": fields["type"],
        "scope": fields.get("scope"),
        "unit": fields.get("unit"),
        "amount": int(amount) if amount else None,
        "reservation_id": fields.get("rid"),
        "reason_code": fields.get("reason"),
        "data": json.loads(data) if data else {},
    }
