"""kill -9 durability: an answer a child process has seen is on disk, and nothing is ever half-applied.

Child processes (`sys.executable -c CHILD`) run reserve → commit (or release) loops on 8 asyncio tasks
against one SQLite file and print each step only after the ledger has answered it. The parent kills them
with SIGKILL at a random moment while they run at full speed, reopens the file and checks every printed
claim plus the books: holds = ACTIVE reservations, spent = COMMITTED charges, log = reservations.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cycles_ledger import Ledger, Reservation, ReservationStatus, open_ledger

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TASKS = 8  # concurrent reserve→settle loops per child
TENANT = "tenant:d"

CHILD = r"""
import asyncio, random, sys
from cycles_ledger import open_ledger

URL, WORKFLOW, SEED, TASKS = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
UNIT = "USD_MICROCENTS"


async def main():
    rng = random.Random(SEED)
    subject = {"tenant": "d", "workflow": WORKFLOW}
    action = {"kind": "llm.completion", "name": "durability"}
    async with open_ledger(URL) as ledger:

        async def loop():
            while True:
                est = rng.randint(1, 1000) * 1000
                actual = rng.randint(0, est)
                how = "r" if rng.random() < 0.2 else "c"
                r = await ledger.reserve(subject, action, {"unit": UNIT, "amount": est})
                if not r.allowed:
                    raise SystemExit(f"unexpected {r.decision} {r.reason_code} on {r.scope}")
                print("R", r.reservation_id, est, actual, how, flush=True)
                if how == "c":
                    c = await ledger.commit(r.reservation_id, {"unit": UNIT, "amount": actual})
                    print("C", r.reservation_id, c.charged.amount, flush=True)
                else:
                    await ledger.release(r.reservation_id, reason="not needed")
                    print("X", r.reservation_id, flush=True)

        print("READY", flush=True)
        await asyncio.gather(*(loop() for _ in range(TASKS)))


asyncio.run(main())
"""


@dataclass
class Child:
    """One running child, its stdout lines (read by a thread) and the commit count to kill it at."""

    proc: subprocess.Popen[str]
    kill_after: int
    stderr_path: Path
    lines: list[str] = field(default_factory=list)
    commits: int = 0
    reader: threading.Thread | None = None

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("C "):
                self.commits += 1


@dataclass
class Claims:
    """What the children printed, i.e. what the ledger had answered before the kill."""

    planned: dict[str, tuple[int, int, str]] = field(default_factory=dict)  # R: id → (estimate, actual, c|r)
    committed: dict[str, int] = field(default_factory=dict)  # C: id → charged
    released: set[str] = field(default_factory=set)  # X: id

    def add(self, lines: list[str]) -> None:
        for line in lines:
            if not line.endswith("\n"):
                continue  # a line cut by the kill claims nothing
            parts = line.split()
            if parts[0] == "R":
                self.planned[parts[1]] = (int(parts[2]), int(parts[3]), parts[4])
            elif parts[0] == "C":
                self.committed[parts[1]] = int(parts[2])
            elif parts[0] == "X":
                self.released.add(parts[1])


def _start(url: str, workflow: str, seed: int, kill_after: int, tmp_path: Path) -> Child:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    stderr_path = tmp_path / f"child-{workflow}-{seed}.err"
    with stderr_path.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, url, workflow, str(seed), str(TASKS)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
    child = Child(proc, kill_after, stderr_path)
    child.reader = threading.Thread(target=child.read, daemon=True)
    child.reader.start()
    return child


def _kill_each_at_its_moment(children: list[Child], rng: random.Random) -> None:
    """SIGKILL each child once it has printed `kill_after` commits (plus a random few ms), never earlier."""
    pending = list(children)
    deadline = time.monotonic() + 60
    while pending:
        assert time.monotonic() < deadline, "children did not reach their kill points within 60 s"
        for c in list(pending):
            if c.proc.poll() is not None:
                pytest.fail(f"child exited by itself with {c.proc.returncode}:\n{c.stderr_path.read_text()}")
            if c.commits >= c.kill_after:
                time.sleep(rng.uniform(0, 0.01))
                os.kill(c.proc.pid, signal.SIGKILL)
                pending.remove(c)
        time.sleep(0.0005)
    for c in children:
        assert c.proc.wait(timeout=30) == -signal.SIGKILL, c.stderr_path.read_text()
        assert c.reader is not None
        c.reader.join(timeout=30)
        assert c.proc.stdout is not None
        c.proc.stdout.close()
        assert c.commits >= c.kill_after


async def _check_after_crash(
    ledger: Ledger, claims: Claims, known: set[str], max_unprinted: int
) -> dict[str, Reservation]:
    """Every printed answer holds, nothing is half-applied, and the log matches the reservations."""
    reservations = {r.reservation_id: r for r in await ledger.list_reservations(limit=100_000)}

    # 1. Each commit/release a child printed is on disk exactly as answered.
    for rid, charged in claims.committed.items():
        r = reservations[rid]
        assert r.status is ReservationStatus.COMMITTED, rid
        assert r.committed is not None and r.committed.amount == charged == claims.planned[rid][1]
    for rid in claims.released:
        assert reservations[rid].status is ReservationStatus.RELEASED, rid
    # 2. A printed reservation whose settle was in flight is either still ACTIVE or settled as asked.
    for rid, (estimate, actual, how) in claims.planned.items():
        r = reservations[rid]
        assert r.reserved.amount == estimate
        if rid not in claims.committed and rid not in claims.released:
            if how == "c":
                assert r.status in (ReservationStatus.ACTIVE, ReservationStatus.COMMITTED), r
                if r.status is ReservationStatus.COMMITTED:
                    assert r.committed is not None and r.committed.amount == actual
            else:
                assert r.status in (ReservationStatus.ACTIVE, ReservationStatus.RELEASED), r
    # 3. A reservation whose answer never got printed can only be one in-flight reserve per task, still ACTIVE.
    unprinted = set(reservations) - set(claims.planned)
    assert all(reservations[rid].status is ReservationStatus.ACTIVE for rid in unprinted)
    assert len(unprinted - known) <= max_unprinted

    # 4. Books: arithmetic, verify(), holds = ACTIVE estimates, spent = COMMITTED charges, per scope.
    balances = await ledger.balances()
    assert {b.scope for b in balances} >= {TENANT}
    for b in balances:
        assert b.remaining == b.allocated - b.spent - b.reserved - b.debt, b
        held = [r for r in reservations.values() if b.scope in r.budgeted_scopes]
        assert b.reserved == sum(r.reserved.amount for r in held if r.status is ReservationStatus.ACTIVE), b
        assert b.spent + b.debt == sum(r.committed.amount for r in held if r.committed is not None), b
        assert b.debt == 0 and not b.is_over_limit, b
    assert await ledger.verify() == []

    # 5. The log has one `reserved` per reservation and one settle event per settled reservation.
    events = await ledger.events(limit=100_000)
    assert len(events) < 100_000
    by_type: dict[str, list[str | None]] = {}
    for e in events:
        by_type.setdefault(e.type, []).append(e.reservation_id)
        if e.type == "committed":
            res = reservations[str(e.reservation_id)]
            assert res.committed is not None and e.amount == res.committed.amount
    assert sorted(map(str, by_type.get("reserved", []))) == sorted(reservations)
    for kind, status in (("committed", ReservationStatus.COMMITTED), ("released", ReservationStatus.RELEASED)):
        assert sorted(map(str, by_type.get(kind, []))) == sorted(
            rid for rid, r in reservations.items() if r.status is status
        )
    return reservations


def _integrity_ok(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


@pytest.mark.parametrize("n_children", [1, 3])
async def test_sigkill_mid_stream_loses_no_answered_commit_and_half_applies_nothing(
    tmp_path: Path, n_children: int
) -> None:
    """After SIGKILL at random moments (3 rounds), every answered commit is on disk and the books reconcile."""
    db = tmp_path / "ledger.db"
    url = f"sqlite:///{db}"
    rng = random.Random(100 + n_children)
    workflows = [f"w{i}" for i in range(n_children)]
    async with open_ledger(url) as ledger:
        await ledger.set_budget(TENANT, "1000000usd")
        for w in workflows:
            await ledger.set_budget(f"{TENANT}/workflow:{w}", "1000000usd")

    claims = Claims()
    known: set[str] = set()
    printed_commits = 0
    for _round in range(3):
        children = [_start(url, w, rng.getrandbits(32), rng.randint(80, 400), tmp_path) for w in workflows]
        try:
            _kill_each_at_its_moment(children, rng)
        finally:
            for c in children:
                if c.proc.poll() is None:
                    c.proc.kill()
                    c.proc.wait()
        for c in children:
            claims.add(c.lines)
        assert len(claims.committed) - printed_commits >= sum(c.kill_after for c in children)
        printed_commits = len(claims.committed)

        _integrity_ok(db)
        async with open_ledger(url) as ledger:
            reservations = await _check_after_crash(ledger, claims, known, n_children * TASKS)
        known = set(reservations)

    # The holds the killed children left behind come back when they expire (store clock 10 min ahead).
    orphans = [rid for rid, r in reservations.items() if r.status is ReservationStatus.ACTIVE]
    assert orphans, "killing busy children must leave some reservations ACTIVE"
    async with open_ledger(url, clock=lambda: time.time_ns() // 1_000_000 + 600_000) as ledger:
        assert await ledger.sweep(limit=100_000) == len(orphans)
        for b in await ledger.balances():
            assert b.reserved == 0, b
            assert b.remaining == b.allocated - b.spent - b.debt, b
        assert await ledger.verify() == []
        expired = [e.reservation_id for e in await ledger.events(limit=100_000) if e.type == "expired"]
        assert sorted(map(str, expired)) == sorted(orphans)
        for rid, charged in claims.committed.items():
            r = await ledger.get_reservation(rid)
            assert r.status is ReservationStatus.COMMITTED and r.committed is not None
            assert r.committed.amount == charged
