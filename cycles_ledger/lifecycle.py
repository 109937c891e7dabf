"""One reserve → run → settle flow for every edge: the proxy hook, the SDK wrappers, `CyclesGate`, `@metered`.

`reserve` makes a `Hold`; `commit` (the work happened) or `release` (it did not) settles it once, later,
so an edge whose reserve and settle are separate callbacks (the LiteLLM proxy) uses the same object as
one that wraps a call (`call`). The rules live here, once:

- Settling never raises. A ledger that does not answer is retried with jittered back-off; then the settle is
  kept (per event loop, up to `backlog_max`, oldest first) and tried again until the ledger takes it, at the
  latest every `backlog_wait_s` and at once after any reserve that reaches the ledger: an outage longer than
  the retries (a Redis failover) loses no spend while the process lives. A refusal is logged and counted.
  The caller's result or error wins.
- Work that happened is paid. A hold that expired, or was given back, before the commit becomes a direct
  debit of the actual cost under one key per hold (a retry never charges twice); a commit the overage
  policy refuses charges what was held.
- Shadow (`reserve(shadow=True)`) is a dry run (the ledger logs `would_deny` / `would_allow`); its commit
  debits every unit spent with `RECORD_ALL`, so balances show how far past the budget the work went.
- Long work stays held: one heartbeat task per event loop extends every live hold by half its TTL every
  half TTL, and stops when the hold is settled.

`Lifecycle` drives this over an async `Ledger`; `SyncLifecycle` runs the same coroutines on a
`SyncLedger`'s private loop (its heartbeats too), so blocking callers get the same outcomes without a
thread per call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import hashlib
import heapq
import itertools
import logging
import random
import uuid
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

from .errors import (
    BudgetExceededError,
    CyclesError,
    IdempotencyMismatchError,
    InvalidRequestError,
    NotFoundError,
    OverdraftLimitExceededError,
    ReservationExpiredError,
    ReservationFinalizedError,
    StoreUnavailableError,
)
from .ledger import Ledger
from .models import (
    Action,
    Amount,
    Caps,
    Decision,
    OveragePolicy,
    ReservationStatus,
    ReserveResult,
    SoftLanding,
    Subject,
)
from .sync import SyncLedger

__all__ = ["Hold", "HoldState", "Lifecycle", "SyncLifecycle"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

SubjectLike = Subject | Mapping[str, Any] | str
ActionLike = Action | Mapping[str, Any]
LedgerSource = Ledger | Callable[[], Awaitable[Ledger]]

_KEY_MAX = 256
_MAX_EXTENSIONS = 10**9  # the most Ledger.extend accepts as a limit


class HoldState(enum.Enum):
    """Where a hold is between reserve and settle."""

    HELD = "held"  # an ACTIVE reservation holds the estimate
    DENIED = "denied"  # refused: nothing held, the work must not run
    SHADOW = "shadow"  # evaluated as a dry run: nothing held, the work runs and its cost is debited
    COMMITTED = "committed"
    RELEASED = "released"  # given back; should the work have run after all, a commit debits it
    DEBITED = "debited"  # paid by a direct debit (shadow, or a hold that was gone)


@dataclass(eq=False)
class Hold:
    """One reservation (or shadow evaluation) from reserve to its single settlement."""

    result: ReserveResult
    subject: SubjectLike
    action: ActionLike
    estimate: Amount
    debit_key: str  # the key of a direct debit of this work, whichever path makes it
    label: str  # how logs name it (a call id, a tool name)
    state: HoldState
    overage_policy: OveragePolicy | str | None = None
    shadow: bool = False
    idempotency_key: str | None = None  # the reserve's, when the caller chose one
    max_extensions: int | None = None  # the heartbeat's limit for this hold (None: the ledger's)
    _beat: int | None = field(default=None, repr=False)  # its entry in a heartbeat, while it beats
    _heart: _Heartbeat | None = field(default=None, repr=False)

    @property
    def reservation_id(self) -> str | None:
        return self.result.reservation_id

    @property
    def decision(self) -> Decision:
        return self.result.decision

    @property
    def caps(self) -> Caps | None:
        return self.result.caps

    @property
    def held(self) -> Amount:
        """What the reservation holds (less than the estimate after a soft landing)."""
        return self.result.reserved or self.estimate

    @property
    def interval_s(self) -> float:
        """Heartbeat period: half the TTL the reserve reported (never under 50 ms)."""
        return max((self.result.remaining_ttl_ms or 60_000) / 2000, 0.05)


def _debit_key(idempotency_key: str | None, shadow: bool) -> str:
    """`<key>:actual` (shadow: the debit is how it pays) or `<key>:late` (a hold that was gone) for a keyed call, so
    a retried call debits once; a fresh key otherwise."""
    if idempotency_key is None:
        return f"debit:{uuid.uuid4().hex}"
    key = f"{idempotency_key}:{'actual' if shadow else 'late'}"
    if len(key) <= _KEY_MAX:
        return key
    return f"debit:{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()}"


class Lifecycle:
    """Reserve, heartbeat and settle holds on one ledger (async driver); settling never raises."""

    backoff_s: float = 0.2  # the first retry waits ~0.2 s (x0.5-1.5 jitter), each next one twice as long
    backlog_max: int = 100_000  # settles kept while the ledger is away; past it the oldest is given up
    backlog_wait_s: float = 5.0  # the longest a kept settle waits between tries

    def __init__(
        self,
        ledger: LedgerSource,
        *,
        retries: int = 3,
        counters: Counter[str] | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        """`ledger`: a Ledger, or an async callable that opens one on first use (the proxy's lazy open)."""
        self._source = ledger
        self.retries = retries
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.log = log or logging.getLogger("cycles_ledger.lifecycle")
        self._hearts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Heartbeat] = weakref.WeakKeyDictionary()
        self._backlogs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Backlog] = weakref.WeakKeyDictionary()

    async def ledger(self) -> Ledger:
        source = self._source
        return source if isinstance(source, Ledger) else await source()

    async def reserve(
        self,
        subject: SubjectLike,
        action: ActionLike,
        estimate: Amount,
        *,
        shadow: bool = False,
        heartbeat: bool = True,
        idempotency_key: str | None = None,
        key_is_unique: bool = False,
        debit_key: str | None = None,
        label: str | None = None,
        ttl_ms: int | None = None,
        overage_policy: OveragePolicy | str | None = None,
        soft_landing: SoftLanding | Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        also: Sequence[Amount] = (),
        max_hold_ms: int | None = None,
    ) -> Hold:
        """Hold `estimate` (a dry run when `shadow`), and `also` in other units in the same decision. A DENY is
        a Hold in state DENIED, not an error; ledger errors (unreachable, invalid input) are raised, since what
        to do then is the edge's policy.

        `max_hold_ms`: how long the heartbeat may keep the hold alive in all (else the ledger's limit of
        extensions decides: 10, about 6 TTLs). It bounds a hold whose work never settles, and must cover the
        longest work, whose hold would otherwise expire while it runs. A non-negative integer, or
        InvalidRequestError before anything is held."""
        if max_hold_ms is not None and (
            isinstance(max_hold_ms, bool) or not isinstance(max_hold_ms, int) or max_hold_ms < 0
        ):
            raise InvalidRequestError(f"max_hold_ms must be a non-negative integer, got {max_hold_ms!r}")
        ledger = await self.ledger()
        r = await ledger.reserve(
            subject,
            action,
            estimate,
            ttl_ms=ttl_ms,
            overage_policy=overage_policy,
            idempotency_key=idempotency_key,
            key_is_unique=key_is_unique,
            dry_run=shadow,
            soft_landing=soft_landing,
            metadata=metadata,
            also=also,
        )
        backlog = self._backlogs.get(asyncio.get_running_loop()) if self._backlogs else None
        if backlog is not None and backlog.items:
            backlog.nudge()  # the ledger answers again: the settles kept for it go now
        if shadow:
            state = HoldState.SHADOW
        elif r.decision is Decision.DENY or r.reservation_id is None:
            state = HoldState.DENIED
        else:
            state = HoldState.HELD
        hold = Hold(
            result=r,
            subject=subject,
            action=action,
            estimate=estimate,
            debit_key=debit_key or _debit_key(idempotency_key, shadow),
            label=label or idempotency_key or r.reservation_id or "reservation",
            state=state,
            overage_policy=overage_policy,
            shadow=shadow,
            idempotency_key=idempotency_key,
        )
        if max_hold_ms is not None:
            # held TTL at first, then half a TTL more per extension (`interval_s`)
            step_ms = max(int(hold.interval_s * 1000), 1)
            ttl = r.remaining_ttl_ms or 0
            hold.max_extensions = min(max(-(-(max_hold_ms - ttl) // step_ms), 0), _MAX_EXTENSIONS)
        if heartbeat and state is HoldState.HELD:
            self._heartbeat().add(hold)
        return hold

    async def commit(
        self,
        hold: Hold,
        actual: Amount,
        *,
        metrics: Mapping[str, Any] | None = None,
        also: Sequence[Amount] = (),
        background: bool = False,
    ) -> None:
        """The work happened and cost `actual` (and `also` in other units): commit it, or debit it directly
        when nothing holds it any more (shadow, expired, given back). Retried while the ledger is unreachable;
        never raises. `background`: the caller does not wait for it (the proxy, after its answer went out), so
        the store may write it with its next operation (`Ledger.commit(coalesce=True)`)."""
        if hold.state in (HoldState.COMMITTED, HoldState.DEBITED, HoldState.DENIED):
            return
        self.stop_heartbeat(hold)

        async def attempt() -> None:
            if hold.state in (HoldState.COMMITTED, HoldState.DEBITED):
                return  # settled meanwhile: another commit of the hold went through, or a kept one
            ledger = await self.ledger()
            if hold.state is HoldState.HELD and await self._commit_held(
                ledger, hold, actual, metrics, also, background
            ):
                return
            if hold.state in (HoldState.COMMITTED, HoldState.DEBITED):
                return
            # Shadow, released or expired: the work ran and nothing holds its cost.
            await self._debit(ledger, hold, actual, hold.debit_key, metrics, also)
            hold.state = HoldState.DEBITED

        await self._settling(hold, actual, attempt)

    async def debit_more(self, hold: Hold, more: Amount, *, metadata: Mapping[str, Any] | None = None) -> None:
        """Work already settled turned out to cost `more` (the rest of a stream the client left, which the proxy
        read to its end): debited once, under a key of its own, as any debit of the hold would be."""
        if more.amount <= 0:
            return

        async def attempt() -> None:
            ledger = await self.ledger()
            await self._debit(ledger, hold, more, f"{hold.debit_key}:rest"[:256], None, (), metadata)

        await self._settling(hold, more, attempt)

    @staticmethod
    async def _debit(
        ledger: Ledger,
        hold: Hold,
        actual: Amount,
        key: str,
        metrics: Mapping[str, Any] | None,
        also: Sequence[Amount],
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Debit what nothing holds. Shadow records every unit (past the budget as debt); a real call is debited
        under its own overage policy."""
        policy = OveragePolicy.RECORD_ALL if hold.shadow else hold.overage_policy
        with contextlib.suppress(IdempotencyMismatchError):  # debited before under this key: charged once
            await ledger.record_event(
                hold.subject,
                hold.action,
                actual,
                overage_policy=policy,
                idempotency_key=key,
                metrics=metrics,
                metadata=metadata,
                also=also,
            )

    async def _settling(self, hold: Hold, actual: Amount, attempt: Callable[[], Awaitable[object]]) -> None:
        """Run a settle's `attempt` with retries; log and count what the ledger could not take, never raise."""
        try:
            if not await self.retry("settle", hold.label, attempt):
                self.log.error("cycles: could not settle %s; kept, to settle when the ledger answers again", hold.label)
                self._backlog().keep("settle", hold.label, attempt, actual)
        except CyclesError as exc:
            self._settle_refused(hold.label, actual, exc)

    def _settle_refused(self, label: str, actual: Amount | None, exc: CyclesError) -> None:
        if isinstance(exc, NotFoundError):
            self.log.info("cycles: no budget for %s; spend of %s not recorded", label, actual)
            return
        # a frozen or closed budget, a refused debit: say so, never raise
        self.counters["settle_refused"] += 1
        self.log.error("cycles: the ledger refused the spend of %s (%s): %s", label, exc.code, exc.message)

    async def _commit_held(
        self,
        ledger: Ledger,
        hold: Hold,
        actual: Amount,
        metrics: Mapping[str, Any] | None,
        also: Sequence[Amount] = (),
        background: bool = False,
    ) -> bool:
        """Commit the reservation; False when it is gone unpaid (expired or released), so a debit must follow."""
        rid = hold.reservation_id
        assert rid is not None
        try:
            try:
                await ledger.commit(rid, actual, metrics=metrics, also=also, coalesce=background)
            except (BudgetExceededError, OverdraftLimitExceededError) as exc:
                # The overage policy refuses the overage (REJECT, or an overdraft past its limit): charge
                # what was held rather than leave the hold to expire with nothing charged.
                capped = Amount(unit=actual.unit, amount=min(actual.amount, hold.held.amount))
                self.log.warning("cycles: %s: %s; committing the %s held", hold.label, exc.message, capped)
                self.counters["settle_capped"] += 1
                held_also = {a.unit: a.amount for a in hold.result.also_reserved}
                capped_also = [Amount(unit=a.unit, amount=min(a.amount, held_also.get(a.unit, a.amount))) for a in also]
                await ledger.commit(rid, capped, metrics=metrics, also=capped_also)
        except IdempotencyMismatchError:
            pass  # committed before with another amount: charged once
        except ReservationExpiredError:
            hold.state = HoldState.RELEASED
            return False
        except ReservationFinalizedError:
            # Settled before: paid if that was a commit; released or expired means the work is unpaid.
            try:
                status = (await ledger.get_reservation(rid)).status
            except ReservationExpiredError:
                status = ReservationStatus.EXPIRED
            if status is not ReservationStatus.COMMITTED:
                hold.state = HoldState.RELEASED
                return False
        hold.state = HoldState.COMMITTED
        return True

    async def release(self, hold: Hold, reason: str) -> None:
        """The work did not happen (it raised, was cancelled or refused): give the hold back. Retried while
        the ledger is unreachable; never raises."""
        if hold.state is not HoldState.HELD:
            return
        self.stop_heartbeat(hold)
        rid = hold.reservation_id
        assert rid is not None

        async def attempt() -> None:
            try:
                await (await self.ledger()).release(rid, reason=reason[:256])
            except (ReservationFinalizedError, ReservationExpiredError, IdempotencyMismatchError):
                return  # settled or expired already: a later commit finds out which, and pays if unpaid
            hold.state = HoldState.RELEASED

        try:
            if not await self.retry("release", hold.label, attempt):
                self.log.error(
                    "cycles: could not release %s; kept, to release when the ledger answers again (or it expires)",
                    hold.label,
                )
                self._backlog().keep("release", hold.label, attempt, None)
        except CyclesError as exc:
            self.log.error("cycles: release of %s refused (%s): %s", hold.label, exc.code, exc.message)

    async def call(
        self,
        hold: Hold,
        work: Callable[[], Awaitable[T]],
        actual: Callable[[T], Amount] | None = None,
        *,
        reason: str = "work failed",
    ) -> T:
        """Run `work` under `hold`: an exception or cancellation releases it and propagates unchanged; a result
        commits `actual(result)` (the estimate without `actual`, or when `actual` itself raises, which then
        propagates: the work ran, so its cost is real)."""
        try:
            result = await work()
        except BaseException as exc:
            await asyncio.shield(self.release(hold, f"{reason}: {type(exc).__name__}"))
            raise
        try:
            spent = hold.estimate if actual is None else actual(result)
        except BaseException:
            await asyncio.shield(self.commit(hold, hold.estimate))
            raise
        await asyncio.shield(self.commit(hold, spent))
        return result

    async def retry(self, what: str, label: str, attempt: Callable[[], Awaitable[object]]) -> bool:
        """Run `attempt` until it returns, backing off (jittered, doubling) while the ledger is unreachable.
        False when it never answered. Every failed attempt counts as `settle_retries`, giving up as
        `settle_failures`; any other error propagates."""
        for n in range(self.retries + 1):
            try:
                await attempt()
                return True
            except StoreUnavailableError as exc:
                self.counters["settle_retries"] += 1
                self.log.warning("cycles: %s of %s failed (%s), attempt %d", what, label, exc, n + 1)
                if n < self.retries:
                    await asyncio.sleep(self.backoff_s * 2**n * random.uniform(0.5, 1.5))
        self.counters["settle_failures"] += 1
        return False

    def backlog_size(self) -> int:
        """Settles and releases kept for the ledger on this event loop."""
        backlog = self._backlogs.get(asyncio.get_running_loop())
        return len(backlog.items) if backlog is not None else 0

    def _backlog(self) -> _Backlog:
        loop = asyncio.get_running_loop()
        backlog = self._backlogs.get(loop)
        if backlog is None:
            backlog = self._backlogs[loop] = _Backlog(self, loop)
        return backlog

    def stop_heartbeat(self, hold: Hold) -> None:
        """Stop extending `hold` (settling does this itself)."""
        if hold._heart is not None:
            hold._heart.discard(hold)

    def _heartbeat(self) -> _Heartbeat:
        loop = asyncio.get_running_loop()
        heart = self._hearts.get(loop)
        if heart is None:
            heart = self._hearts[loop] = _Heartbeat(self)
        return heart


class _Heartbeat:
    """One task on one event loop that extends every live hold of a Lifecycle when it is due: a timer heap,
    not a task or thread per hold. The task ends when nothing is left to beat."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._life = lifecycle
        self._live: dict[int, Hold] = {}
        self._due: list[tuple[float, int]] = []  # (loop time, entry); entries of settled holds are skipped
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add(self, hold: Hold) -> None:
        loop = asyncio.get_running_loop()
        seq = next(self._seq)
        hold._beat, hold._heart = seq, self
        self._live[seq] = hold
        due = loop.time() + hold.interval_s
        if self._due and due < self._due[0][0]:
            self._wake.set()  # sooner than the task sleeps for
        heapq.heappush(self._due, (due, seq))
        if len(self._due) > 2 * len(self._live) + 64:  # settled holds' entries: drop them now and then
            self._due = [e for e in self._due if e[1] in self._live]
            heapq.heapify(self._due)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="cycles-heartbeat")

    def discard(self, hold: Hold) -> None:
        if hold._beat is not None:
            self._live.pop(hold._beat, None)
            hold._beat = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._live:
            while self._due and self._due[0][1] not in self._live:
                heapq.heappop(self._due)
            if not self._due:
                return
            delay = self._due[0][0] - loop.time()
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                continue
            now, due = loop.time(), []
            while self._due and self._due[0][0] <= now:
                seq = heapq.heappop(self._due)[1]
                if seq in self._live:
                    due.append(seq)
            await asyncio.gather(*(self._extend(seq) for seq in due))

    async def _extend(self, seq: int) -> None:
        hold = self._live.get(seq)
        if hold is None or hold.reservation_id is None:
            return
        interval = hold.interval_s
        log = self._life.log
        try:
            ledger = await self._life.ledger()
            by_ms = max(int(interval * 1000), 1)
            if hold.max_extensions is None:
                await ledger.extend(hold.reservation_id, by_ms)
            else:
                await ledger.extend(hold.reservation_id, by_ms, max_extensions=hold.max_extensions)
        except StoreUnavailableError as exc:
            log.warning("cycles: heartbeat for %s failed (%s); trying again in %.1f s", hold.label, exc, interval)
        except (ReservationFinalizedError, ReservationExpiredError):
            self.discard(hold)  # settled elsewhere, or already gone: a commit pays it either way
            return
        except CyclesError as exc:  # max extensions reached, a frozen budget: the TTL runs from here
            log.warning("cycles: heartbeat for %s stopped: %s", hold.label, exc.message)
            self.discard(hold)
            return
        except Exception:  # one hold's surprise must not stop every other hold's heartbeat
            log.exception("cycles: heartbeat for %s failed", hold.label)
            self.discard(hold)
            return
        if seq in self._live:
            heapq.heappush(self._due, (asyncio.get_running_loop().time() + interval, seq))


@dataclass
class _Kept:
    what: str  # settle | release
    label: str
    attempt: Callable[[], Awaitable[object]]
    actual: Amount | None


class _Backlog:
    """Settles the ledger could not take after their retries, on one event loop: tried again oldest first, until
    the ledger takes them, by one task that backs off to `backlog_wait_s` and is woken by `nudge`. An attempt is
    safe to repeat (a commit's key, a debit's key per hold), so one that reached the ledger before its answer
    was lost is charged once. Drained, it lets go of its loop; cancelled (its loop closing: `SyncLedger.close`,
    the end of `asyncio.run`), it tries what it holds once more, for up to `_LAST_TRY_S`, and counts the rest
    as given up."""

    def __init__(self, lifecycle: Lifecycle, loop: asyncio.AbstractEventLoop) -> None:
        self._life = lifecycle
        self._loop = loop
        self.items: collections.deque[_Kept] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def keep(self, what: str, label: str, attempt: Callable[[], Awaitable[object]], actual: Amount | None) -> None:
        life = self._life
        if life.backlog_max <= 0:  # keeping nothing: given up at once, as the TTL's last resort
            self._give_up([_Kept(what, label, attempt, actual)], "no settle may wait for the ledger")
            return
        while len(self.items) >= life.backlog_max:
            self._give_up([self.items.popleft()], "too many settles wait for the ledger")
            life.counters["settle_backlog"] -= 1
        self.items.append(_Kept(what, label, attempt, actual))
        life.counters["settle_backlog"] += 1  # summed over every loop's backlog
        self._start()

    def nudge(self) -> None:
        self._wake.set()
        self._start()

    def _start(self) -> None:
        if self.items and (self._task is None or self._task.done()):
            self._task = self._loop.create_task(self._run(), name="cycles-settle-backlog")

    def _give_up(self, lost: Sequence[_Kept], why: str) -> None:
        for kept in lost:
            self._life.counters["settle_dropped"] += 1
            self._life.log.error("cycles: %s; %s of %s given up", why, kept.what, kept.label)

    async def _run(self) -> None:
        life = self._life
        try:
            wait = life.backoff_s
            while self.items:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait * random.uniform(0.5, 1.5)):
                        await self._wake.wait()
                wait = life.backoff_s if self._wake.is_set() else min(wait * 2, life.backlog_wait_s)
                if await self._try_all():
                    wait = life.backoff_s
        except asyncio.CancelledError:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_LAST_TRY_S):
                    await self._try_all()
            left = list(self.items)
            self.items.clear()
            life.counters["settle_backlog"] -= len(left)
            self._give_up(left, "the event loop is closing")
            raise
        finally:
            if not self.items and life._backlogs.get(self._loop) is self:
                del life._backlogs[self._loop]  # drained: nothing keeps the loop alive

    async def _try_all(self) -> bool:
        """Try the kept settles oldest first until the ledger is still away; True if any was made."""
        life, made = self._life, False
        while self.items:
            kept = self.items[0]
            try:
                await kept.attempt()
            except StoreUnavailableError:
                return made  # still away: wait, then try the oldest again
            except CyclesError as exc:
                if kept.what == "settle":
                    life._settle_refused(kept.label, kept.actual, exc)
                else:
                    life.log.error("cycles: release of %s refused (%s): %s", kept.label, exc.code, exc.message)
            except Exception:  # one kept settle's surprise must not keep the others waiting
                life.log.exception("cycles: %s of %s failed", kept.what, kept.label)
            else:
                made = True
                life.counters["settle_recovered"] += 1
                life.log.info("cycles: %s of %s done, the ledger answering again", kept.what, kept.label)
            self.items.popleft()
            life.counters["settle_backlog"] -= 1
        return made


_LAST_TRY_S = 2.0  # what a closing loop gives its kept settles


def _twin(
    method: Callable[Concatenate[Lifecycle, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[SyncLifecycle, P], R]:
    def call(self: SyncLifecycle, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.ledger.run(method(self.lifecycle, *args, **kwargs))

    call.__name__ = method.__name__
    call.__qualname__ = f"SyncLifecycle.{method.__name__}"
    call.__doc__ = method.__doc__
    return call


class SyncLifecycle:
    """`Lifecycle` for blocking callers: each step runs on the SyncLedger's private loop, as do heartbeats."""

    def __init__(
        self,
        ledger: SyncLedger,
        *,
        retries: int = 3,
        counters: Counter[str] | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.ledger = ledger
        self.lifecycle = Lifecycle(ledger.ledger, retries=retries, counters=counters, log=log)

    reserve = _twin(Lifecycle.reserve)
    commit = _twin(Lifecycle.commit)
    release = _twin(Lifecycle.release)

    def call(
        self,
        hold: Hold,
        work: Callable[[], T],
        actual: Callable[[T], Amount] | None = None,
        *,
        reason: str = "work failed",
    ) -> T:
        """`Lifecycle.call` for a blocking `work`, run in the calling thread."""
        try:
            result = work()
        except BaseException as exc:
            self.release(hold, f"{reason}: {type(exc).__name__}")
            raise
        try:
            spent = hold.estimate if actual is None else actual(result)
        except BaseException:
            self.commit(hold, hold.estimate)
            raise
        self.commit(hold, spent)
        return result
