"""Amounts, units and scopes: exact integers, clear errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cycles_ledger import Amount, InvalidRequestError, Subject, Unit, format_amount
from cycles_ledger.models import INT64_MAX, parse_scope


@pytest.mark.parametrize(
    ("text", "unit", "amount"),
    [
        ("25usd", Unit.USD_MICROCENTS, 2_500_000_000),
        ("0.25usd", Unit.USD_MICROCENTS, 25_000_000),
        ("$0.10", Unit.USD_MICROCENTS, 10_000_000),
        ("0.00000001usd", Unit.USD_MICROCENTS, 1),
        ("1_000usd", Unit.USD_MICROCENTS, 100_000_000_000),
        ("100000tokens", Unit.TOKENS, 100_000),
        ("50credits", Unit.CREDITS, 50),
        ("10rp", Unit.RISK_POINTS, 10),
        ("7 risk_points", Unit.RISK_POINTS, 7),
        ("123microcents", Unit.USD_MICROCENTS, 123),
    ],
)
def test_parse_amounts(text: str, unit: Unit, amount: int) -> None:
    """Amount text in every unit becomes the exact integer in that unit."""
    a = Amount.parse(text)
    assert (a.unit, a.amount) == (unit, amount)


@pytest.mark.parametrize(
    "text",
    [
        "-5usd",
        "0.000000001usd",
        "1.5tokens",
        "5",
        "5parsecs",
        "usd",
        "",
        "1e3usd",
        "nan usd",
        "99999999999999999999usd",
    ],
)
def test_parse_rejects_bad_amounts(text: str) -> None:
    """Negative, sub-microcent, fractional counts, unitless, unknown units and overflows are typed errors."""
    with pytest.raises(InvalidRequestError):
        Amount.parse(text)


def test_usd_never_takes_floats() -> None:
    """Amount.usd refuses floats: money is decimal text or integers."""
    assert Amount.usd("0.1").amount == 10_000_000
    with pytest.raises(InvalidRequestError):
        Amount.usd(0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [1.5, -1, True, "12", INT64_MAX + 1, None])
def test_amount_model_is_strict(bad: object) -> None:
    """The Amount model accepts only non-negative int64 integers (no floats, bools or strings)."""
    with pytest.raises(ValidationError):
        Amount(unit=Unit.TOKENS, amount=bad)  # type: ignore[arg-type]


def test_amount_rejects_unknown_unit() -> None:
    """An unknown unit is a validation error."""
    with pytest.raises(ValidationError):
        Amount(unit="EUR", amount=1)  # type: ignore[arg-type]


def test_format_amount() -> None:
    """USD amounts print as dollars without losing microcents; other units print as counts."""
    assert format_amount(2_500_000_000, Unit.USD_MICROCENTS) == "$25.00"
    assert format_amount(123_456_789, Unit.USD_MICROCENTS) == "$1.23456789"
    assert format_amount(-50_000_000, Unit.USD_MICROCENTS) == "-$0.50"
    assert format_amount(42, Unit.TOKENS) == "42 TOKENS"


def test_scopes_skip_absent_levels() -> None:
    """Derived scopes follow the canonical order and skip levels that are absent."""
    s = Subject(tenant="acme", workspace="prod", agent="bot")
    assert s.scopes() == ["tenant:acme", "tenant:acme/workspace:prod", "tenant:acme/workspace:prod/agent:bot"]
    assert s.scope_path == "tenant:acme/workspace:prod/agent:bot"
    assert Subject(workflow="w", toolset="t").scopes() == ["workflow:w", "workflow:w/toolset:t"]


@pytest.mark.parametrize(
    "fields",
    [
        {"tenant": "ac me"},
        {"tenant": "a/b"},
        {"tenant": "a:b"},
        {"tenant": "x" * 129},
        {"tenant": ""},
        {"dimensions": {"run": "1"}},
        {},
        {"tenant": "ok", "planet": "mars"},
    ],
)
def test_subject_validation(fields: dict[str, object]) -> None:
    """Bad characters, over-long values, empty subjects and unknown fields are rejected."""
    with pytest.raises(ValidationError):
        Subject(**fields)  # type: ignore[arg-type]


def test_subject_accepts_edge_values() -> None:
    """128-character values and the full charset are accepted."""
    s = Subject(tenant="x" * 128, agent="A-b_c.9")
    assert s.scopes()[-1] == f"tenant:{'x' * 128}/agent:A-b_c.9"


@pytest.mark.parametrize(
    "scope",
    [
        "",
        "tenant",
        "tenant:",
        "planet:x",
        "workflow:w/tenant:t",
        "tenant:a/tenant:b",
        "tenant:a b",
        "tenant:a//agent:b",
    ],
)
def test_parse_scope_rejects_malformed(scope: str) -> None:
    """Malformed scope ids (order, duplicates, charset, empty parts) are typed errors."""
    with pytest.raises(InvalidRequestError):
        parse_scope(scope)


def test_parse_scope_roundtrip() -> None:
    """A canonical id parses back into the subject that derives it."""
    assert Subject.parse("tenant:acme/workflow:docs").scopes()[-1] == "tenant:acme/workflow:docs"
