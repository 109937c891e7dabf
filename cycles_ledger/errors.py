"""One error tree for everything the ledger raises.

A DENY decision is *not* an error: it is a normal result. Exceptions are for requests that cannot be
carried out (bad input, unknown ids, finalized or expired reservations, idempotency conflicts) and for
settlements the overage policy refuses. Each class carries the Cycles protocol error code and the HTTP
status the protocol gives it, so an HTTP edge can map them without a table of its own.

    CyclesError
    ├── InvalidRequestError          INVALID_REQUEST          400
    │   ├── UnitMismatchError        UNIT_MISMATCH            400
    │   └── ConfigError              INVALID_CONFIG           400
    ├── NotFoundError                NOT_FOUND                404
    ├── ConflictError                (409 family)
    │   ├── BudgetExceededError      BUDGET_EXCEEDED
    │   │   └── BudgetDenied             (raised by integrations for a DENY; `reason_code` says why)
    │   ├── OverdraftLimitExceededError OVERDRAFT_LIMIT_EXCEEDED
    │   ├── DebtOutstandingError     DEBT_OUTSTANDING
    │   ├── BudgetFrozenError        BUDGET_FROZEN
    │   ├── BudgetClosedError        BUDGET_CLOSED
    │   ├── ReservationFinalizedError RESERVATION_FINALIZED
    │   ├── IdempotencyMismatchError IDEMPOTENCY_MISMATCH
    │   └── MaxExtensionsExceededError MAX_EXTENSIONS_EXCEEDED
    ├── ReservationExpiredError      RESERVATION_EXPIRED      410
    └── StoreUnavailableError        UNAVAILABLE              503
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "BudgetClosedError",
    "BudgetDenied",
    "BudgetExceededError",
    "BudgetFrozenError",
    "ConfigError",
    "ConflictError",
    "CyclesError",
    "DebtOutstandingError",
    "IdempotencyMismatchError",
    "InvalidRequestError",
    "MaxExtensionsExceededError",
    "NotFoundError",
    "OverdraftLimitExceededError",
    "ReservationExpiredError",
    "ReservationFinalizedError",
    "StoreUnavailableError",
    "UnitMismatchError",
    "error_from_code",
]


class CyclesError(Exception):
    """Base of every error we raise; `code` is the protocol error code."""

    code: ClassVar[str] = "INTERNAL_ERROR"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, *, scope: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.scope = scope
        self.details: dict[str, Any] = details

    def to_dict(self) -> dict[str, Any]:
        """The protocol's error body: `error` (code), `message`, `details`."""
        details = dict(self.details)
        if self.scope is not None:
            details["scope"] = self.scope
        return {"error": self.code, "message": self.message, "details": details}


class InvalidRequestError(CyclesError, ValueError):
    code = "INVALID_REQUEST"
    http_status = 400


class UnitMismatchError(InvalidRequestError):
    code = "UNIT_MISMATCH"


class ConfigError(InvalidRequestError):
    """A configuration file or store URL that cannot be used; the message names the place."""

    code = "INVALID_CONFIG"


class NotFoundError(CyclesError, LookupError):
    code = "NOT_FOUND"
    http_status = 404


class ConflictError(CyclesError):
    http_status = 409


class BudgetExceededError(ConflictError):
    code = "BUDGET_EXCEEDED"


class BudgetDenied(BudgetExceededError):
    """An integration's way to stop an action the ledger denied (the Ledger itself returns DENY as data).

    `reason_code` is the decision's reason (BUDGET_EXCEEDED, BUDGET_FROZEN, PRICE_UNKNOWN, ...), `scope`
    the scope that refused, `remaining` what it had left, `estimate` what was asked.
    """

    def __init__(
        self,
        message: str,
        *,
        reason_code: str,
        scope: str | None = None,
        remaining: int | None = None,
        estimate: int | None = None,
        unit: str | None = None,
        **details: Any,
    ) -> None:
        super().__init__(
            message, scope=scope, reason_code=reason_code, remaining=remaining, estimate=estimate, unit=unit, **details
        )
        self.reason_code = reason_code
        self.remaining = remaining
        self.estimate = estimate
        self.unit = unit


class OverdraftLimitExceededError(ConflictError):
    code = "OVERDRAFT_LIMIT_EXCEEDED"


class DebtOutstandingError(ConflictError):
    code = "DEBT_OUTSTANDING"


class BudgetFrozenError(ConflictError):
    code = "BUDGET_FROZEN"


class BudgetClosedError(ConflictError):
    code = "BUDGET_CLOSED"


class ReservationFinalizedError(ConflictError):
    code = "RESERVATION_FINALIZED"


class IdempotencyMismatchError(ConflictError):
    code = "IDEMPOTENCY_MISMATCH"


class MaxExtensionsExceededError(ConflictError):
    code = "MAX_EXTENSIONS_EXCEEDED"


class ReservationExpiredError(CyclesError):
    code = "RESERVATION_EXPIRED"
    http_status = 410


class StoreUnavailableError(CyclesError):
    """The store could not be reached or did not answer in time; integrations apply `on_unavailable`."""

    code = "UNAVAILABLE"
    http_status = 503


def _all_subclasses(cls: type[CyclesError]) -> list[type[CyclesError]]:
    out: list[type[CyclesError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def error_from_code(code: str, message: str, details: dict[str, Any] | None = None) -> CyclesError:
    """Rebuild a typed error from its protocol code (used by stores that speak JSON)."""
    details = dict(details or {})
    scope = details.pop("scope", None)
    for cls in _all_subclasses(CyclesError):
        if cls.code == code:
            return cls(message, scope=scope, **details)
    return CyclesError(message, scope=scope, **details)
