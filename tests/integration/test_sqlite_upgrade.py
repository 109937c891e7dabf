"""A ledger file written by the previous release (tests/fixtures/ledger-2026-12-04.db, made with commit
5c9e26e) opens with this one: its schema is brought up to date in place, its reservations settle and replay,
new rows in the compact format sit beside the old ones, and the books still agree."""

from __future__ import annotations

import shutil
from pathlib import Path

from cycles_ledger import ReservationStatus, open_ledger

FIXTURE = Path(__file__).parent.parent / "fixtures" / "ledger-2026-12-04.db"
T0 = 1_800_000_000_000
A, B, C = (f"rsv_01a3185c500027eaebb400000{i}" for i in range(3))
SUBJ = {"tenant": "t", "agent": "a"}
ACT = {"kind": "llm.completion", "name": "openai:gpt-4o-mini"}


async def test_an_older_ledger_file_upgrades_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    shutil.copy(FIXTURE, path)
    async with open_ledger(f"sqlite:///{path}", clock=lambda: T0 + 1_000) as led:
        a = await led.get_reservation(A)
        assert a.status is ReservationStatus.COMMITTED and a.committed and a.committed.amount == 40_000_000
        assert a.subject.agent == "a" and a.budgeted_scopes == ["tenant:t"]
        replay = await led.commit(A, "0.4usd")  # the old row's stored answer replays
        assert replay.charged.amount == 40_000_000 and replay.released and replay.released.amount == 60_000_000
        done = await led.commit(B, "1.5usd")
        assert done.charged.amount == 150_000_000
        assert (await led.commit(B, "1.5usd")).charged.amount == 150_000_000  # replay from the compact row
        await led.release(C)
        new = await led.reserve(SUBJ, ACT, "0.5usd", also=["100tokens"], idempotency_key="call-d")
        await led.commit(new.reservation_id or "", "0.5usd", also=["60tokens"])
        listed = {r.reservation_id for r in await led.list_reservations(scope="tenant:t")}
        assert {A, B, C, new.reservation_id} <= listed
        assert {r.reservation_id for r in await led.list_reservations(scope="tenant:t/agent:a")} >= {A, B}
        events = await led.events(limit=1000)
        assert {e.unit for e in events if e.amount is not None} <= {"USD_MICROCENTS", "TOKENS"}
        committed = [e for e in events if e.type == "committed"]
        assert [e.call_id for e in committed] == ["call-a", "call-b", "call-d"]
        usd = await led.balance("tenant:t")
        assert usd.spent == 40_000_000 + 10_000_000 + 150_000_000 + 50_000_000
        tokens = await led.balance("tenant:t/agent:a", "TOKENS")
        assert (tokens.spent, tokens.reserved) == (60, 0)
        assert await led.verify() == []
