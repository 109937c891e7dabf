"""A budget over time: its period, rate limits and alerts as users write them, and the calendar
arithmetic of periods (where the period that contains an instant starts and ends).

`daily`, `weekly` (from Monday) and `monthly` (from the 1st) periods start at local midnight in the
budget's time zone, so a day is 23 or 25 hours across a daylight-saving change; `every: 30d` periods are
fixed durations counted from an anchor instant. Pure functions of their arguments (the tz database is
read-only data), used by `rules.roll_period` on every store's clock.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ValidationError

from .errors import InvalidRequestError
from .models import Amount, Period, RateLimit, Unit

M = TypeVar("M", bound=BaseModel)

__all__ = [
    "CALENDAR",
    "duration_ms",
    "parse_alerts",
    "parse_period",
    "parse_rate_limits",
    "period_bounds",
    "time_zone",
]

CALENDAR = ("daily", "weekly", "monthly")
_UNITS_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000}
_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)\s*$")


def duration_ms(text: str | int, what: str = "duration") -> int:
    """`10m`, `1h`, `30d`, `2w`, `500ms` (or whole milliseconds) → milliseconds, > 0."""
    if isinstance(text, bool):
        raise InvalidRequestError(f"{what} must be a duration such as 10m or 1h, got {text!r}")
    if isinstance(text, int):
        n = text
    else:
        m = _DURATION.match(str(text))
        if not m:
            raise InvalidRequestError(f"{what} {text!r} is not a duration; use e.g. 500ms, 30s, 10m, 1h, 30d, 2w")
        n = int(m.group(1)) * _UNITS_MS[m.group(2)]
    if n <= 0:
        raise InvalidRequestError(f"{what} must be longer than zero, got {text!r}")
    return n


@lru_cache(maxsize=64)
def time_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidRequestError(f"unknown time zone {name!r}; use an IANA name such as Europe/Paris or UTC") from None


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def _local_midnight(year: int, month: int, day: int, tz: ZoneInfo) -> datetime:
    return datetime(year, month, day, tzinfo=tz)


def period_bounds(spec: dict[str, Any], now_ms: int) -> tuple[int, int]:
    """[start, end) in epoch milliseconds of the period of `spec` that contains `now_ms`.

    `spec` is a stored period: `{"every": "daily"|"weekly"|"monthly", "tz": name}` or
    `{"every_ms": n, "anchor_ms": a}`.
    """
    every = spec.get("every")
    if every in CALENDAR:
        tz = time_zone(str(spec.get("tz") or "UTC"))
        local = datetime.fromtimestamp(now_ms / 1000, tz=UTC).astimezone(tz)
        if every == "daily":
            start = _local_midnight(local.year, local.month, local.day, tz)
            nxt = start.date() + timedelta(days=1)
            end = _local_midnight(nxt.year, nxt.month, nxt.day, tz)
        elif every == "weekly":
            monday = local.date() - timedelta(days=local.weekday())
            start = _local_midnight(monday.year, monday.month, monday.day, tz)
            nxt = monday + timedelta(days=7)
            end = _local_midnight(nxt.year, nxt.month, nxt.day, tz)
        else:
            start = _local_midnight(local.year, local.month, 1, tz)
            year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
            end = _local_midnight(year, month, 1, tz)
        return _ms(start), _ms(end)
    step = int(spec["every_ms"])
    anchor = int(spec.get("anchor_ms") or 0)
    start_ms = anchor + ((now_ms - anchor) // step) * step
    return start_ms, start_ms + step


# --- as users write them (Ledger.set_budget, budgets.yaml) ----------------------------------------------


def _model(cls: type[M], value: Any, what: str) -> M:
    try:
        return cls.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidRequestError(
            f"invalid {what}: {str(first.get('msg', exc)).removeprefix('Value error, ')}"
        ) from None


def parse_period(value: Period | Mapping[str, Any] | str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    if value == "" or value == {}:
        return {}
    if isinstance(value, str):
        value = {"every": value}
    return _model(Period, value, "period").spec()


def parse_rate_limits(
    values: Sequence[RateLimit | Mapping[str, Any]] | None, unit: Unit
) -> list[dict[str, Any]] | None:
    """Each limit as stored: amount in the budget's unit, window in ms, on_exceed, alert_at (percent, when set)."""
    if values is None:
        return None
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
        raise InvalidRequestError("rate_limits must be a list such as [{amount: 5usd, window: 10m}]")
    out = []
    for value in values:
        if isinstance(value, RateLimit):
            out.append(value.model_dump(exclude_none=True))
            continue
        if not isinstance(value, Mapping):
            raise InvalidRequestError(f"each rate limit is a mapping with amount and window, got {value!r}")
        raw = dict(value)
        unknown = set(raw) - {"amount", "window", "window_ms", "on_exceed", "alert_at"}
        if unknown:
            raise InvalidRequestError(f"unknown rate limit key(s) {', '.join(sorted(unknown))}")
        amt = raw.get("amount")
        if not isinstance(amt, int) or isinstance(amt, bool):
            parsed = Amount.parse(str(amt))
            if parsed.unit is not unit:
                raise InvalidRequestError(f"rate limit amount is in {parsed.unit.value}, the budget in {unit.value}")
            amt = parsed.amount
        window, alert_at = raw.get("window_ms", raw.get("window")), raw.get("alert_at")
        if window is None:
            raise InvalidRequestError("a rate limit needs a window such as 10m")
        lim = _model(
            RateLimit,
            {
                "amount": amt,
                "window_ms": duration_ms(window, "rate limit window"),
                "on_exceed": raw.get("on_exceed", "throttle"),
                "alert_at": None if alert_at is None else _percent(alert_at, "rate limit alert_at", 100),
            },
            "rate limit",
        )
        out.append(lim.model_dump(exclude_none=True))
    return out


def parse_alerts(values: Sequence[int | str] | None) -> list[int] | None:
    """Thresholds in percent of the allocation: 80 or "80%" (1 to 1000)."""
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise InvalidRequestError("alerts must be a list such as [50%, 80%, 100%]")
    return sorted({_percent(v, "alert threshold", 1000) for v in values})


def _percent(value: Any, what: str, most: int) -> int:
    """80 or "80%" as 80, from 1 to `most`."""
    text = str(value).strip().removesuffix("%").strip() if not isinstance(value, bool) else ""
    if not text.isdigit() or not 1 <= int(text) <= most:
        raise InvalidRequestError(f"{what} {value!r} is not a percentage from 1% to {most}%")
    return int(text)
