"""The store interface: one atomic call per protocol operation.

The ledger validates and normalises a request into a command, then hands it to the store in ONE call.
The store does the idempotency check, the rule evaluation (`cycles_ledger.rules`) and every write as a
single atomic unit, on its own clock — a SQLite transaction, a Redis Lua script, or one HTTP request
to a Cycles server. Results come back as plain JSON-able dicts shaped like the result models.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ..rules import BudgetState, ReservationState

__all__ = [
    "BudgetCommand",
    "CommitCommand",
    "EventCommand",
    "ExtendCommand",
    "NoteCommand",
    "ReleaseCommand",
    "ReserveCommand",
    "Store",
    "SupportsState",
    "SupportsSweep",
    "Txn",
]


@dataclass(frozen=True, slots=True)
class ReserveCommand:
    idempotency_key: str
    payload_hash: str  # "" when the ledger minted the key itself: it can never be replayed
    subject: dict[str, Any]
    action: dict[str, Any]
    scopes: list[str]  # derived scope ids, canonical order
    unit: str
    estimate: int
    ttl_ms: int
    grace_period_ms: int
    overage_policy: str
    dry_run: bool
    allow_unbudgeted: bool
    metadata: dict[str, Any] | None = None
    soft_landing: dict[str, Any] | None = None
    also: tuple[tuple[str, int], ...] = ()  # holds in other units, in the same decision


@dataclass(frozen=True, slots=True)
class CommitCommand:
    reservation_id: str
    idempotency_key: str
    payload_hash: str
    unit: str
    actual: int
    metrics: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    also: tuple[tuple[str, int], ...] = ()  # actuals in the hold's other units (unnamed: charged as held)
    # Nobody is waiting on this answer (a settle in the background): a store may hold the commit back a few
    # milliseconds and write it in the transaction of the next operation (SQLite), instead of a transaction
    # of its own. Not part of the request's payload: a replay matches with or without it.
    coalesce: bool = False


@dataclass(frozen=True, slots=True)
class ReleaseCommand:
    reservation_id: str
    idempotency_key: str
    payload_hash: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ExtendCommand:
    reservation_id: str
    idempotency_key: str
    payload_hash: str
    extend_by_ms: int
    max_extensions: int | None


@dataclass(frozen=True, slots=True)
class EventCommand:
    idempotency_key: str
    payload_hash: str
    subject: dict[str, Any]
    action: dict[str, Any]
    scopes: list[str]
    unit: str
    actual: int
    overage_policy: str
    allow_unbudgeted: bool
    metrics: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    also: tuple[tuple[str, int], ...] = ()  # charges in other units, in the same debit


@dataclass(frozen=True, slots=True)
class NoteCommand:
    """A decision event on its own: `type` denied or would_deny, on `scope`, with a reason code."""

    type: str
    scope: str
    reason_code: str
    data: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class BudgetCommand:
    """Admin change to one (scope, unit) budget: `op` is set, fund, freeze, unfreeze or close."""

    op: str
    scope: str
    unit: str
    amount: int | None = None
    overdraft_limit: int | None = None
    caps: dict[str, Any] | None = None
    # set only; None leaves them as they are, an empty value removes them
    period: dict[str, Any] | None = None  # models.Period.spec()
    rate_limits: list[dict[str, Any]] | None = None
    alerts: list[int] | None = None


class Store(ABC):
    """Where budgets, reservations, idempotency records and events live.

    Every mutating method is atomic: either all of its effects (balances, reservation row, idempotency
    record, events) become visible together, or none do. A typed `CyclesError` means nothing changed,
    except `ReservationExpiredError`, which may come after the store expired the reservation it found.
    """

    schemes: ClassVar[tuple[str, ...]] = ()
    # Periods, rate limits and alerts on budgets (issue 14): the stores that run `operations` have them.
    time_policies: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def from_url(cls, url: str, **settings: Any) -> Store: ...

    @abstractmethod
    async def reserve(self, cmd: ReserveCommand) -> dict[str, Any]:
        """Hold `estimate` on every derived scope with a budget in the unit, all or none; a dry run or a
        denial changes no balance but is logged. Replays the first answer for a known key."""

    @abstractmethod
    async def decide(self, cmd: ReserveCommand) -> dict[str, Any]:
        """Evaluate like `reserve` without holding or writing anything."""

    @abstractmethod
    async def commit(self, cmd: CommitCommand) -> dict[str, Any]:
        """Charge `actual` for an ACTIVE reservation (until expiry + grace) under its overage policy."""

    @abstractmethod
    async def release(self, cmd: ReleaseCommand) -> dict[str, Any]:
        """Return the whole hold of an ACTIVE reservation (until expiry + grace)."""

    @abstractmethod
    async def extend(self, cmd: ExtendCommand) -> dict[str, Any]:
        """Push `expires_at_ms` of an unexpired ACTIVE reservation by `extend_by_ms`."""

    @abstractmethod
    async def record_event(self, cmd: EventCommand) -> dict[str, Any]:
        """Direct debit of `actual` on every budgeted derived scope, all or none."""

    @abstractmethod
    async def note(self, cmd: NoteCommand) -> int:
        """Append one decision event that changes no balance (a refusal before any budget was looked at:
        unknown payer, unpriced model, unmetered route); returns its event id."""

    @abstractmethod
    async def change_budget(self, cmd: BudgetCommand) -> dict[str, Any]:
        """Apply one admin change to a budget and log it; returns the new balance."""

    @abstractmethod
    async def balances(self, scope_prefix: str | None = None, unit: str | None = None) -> list[dict[str, Any]]:
        """Budgets whose scope equals `scope_prefix` or lies under it (all when None)."""

    @abstractmethod
    async def get_reservation(self, reservation_id: str) -> dict[str, Any] | None: ...

    @abstractmethod
    async def list_reservations(
        self,
        *,
        status: str | None = None,
        scope_prefix: str | None = None,
        idempotency_key: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]: ...

    @abstractmethod
    async def events(
        self,
        *,
        after: int = 0,
        limit: int = 100,
        reservation_id: str | None = None,
        scope_prefix: str | None = None,
        newest: bool = False,
    ) -> list[dict[str, Any]]:
        """Events with `event_id > after`, oldest first; `newest`: the last `limit` of them, newest first."""

    @abstractmethod
    async def aclose(self) -> None: ...


class SupportsState(ABC):
    """Optional ability: small keyed records next to the ledger, changed by compare-and-set. The notifier
    keeps its cursor, its lease and its dead letters here, so they survive restarts with the ledger."""

    @abstractmethod
    async def state_get(self, key: str) -> str | None: ...

    @abstractmethod
    async def state_put(self, key: str, value: str | None, expected: str | None) -> bool:
        """Write `value` (None: delete) only if the record is now `expected` (None: absent); False if not."""

    @abstractmethod
    async def state_list(self, prefix: str) -> dict[str, str]:
        """Every record whose key starts with `prefix`."""


class SupportsSweep(ABC):
    """Optional ability: expire overdue reservations in bulk (the sweeper) and check the books."""

    @abstractmethod
    async def expire_due(self, limit: int = 1000) -> int:
        """Expire up to `limit` ACTIVE reservations past expires_at + grace; returns how many."""

    @abstractmethod
    async def verify(self) -> list[str]:
        """Reconcile every budget with reservations and events; returns the discrepancies found."""


class Txn(ABC):
    """One atomic section of a store, as `cycles_ledger.operations` sees it.

    A store that implements this gets every ledger operation from `operations` (SQLite, memory). The
    store begins the section, calls the operation, and commits what it wrote, or discards all of it
    when the operation raises. Budgets come back in the order of the scopes asked for (canonical order:
    broadest first), then by unit; callers mutate the returned objects and hand them to `save_budgets`.
    """

    @abstractmethod
    def budgets(self, scopes: list[str], unit: str | None = None) -> list[BudgetState]:
        """Budgets on exactly these scopes (in `unit`, or every unit)."""

    @abstractmethod
    def save_budgets(self, budgets: list[BudgetState]) -> None: ...

    @abstractmethod
    def insert_budget(self, budget: BudgetState) -> None: ...

    @abstractmethod
    def reservation(self, reservation_id: str) -> ReservationState | None: ...

    @abstractmethod
    def insert_reservation(self, r: ReservationState) -> None: ...

    @abstractmethod
    def update_reservation(self, r: ReservationState) -> None:
        """Write back the mutable fields: status, charged, finalized_at, expiry, extensions, settle, extra."""

    @abstractmethod
    def due(self, now: int, limit: int) -> list[ReservationState]:
        """ACTIVE reservations whose deadline (expiry + grace) is before `now`, earliest first."""

    @abstractmethod
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
        """Append to the audit log; returns the event id (increasing)."""

    @abstractmethod
    def idempotency(self, op: str, key: str) -> tuple[str, dict[str, Any]] | None:
        """(payload hash, remembered answer) for an operation's key, if seen."""

    @abstractmethod
    def remember(self, op: str, key: str, payload_hash: str, response: dict[str, Any]) -> None: ...

    @abstractmethod
    def prune_idempotency(self, before_ms: int) -> None: ...

    # --- the spend window of rate-limited budgets: one entry per hold or charge ---

    @abstractmethod
    def window(self, scope: str, unit: str, since_ms: int) -> list[tuple[int, int]]:
        """(ts_ms, amount) of the entries after `since_ms`, oldest first."""

    @abstractmethod
    def window_add(self, scope: str, unit: str, ts_ms: int, ref: str, amount: int) -> None: ...

    @abstractmethod
    def window_set(self, ref: str, unit: str, amount: int) -> None:
        """A hold settled: its entries in `unit` now count what was charged."""

    @abstractmethod
    def window_drop(self, ref: str) -> None:
        """A hold returned: its entries no longer count."""

    @abstractmethod
    def window_prune(self, scope: str, unit: str, before_ms: int) -> None: ...

    # --- retention ---

    @abstractmethod
    def old_events(
        self, before_ms: int, limit: int
    ) -> list[tuple[int, str, str, int | None, dict[str, Any], str | None, str | None]]:
        """Up to `limit` of the oldest events before `before_ms`, except `period_reset` ones and the newest
        event (event ids must keep increasing): (event_id, type, unit, amount, data, reservation_id, scope)."""

    @abstractmethod
    def forget_events(self, event_ids: list[int], folded: dict[tuple[str, str], int]) -> None:
        """Delete these events, adding `folded` ((scope, unit) -> amount) to the pruned totals `charges` yields."""

    @abstractmethod
    def forget_reservations(self, before_ms: int, limit: int) -> None:
        """Delete up to `limit` finished reservations finalized before `before_ms`."""

    @abstractmethod
    def state_get(self, key: str) -> str | None: ...

    @abstractmethod
    def state_set(self, key: str, value: str | None) -> None:
        """Write a keyed record (None: delete it)."""

    @abstractmethod
    def state_list(self, prefix: str) -> dict[str, str]: ...

    @abstractmethod
    def period_due(self, now: int, limit: int) -> list[BudgetState]:
        """Budgets whose period ended before `now` (for the sweeper's roll-over)."""

    # --- reads ---

    @abstractmethod
    def all_budgets(self, scope_prefix: str | None, unit: str | None) -> list[BudgetState]:
        """Budgets at `scope_prefix` or under it (all when None), ordered by scope then unit."""

    @abstractmethod
    def find_reservations(
        self, status: str | None, scope_prefix: str | None, idempotency_key: str | None, limit: int
    ) -> list[ReservationState]:
        """Newest first."""

    @abstractmethod
    def find_events(
        self, after: int, limit: int, reservation_id: str | None, scope_prefix: str | None, newest: bool
    ) -> list[dict[str, Any]]: ...

    @abstractmethod
    def active_reservations(self) -> Iterable[ReservationState]: ...

    @abstractmethod
    def charges(self) -> Iterable[tuple[str, int, list[str]]]:
        """(unit, amount, scopes) of every charge in the log: what `operations.charges_of` makes of each
        committed and debited event."""
