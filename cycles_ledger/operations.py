"""The ledger's operations, written once over a store's transaction (`stores.base.Txn`).

The SQLite and memory stores run these functions inside one atomic section of their own and commit
what the transaction wrote; the Redis store runs the Lua copy in `stores/redis.lua`, checked against
these by rule vectors. Policy lives in `rules`; this module sequences it: idempotency replay, load,
decide, write, log.

Every function takes `(tx, now, cmd)` and returns a JSON-able answer shaped like the result models, or
raises a typed `CyclesError` (nothing written). `Failed` is the one exception to that: an answer that
is an error but keeps its writes (a reservation found past its grace is expired on the spot).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from . import rules
from .errors import CyclesError, IdempotencyMismatchError, NotFoundError, ReservationExpiredError, UnitMismatchError
from .models import Decision, OveragePolicy, SoftLanding
from .rules import BudgetState, ReservationState
from .stores._ids import reservation_id as _new_id
from .stores.base import (
    BudgetCommand,
    CommitCommand,
    EventCommand,
    ExtendCommand,
    NoteCommand,
    ReleaseCommand,
    ReserveCommand,
    Txn,
)

__all__ = [
    "Failed",
    "balances",
    "change_budget",
    "commit",
    "decide",
    "events",
    "expire_due",
    "extend",
    "get_reservation",
    "list_reservations",
    "note",
    "record_event",
    "release",
    "reserve",
    "reservation_dict",
    "settle_answer",
    "sweep",
    "verify",
]

_JSON = json.JSONEncoder(separators=(",", ":")).encode


class Failed:
    """An operation outcome that keeps its writes (e.g. a lazy expiry) and still answers with an error."""

    __slots__ = ("error",)

    def __init__(self, error: CyclesError) -> None:
        self.error = error


def _amount(unit: str, n: int) -> dict[str, Any]:
    return {"unit": unit, "amount": n}


def _also_list(amounts: dict[str, int]) -> list[dict[str, Any]]:
    return [_amount(u, n) for u, n in amounts.items()]


def _load(tx: Txn, now: int, scopes: list[str], unit: str | None = None, *, write: bool = True) -> list[BudgetState]:
    """Budgets a write touches, their periods rolled over first: the first touch after a boundary resets
    spent (and logs `period_reset` with the closed period's totals). A read (`write=False`) sees the rolled
    state without writing it."""
    budgets = tx.budgets(scopes, unit)
    for b in budgets:
        if b.period is not None:
            closed = rules.roll_period(b, now)
            if closed is not None and write:
                tx.save_budgets([b])
                tx.append_event(now, "period_reset", b.scope, b.unit, closed["spent"], None, None, closed)
    return budgets


def _after_charge(
    tx: Txn, now: int, budgets: list[BudgetState], debts: dict[tuple[str, str], int], ref: str | None
) -> None:
    """Events a charge can cause: a threshold of the allocation crossed (once per period), new debt."""
    for b in budgets:
        if b.alerts:
            for t in rules.crossed_thresholds(b):
                data = {"threshold": t, "allocated": b.allocated, "spent": b.spent, "debt": b.debt}
                tx.append_event(now, "threshold_crossed", b.scope, b.unit, b.spent + b.debt, ref, None, data)
        before = debts.get((b.scope, b.unit), 0)
        if b.debt > before:
            data = {"debt": b.debt, "added": b.debt - before, "overdraft_limit": b.overdraft_limit}
            tx.append_event(now, "debt", b.scope, b.unit, b.debt - before, ref, None, data)


def _debts(budgets: list[BudgetState]) -> dict[tuple[str, str], int]:
    return {(b.scope, b.unit): b.debt for b in budgets}


def _window_add(tx: Txn, now: int, budgets: list[BudgetState], amounts: dict[str, int], ref: str) -> bool:
    """Log a hold or charge in the spend window of every rate-limited budget; True if any was."""
    logged = False
    for b in budgets:
        span = rules.window_span(b) if b.rate_limits else 0
        if span:
            tx.window_prune(b.scope, b.unit, now - span)
            tx.window_add(b.scope, b.unit, now, ref, amounts[b.unit])
            logged = True
    return logged


def _burn_alerts(tx: Txn, now: int, budgets: list[BudgetState], ref: str | None) -> None:
    """After a hold or charge entered the spend windows: a `threshold_crossed` event (kind burn_rate) for each
    rate limit with `alert_at` that its window reached, at most once per window length."""
    changed = []
    for b in budgets:
        if b.rate_limits and any(lim.get("alert_at") for lim in b.rate_limits):
            entries = tx.window(b.scope, b.unit, now - rules.window_span(b))
            for data in rules.crossed_rates(b, entries, now):
                tx.append_event(now, "threshold_crossed", b.scope, b.unit, data["used"], ref, None, data)
                changed.append(b)
    if changed:
        tx.save_budgets(list({id(b): b for b in changed}.values()))


def _load_holds(tx: Txn, holds: Iterable[tuple[str, list[str]]]) -> list[BudgetState]:
    out: list[BudgetState] = []
    for unit, scopes in holds:
        out += tx.budgets(scopes, unit)
    return out


def _replayed(tx: Txn, body: dict[str, Any], unit: str) -> dict[str, Any]:
    """A remembered answer with today's balances (records keep no balances, so they stay small)."""
    holds = [(unit, body.pop("budgeted_scopes", []))]
    holds += list(body.pop("also_scopes", {}).items())
    body["balances"] = [b.as_balance() for b in _load_holds(tx, holds)]
    return body


def _remember(
    tx: Txn, op: str, scope: str, cmd_key: str, payload_hash: str, body: dict[str, Any], **extra: Any
) -> None:
    slim = {k: v for k, v in body.items() if k != "balances"}
    slim.update(extra)
    tx.remember(op, f"{rules.tenant_of(scope)}|{cmd_key}", payload_hash, slim)


def _replay(tx: Txn, op: str, scope: str, key: str, payload_hash: str) -> dict[str, Any] | None:
    found = tx.idempotency(op, f"{rules.tenant_of(scope)}|{key}")
    if found is None:
        return None
    stored_hash, response = found
    if stored_hash != payload_hash:
        raise IdempotencyMismatchError(
            f"idempotency key {key!r} was already used for a different {op} request", idempotency_key=key
        )
    return response


# --- reserve and decide ---------------------------------------------------------------------------


def _evaluate(tx: Txn, now: int, cmd: ReserveCommand, write: bool) -> tuple[rules.Evaluation, list[BudgetState]]:
    """The decision and the budgets it holds on (every unit); only period roll-overs are written."""
    also = dict(cmd.also)
    found = _load(tx, now, cmd.scopes, write=write)
    by_unit = rules.budgets_by_unit(found, cmd.scopes, [cmd.unit, *also], cmd.allow_unbudgeted)
    if by_unit is None:
        ev = rules.Evaluation(Decision.DENY, reason_code="BUDGET_NOT_FOUND", scope=cmd.scopes[-1], unit=cmd.unit)
        return ev, []
    # Validated by the Ledger, which dumped it into the command: rebuilt here without a second validation.
    soft = SoftLanding.model_construct(**cmd.soft_landing) if cmd.soft_landing else None
    ev = rules.evaluate_units(by_unit, cmd.unit, cmd.estimate, soft, also)
    held = list(by_unit[cmd.unit])
    for unit in ev.also:
        held += by_unit[unit]
    if ev.decision is Decision.DENY and ev.unit != cmd.unit:
        held += by_unit.get(ev.unit or "", [])
    if ev.decision is not Decision.DENY:
        amounts = {cmd.unit: ev.amount, **ev.also}
        for b in held:
            span = rules.window_span(b) if b.rate_limits else 0
            if span:
                denial = rules.check_rates(b, amounts[b.unit], tx.window(b.scope, b.unit, now - span), now)
                if denial is not None:  # its unit's budgets are held already: ev.also named it
                    ev = denial
                    break
    return ev, held


def _decision_body(cmd: ReserveCommand, ev: rules.Evaluation) -> dict[str, Any]:
    body: dict[str, Any] = {
        "decision": ev.decision.value,
        "scope_path": cmd.scopes[-1],
        "affected_scopes": cmd.scopes,
        "caps": ev.caps,
        "reason_code": ev.reason_code,
        "scope": ev.scope,
        "remaining": ev.remaining,
    }
    if ev.decision is Decision.DENY and ev.unit and ev.unit != cmd.unit:
        body["unit"] = ev.unit
    if ev.reason_code == "RATE_EXCEEDED":
        body["retry_after_ms"] = ev.retry_after_ms
    return body


def decide(tx: Txn, now: int, cmd: ReserveCommand) -> dict[str, Any]:
    ev, budgets = _evaluate(tx, now, cmd, write=False)
    body = _decision_body(cmd, ev)
    body["balances"] = [b.as_balance() for b in budgets]
    return body


def reserve(tx: Txn, now: int, cmd: ReserveCommand) -> dict[str, Any]:
    # An empty payload_hash marks a fresh key nobody can repeat: no replay lookup, no record.
    first = cmd.scopes[0]
    prior = _replay(tx, "reserve", first, cmd.idempotency_key, cmd.payload_hash) if cmd.payload_hash else None
    if prior is not None:
        if prior.get("expires_at_ms") is not None:
            prior["remaining_ttl_ms"] = max(0, prior["expires_at_ms"] - now)
        return _replayed(tx, prior, cmd.unit)
    ev, budgets = _evaluate(tx, now, cmd, write=True)
    if rules.retry_after_expiry(ev) and expire_due(tx, now, 1000):
        ev, budgets = _evaluate(tx, now, cmd, write=True)  # overdue holds still counted; look again
    body = _decision_body(cmd, ev)
    body["dry_run"] = cmd.dry_run
    if cmd.dry_run or ev.decision is Decision.DENY:
        denied = ev.decision is Decision.DENY
        kind = ("would_deny" if denied else "would_allow") if cmd.dry_run else "denied"
        info: dict[str, Any] = {
            "subject": cmd.subject,
            "action": cmd.action,
            "key": cmd.idempotency_key,
            "remaining": ev.remaining,
        }
        if ev.caps:
            info["caps"] = ev.caps
        if cmd.also:
            info["also"] = dict(cmd.also)
        if ev.reason_code == "RATE_EXCEEDED":
            info["retry_after_ms"] = ev.retry_after_ms
        unit = ev.unit or cmd.unit
        amount = cmd.estimate if unit == cmd.unit else dict(cmd.also)[unit]
        tx.append_event(now, kind, ev.scope or cmd.scopes[-1], unit, amount, None, ev.reason_code, info)
        if ev.freeze and not cmd.dry_run:  # the circuit breaker: the scope stays shut until unfrozen
            for b in budgets:
                if b.scope == ev.scope and b.unit == unit:
                    b.status = "FROZEN"
                    tx.save_budgets([b])
                    tx.append_event(now, "frozen", b.scope, b.unit, None, None, "RATE_EXCEEDED", {"by": "rate_limit"})
        if cmd.dry_run and cmd.payload_hash:
            _remember(tx, "reserve", first, cmd.idempotency_key, cmd.payload_hash, body)
        body["balances"] = [b.as_balance() for b in budgets]
        return body
    main = [b for b in budgets if b.unit == cmd.unit]
    rules.hold(main, ev.amount)
    extra: dict[str, dict[str, Any]] = {}
    for unit, amount in ev.also.items():
        on = [b for b in budgets if b.unit == unit]
        rules.hold(on, amount)
        extra[unit] = {"amount": amount, "scopes": [b.scope for b in on], "charged": None}
    tx.save_budgets(budgets)
    rid = _new_id(now)
    windowed = _window_add(tx, now, budgets, {cmd.unit: ev.amount, **ev.also}, rid)
    expires = now + cmd.ttl_ms
    budgeted = [b.scope for b in main]
    tx.insert_reservation(
        ReservationState(
            reservation_id=rid,
            status="ACTIVE",
            idempotency_key=cmd.idempotency_key,
            subject_json=_JSON(cmd.subject),
            action_json=_JSON(cmd.action),
            unit=cmd.unit,
            estimate=ev.amount,
            overage_policy=cmd.overage_policy,
            created_at_ms=now,
            expires_at_ms=expires,
            grace_ms=cmd.grace_period_ms,
            scope_path=cmd.scopes[-1],
            affected_json=_JSON(cmd.scopes),
            budgeted_scopes=budgeted,
            metadata_json=_JSON(cmd.metadata) if cmd.metadata else None,
            caps=ev.caps,
            extra=extra or None,
            windowed=windowed,
        )
    )
    # The reservation row holds subject, action and scopes; the event only adds what it decided.
    data: dict[str, Any] | None = {"decision": ev.decision.value, "caps": ev.caps} if ev.caps else None
    if ev.also:
        data = {**(data or {}), "also": dict(ev.also)}
    tx.append_event(now, "reserved", cmd.scopes[-1], cmd.unit, ev.amount, rid, None, data)
    _burn_alerts(tx, now, budgets, rid)
    body.update(reservation_id=rid, reserved=_amount(cmd.unit, ev.amount), expires_at_ms=expires)
    if ev.also:
        body["also_reserved"] = _also_list(ev.also)
    body["remaining_ttl_ms"] = cmd.ttl_ms
    if cmd.payload_hash:
        scopes_also = {u: h["scopes"] for u, h in extra.items()}
        _remember(
            tx,
            "reserve",
            first,
            cmd.idempotency_key,
            cmd.payload_hash,
            body,
            budgeted_scopes=budgeted,
            **({"also_scopes": scopes_also} if scopes_also else {}),
        )
    body["balances"] = [b.as_balance() for b in budgets]
    return body


# --- settle: commit, release, expiry --------------------------------------------------------------


def _settle_target(
    tx: Txn, now: int, op: str, reservation_id: str, key: str, payload_hash: str
) -> ReservationState | dict[str, Any] | Failed:
    """The reservation to commit or release, a replayed answer, or a lazily expired one's error."""
    r = rules.found(tx.reservation(reservation_id), reservation_id)
    verdict = rules.settle_verdict(r, now, op, key, payload_hash)
    if verdict == "replay":
        body = dict(r.settle_response or settle_answer(r))
        body["balances"] = [b.as_balance() for b in _load_holds(tx, ((u, s) for u, _, s in r.holds()))]
        return body
    if verdict == "expire":
        _expire(tx, now, r)
        return Failed(rules.expired_error(r))
    return r


def settle_answer(r: ReservationState) -> dict[str, Any]:
    """The answer of a reservation's settle, rebuilt from what the reservation keeps (status, amounts, the
    other units), so a store need not keep the answer itself for replays."""
    if r.status == "COMMITTED":
        charged = r.charged or 0
        released = max(r.estimate - (r.actual if r.actual is not None else charged), 0)
        body: dict[str, Any] = {
            "reservation_id": r.reservation_id,
            "status": "COMMITTED",
            "charged": _amount(r.unit, charged),
            "released": _amount(r.unit, released) if released else None,
        }
        also = {u: h["charged"] for u, h in (r.extra or {}).items() if h.get("charged") is not None}
        if also:
            body["also_charged"] = _also_list(also)
        return body
    body = {"reservation_id": r.reservation_id, "status": "RELEASED", "released": _amount(r.unit, r.estimate)}
    also = {u: h["amount"] for u, h in (r.extra or {}).items()}
    if also:
        body["also_released"] = _also_list(also)
    return body


def _finalize(tx: Txn, now: int, r: ReservationState, status: str, op: str, key: str, h: str) -> dict[str, Any]:
    """Mark `r` settled by `op` under `key`/`h` (its replay record) and return the settle's answer."""
    r.status = status
    r.finalized_at_ms = now
    r.settle_op, r.settle_key, r.settle_hash = op, key, h
    r.settle_response = settle_answer(r)
    tx.update_reservation(r)
    return dict(r.settle_response)


def _expire(tx: Txn, now: int, r: ReservationState) -> None:
    budgets: list[BudgetState] = []
    if r.windowed:
        tx.window_drop(r.reservation_id)
    for unit, amount, scopes in r.holds():
        on = _load(tx, now, scopes, unit)
        rules.unhold(on, amount)
        budgets += on
    tx.save_budgets(budgets)
    r.status = "EXPIRED"
    r.finalized_at_ms = now
    tx.update_reservation(r)
    data = {"also": {u: h["amount"] for u, h in r.extra.items()}} if r.extra else None
    tx.append_event(now, "expired", r.scope_path, r.unit, r.estimate, r.reservation_id, None, data)


def expire_due(tx: Txn, now: int, limit: int) -> int:
    """Expire up to `limit` ACTIVE reservations past their deadline; returns how many."""
    due = tx.due(now, limit)
    for r in due:
        _expire(tx, now, r)
    return len(due)


def commit(tx: Txn, now: int, cmd: CommitCommand) -> dict[str, Any] | Failed:
    r = _settle_target(tx, now, "commit", cmd.reservation_id, cmd.idempotency_key, cmd.payload_hash)
    if not isinstance(r, ReservationState):
        return r
    if cmd.unit != r.unit:
        raise UnitMismatchError(
            f"commit in {cmd.unit} for a reservation in {r.unit}", requested_unit=cmd.unit, expected_units=[r.unit]
        )
    policy = OveragePolicy(r.overage_policy)
    budgets = _load(tx, now, r.budgeted_scopes, r.unit)
    debts = _debts(budgets)
    charged, flagged = rules.settle(budgets, r.estimate, cmd.actual, policy)
    also_actual = dict(cmd.also)
    also_charged: dict[str, int] = {}
    flagged_units = [(s, r.unit) for s in flagged]
    for unit, h in (r.extra or {}).items():
        # A unit the commit does not name is charged what was held: the worst case stands.
        on = _load(tx, now, h["scopes"], unit)
        debts.update(_debts(on))
        also_charged[unit], more = rules.settle(on, h["amount"], also_actual.get(unit, h["amount"]), policy)
        h["charged"] = also_charged[unit]
        flagged_units += [(s, unit) for s in more]
        budgets += on
    _after_charge(tx, now, budgets, debts, r.reservation_id)
    tx.save_budgets(budgets)
    if r.windowed:
        tx.window_set(r.reservation_id, r.unit, charged)
        for unit, got in also_charged.items():
            tx.window_set(r.reservation_id, unit, got)
    released = max(r.estimate - cmd.actual, 0)
    r.charged, r.actual = charged, cmd.actual
    body = _finalize(tx, now, r, "COMMITTED", "commit", cmd.idempotency_key, cmd.payload_hash)
    data: dict[str, Any] = {"actual": cmd.actual, "released": released}
    if flagged:
        data["over_limit"] = flagged
    if also_charged:
        data["also"] = also_charged
    if cmd.metrics:
        data["metrics"] = cmd.metrics
    if cmd.metadata:
        data["metadata"] = cmd.metadata
    tx.append_event(now, "committed", r.scope_path, r.unit, charged, r.reservation_id, None, data)
    for scope, unit in flagged_units:
        tx.append_event(now, "over_limit", scope, unit, None, r.reservation_id, None, None)
    body["balances"] = [b.as_balance() for b in budgets]
    return body


def release(tx: Txn, now: int, cmd: ReleaseCommand) -> dict[str, Any] | Failed:
    r = _settle_target(tx, now, "release", cmd.reservation_id, cmd.idempotency_key, cmd.payload_hash)
    if not isinstance(r, ReservationState):
        return r
    budgets: list[BudgetState] = []
    for unit, amount, scopes in r.holds():
        on = _load(tx, now, scopes, unit)
        rules.unhold(on, amount)
        budgets += on
    tx.save_budgets(budgets)
    if r.windowed:
        tx.window_drop(r.reservation_id)
    body = _finalize(tx, now, r, "RELEASED", "release", cmd.idempotency_key, cmd.payload_hash)
    also = {u: h["amount"] for u, h in (r.extra or {}).items()}
    data: dict[str, Any] = {"reason": cmd.reason} if cmd.reason else {}
    if also:
        data["also"] = also
    tx.append_event(now, "released", r.scope_path, r.unit, r.estimate, r.reservation_id, None, data or None)
    body["balances"] = [b.as_balance() for b in budgets]
    return body


def extend(tx: Txn, now: int, cmd: ExtendCommand) -> dict[str, Any] | Failed:
    r = rules.found(tx.reservation(cmd.reservation_id), cmd.reservation_id)
    holds = [(u, s) for u, _, s in r.holds()]
    prior = _replay(tx, "extend", r.scope_path, cmd.idempotency_key, cmd.payload_hash)
    if prior is not None:
        prior["remaining_ttl_ms"] = max(0, prior["expires_at_ms"] - now)
        prior["balances"] = [b.as_balance() for b in _load_holds(tx, holds)]
        return prior
    if rules.extend_verdict(r, now, cmd.max_extensions) == "expire":
        _expire(tx, now, r)
        return Failed(ReservationExpiredError(f"reservation {cmd.reservation_id} expired"))
    r.expires_at_ms += cmd.extend_by_ms
    r.extension_count += 1
    tx.update_reservation(r)
    tx.append_event(
        now,
        "extended",
        r.scope_path,
        r.unit,
        None,
        r.reservation_id,
        None,
        {"expires_at_ms": r.expires_at_ms, "extend_by_ms": cmd.extend_by_ms},
    )
    body: dict[str, Any] = {
        "reservation_id": cmd.reservation_id,
        "status": "ACTIVE",
        "expires_at_ms": r.expires_at_ms,
        "remaining_ttl_ms": r.expires_at_ms - now,
    }
    _remember(tx, "extend", r.scope_path, cmd.idempotency_key, cmd.payload_hash, body)
    body["balances"] = [b.as_balance() for b in _load_holds(tx, holds)]
    return body


# --- direct debits and notes ------------------------------------------------------------------------


def record_event(tx: Txn, now: int, cmd: EventCommand) -> dict[str, Any]:
    first = cmd.scopes[0]
    prior = _replay(tx, "event", first, cmd.idempotency_key, cmd.payload_hash)
    if prior is not None:
        return _replayed(tx, prior, cmd.unit)
    also = dict(cmd.also)
    found = _load(tx, now, cmd.scopes)
    by_unit = rules.budgets_by_unit(found, cmd.scopes, [cmd.unit, *also], cmd.allow_unbudgeted)
    if by_unit is None:
        raise NotFoundError(f"no budget for {cmd.scopes[-1]} or its parents", scope=cmd.scopes[-1])
    policy = OveragePolicy(cmd.overage_policy)
    main = by_unit[cmd.unit]
    rules.check_debit(main)
    for unit in also:
        rules.check_debit(by_unit[unit])
    debts = _debts(found)
    # A refusal on any unit raises before the transaction writes: nothing is charged on the others either.
    charged, flagged = rules.settle(main, 0, cmd.actual, policy, is_commit=False)
    flagged_units = [(s, cmd.unit) for s in flagged]
    also_charged: dict[str, dict[str, Any]] = {}
    for unit, actual in also.items():
        on = by_unit[unit]
        if not on:
            continue
        got, more = rules.settle(on, 0, actual, policy, is_commit=False)
        also_charged[unit] = {"charged": got, "scopes": [b.scope for b in on]}
        flagged_units += [(s, unit) for s in more]
    budgets = main + [b for u in also_charged for b in by_unit[u]]
    _after_charge(tx, now, budgets, debts, None)
    tx.save_budgets(budgets)
    scopes = [b.scope for b in main]
    data: dict[str, Any] = {
        "scopes": scopes,
        "actual": cmd.actual,
        "subject": cmd.subject,
        "action": cmd.action,
        "over_limit": flagged,
        "metrics": cmd.metrics,
        "metadata": cmd.metadata,
        "key": cmd.idempotency_key,
    }
    if also_charged:
        data["also"] = also_charged
    event_id = tx.append_event(now, "debited", cmd.scopes[-1], cmd.unit, charged, None, None, data)
    _window_add(
        tx, now, budgets, {cmd.unit: charged, **{u: c["charged"] for u, c in also_charged.items()}}, f"e{event_id}"
    )
    _burn_alerts(tx, now, budgets, None)
    for scope, unit in flagged_units:
        tx.append_event(now, "over_limit", scope, unit, None, None, None, None)
    body: dict[str, Any] = {"status": "APPLIED", "event_id": event_id, "charged": _amount(cmd.unit, charged)}
    if also_charged:
        body["also_charged"] = _also_list({u: c["charged"] for u, c in also_charged.items()})
    extra = {"also_scopes": {u: c["scopes"] for u, c in also_charged.items()}} if also_charged else {}
    _remember(tx, "event", first, cmd.idempotency_key, cmd.payload_hash, body, budgeted_scopes=scopes, **extra)
    body["balances"] = [b.as_balance() for b in budgets]
    return body


def note(tx: Txn, now: int, cmd: NoteCommand) -> int:
    return tx.append_event(now, cmd.type, cmd.scope, None, None, None, cmd.reason_code, cmd.data)


# --- admin ------------------------------------------------------------------------------------------


def change_budget(tx: Txn, now: int, cmd: BudgetCommand) -> dict[str, Any]:
    found = _load(tx, now, [cmd.scope], cmd.unit)
    if cmd.op == "set":
        assert cmd.amount is not None
        if not found:
            b = BudgetState(
                cmd.scope, cmd.unit, cmd.amount, overdraft_limit=cmd.overdraft_limit or 0, caps=cmd.caps or None
            )
            _set_time_policy(b, cmd, now)
            tx.insert_budget(b)
            data: dict[str, Any] = {}
        else:
            b = found[0]
            data = rules.set_allocation(b, cmd.amount, cmd.overdraft_limit, cmd.caps)
            _set_time_policy(b, cmd, now)
            tx.save_budgets([b])
        if b.period is not None:
            data["period"] = b.period
        tx.append_event(now, "budget_set", cmd.scope, cmd.unit, cmd.amount, None, None, data or None)
        return b.as_balance()
    if not found:
        raise NotFoundError(f"no {cmd.unit} budget at {cmd.scope}", scope=cmd.scope)
    b = found[0]
    amount: int | None = None
    data = {}
    if cmd.op == "fund":
        assert cmd.amount is not None
        rules.check_open(b)
        data["debt_repaid"] = rules.fund(b, cmd.amount)
        kind, amount = "funded", cmd.amount
    else:
        kind = rules.change_status(b, cmd.op)
    tx.save_budgets([b])
    tx.append_event(now, kind, cmd.scope, cmd.unit, amount, None, None, data or None)
    return b.as_balance()


def _set_time_policy(b: BudgetState, cmd: BudgetCommand, now: int) -> None:
    """Period, rate limits and alerts as the command says (None: unchanged; empty: removed). A new or changed
    period starts at the boundary before `now`; spent so far stays (it was spent in this period)."""
    if cmd.period is not None and (cmd.period or None) != b.period:
        b.period = cmd.period or None
        rules.start_period(b, now)
    if cmd.rate_limits is not None and (cmd.rate_limits or None) != b.rate_limits:
        b.rate_limits = cmd.rate_limits or None
        b.rate_fired = None  # changed limits: their burn-rate alerts start afresh
    if cmd.alerts is not None:
        b.alerts = sorted(cmd.alerts) or None


# --- reads and maintenance --------------------------------------------------------------------------


def reservation_dict(r: ReservationState) -> dict[str, Any]:
    body: dict[str, Any] = {
        "reservation_id": r.reservation_id,
        "status": r.status,
        "idempotency_key": r.idempotency_key,
        "subject": json.loads(r.subject_json),
        "action": json.loads(r.action_json),
        "reserved": _amount(r.unit, r.estimate),
        "committed": _amount(r.unit, r.charged) if r.charged is not None else None,
        "overage_policy": r.overage_policy,
        "created_at_ms": r.created_at_ms,
        "expires_at_ms": r.expires_at_ms,
        "grace_period_ms": r.grace_ms,
        "finalized_at_ms": r.finalized_at_ms,
        "scope_path": r.scope_path,
        "affected_scopes": json.loads(r.affected_json),
        "budgeted_scopes": r.budgeted_scopes,
        "extension_count": r.extension_count,
        "caps": r.caps,
        "metadata": json.loads(r.metadata_json) if r.metadata_json else None,
    }
    if r.extra:
        body["also_reserved"] = [_amount(u, h["amount"]) for u, h in r.extra.items()]
        charged = [_amount(u, h["charged"]) for u, h in r.extra.items() if h.get("charged") is not None]
        if charged:
            body["also_committed"] = charged
    return body


def balances(tx: Txn, now: int, scope_prefix: str | None, unit: str | None) -> list[dict[str, Any]]:
    """Budgets as of now: a period that has ended shows its new period (the reset itself is written by the
    next write or the sweeper), and rate-limited budgets show what each window holds (`burn`)."""
    out = []
    for b in tx.all_budgets(scope_prefix, unit):
        rules.roll_period(b, now)
        row = b.as_balance()
        span = rules.window_span(b)
        if span:
            entries = tx.window(b.scope, b.unit, now - span)
            row["burn"] = [
                sum(a for ts, a in entries if ts > now - int(lim["window_ms"])) for lim in b.rate_limits or ()
            ]
        out.append(row)
    return out


def get_reservation(tx: Txn, now: int, reservation_id: str) -> dict[str, Any] | None:
    r = tx.reservation(reservation_id)
    return reservation_dict(r) if r else None


def list_reservations(
    tx: Txn, now: int, status: str | None, scope_prefix: str | None, key: str | None, limit: int
) -> list[dict[str, Any]]:
    return [reservation_dict(r) for r in tx.find_reservations(status, scope_prefix, key, limit)]


def events(
    tx: Txn,
    now: int,
    after: int,
    limit: int,
    reservation_id: str | None,
    scope_prefix: str | None,
    newest: bool = False,
) -> list[dict[str, Any]]:
    return tx.find_events(after, limit, reservation_id, scope_prefix, newest)


def sweep(
    tx: Txn, now: int, limit: int, retention_ms: int | None, log_retention_ms: int | None = None, prune: int = 5_000
) -> int:
    """Expire overdue holds (returns how many), roll over the periods that ended, and forget what is older
    than the retention windows: idempotency records (`retention_ms`), and up to `prune` events and finished
    reservations (`log_retention_ms`)."""
    n = expire_due(tx, now, limit)
    for b in tx.period_due(now, limit):
        _load(tx, now, [b.scope], b.unit)
    if retention_ms is not None:
        tx.prune_idempotency(now - retention_ms)
    if log_retention_ms is not None:
        prune_log(tx, now - log_retention_ms, prune)
    return n


def prune_log(tx: Txn, before_ms: int, limit: int) -> int:
    """Delete up to `limit` events older than `before_ms` (never a `period_reset`: the totals of every closed
    period are kept) and the reservations finished before it. What the deleted events charged is added to
    each budget's pruned total first, so `verify` still rebuilds spent + debt exactly. Returns how many
    events went."""
    old = tx.old_events(before_ms, limit)
    folded: dict[tuple[str, str], int] = {}
    for _event_id, type_, unit, amount, data, rid, scope in old:
        if type_ in ("committed", "debited"):
            r = tx.reservation(rid) if type_ == "committed" and rid else None
            for u, charged, scopes in charges_of(type_, unit, amount or 0, data, r, scope):
                for s in scopes:
                    folded[(s, u)] = folded.get((s, u), 0) + charged
    tx.forget_events([e[0] for e in old], folded)
    tx.forget_reservations(before_ms, limit)
    return len(old)


def verify(tx: Txn, now: int) -> list[str]:
    """Rebuild each budget's reserved and spent+debt from reservations and events, and compare."""
    held: dict[tuple[str, str], int] = {}
    for r in tx.active_reservations():
        for unit, amount, scopes in r.holds():
            for s in scopes:
                held[(s, unit)] = held.get((s, unit), 0) + amount
    charged: dict[tuple[str, str], int] = {}
    for unit, amount, scopes in tx.charges():
        for s in scopes:
            charged[(s, unit)] = charged.get((s, unit), 0) + amount
    problems = []
    for b in tx.all_budgets(None, None):
        key = (b.scope, b.unit)
        if b.reserved != held.get(key, 0):
            problems.append(
                f"{b.scope} {b.unit}: reserved {b.reserved} but active reservations hold {held.get(key, 0)}"
            )
        if b.spent + b.debt != charged.get(key, 0):
            problems.append(
                f"{b.scope} {b.unit}: spent+debt {b.spent + b.debt} but events charged {charged.get(key, 0)}"
            )
        if min(b.spent, b.reserved, b.debt) < 0:
            problems.append(f"{b.scope} {b.unit}: negative field in {b.as_balance()}")
        if b.debt > b.overdraft_limit and not b.is_over_limit:
            problems.append(f"{b.scope} {b.unit}: debt {b.debt} above overdraft limit {b.overdraft_limit}")
    return problems


def charges_of(
    type_: str, unit: str, amount: int, data: dict[str, Any], r: ReservationState | None, scope: str | None = None
) -> list[tuple[str, int, list[str]]]:
    """What one committed or debited event charged: (unit, amount, scopes) for every unit it names.
    A commit's scopes are its reservation's; a debit names its own; a period reset takes its scope's
    closed spend back out (spent restarts from zero, debt carries over)."""
    if type_ == "committed":
        if r is None:
            return []
        out = [(unit, amount, r.budgeted_scopes)]
        for u, got in (data.get("also") or {}).items():
            out.append((u, got, (r.extra or {}).get(u, {}).get("scopes", [])))
        return out
    if type_ == "period_reset":  # spent starts again: the charges before it no longer count in spent
        return [(unit, -amount, [scope])] if scope else []
    out = [(unit, amount, data.get("scopes") or [])]
    for u, c in (data.get("also") or {}).items():
        out.append((u, c["charged"], c["scopes"]))
    return out


# --- keyed state (notifier cursor, lease, dead letters) ---------------------------------------------


def state_get(tx: Txn, now: int, key: str) -> str | None:
    return tx.state_get(key)


def state_put(tx: Txn, now: int, key: str, value: str | None, expected: str | None) -> bool:
    """Compare-and-set: the write happens only if the record is `expected` now (None: absent)."""
    if tx.state_get(key) != expected:
        return False
    tx.state_set(key, value)
    return True


def state_list(tx: Txn, now: int, prefix: str) -> dict[str, str]:
    return tx.state_list(prefix)
