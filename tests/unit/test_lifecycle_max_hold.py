"""`Lifecycle.reserve(max_hold_ms=...)`: the heartbeat keeps a hold alive up to max_hold_ms in all (the TTL, then
half a TTL per extension), then stops, on every store; a bad value is refused before anything is held."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cycles_ledger import Amount, InvalidRequestError, Unit, open_ledger
from cycles_ledger.lifecycle import Lifecycle

SUBJECT = {"tenant": "r"}
ACTION = {"kind": "tool.x", "name": "x"}
EST = Amount(unit=Unit.USD_MICROCENTS, amount=10)


@pytest.mark.parametrize(
    ("ttl", "max_hold"),
    [
        (1_000, 2_500),
        (1_000, 3_000),
        (600_000, 21_600_000),
        (1_001, 5_000),
        (1_000, 1_000),
        (1_000, 1_001),
        (2_000, 1_000),
    ],
)
async def test_the_extension_count_covers_max_hold_and_no_more(ttl: int, max_hold: int) -> None:
    """n is the least number of extensions for which ttl + n * step >= max_hold (step: what each beat adds)."""
    async with open_ledger("memory://") as led:
        await led.set_budget("tenant:r", "1usd")
        hold = await Lifecycle(led).reserve(SUBJECT, ACTION, EST, ttl_ms=ttl, max_hold_ms=max_hold, heartbeat=False)
        step = max(int(hold.interval_s * 1000), 1)
        n = hold.max_extensions
        assert n is not None and n >= 0
        assert ttl + n * step >= max_hold
        assert n == 0 or ttl + (n - 1) * step < max_hold


async def test_the_heartbeat_stops_at_max_hold_on_every_store(db_url: str) -> None:
    """TTL 1 s, max_hold 2 s: 2 extensions of 500 ms, then the hold expires 2 s after it was made (the
    per-call limit reaches every store, Redis's Lua included)."""
    async with open_ledger(db_url) as led:
        await led.set_budget("tenant:r", "1usd")
        life = Lifecycle(led)
        hold = await life.reserve(SUBJECT, ACTION, EST, ttl_ms=1_000, max_hold_ms=2_000)
        assert hold.max_extensions == 2
        res = await led.get_reservation(hold.reservation_id or "")
        await asyncio.sleep(2.4)
        res = await led.get_reservation(hold.reservation_id or "")
        assert res.extension_count == 2
        assert res.expires_at_ms - res.created_at_ms == 2_000
        life.stop_heartbeat(hold)


async def _extensions_after(max_hold_ms: Any, wait_s: float = 1.8) -> int:
    async with open_ledger("memory://") as led:
        await led.set_budget("tenant:r", "1usd")
        life = Lifecycle(led)
        hold = await life.reserve(SUBJECT, ACTION, EST, ttl_ms=1_000, max_hold_ms=max_hold_ms)
        await asyncio.sleep(wait_s)
        res = await led.get_reservation(hold.reservation_id or "")
        life.stop_heartbeat(hold)
        return res.extension_count


async def test_a_longer_max_hold_never_holds_for_less() -> None:
    """A max_hold_ms whose extension count would pass `Ledger.extend`'s bound (10**9) is capped there: asking for a
    very long hold never gives a shorter one than asking for none (the ledger's 10 extensions)."""
    without = await _extensions_after(None)
    assert without >= 3
    assert await _extensions_after(10**12) >= 3


@pytest.mark.parametrize("bad", [2_500.0, -1, True, "2500"])
async def test_a_max_hold_that_is_not_a_non_negative_integer_is_refused(bad: Any) -> None:
    """2_500.0 (arithmetic, a JSON config), a negative number, a bool or text: InvalidRequestError before the
    reserve, and nothing is held."""
    async with open_ledger("memory://") as led:
        await led.set_budget("tenant:r", "1usd")
        with pytest.raises(InvalidRequestError):
            await Lifecycle(led).reserve(SUBJECT, ACTION, EST, ttl_ms=1_000, max_hold_ms=bad)
        assert (await led.balance("tenant:r")).reserved == 0
