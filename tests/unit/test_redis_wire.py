"""The Redis store's error mapping, in one place (`stores/redis_wire.py`): every driver failure is the
ledger's `StoreUnavailableError` raised from it, every script refusal its typed `CyclesError`."""

from __future__ import annotations

import json

import pytest

from cycles_ledger.errors import (
    BudgetExceededError,
    CyclesError,
    IdempotencyMismatchError,
    NotFoundError,
    StoreUnavailableError,
    UnitMismatchError,
)
from cycles_ledger.stores.redis_wire import driver_errors, is_noscript, script_reply

redis_exceptions = pytest.importorskip("redis.exceptions")


def _driver_exceptions() -> list[type[BaseException]]:
    """Every exception class redis-py defines (RedisError's family and RedisClusterException's), and the
    socket errors a connection meets."""
    found: set[type[BaseException]] = {OSError, TimeoutError, ConnectionResetError, ConnectionRefusedError}
    todo: list[type[BaseException]] = [redis_exceptions.RedisError, redis_exceptions.RedisClusterException]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo += cls.__subclasses__()
    return sorted(found, key=lambda c: f"{c.__module__}.{c.__qualname__}")


@pytest.mark.parametrize("cls", _driver_exceptions(), ids=lambda c: c.__name__)
def test_every_driver_exception_is_unavailable_from_its_cause(cls: type[BaseException]) -> None:
    """Whatever redis-py or the socket raises inside `driver_errors()` comes out as StoreUnavailableError."""
    try:
        original = cls("boom")
    except ValueError:  # a cluster redirection: its message names a slot and a node
        original = cls("3999 127.0.0.1:7001")
    with pytest.raises(StoreUnavailableError, match="Redis ledger unavailable") as caught, driver_errors():
        raise original
    assert caught.value.__cause__ is original


def test_the_ledgers_own_errors_pass_through() -> None:
    """A typed error raised inside `driver_errors()` is not rewrapped."""
    with pytest.raises(NotFoundError), driver_errors():
        raise NotFoundError("gone")


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("BUDGET_EXCEEDED", BudgetExceededError),
        ("IDEMPOTENCY_MISMATCH", IdempotencyMismatchError),
        ("NOT_FOUND", NotFoundError),
        ("UNIT_MISMATCH", UnitMismatchError),
    ],
)
def test_a_script_refusal_is_its_typed_error(code: str, cls: type[CyclesError]) -> None:
    """`{"err", CODE, message, details}` raises the error class of CODE, with its scope and details."""
    details = {"scope": "tenant:t", "remaining": 5}
    with pytest.raises(cls) as caught:
        script_reply(["err", code, "no", json.dumps(details)])
    assert type(caught.value) is cls
    assert caught.value.to_dict() == {"error": code, "message": "no", "details": details}


def test_a_script_failure_or_a_lost_call_is_unavailable() -> None:
    """A script error (a bug) and an exception in place of the reply are unavailable for that caller."""
    with pytest.raises(StoreUnavailableError, match="script error: oops"):
        script_reply(["raise", "oops"])
    with pytest.raises(StoreUnavailableError, match="ValueError: bad") as caught:
        script_reply(ValueError("bad"))
    assert isinstance(caught.value.__cause__, ValueError)
    lost = StoreUnavailableError("Redis ledger unavailable: connection lost")
    with pytest.raises(StoreUnavailableError) as caught:
        script_reply(lost)
    assert caught.value is lost
    assert script_reply(["reserve", "ALLOW"]) == ["reserve", "ALLOW"]


def test_noscript_replies_are_recognised() -> None:
    """A NOSCRIPT error reply asks for the script to be loaded; other replies do not."""
    assert is_noscript(redis_exceptions.NoScriptError("NOSCRIPT No matching script"))
    assert not is_noscript(redis_exceptions.ResponseError("ERR other"))
    assert not is_noscript(["reserve"])
