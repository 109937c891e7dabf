"""`cycles top`: budgets with their bars, burn against rate limits, and spend per minute from the log."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from cycles_ledger import Unit, open_ledger, open_ledger_sync
from cycles_ledger.cli import main
from cycles_ledger.models import format_amount
from cycles_ledger.top import RecentSpend, frame, run
from tests.conftest import FakeClock

USD = 10**8
COSTS = [31 * USD // 100, 45 * USD // 100, 12 * USD // 100, 80 * USD // 100, 5 * USD // 100]


def build(url: str, start_ms: int) -> FakeClock:
    """Five calls a minute apart from `start_ms` on tenant:acme (daily, at most $10 an hour) and tenant:beta."""
    clock = FakeClock(start_ms)
    with open_ledger_sync(url, clock=clock) as led:
        led.set_budget("tenant:acme", "50usd", period="daily", rate_limits=[{"amount": "10usd", "window": "1h"}])
        led.set_budget("tenant:acme/workflow:docs", "5usd")
        led.set_budget("tenant:beta", "20usd")
        for i, cost in enumerate(COSTS):
            subject = {"tenant": "acme", "workflow": "docs"} if i % 2 == 0 else {"tenant": "beta"}
            r = led.reserve(subject, {"kind": "llm.completion", "name": "gpt-4o"}, "1usd")
            led.commit(str(r.reservation_id), f"{cost}microcents")
            clock.advance(60_000)
        led.reserve({"tenant": "beta"}, {"kind": "llm.completion", "name": "gpt-4o"}, "2usd")  # held, not spent
    return clock


def test_top_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One frame names every budget with its numbers, the rate limit's burn, and the last minutes' spend."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    build(url, time.time_ns() // 1_000_000 - 6 * 60_000)
    assert main(["--store", url, "top", "--once", "--minutes", "10"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out  # not a terminal: no escapes
    acme = sum(COSTS[0::2])
    beta = sum(COSTS[1::2])

    def money(n: int) -> str:
        return format_amount(n, Unit.USD_MICROCENTS)

    lines = out.splitlines()
    for scope, spent, reserved in (("tenant:acme", acme, 0), ("tenant:acme/workflow:docs", acme, 0)):
        row = next(line for line in lines if line.split()[:1] == [scope])
        assert money(spent) in row and money(reserved) in row
    beta_row = next(line for line in lines if line.split()[:1] == ["tenant:beta"])
    assert money(beta) in beta_row and "$2.00" in beta_row and "++" in beta_row
    assert f"burn {money(acme)} / $10.00 per 1h (throttle)" in out
    assert f"{acme * 100 // (10 * USD):3d}%" in out
    assert "daily, resets" in out
    assert f"USD: {money(acme + beta)} in 10 min" in out
    for cost in COSTS:
        assert money(cost) in out  # each call in its own minute


def test_frame_is_pure_text_and_colours_only_when_asked(tmp_path: Path) -> None:
    """`frame` draws from balances and the recent spend it is given; colour adds ANSI codes and nothing else."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    clock = build(url, 1_800_000_000_000)
    with open_ledger_sync(url, clock=clock) as led:
        recent = RecentSpend(minutes=4, scope="tenant:acme")
        led.run(recent.refresh(led.ledger, clock()))
        balances = led.balances("tenant:acme")
    plain = frame(balances, recent, now_ms=clock())
    coloured = frame(balances, recent, now_ms=clock(), colour=True)
    assert "\x1b[" in coloured and "\x1b[" not in plain
    assert "tenant:beta" not in plain and "under tenant:acme" in plain
    # minutes 2 to 5 after the start hold two acme calls (minutes 2 and 4); minute 3 was beta's
    assert format_amount(COSTS[4], Unit.USD_MICROCENTS) in plain
    assert f"USD: {format_amount(COSTS[4] + COSTS[2], Unit.USD_MICROCENTS)} in 4 min" in plain
    assert "$0.0425/min" in plain  # $0.17 / 4, to a hundredth of a cent


def test_recent_spend_reads_only_new_events(tmp_path: Path) -> None:
    """After the first read, a refresh adds the events written since and forgets minutes out of the window."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    clock = build(url, 1_800_000_000_000)
    with open_ledger_sync(url, clock=clock) as led:
        recent = RecentSpend(minutes=2)
        led.run(recent.refresh(led.ledger, clock()))
        assert sum(c.amount for c in recent.items) == COSTS[4]  # the minute before, and this one (empty)
        r = led.reserve({"tenant": "beta"}, {"kind": "llm.completion", "name": "gpt-4o"}, "1usd")
        led.commit(str(r.reservation_id), "0.07usd")
        led.run(recent.refresh(led.ledger, clock()))
        assert sum(c.amount for c in recent.items) == COSTS[4] + 7 * USD // 100
        clock.advance(120_000)
        led.run(recent.refresh(led.ledger, clock()))
        assert recent.items == []


class _Tty(io.StringIO):
    """A terminal that takes two frames, then hangs up."""

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if self.getvalue().count("\x1b[H") >= 2:
            raise EOFError
        return super().write(s)


async def test_live_frames_redraw_in_place(tmp_path: Path) -> None:
    """On a terminal each frame clears the screen (cursor home, clear) and draws the next one in its place."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    clock = build(url, 1_800_000_000_000)
    out = _Tty()
    async with open_ledger(url, clock=clock) as led:
        with pytest.raises(EOFError):
            await run(led, interval=0.01, out=out, clock=clock)
    frames = out.getvalue().split("\x1b[H\x1b[J")[1:]
    assert len(frames) == 2 and all("BUDGETS (3)" in f for f in frames)
    assert "Ctrl-C quits" in frames[0]
