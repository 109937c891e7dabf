"""The proxy's burn rate (`metrics.Burn`) reads the event log as the store keeps it (`Ledger.event_rows` +
`report.row_charges`, no models) so that a refresh costs its event loop little. Checked against the burn
computed from `Ledger.events` models with `report.charges` (the reader it replaced, below as the oracle): the
same buckets and rates on every store, across a first read, paged reads and the window moving on; and two
refreshes at once (a scrape while one is under way) count each event once."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import pytest

from cycles_ledger import Ledger, Unit, open_ledger
from cycles_ledger.report import charges
from cycles_litellm import metrics
from cycles_litellm.metrics import Burn
from tests.conftest import FakeClock

_MINUTE_MS = 60_000


class OldBurn:
    """The burn from `Ledger.events` models (metrics.Burn before it read raw rows; page size a parameter)."""

    def __init__(self, minutes: int, page: int = 5000, first_read: int = 20_000) -> None:
        self.minutes = minutes
        self.buckets: dict[int, collections.Counter[tuple[str, Unit]]] = {}
        self._after: int | None = None
        self.page, self.first_read = page, first_read

    def start_ms(self, now_ms: int) -> int:
        return (now_ms // _MINUTE_MS - self.minutes + 1) * _MINUTE_MS

    async def refresh(self, ledger: Ledger, now_ms: int) -> None:
        if self._after is None:
            newest = await ledger.events(limit=self.first_read, newest=True, calls=False)
            self._after = newest[0].event_id if newest else 0
            fresh = list(reversed(newest))
        else:
            fresh = []
            while True:
                page = await ledger.events(after=self._after, limit=self.page, calls=False)
                fresh += page
                if page:
                    self._after = page[-1].event_id
                if len(page) < self.page:
                    break
        first = self.start_ms(now_ms) // _MINUTE_MS
        for e in fresh:
            for c in charges(e):
                minute = c.ts_ms // _MINUTE_MS
                if minute >= first:
                    self.buckets.setdefault(minute, collections.Counter())[(c.scope, c.unit)] += c.amount
        for minute in [m for m in self.buckets if m < first]:
            del self.buckets[minute]


async def _spend(led: Ledger, clock: FakeClock, n: int, tag: int) -> None:
    for i in range(n):
        sub: dict[str, Any] = {"tenant": "acme"} if i % 3 else {"tenant": "acme", "workflow": "docs"}
        act = {"kind": "llm.completion", "name": f"m{i % 2}"}
        if i % 4 == 0:
            await led.record_event(
                sub, act, f"{100 + i + tag}microcents", overage_policy="RECORD_ALL", also=[f"{7 + i}tokens"]
            )
        elif i % 4 == 1:
            r = await led.reserve(sub, act, "1usd")
            await led.release(str(r.reservation_id))
        else:
            r = await led.reserve(sub, act, "1usd", also=["500tokens"])
            await led.commit(str(r.reservation_id), f"{300 + i * 11 + tag}microcents", also=[f"{i + 1}tokens"])
        clock.advance(17_000)


@pytest.mark.parametrize("page", [1, 3, 2_000])
async def test_the_burn_from_raw_rows_equals_the_burn_from_event_models(
    db_url: str, monkeypatch: pytest.MonkeyPatch, page: int
) -> None:
    monkeypatch.setattr(metrics, "_PAGE", page)
    clock = FakeClock()
    async with open_ledger(db_url, clock=clock) as led:
        await led.set_budget("tenant:acme", "500usd")
        await led.set_budget("tenant:acme/workflow:docs", "100usd")
        await led.set_budget("tenant:acme", "1000000tokens")
        new, old = Burn(5), OldBurn(5, page=page)
        budgets = {"tenant:acme", "tenant:acme/workflow:docs"}
        await _spend(led, clock, 12, 0)
        for b in (new, old):
            await b.refresh(led, clock.now)
        assert new.buckets == old.buckets and new.buckets
        for tag in (1, 2, 3):
            await _spend(led, clock, 10, tag)
            for b in (new, old):
                await b.refresh(led, clock.now)
            assert new.buckets == old.buckets
            assert new.per_second(budgets, clock.now) == pytest.approx(
                metrics.Burn.per_second(old, budgets, clock.now)  # type: ignore[arg-type]
            )
        clock.advance(10 * _MINUTE_MS)  # the window moves past everything
        for b in (new, old):
            await b.refresh(led, clock.now)
        assert new.buckets == old.buckets == {}


async def test_two_refreshes_at_once_count_each_event_once(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scrape from LiteLLM's worker thread can ask for a refresh while one is under way on the loop (paged,
    the loop free between pages): they take turns, and no event is added twice."""
    monkeypatch.setattr(metrics, "_PAGE", 1)
    clock = FakeClock()
    async with open_ledger(db_url, clock=clock) as led:
        await led.set_budget("tenant:acme", "500usd")
        await led.set_budget("tenant:acme", "1000000tokens")
        together, alone = Burn(5), OldBurn(5)
        for b in (together, alone):
            await b.refresh(led, clock.now)
        await _spend(led, clock, 12, 0)
        await asyncio.gather(together.refresh(led, clock.now), together.refresh(led, clock.now))
        await alone.refresh(led, clock.now)
        assert together.buckets == alone.buckets and together.buckets
