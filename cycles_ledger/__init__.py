"""Cycles ledger: reserve → commit/release budget authority over hierarchical scopes.

async with open_ledger("sqlite:///budgets.db") as ledger:
    await ledger.set_budget("tenant:acme", "25usd")
    r = await ledger.reserve({"tenant": "acme"}, {"kind": "tool.search", "name": "web"}, "0.02usd")
    if r.allowed:
        await ledger.commit(r.reservation_id, "0.015usd")
"""

from .errors import (
    BudgetClosedError,
    BudgetDenied,
    BudgetExceededError,
    BudgetFrozenError,
    ConfigError,
    ConflictError,
    CyclesError,
    DebtOutstandingError,
    IdempotencyMismatchError,
    InvalidRequestError,
    MaxExtensionsExceededError,
    NotFoundError,
    OverdraftLimitExceededError,
    ReservationExpiredError,
    ReservationFinalizedError,
    StoreUnavailableError,
    UnitMismatchError,
)
from .ledger import Ledger, open_ledger
from .models import (
    Action,
    Amount,
    Balance,
    BudgetStatus,
    Caps,
    CommitResult,
    DecideResult,
    Decision,
    EventResult,
    ExtendResult,
    LedgerEvent,
    OveragePolicy,
    ReleaseResult,
    Reservation,
    ReservationStatus,
    ReserveResult,
    SoftLanding,
    Subject,
    Unit,
    format_amount,
)
from .stores import Store, store_from_url
from .sync import SyncLedger, open_ledger_sync

__all__ = [
    "Action",
    "Amount",
    "Balance",
    "BudgetClosedError",
    "BudgetDenied",
    "BudgetExceededError",
    "BudgetFrozenError",
    "BudgetStatus",
    "Caps",
    "CommitResult",
    "ConfigError",
    "ConflictError",
    "CyclesError",
    "DebtOutstandingError",
    "DecideResult",
    "Decision",
    "EventResult",
    "ExtendResult",
    "IdempotencyMismatchError",
    "InvalidRequestError",
    "Ledger",
    "LedgerEvent",
    "MaxExtensionsExceededError",
    "NotFoundError",
    "OveragePolicy",
    "OverdraftLimitExceededError",
    "ReleaseResult",
    "Reservation",
    "ReservationExpiredError",
    "ReservationFinalizedError",
    "ReservationStatus",
    "ReserveResult",
    "SoftLanding",
    "Store",
    "StoreUnavailableError",
    "Subject",
    "SyncLedger",
    "Unit",
    "UnitMismatchError",
    "format_amount",
    "open_ledger",
    "open_ledger_sync",
    "store_from_url",
]
