"""`memory://`: the ledger in this process's memory, for tests, notebooks and short-lived scripts.

Nothing survives the process. `memory://` is a private ledger; `memory://name` is shared by every
store opened with that name in this process (kept until the process ends), like SQLite's named
in-memory databases. It is
also the proof of the store interface: a whole store is this class (one `Txn` over dicts), one line in
the registry and one fixture parameter, and it passes the same conformance suite as SQLite and Redis.

Atomic by construction: one lock, and each operation writes into an overlay that is applied only when
the operation returns (an error discards it).
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from .. import operations, rules
from ..errors import ConfigError, StoreUnavailableError
from ..operations import Failed
from .base import (
    BudgetCommand,
    CommitCommand,
    EventCommand,
    ExtendCommand,
    NoteCommand,
    ReleaseCommand,
    ReserveCommand,
    Store,
    SupportsState,
    SupportsSweep,
    Txn,
)

__all__ = ["MemoryStore"]

Clock = Callable[[], int]
_LAZY_EXPIRY = 64  # like SQLite: every write first expires up to this many overdue holds


def _copy_budget(b: rules.BudgetState) -> rules.BudgetState:
    return dataclasses.replace(
        b,
        alerts_fired=list(b.alerts_fired) if b.alerts_fired else b.alerts_fired,
        rate_fired=list(b.rate_fired) if b.rate_fired else b.rate_fired,
    )


def _copy_reservation(r: rules.ReservationState) -> rules.ReservationState:
    return dataclasses.replace(r, extra=copy.deepcopy(r.extra))


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.budgets: dict[tuple[str, str], rules.BudgetState] = {}
        self.reservations: dict[str, rules.ReservationState] = {}
        self.active: set[str] = set()
        self.events: list[dict[str, Any]] = []
        self.idempotency: dict[tuple[str, str], tuple[str, dict[str, Any], int]] = {}
        self.window: dict[tuple[str, str], list[tuple[int, str, int]]] = {}  # (scope, unit) → (ts, ref, amount)
        self.records: dict[str, str] = {}  # keyed state (SupportsState)


def _under(scope: str, prefix: str | None) -> bool:
    return prefix is None or scope == prefix or scope.startswith(prefix + "/")


class MemoryTxn(Txn):
    """Reads see the state plus this operation's own writes; `apply` makes the writes the state."""

    def __init__(self, state: _State, now: int) -> None:
        self.state = state
        self.now = now
        self.budgets_w: dict[tuple[str, str], rules.BudgetState] = {}
        self.reservations_w: dict[str, rules.ReservationState] = {}
        self.events_w: list[dict[str, Any]] = []
        self.idempotency_w: dict[tuple[str, str], tuple[str, dict[str, Any], int]] = {}
        self.prune_before: int | None = None
        self.window_w: dict[tuple[str, str], list[tuple[int, str, int]]] | None = None  # copy-on-write
        self.state_w: dict[str, str | None] = {}

    def budgets(self, scopes: list[str], unit: str | None = None) -> list[rules.BudgetState]:
        keys = {**self.state.budgets, **self.budgets_w}
        out = []
        for scope in scopes:
            for (s, u), b in sorted(keys.items()):
                if s == scope and (unit is None or u == unit):
                    out.append(_copy_budget(b))
        return out

    def save_budgets(self, budgets: list[rules.BudgetState]) -> None:
        for b in budgets:
            self.budgets_w[(b.scope, b.unit)] = _copy_budget(b)

    def insert_budget(self, budget: rules.BudgetState) -> None:
        self.save_budgets([budget])

    def reservation(self, reservation_id: str) -> rules.ReservationState | None:
        r = self.reservations_w.get(reservation_id) or self.state.reservations.get(reservation_id)
        return None if r is None else _copy_reservation(r)

    def insert_reservation(self, r: rules.ReservationState) -> None:
        self.reservations_w[r.reservation_id] = _copy_reservation(r)

    def update_reservation(self, r: rules.ReservationState) -> None:
        self.reservations_w[r.reservation_id] = _copy_reservation(r)

    def due(self, now: int, limit: int) -> list[rules.ReservationState]:
        found = []
        for rid in self.state.active:
            r = self.reservation(rid)
            if r is not None and r.status == "ACTIVE" and r.deadline_ms < now:
                found.append(r)
        return sorted(found, key=lambda r: (r.deadline_ms, r.reservation_id))[:limit]

    def append_event(
        self,
        now: int,
        type_: str,
        scope: str | None,
        unit: str | None,
        amount: int | None,
        reservation_id: str | None,
        reason_code: str | None,
        data: dict[str, Any] | None,
    ) -> int:
        event_id = len(self.state.events) + len(self.events_w) + 1
        self.events_w.append(
            {
                "event_id": event_id,
                "ts_ms": now,
                "type": type_,
                "scope": scope,
                "unit": unit,
                "amount": amount,
                "reservation_id": reservation_id,
                "reason_code": reason_code,
                "data": copy.deepcopy(data) if data else {},
            }
        )
        return event_id

    def idempotency(self, op: str, key: str) -> tuple[str, dict[str, Any]] | None:
        found = self.idempotency_w.get((op, key)) or self.state.idempotency.get((op, key))
        return None if found is None else (found[0], copy.deepcopy(found[1]))

    def remember(self, op: str, key: str, payload_hash: str, response: dict[str, Any]) -> None:
        self.idempotency_w[(op, key)] = (payload_hash, copy.deepcopy(response), self.now)

    def prune_idempotency(self, before_ms: int) -> None:
        self.prune_before = before_ms

    def _windows(self) -> dict[tuple[str, str], list[tuple[int, str, int]]]:
        if self.window_w is None:
            self.window_w = {k: list(v) for k, v in self.state.window.items()}
        return self.window_w

    def window(self, scope: str, unit: str, since_ms: int) -> list[tuple[int, int]]:
        entries = (self.window_w if self.window_w is not None else self.state.window).get((scope, unit), [])
        return [(ts, a) for ts, _, a in sorted(entries) if ts > since_ms]

    def window_add(self, scope: str, unit: str, ts_ms: int, ref: str, amount: int) -> None:
        self._windows().setdefault((scope, unit), []).append((ts_ms, ref, amount))

    def window_set(self, ref: str, unit: str, amount: int) -> None:
        for (_, u), entries in self._windows().items():
            if u == unit:
                entries[:] = [(ts, r, amount if r == ref else a) for ts, r, a in entries]

    def window_drop(self, ref: str) -> None:
        for entries in self._windows().values():
            entries[:] = [e for e in entries if e[1] != ref]

    def window_prune(self, scope: str, unit: str, before_ms: int) -> None:
        entries = self._windows().get((scope, unit), [])
        entries[:] = [e for e in entries if e[0] > before_ms]

    def old_events(
        self, before_ms: int, limit: int
    ) -> list[tuple[int, str, str, int | None, dict[str, Any], str | None, str | None]]:
        return []  # a memory ledger lives as long as its process: nothing is pruned

    def forget_events(self, event_ids: list[int], folded: dict[tuple[str, str], int]) -> None:
        pass

    def forget_reservations(self, before_ms: int, limit: int) -> None:
        pass

    def state_get(self, key: str) -> str | None:
        if key in self.state_w:
            return self.state_w[key]
        return self.state.records.get(key)

    def state_set(self, key: str, value: str | None) -> None:
        self.state_w[key] = value

    def state_list(self, prefix: str) -> dict[str, str]:
        merged: dict[str, str | None] = {**self.state.records, **self.state_w}
        return {k: v for k, v in sorted(merged.items()) if k.startswith(prefix) and v is not None}

    def period_due(self, now: int, limit: int) -> list[rules.BudgetState]:
        due = [
            b
            for b in {**self.state.budgets, **self.budgets_w}.values()
            if b.period_end_ms is not None and b.period_end_ms <= now
        ]
        due.sort(key=lambda b: (b.period_end_ms or 0, b.scope, b.unit))  # ties in the order of Txn.budgets
        return [_copy_budget(b) for b in due[:limit]]

    def all_budgets(self, scope_prefix: str | None, unit: str | None) -> list[rules.BudgetState]:
        merged = {**self.state.budgets, **self.budgets_w}
        return [
            _copy_budget(b)
            for (scope, u), b in sorted(merged.items())
            if _under(scope, scope_prefix) and (unit is None or u == unit)
        ]

    def find_reservations(
        self, status: str | None, scope_prefix: str | None, idempotency_key: str | None, limit: int
    ) -> list[rules.ReservationState]:
        out = []
        for rid in sorted(self.state.reservations, reverse=True):
            r = self.state.reservations[rid]
            if status and r.status != status:
                continue
            if idempotency_key and r.idempotency_key != idempotency_key:
                continue
            if not _under(r.scope_path, scope_prefix):
                continue
            out.append(_copy_reservation(r))
            if len(out) >= limit:
                break
        return out

    def find_events(
        self, after: int, limit: int, reservation_id: str | None, scope_prefix: str | None, newest: bool
    ) -> list[dict[str, Any]]:
        rows = self.state.events[after:]
        if newest:
            rows = list(reversed(rows))
        out = []
        for e in rows:
            if reservation_id and e["reservation_id"] != reservation_id:
                continue
            if scope_prefix and not (e["scope"] and _under(e["scope"], scope_prefix)):
                continue
            out.append(copy.deepcopy(e))
            if len(out) >= limit:
                break
        return out

    def active_reservations(self) -> Iterable[rules.ReservationState]:
        return [_copy_reservation(self.state.reservations[rid]) for rid in sorted(self.state.active)]

    def charges(self) -> Iterable[tuple[str, int, list[str]]]:
        for e in self.state.events:
            if e["type"] in ("committed", "debited", "period_reset"):
                r = self.state.reservations.get(e["reservation_id"] or "")
                yield from operations.charges_of(e["type"], e["unit"], e["amount"], e["data"], r, e["scope"])

    def apply(self) -> None:
        st = self.state
        st.budgets.update(self.budgets_w)
        for rid, r in self.reservations_w.items():
            st.reservations[rid] = r
            if r.status == "ACTIVE":
                st.active.add(rid)
            else:
                st.active.discard(rid)
        st.events.extend(self.events_w)
        st.idempotency.update(self.idempotency_w)
        if self.window_w is not None:
            st.window = self.window_w
        for key, value in self.state_w.items():
            if value is None:
                st.records.pop(key, None)
            else:
                st.records[key] = value
        if self.prune_before is not None:
            cutoff = self.prune_before
            st.idempotency = {k: v for k, v in st.idempotency.items() if v[2] >= cutoff}


_NAMED: dict[str, _State] = {}
_NAMED_LOCK = threading.Lock()


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class MemoryStore(Store, SupportsSweep, SupportsState):
    """`memory://` (a private ledger) or `memory://name` (shared by name within this process)."""

    schemes = ("memory",)
    time_policies = True

    def __init__(self, name: str = "", *, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or _wall_clock_ms
        if name:
            with _NAMED_LOCK:
                self._state = _NAMED.setdefault(name, _State())
        else:
            self._state = _State()
        self._lock = self._state.lock
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **settings: Any) -> MemoryStore:
        if not url.lower().startswith("memory://"):
            raise ConfigError(f"memory store URL must start with memory://, got {url!r}")
        return cls(url[len("memory://") :], **settings)

    def _run(self, op: Callable[..., Any], *args: Any, write: bool = True) -> Any:
        if self._closed:
            raise StoreUnavailableError("the memory store is closed")
        with self._lock:
            now = self.clock()
            tx = MemoryTxn(self._state, now)
            swept = 0
            if write:
                swept = operations.expire_due(tx, now, _LAZY_EXPIRY)
                tx.apply()  # kept whatever the operation does, as SQLite keeps its expiry pass
                tx = MemoryTxn(self._state, now)
            result = op(tx, now, *args)  # raises: the overlay is dropped, nothing changed
            tx.apply()
        if op is operations.sweep:
            result += swept
        if isinstance(result, Failed):
            raise result.error
        return result

    async def reserve(self, cmd: ReserveCommand) -> dict[str, Any]:
        return self._run(operations.reserve, cmd)  # type: ignore[no-any-return]

    async def decide(self, cmd: ReserveCommand) -> dict[str, Any]:
        return self._run(operations.decide, cmd, write=False)  # type: ignore[no-any-return]

    async def commit(self, cmd: CommitCommand) -> dict[str, Any]:
        return self._run(operations.commit, cmd)  # type: ignore[no-any-return]

    async def release(self, cmd: ReleaseCommand) -> dict[str, Any]:
        return self._run(operations.release, cmd)  # type: ignore[no-any-return]

    async def extend(self, cmd: ExtendCommand) -> dict[str, Any]:
        return self._run(operations.extend, cmd)  # type: ignore[no-any-return]

    async def record_event(self, cmd: EventCommand) -> dict[str, Any]:
        return self._run(operations.record_event, cmd)  # type: ignore[no-any-return]

    async def note(self, cmd: NoteCommand) -> int:
        return self._run(operations.note, cmd)  # type: ignore[no-any-return]

    async def change_budget(self, cmd: BudgetCommand) -> dict[str, Any]:
        return self._run(operations.change_budget, cmd)  # type: ignore[no-any-return]

    async def balances(self, scope_prefix: str | None = None, unit: str | None = None) -> list[dict[str, Any]]:
        return self._run(operations.balances, scope_prefix, unit, write=False)  # type: ignore[no-any-return]

    async def get_reservation(self, reservation_id: str) -> dict[str, Any] | None:
        return self._run(operations.get_reservation, reservation_id, write=False)  # type: ignore[no-any-return]

    async def list_reservations(
        self,
        *,
        status: str | None = None,
        scope_prefix: str | None = None,
        idempotency_key: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        return self._run(  # type: ignore[no-any-return]
            operations.list_reservations, status, scope_prefix, idempotency_key, limit, write=False
        )

    async def events(
        self,
        *,
        after: int = 0,
        limit: int = 100,
        reservation_id: str | None = None,
        scope_prefix: str | None = None,
        newest: bool = False,
    ) -> list[dict[str, Any]]:
        return self._run(  # type: ignore[no-any-return]
            operations.events, after, limit, reservation_id, scope_prefix, newest, write=False
        )

    async def expire_due(self, limit: int = 1000) -> int:
        return self._run(operations.sweep, limit, None)  # type: ignore[no-any-return]

    async def verify(self) -> list[str]:
        return self._run(operations.verify, write=False)  # type: ignore[no-any-return]

    async def state_get(self, key: str) -> str | None:
        return self._run(operations.state_get, key, write=False)  # type: ignore[no-any-return]

    async def state_put(self, key: str, value: str | None, expected: str | None) -> bool:
        return self._run(operations.state_put, key, value, expected)  # type: ignore[no-any-return]

    async def state_list(self, prefix: str) -> dict[str, str]:
        return self._run(operations.state_list, prefix, write=False)  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        self._closed = True
