"""The async Ledger: validates requests, derives scopes, fingerprints payloads, calls the store once.

Validation happens here, before the store is touched, so bad input raises a typed error and changes
nothing. Everything that must be atomic (checks, holds, charges, idempotency, events) happens in the
store's single call.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import ConfigError, InvalidRequestError, NotFoundError
from .models import (
    INT64_MAX,
    SCOPE_LEVELS,
    Action,
    Amount,
    Balance,
    Caps,
    CommitResult,
    DecideResult,
    EventResult,
    ExtendResult,
    LedgerEvent,
    OveragePolicy,
    Period,
    RateLimit,
    ReleaseResult,
    Reservation,
    ReservationStatus,
    ReserveResult,
    SoftLanding,
    Subject,
    Unit,
    parse_scope,
)
from .stores import Store, SupportsSweep, store_from_url
from .stores.base import (
    BudgetCommand,
    CommitCommand,
    EventCommand,
    ExtendCommand,
    NoteCommand,
    ReleaseCommand,
    ReserveCommand,
)
from .timing import parse_alerts, parse_period, parse_rate_limits

__all__ = ["Ledger", "open_ledger"]

_REASON = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")

log = logging.getLogger("cycles_ledger")

M = TypeVar("M", bound=BaseModel)

SubjectLike = Subject | Mapping[str, Any] | str
ActionLike = Action | Mapping[str, Any]
AmountLike = Amount | Mapping[str, Any] | str


# Canonical JSON (sorted keys, no spaces): the text request fingerprints hash.
_FINGERPRINT_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode
_STRICT_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode
_json_str = json.encoder.encode_basestring_ascii


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "value"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def _build(cls: type[M], value: Any, what: str) -> M:
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f"{what} must be a {cls.__name__} or a mapping, got {type(value).__name__}")
    try:
        return cls.model_validate(dict(value))
    except ValidationError as exc:
        raise InvalidRequestError(f"invalid {what}: {_describe(exc)}") from None


def _subject(value: SubjectLike) -> Subject:
    if isinstance(value, str):
        return Subject.parse(value)
    return _build(Subject, value, "subject")


# Agents send the same subjects, actions and amounts over and over: validate each shape once.
# Cached values are shared, so everything below treats them as read-only.
@functools.lru_cache(maxsize=4096)
def _subject_cached(items: tuple[tuple[str, Any], ...]) -> tuple[Subject, dict[str, Any], list[str], str]:
    subj = _build(Subject, dict(items), "subject")
    dump = subj.model_dump(exclude_none=True)
    return subj, dump, subj.scopes(), _STRICT_JSON(dump)


def _subject_parts(value: SubjectLike) -> tuple[Subject, dict[str, Any], list[str], str | None]:
    """The subject, its JSON form, its derived scopes and (when cached) its canonical JSON text."""
    if isinstance(value, Subject):
        if value.dimensions is not None:
            return value, value.model_dump(exclude_none=True), value.scopes(), None
        # Already valid: the cache only saves dumping it and deriving its scopes again.
        return _subject_cached(tuple((lvl, v) for lvl in SCOPE_LEVELS if (v := getattr(value, lvl)) is not None))
    if isinstance(value, Mapping) and "dimensions" not in value:
        try:
            return _subject_cached(tuple(value.items()))
        except TypeError:  # unhashable values: validate without the cache (and fail there)
            pass
    subj = _subject(value)
    return subj, subj.model_dump(exclude_none=True), subj.scopes(), None


@functools.lru_cache(maxsize=4096)
def _action_cached(items: tuple[tuple[str, Any], ...]) -> tuple[Action, dict[str, Any], str]:
    act = _build(Action, dict(items), "action")
    dump = act.model_dump(exclude_none=True)
    return act, dump, _STRICT_JSON(dump)


def _action_parts(value: ActionLike) -> tuple[Action, dict[str, Any], str | None]:
    """The action, its JSON form and (when cached) its canonical JSON text."""
    if isinstance(value, Action):
        if value.tags is not None:
            return value, value.model_dump(exclude_none=True), None
        return _action_cached((("kind", value.kind), ("name", value.name)))
    if isinstance(value, Mapping) and not value.get("tags"):
        try:
            return _action_cached(tuple(value.items()))
        except TypeError:
            pass
    act = _build(Action, value, "action")
    return act, act.model_dump(exclude_none=True), None


@functools.lru_cache(maxsize=4096)
def _parse_amount(text: str) -> Amount:
    return Amount.parse(text)


def _amount(value: AmountLike, what: str) -> Amount:
    if isinstance(value, str):
        return _parse_amount(value)
    if isinstance(value, (bool, int | float)):
        raise InvalidRequestError(
            f"{what} needs a unit: pass an Amount, a mapping {{unit, amount}} or text like '0.25usd'"
        )
    return _build(Amount, value, what)


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _also(values: Sequence[AmountLike], main: Unit, what: str) -> list[dict[str, Any]]:
    """Amounts in other units than `main`, one per unit, as JSON (in the order given)."""
    if isinstance(values, tuple) and not values:
        return []
    if isinstance(values, (str, bytes, Amount)) or not isinstance(values, Sequence):
        raise InvalidRequestError(f"{what} must be a list of amounts such as ['1200tokens']")
    out: list[dict[str, Any]] = []
    seen = {main}
    for value in values:
        amt = _amount(value, what)
        if amt.unit in seen:
            raise InvalidRequestError(f"{what} names {amt.unit.value} twice (or the main amount's unit)")
        seen.add(amt.unit)
        out.append({"unit": amt.unit.value, "amount": amt.amount})
    return out


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{what} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InvalidRequestError(f"{what} must be between {lo} and {hi}, got {value}")
    return value


class _Unset(enum.Enum):
    UNSET = "unset"


UNSET = _Unset.UNSET  # an argument not given (where None means something)

_KEY_PREFIX = f"auto-{uuid.uuid4().hex[:16]}-"
_KEY_COUNTER = itertools.count()


def _reseed_keys() -> None:
    """A forked child must not hand out its parent's keys (a replay would skip its hold)."""
    global _KEY_PREFIX, _KEY_COUNTER
    _KEY_PREFIX = f"auto-{uuid.uuid4().hex[:16]}-"
    _KEY_COUNTER = itertools.count()


os.register_at_fork(after_in_child=_reseed_keys)


def _fresh_key() -> str:
    """A key no other call can have used: a random per-process prefix plus a counter."""
    return f"{_KEY_PREFIX}{next(_KEY_COUNTER)}"


def _key(value: str | None, default: str | None = None) -> str:
    if value is None:
        return default or _fresh_key()
    if not isinstance(value, str) or not 1 <= len(value) <= 256:
        raise InvalidRequestError("idempotency_key must be a string of 1-256 characters")
    return value


def _jsonable(value: Mapping[str, Any] | None, what: str) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"{what} must be JSON-serialisable: {exc}") from None
    return dict(value)


def _json_copy(value: Mapping[str, Any] | None, what: str) -> dict[str, Any] | None:
    """A dict copy of a caller's JSON field. A plain dict is proven serialisable later, by the encode
    that fingerprints the request (one encode instead of two); any other mapping is checked now."""
    if value is None:
        return None
    if isinstance(value, dict):
        return dict(value)
    return _jsonable(value, what)


def _fingerprint(payload: dict[str, Any]) -> str:
    """Stable hash of a request body (key order does not matter) for idempotency comparisons."""
    return hashlib.sha256(_FINGERPRINT_JSON(payload).encode()).hexdigest()


def _checked_fingerprint(payload: dict[str, Any], fields: Mapping[str, Mapping[str, Any] | None]) -> str:
    """`_fingerprint(payload)` whose encode also proves the caller's JSON `fields` serialisable, as
    `_jsonable` would (same errors, same order); the hash is the same."""
    try:
        raw = _STRICT_JSON(payload)
    except (TypeError, ValueError):
        for what, value in fields.items():
            _jsonable(value, what)
        return _fingerprint(payload)
    return hashlib.sha256(raw.encode()).hexdigest()


def _unit(value: Unit | str) -> Unit:
    try:
        return Unit(value)
    except ValueError:
        raise InvalidRequestError(f"unknown unit {value!r}; known: {', '.join(u.value for u in Unit)}") from None


def _scope(value: str) -> str:
    parse_scope(value)
    return value


class Ledger:
    """Budget authority over one store. Use `open_ledger(url)`; close with `aclose()` or `async with`."""

    def __init__(
        self,
        store: Store,
        *,
        allow_unbudgeted: bool = False,
        default_ttl_ms: int = 60_000,
        default_grace_period_ms: int = 5_000,
        default_overage_policy: OveragePolicy | str = OveragePolicy.ALLOW_IF_AVAILABLE,
        max_extensions: int | None = 10,
    ) -> None:
        self.store = store
        self.allow_unbudgeted = allow_unbudgeted
        self.default_ttl_ms = _int(default_ttl_ms, "default_ttl_ms", 1_000, 86_400_000)
        self.default_grace_period_ms = _int(default_grace_period_ms, "default_grace_period_ms", 0, 60_000)
        self.default_overage_policy = OveragePolicy(default_overage_policy)
        self.max_extensions = max_extensions
        self._sweeper: asyncio.Task[None] | None = None

    # --- runtime operations -------------------------------------------------------------------

    async def reserve(
        self,
        subject: SubjectLike,
        action: ActionLike,
        estimate: AmountLike,
        *,
        ttl_ms: int | None = None,
        grace_period_ms: int | None = None,
        overage_policy: OveragePolicy | str | None = None,
        idempotency_key: str | None = None,
        dry_run: bool = False,
        metadata: Mapping[str, Any] | None = None,
        soft_landing: SoftLanding | Mapping[str, Any] | None = None,
        key_is_unique: bool = False,
        also: Sequence[AmountLike] = (),
    ) -> ReserveResult:
        """Hold `estimate` on every budgeted scope of `subject`, all or none. A DENY is a result.

        `also`: holds in other units taken in the same decision (e.g. the call's tokens next to its
        dollars), each on the scopes that have a budget in that unit; any that does not fit denies all.

        `key_is_unique=True`: the caller vouches that `idempotency_key` is new and never sent again (a
        UUID it just made): the key labels the reservation, but no replay lookup is made and no
        idempotency record kept, which saves a third of a reserve's work. A repeat would reserve again."""
        cmd = self._reserve_command(
            subject,
            action,
            estimate,
            ttl_ms,
            grace_period_ms,
            overage_policy,
            idempotency_key,
            dry_run,
            metadata,
            soft_landing,
            key_is_unique,
            also,
        )
        body = await self.store.reserve(cmd)
        return ReserveResult.model_validate(body)

    async def decide(
        self,
        subject: SubjectLike,
        action: ActionLike,
        estimate: AmountLike,
        *,
        soft_landing: SoftLanding | Mapping[str, Any] | None = None,
        also: Sequence[AmountLike] = (),
    ) -> DecideResult:
        """What `reserve` would answer now, without holding anything (not a guarantee)."""
        cmd = self._reserve_command(
            subject, action, estimate, None, None, None, None, False, None, soft_landing, False, also
        )
        body = await self.store.decide(cmd)
        return DecideResult.model_validate(body)

    def _reserve_command(
        self,
        subject: SubjectLike,
        action: ActionLike,
        estimate: AmountLike,
        ttl_ms: int | None,
        grace_period_ms: int | None,
        overage_policy: OveragePolicy | str | None,
        idempotency_key: str | None,
        dry_run: bool,
        metadata: Mapping[str, Any] | None,
        soft_landing: SoftLanding | Mapping[str, Any] | None,
        key_is_unique: bool = False,
        also: Sequence[AmountLike] = (),
    ) -> ReserveCommand:
        _, subj_json, scopes, subj_text = _subject_parts(subject)
        _, act_json, act_text = _action_parts(action)
        est = _amount(estimate, "estimate")
        others = _also(also, est.unit, "also")
        ttl = _int(self.default_ttl_ms if ttl_ms is None else ttl_ms, "ttl_ms", 1_000, 86_400_000)
        grace = _int(
            self.default_grace_period_ms if grace_period_ms is None else grace_period_ms, "grace_period_ms", 0, 60_000
        )
        policy = self._policy(overage_policy)
        soft = None if soft_landing is None else _build(SoftLanding, soft_landing, "soft_landing")
        if not isinstance(dry_run, bool):
            raise InvalidRequestError("dry_run must be a bool")
        meta = _json_copy(metadata, "metadata")
        soft_json = soft.model_dump() if soft else None
        if not isinstance(key_is_unique, bool):
            raise InvalidRequestError("key_is_unique must be a bool")
        if idempotency_key is None or key_is_unique:
            payload_hash = ""  # a key minted here (or vouched for as new) can never be replayed
            _jsonable(metadata, "metadata")
        else:
            try:
                # The canonical JSON `_fingerprint` would hash, put together from its parts (the subject's
                # and the action's are cached); encoding `meta` also proves it serialisable.
                meta_text = "null" if meta is None else _STRICT_JSON(meta)
                raw = "".join(
                    (
                        '{"action":',
                        act_text or _STRICT_JSON(act_json),
                        (',"also":' + _STRICT_JSON(others)) if others else "",
                        ',"dry_run":',
                        "true" if dry_run else "false",
                        ',"estimate":{"amount":',
                        int.__repr__(est.amount),
                        ',"unit":',
                        _json_str(est.unit.value),
                        '},"grace_period_ms":',
                        int.__repr__(grace),
                        ',"metadata":',
                        meta_text,
                        ',"overage_policy":',
                        _json_str(policy.value),
                        ',"soft_landing":',
                        "null" if soft_json is None else _STRICT_JSON(soft_json),
                        ',"subject":',
                        subj_text or _STRICT_JSON(subj_json),
                        ',"ttl_ms":',
                        int.__repr__(ttl),
                        "}",
                    )
                )
                payload_hash = hashlib.sha256(raw.encode()).hexdigest()
            except (TypeError, ValueError):
                _jsonable(metadata, "metadata")  # the caller's error, as it always was
                payload = {
                    "subject": subj_json,
                    "action": act_json,
                    "estimate": {"unit": est.unit.value, "amount": est.amount},
                    "ttl_ms": ttl,
                    "grace_period_ms": grace,
                    "overage_policy": policy.value,
                    "dry_run": dry_run,
                    "metadata": meta,
                    "soft_landing": soft_json,
                }
                if others:
                    payload["also"] = others
                payload_hash = _fingerprint(payload)
        return ReserveCommand(
            idempotency_key=_key(idempotency_key),
            payload_hash=payload_hash,
            subject=subj_json,
            action=act_json,
            scopes=scopes,
            unit=est.unit.value,
            estimate=est.amount,
            ttl_ms=ttl,
            grace_period_ms=grace,
            overage_policy=policy.value,
            dry_run=dry_run,
            allow_unbudgeted=self.allow_unbudgeted,
            metadata=meta,
            soft_landing=soft_json,
            also=tuple((a["unit"], a["amount"]) for a in others),
        )

    @staticmethod
    def _subject_action(subject: SubjectLike, action: ActionLike) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        _, subj_json, scopes, _ = _subject_parts(subject)
        _, act_json, _ = _action_parts(action)
        return subj_json, act_json, scopes

    def _policy(self, value: OveragePolicy | str | None) -> OveragePolicy:
        if value is None:
            return self.default_overage_policy
        try:
            return OveragePolicy(value)
        except ValueError:
            raise InvalidRequestError(
                f"unknown overage_policy {value!r}; known: {', '.join(p.value for p in OveragePolicy)}"
            ) from None

    async def commit(
        self,
        reservation_id: str,
        actual: AmountLike,
        *,
        idempotency_key: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        also: Sequence[AmountLike] = (),
        coalesce: bool = False,
    ) -> CommitResult:
        """Charge `actual` and return the rest of the hold. The default key makes a retried commit safe.

        `also`: the actual amounts in the hold's other units; one not named is charged what it held.
        `coalesce=True`: nobody waits for this answer (a settle in the background), so the store may write it
        in the transaction of its next operation, a few milliseconds later (SQLite: one transaction per call
        instead of two); the answer comes once it is written."""
        rid = _reservation_id(reservation_id)
        amt = _amount(actual, "actual")
        unit = amt.unit.value
        others = _also(also, amt.unit, "also")
        metrics_copy = _json_copy(metrics, "metrics")
        metadata_copy = _json_copy(metadata, "metadata")
        if metrics_copy is None and metadata_copy is None:
            payload_hash = f"{rid}|{unit}|{amt.amount}" + "".join(f"|{a['unit']}={a['amount']}" for a in others)
        else:
            payload: dict[str, Any] = {
                "reservation_id": rid,
                "actual": {"unit": unit, "amount": amt.amount},
                "metrics": metrics_copy,
                "metadata": metadata_copy,
            }
            if others:
                payload["also"] = others
            payload_hash = _checked_fingerprint(payload, {"metrics": metrics, "metadata": metadata})
        cmd = CommitCommand(
            reservation_id=rid,
            idempotency_key=_key(idempotency_key, f"commit:{rid}"),
            payload_hash=payload_hash,
            unit=unit,
            actual=amt.amount,
            metrics=metrics_copy,
            metadata=metadata_copy,
            also=tuple((a["unit"], a["amount"]) for a in others),
            coalesce=coalesce is True,
        )
        return CommitResult.model_validate(await self.store.commit(cmd))

    async def release(
        self, reservation_id: str, *, reason: str | None = None, idempotency_key: str | None = None
    ) -> ReleaseResult:
        """Give the whole hold back (the action did not happen)."""
        rid = _reservation_id(reservation_id)
        if reason is not None and (not isinstance(reason, str) or len(reason) > 256):
            raise InvalidRequestError("reason must be a string of at most 256 characters")
        cmd = ReleaseCommand(
            reservation_id=rid,
            idempotency_key=_key(idempotency_key, f"release:{rid}"),
            payload_hash=_fingerprint({"reservation_id": rid, "reason": reason}),
            reason=reason,
        )
        return ReleaseResult.model_validate(await self.store.release(cmd))

    async def extend(
        self,
        reservation_id: str,
        extend_by_ms: int,
        *,
        idempotency_key: str | None = None,
        max_extensions: int | _Unset | None = UNSET,
    ) -> ExtendResult:
        """Push the expiry of a live reservation (a heartbeat); counts from the current expiry, not now.
        `max_extensions`: this reservation's limit in place of the ledger's (None: no limit)."""
        rid = _reservation_id(reservation_id)
        by = _int(extend_by_ms, "extend_by_ms", 1, 86_400_000)
        cmd = ExtendCommand(
            reservation_id=rid,
            idempotency_key=_key(idempotency_key),
            payload_hash=_fingerprint({"reservation_id": rid, "extend_by_ms": by}),
            extend_by_ms=by,
            max_extensions=(
                self.max_extensions
                if isinstance(max_extensions, _Unset)
                else None
                if max_extensions is None
                else _int(max_extensions, "max_extensions", 0, 10**9)
            ),
        )
        return ExtendResult.model_validate(await self.store.extend(cmd))

    async def record_event(
        self,
        subject: SubjectLike,
        action: ActionLike,
        actual: AmountLike,
        *,
        overage_policy: OveragePolicy | str | None = None,
        idempotency_key: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        also: Sequence[AmountLike] = (),
    ) -> EventResult:
        """Direct debit without a reservation (spend known only afterwards), atomic across scopes.

        `also`: charges in other units in the same debit (e.g. the call's tokens next to its dollars)."""
        subj_json, act_json, scopes = self._subject_action(subject, action)
        amt = _amount(actual, "actual")
        others = _also(also, amt.unit, "also")
        policy = self._policy(overage_policy)
        payload: dict[str, Any] = {
            "subject": subj_json,
            "action": act_json,
            "actual": {"unit": amt.unit.value, "amount": amt.amount},
            "overage_policy": policy.value,
            "metrics": _json_copy(metrics, "metrics"),
            "metadata": _json_copy(metadata, "metadata"),
        }
        if others:
            payload["also"] = others
        payload_hash = _checked_fingerprint(payload, {"metrics": metrics, "metadata": metadata})
        cmd = EventCommand(
            idempotency_key=_key(idempotency_key),
            payload_hash=payload_hash,
            subject=payload["subject"],
            action=payload["action"],
            scopes=scopes,
            unit=amt.unit.value,
            actual=amt.amount,
            overage_policy=policy.value,
            allow_unbudgeted=self.allow_unbudgeted,
            metrics=payload["metrics"],
            metadata=payload["metadata"],
            also=tuple((a["unit"], a["amount"]) for a in others),
        )
        return EventResult.model_validate(await self.store.record_event(cmd))

    async def note(
        self, scope: str, reason_code: str, *, would: bool = False, data: Mapping[str, Any] | None = None
    ) -> int:
        """Log a refusal decided before any budget was looked at (an unknown payer, an unpriced model, an
        unmetered route) as a `denied` event, or `would_deny` when it was only evaluated (shadow mode).
        Changes no balance; returns the event id."""
        parse_scope(scope)
        if not isinstance(reason_code, str) or not _REASON.match(reason_code):
            raise InvalidRequestError(f"reason_code must be UPPER_SNAKE_CASE, got {reason_code!r}")
        cmd = NoteCommand(
            "would_deny" if would else "denied", scope, reason_code, _jsonable(data, "data") if data else None
        )
        return await self.store.note(cmd)

    # --- reads ---------------------------------------------------------------------------------

    async def balances(self, scope: str | None = None, *, unit: Unit | str | None = None) -> list[Balance]:
        """Budgets at `scope` and below it (every budget when None)."""
        prefix = None if scope is None else _scope(scope)
        rows = await self.store.balances(prefix, None if unit is None else _unit(unit).value)
        return [Balance.model_validate(r) for r in rows]

    async def balance(self, scope: str, unit: Unit | str = Unit.USD_MICROCENTS) -> Balance:
        """The one budget at exactly (scope, unit)."""
        u = _unit(unit)
        for b in await self.balances(scope, unit=u):
            if b.scope == scope:
                return b
        raise NotFoundError(f"no {u.value} budget at {scope}", scope=scope)

    async def get_reservation(self, reservation_id: str) -> Reservation:
        rid = _reservation_id(reservation_id)
        row = await self.store.get_reservation(rid)
        if row is None:
            raise NotFoundError(f"reservation {rid!r} not found", reservation_id=rid)
        return Reservation.model_validate(row)

    async def list_reservations(
        self,
        *,
        status: ReservationStatus | str | None = None,
        scope: str | None = None,
        idempotency_key: str | None = None,
        limit: int = 100,
    ) -> list[Reservation]:
        """Newest first; `idempotency_key` recovers the id of a reservation whose answer was lost."""
        st = None
        if status is not None:
            try:
                st = ReservationStatus(status).value
            except ValueError:
                raise InvalidRequestError(f"unknown reservation status {status!r}") from None
        rows = await self.store.list_reservations(
            status=st,
            scope_prefix=None if scope is None else _scope(scope),
            idempotency_key=idempotency_key,
            limit=_int(limit, "limit", 1, 100_000),
        )
        return [Reservation.model_validate(r) for r in rows]

    async def events(
        self,
        *,
        after: int = 0,
        limit: int = 100,
        reservation_id: str | None = None,
        scope: str | None = None,
        newest: bool = False,
        calls: bool = True,
    ) -> list[LedgerEvent]:
        """The audit log, oldest first, from `event_id > after` (page with the last id you saw); with
        `newest`, the last `limit` events, newest first. `calls=False` leaves `call_id`, `model` and `route`
        as the event itself has them (a reservation's events then skip the read of their reservation): for
        readers that only add amounts up, such as a burn rate."""
        if not isinstance(calls, bool):
            raise InvalidRequestError("calls must be a bool")
        rows = await self._event_rows(after, limit, newest, reservation_id, scope)
        return await self._with_calls(rows, join=calls)

    async def event_rows(self, *, after: int = 0, limit: int = 100, newest: bool = False) -> list[dict[str, Any]]:
        """`events` as the store keeps them: dicts of event_id, ts_ms, type, scope, unit (its name), amount,
        reservation_id, reason_code and data, with no call named and no model built, for readers of many
        events that only add amounts up (a burn rate read on the proxy's event loop)."""
        return await self._event_rows(after, limit, newest)

    async def _event_rows(
        self, after: int, limit: int, newest: bool, reservation_id: str | None = None, scope: str | None = None
    ) -> list[dict[str, Any]]:
        if not isinstance(newest, bool):
            raise InvalidRequestError("newest must be a bool")
        return await self.store.events(
            after=_int(after, "after", 0, INT64_MAX),
            limit=_int(limit, "limit", 1, 100_000),
            reservation_id=reservation_id,
            scope_prefix=None if scope is None else _scope(scope),
            newest=newest,
        )

    async def _with_calls(self, rows: list[dict[str, Any]], join: bool = True) -> list[LedgerEvent]:
        """Name the call, model and route behind each event. Decisions and debits carry their subject and
        action; a reservation's events (reserved, committed, released, expired) are joined with the
        reservation row, read once per reservation, so each event stays small in the log."""
        found: dict[str, tuple[str | None, str | None, str | None]] = {}
        out = []
        for row in rows:
            data = row.get("data") or {}
            raw_action, raw_meta = data.get("action"), data.get("metadata")
            action: dict[str, Any] = raw_action if isinstance(raw_action, dict) else {}
            meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
            call = data.get("call_id") or data.get("key")
            model = data.get("model") or meta.get("model") or action.get("name")
            route = data.get("route") or meta.get("route") or action.get("kind")
            rid = row.get("reservation_id")
            if join and rid and not (call and model and route):
                if rid not in found:
                    r = await self.store.get_reservation(rid)
                    if r is None:
                        found[rid] = (None, None, None)
                    else:
                        rmeta = r.get("metadata") or {}
                        act = r.get("action") or {}
                        found[rid] = (
                            r.get("idempotency_key"),
                            rmeta.get("model") or act.get("name"),
                            rmeta.get("route") or act.get("kind"),
                        )
                rc, rm, rr = found[rid]
                call, model, route = call or rc, model or rm, route or rr
            out.append(
                LedgerEvent.model_validate(
                    {**row, "call_id": _text(call), "model": _text(model), "route": _text(route)}
                )
            )
        return out

    # --- admin ---------------------------------------------------------------------------------

    async def set_budget(
        self,
        scope: str,
        allocated: AmountLike,
        *,
        overdraft_limit: AmountLike | int | None = None,
        caps: Caps | Mapping[str, Any] | None = None,
        period: Period | Mapping[str, Any] | str | None = None,
        rate_limits: Sequence[RateLimit | Mapping[str, Any]] | None = None,
        alerts: Sequence[int | str] | None = None,
    ) -> Balance:
        """Create a budget or change its allocation (spent, reserved and debt are kept).

        `period` (`"daily"`, `"monthly"`, `{"every": "30d"}`, `{"every": "daily", "tz": "Europe/Paris"}`):
        spent starts again from zero at each boundary. `rate_limits`: at most `amount` spent or held in
        any sliding `window` (`{"amount": "5usd", "window": "10m", "on_exceed": "freeze"}`), else DENY
        RATE_EXCEEDED. `alerts` (`[50, 80, 100]` or `["80%"]`): a `threshold_crossed` event once per period.
        For these three, None keeps what the budget has and an empty value removes it."""
        amt = _amount(allocated, "allocated")
        limit = None
        if overdraft_limit is not None:
            if isinstance(overdraft_limit, int):
                limit = _int(overdraft_limit, "overdraft_limit", 0, INT64_MAX)
            else:
                lim = _amount(overdraft_limit, "overdraft_limit")
                if lim.unit is not amt.unit:
                    raise InvalidRequestError(f"overdraft_limit is in {lim.unit.value}, the budget in {amt.unit.value}")
                limit = lim.amount
        cap_dict = None
        if caps is not None:
            cap_dict = _build(Caps, caps, "caps").model_dump(exclude_none=True)
        timed = [name for name, v in (("period", period), ("rate_limits", rate_limits), ("alerts", alerts)) if v]
        if timed and not self.store.time_policies:
            raise ConfigError(f"{type(self.store).__name__} does not keep {', '.join(timed)} yet")
        cmd = BudgetCommand(
            "set",
            _scope(scope),
            amt.unit.value,
            amt.amount,
            limit,
            cap_dict,
            period=parse_period(period),
            rate_limits=parse_rate_limits(rate_limits, amt.unit),
            alerts=parse_alerts(alerts),
        )
        return Balance.model_validate(await self.store.change_budget(cmd))

    async def fund(self, scope: str, amount: AmountLike) -> Balance:
        """Add to a budget's allocation; outstanding debt is repaid first."""
        amt = _amount(amount, "amount")
        cmd = BudgetCommand("fund", _scope(scope), amt.unit.value, amt.amount)
        return Balance.model_validate(await self.store.change_budget(cmd))

    async def freeze(self, scope: str, unit: Unit | str = Unit.USD_MICROCENTS) -> Balance:
        """Block new reservations and events on a budget; live reservations can still settle."""
        return await self._status("freeze", scope, unit)

    async def unfreeze(self, scope: str, unit: Unit | str = Unit.USD_MICROCENTS) -> Balance:
        return await self._status("unfreeze", scope, unit)

    async def close(self, scope: str, unit: Unit | str = Unit.USD_MICROCENTS) -> Balance:
        """Close a budget for good (it can no longer be funded or unfrozen)."""
        return await self._status("close", scope, unit)

    async def _status(self, op: str, scope: str, unit: Unit | str) -> Balance:
        cmd = BudgetCommand(op, _scope(scope), _unit(unit).value)
        return Balance.model_validate(await self.store.change_budget(cmd))

    # --- maintenance ---------------------------------------------------------------------------

    async def sweep(self, limit: int = 1000) -> int:
        """Expire overdue reservations now (their holds return); returns how many."""
        if not isinstance(self.store, SupportsSweep):
            return 0
        return await self.store.expire_due(limit)

    async def verify(self) -> list[str]:
        """Reconcile budgets against reservations and the event log; an empty list means the books agree."""
        if not isinstance(self.store, SupportsSweep):
            raise ConfigError(f"{type(self.store).__name__} cannot verify its books")
        return await self.store.verify()

    def start_sweeper(self, interval_s: float = 1.0) -> asyncio.Task[None]:
        """Run `sweep` every `interval_s` on the running loop until `aclose()`."""
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(interval_s))
        return self._sweeper

    async def _sweep_forever(self, interval_s: float) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("cycles sweeper failed; retrying in %.1fs", interval_s)
            await asyncio.sleep(interval_s)

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self.store.aclose()

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _reservation_id(value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 128:
        raise InvalidRequestError(f"reservation_id must be a non-empty string, got {value!r}")
    return value


_LEDGER_SETTINGS = {
    "allow_unbudgeted",
    "default_ttl_ms",
    "default_grace_period_ms",
    "default_overage_policy",
    "max_extensions",
}


def open_ledger(url: str, **settings: Any) -> Ledger:
    """Open a ledger on the store `url` names (`sqlite:///budgets.db`, `sqlite:///:memory:`).

    Ledger settings (`allow_unbudgeted`, `default_ttl_ms`, …) go to the Ledger; the rest (e.g. `clock`,
    `batch_size`) to the store. Usable as `async with open_ledger(url) as ledger:`.
    """
    ledger_kw = {k: v for k, v in settings.items() if k in _LEDGER_SETTINGS}
    store_kw = {k: v for k, v in settings.items() if k not in _LEDGER_SETTINGS}
    try:
        store = store_from_url(url, **store_kw)
    except TypeError as exc:
        raise ConfigError(f"unknown setting for {url!r}: {exc}") from None
    return Ledger(store, **ledger_kw)
