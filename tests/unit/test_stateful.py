"""Stateful property test: random operation sequences on a real SQLite ledger agree with a plain model.

The model below restates the README semantics in plain Python (it does not use `cycles_ledger.rules`):
budgets on `tenant:t` and `tenant:t/workflow:w` in USD_MICROCENTS, subjects that also reach the
unbudgeted `agent:a` level, small amounts so that denials, overages, over-limit flags and debt are common.
After every step the balances, the reservations and `verify()` must match the model.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from cycles_ledger import (
    Balance,
    BudgetExceededError,
    BudgetFrozenError,
    CyclesError,
    IdempotencyMismatchError,
    MaxExtensionsExceededError,
    NotFoundError,
    OverdraftLimitExceededError,
    ReservationExpiredError,
    ReservationFinalizedError,
    open_ledger_sync,
)
from cycles_ledger.redis_server import RedisTarget

UNIT = "USD_MICROCENTS"
T = "tenant:t"
W = "tenant:t/workflow:w"
LEVELS = ("tenant", "workspace", "app", "workflow", "agent", "toolset")
TENANT_TAG = "tenant:t"  # the top-level scope every budget of this test lives under
SUBJECTS: tuple[dict[str, str], ...] = (
    {"tenant": "t"},
    {"tenant": "t", "workflow": "w"},
    {"tenant": "t", "workflow": "w", "agent": "a"},
    {"tenant": "t", "agent": "a"},
    {"agent": "a"},
)
ACTION = {"kind": "llm.completion", "name": "m"}
POLICIES = ("REJECT", "ALLOW_IF_AVAILABLE", "ALLOW_WITH_OVERDRAFT")
DEFAULT_TTL_MS = 60_000
DEFAULT_GRACE_MS = 5_000
MAX_EXTENSIONS = 3  # a small ledger setting, so the limit is reached

small = st.integers(min_value=0, max_value=10)
subjects = st.sampled_from((0, 0, 1, 1, 2, 2, 3, 4))  # indexes into SUBJECTS; the unbudgeted one is rarer
policies = st.sampled_from(POLICIES)
retries = st.sampled_from((False, False, True))  # True: repeat the earlier call made with this key, unchanged


def usd(n: int) -> dict[str, Any]:
    return {"unit": UNIT, "amount": n}


def scopes_of(subject: dict[str, str]) -> list[str]:
    """Canonical scope ids, broadest first, absent levels skipped."""
    out: list[str] = []
    path = ""
    for level in LEVELS:
        if level in subject:
            path = f"{path}/{level}:{subject[level]}" if path else f"{level}:{subject[level]}"
            out.append(path)
    return out


class Clock:
    """Integer milliseconds that move only when the machine says so."""

    def __init__(self, start_ms: int = 1_800_000_000_000) -> None:
        self.now = start_ms

    def __call__(self) -> int:
        return self.now


# --- the model -------------------------------------------------------------------------------------


@dataclass
class MBudget:
    allocated: int
    spent: int = 0
    reserved: int = 0
    debt: int = 0
    overdraft_limit: int = 0
    is_over_limit: bool = False
    status: str = "ACTIVE"
    cut: bool = False  # the operator set the allocation below spent + reserved

    @property
    def remaining(self) -> int:
        return self.allocated - self.spent - self.reserved - self.debt


@dataclass
class MReservation:
    amount: int
    policy: str
    budgeted: list[str]
    expires: int
    grace: int
    status: str = "ACTIVE"
    charged: int | None = None
    extensions: int = 0
    settle: tuple[str, str, Any, Any] | None = None  # (op, key, payload, answer)

    @property
    def deadline(self) -> int:
        return self.expires + self.grace


@dataclass
class Evaluation:
    decision: str
    reason: str | None
    scope: str | None
    remaining: int | None
    amount: int


class Model:
    """The ledger's documented semantics, written out plainly."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.budgets: dict[str, MBudget] = {}
        self.res: dict[str, MReservation] = {}
        self.per_tenant = False  # lazy expiry per top-level scope (Redis) instead of global (SQLite)
        # Idempotency keys are per (tenant, operation), the tenant being the top-level scope.
        self.reserve_keys: dict[tuple[str, str], tuple[Any, Any]] = {}  # (tenant, key) -> (payload, first answer)
        self.event_keys: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.extend_keys: dict[tuple[str, str], tuple[Any, int]] = {}  # -> ((rid, by), expires_at_ms)

    def expire_overdue(self) -> int:
        """Expire every reservation whose grace is over (now > expiry + grace); their holds return."""
        overdue = [r for r in self.res.values() if r.status == "ACTIVE" and r.deadline < self.clock.now]
        for r in overdue:
            self.expire(r)
        return len(overdue)

    def expire(self, r: MReservation) -> None:
        r.status = "EXPIRED"
        for s in r.budgeted:
            self.budgets[s].reserved -= r.amount

    def touch(self, r: MReservation) -> None:
        """Settling or extending a reservation past its expiry + grace expires it (and then refuses)."""
        if r.status == "ACTIVE" and self.clock.now > r.deadline:
            self.expire(r)

    def before_write(self, tag: str | None) -> None:
        """README: overdue reservations expire lazily in every write (reads never expire anything). On SQLite
        that is any write; on Redis a write to the same top-level scope (`tag`), since each script runs in
        one tag's slot; a write that names no tag (an unknown reservation id) expires nothing there."""
        if self.per_tenant and tag != TENANT_TAG:
            return
        self.expire_overdue()

    def evaluate(self, scopes: list[str], estimate: int, soft_min: int | None) -> Evaluation:
        present = [s for s in scopes if s in self.budgets]
        if not present:
            return Evaluation("DENY", "BUDGET_NOT_FOUND", scopes[-1], None, 0)
        for s in present:
            b = self.budgets[s]
            reason = None
            if b.status == "FROZEN":
                reason = "BUDGET_FROZEN"
            elif b.is_over_limit:
                reason = "OVERDRAFT_LIMIT_EXCEEDED"
            elif b.debt > 0:
                reason = "DEBT_OUTSTANDING"
            if reason:
                return Evaluation("DENY", reason, s, b.remaining, 0)
        tight = present[0]
        for s in present[1:]:
            if self.budgets[s].remaining < self.budgets[tight].remaining:
                tight = s
        left = self.budgets[tight].remaining
        if left >= estimate:
            return Evaluation("ALLOW", None, tight, left, estimate)
        if soft_min is not None and left >= max(soft_min, 1):
            return Evaluation("ALLOW_WITH_CAPS", None, tight, left, left)
        return Evaluation("DENY", "BUDGET_EXCEEDED", tight, left, 0)

    def charge(self, scopes: list[str], held: int, actual: int, policy: str, is_commit: bool) -> int | type[Exception]:
        """Turn a hold into a charge under the overage policy; an error class means nothing changed."""
        bs = [self.budgets[s] for s in scopes]
        over = actual - held
        if over <= 0 or policy == "REJECT":
            # REJECT: a commit may not go past its hold at all; a direct debit must fit on every scope.
            if over > 0 and (is_commit or any(b.remaining < over for b in bs)):
                return BudgetExceededError
            for b in bs:
                b.reserved -= held
                b.spent += actual
            return actual
        if policy == "ALLOW_IF_AVAILABLE":  # charge what every scope can still cover, flag the short ones
            extra = min([over] + [max(b.remaining, 0) for b in bs])
            for b in bs:
                if b.remaining < over:
                    b.is_over_limit = True
                b.reserved -= held
                b.spent += held + extra
            return held + extra
        plan = []  # ALLOW_WITH_OVERDRAFT: what remaining cannot cover becomes debt, up to the overdraft limit
        for b in bs:
            covered = min(over, max(b.remaining, 0))
            if over > covered and b.debt + over - covered > b.overdraft_limit:
                return OverdraftLimitExceededError
            plan.append((b, covered))
        for b, covered in plan:
            b.reserved -= held
            b.spent += held + covered
            b.debt += over - covered
        return actual


# --- the machine -----------------------------------------------------------------------------------


def used(keys: dict[tuple[str, str], Any], key: str | None) -> Any:
    """The first recorded use of `key` under any tenant, to replay its payload."""
    return next((v for (_, k), v in keys.items() if k == key), None) if key is not None else None


def has_reservations(machine: LedgerMachine) -> bool:
    return bool(machine.model.res)


class LedgerMachine(RuleBasedStateMachine):
    # A fresh store per example: a new SQLite file, or (when a test sets `redis`) a new key prefix on that server.
    redis: RedisTarget | None = None

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="cycles-stateful-")
        self.clock = Clock()
        url = f"sqlite:///{self.dir}/x.db" if self.redis is None else self.redis.url()
        self.ledger = open_ledger_sync(url, clock=self.clock, max_extensions=MAX_EXTENSIONS)
        self.model = Model(self.clock)
        self.model.per_tenant = url.startswith("redis")

    def teardown(self) -> None:
        self.ledger.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # helpers

    def raises(self, expected: type[Exception], fn: Any, *args: Any, **kwargs: Any) -> None:
        with pytest.raises(CyclesError) as info:
            fn(*args, **kwargs)
        assert type(info.value) is expected, f"expected {expected.__name__}, got {info.value!r}"

    def check_returned(self, balances: list[Balance]) -> None:
        """Balances that come back with an answer are the budgets' state right after the operation."""
        for b in balances:
            m = self.model.budgets[b.scope]
            got = (b.allocated, b.spent, b.reserved, b.debt, b.remaining, b.overdraft_limit, b.is_over_limit, b.status)
            want = (m.allocated, m.spent, m.reserved, m.debt, m.remaining, m.overdraft_limit, m.is_over_limit, m.status)
            assert got == want, f"{b.scope}: answer carried {got}, model has {want}"

    def pick(self, data: st.DataObject) -> str:
        """A reservation id: usually a live one, sometimes any (for replays and refusals), rarely an unknown one."""
        ids = list(self.model.res)
        live = [n for n, rid in enumerate(ids) if self.model.res[rid].status == "ACTIVE"]
        choice = data.draw(st.integers(0, 9), label="0 unknown, 1-2 any, else live")
        if choice == 0:
            return "rsv_unknown"
        pool = live if live and choice > 2 else list(range(len(ids)))
        return ids[data.draw(st.sampled_from(pool), label="reservation number")]

    # setup

    @initialize(
        tenant=st.integers(0, 25),
        workflow=st.sampled_from((None, 0, 3, 6, 10, 15)),
        limits=st.tuples(st.integers(0, 8), st.integers(0, 8)),
    )
    def create_budgets(self, tenant: int, workflow: int | None, limits: tuple[int, int]) -> None:
        """Start with a tenant budget and usually a workflow budget below it, with overdraft limits."""
        self.set_budget(T, tenant, limits[0])
        if workflow is not None:
            self.set_budget(W, workflow, limits[1])

    # admin

    @rule(
        op=st.sampled_from(("set", "set", "fund", "fund", "freeze", "unfreeze", "unfreeze")),
        scope=st.sampled_from((T, T, W)),
        allocated=st.integers(0, 20),
        limit=st.sampled_from((None, 0, 1, 2, 5, 10)),
        amount=small,
    )
    def operator(self, op: str, scope: str, allocated: int, limit: int | None, amount: int) -> None:
        """An operator sets, funds, freezes or unfreezes a budget (one rule, so runtime calls stay frequent)."""
        if op == "set":
            self.set_budget(scope, allocated, limit)
        elif op == "fund":
            self.fund(scope, amount)
        else:
            self.freeze_or_unfreeze(scope, op == "freeze")

    def set_budget(self, scope: str, allocated: int, limit: int | None) -> None:
        """set_budget creates a budget or changes its allocation and overdraft limit, keeping what was used."""
        self.model.before_write(scope.split("/")[0])
        b = self.model.budgets.get(scope)
        if b is None:
            b = self.model.budgets[scope] = MBudget(allocated, overdraft_limit=limit or 0)
        else:
            b.allocated = allocated
            if limit is not None:
                b.overdraft_limit = limit
            if b.debt > b.overdraft_limit:
                b.is_over_limit = True  # debt above the limit always means over-limit (verify's rule)
            elif b.remaining >= 0:
                b.is_over_limit = False
        if b.spent + b.reserved > b.allocated:
            b.cut = True
        got = self.ledger.set_budget(scope, usd(allocated), overdraft_limit=limit)
        self.check_returned([got])

    def fund(self, scope: str, amount: int) -> None:
        """fund repays debt first (it becomes spend), then the rest is new allocation."""
        self.model.before_write(scope.split("/")[0])
        b = self.model.budgets.get(scope)
        if b is None:
            self.raises(NotFoundError, self.ledger.fund, scope, usd(amount))
            return
        repaid = min(b.debt, amount)
        b.debt -= repaid
        b.spent += repaid
        b.allocated += amount
        if b.debt == 0 and b.remaining >= 0:
            b.is_over_limit = False
        self.check_returned([self.ledger.fund(scope, usd(amount))])

    def freeze_or_unfreeze(self, scope: str, frozen: bool) -> None:
        """freeze blocks new holds and events on a budget; unfreeze lifts it."""
        self.model.before_write(scope.split("/")[0])
        op = self.ledger.freeze if frozen else self.ledger.unfreeze
        b = self.model.budgets.get(scope)
        if b is None:
            self.raises(NotFoundError, op, scope)
            return
        b.status = "FROZEN" if frozen else "ACTIVE"
        self.check_returned([op(scope)])

    # runtime

    @rule(
        subject=subjects,
        estimate=small,
        policy=policies,
        ttl=st.sampled_from((None, 1_000, 3_000, 10_000)),
        grace=st.sampled_from((None, 0, 1_000)),
        key=st.sampled_from((None, None, None, None, "r1", "r2")),
        dry_run=st.sampled_from((False, False, False, True)),
        soft_min=st.one_of(st.none(), st.integers(0, 3)),
        retry=retries,
    )
    def reserve(
        self,
        subject: int,
        estimate: int,
        policy: str,
        ttl: int | None,
        grace: int | None,
        key: str | None,
        dry_run: bool,
        soft_min: int | None,
        retry: bool,
    ) -> None:
        """reserve holds the estimate on every budgeted scope or denies with the first failing scope."""
        if retry and (first_use := used(self.model.reserve_keys, key)):
            subject, estimate, policy, ttl, grace, dry_run, soft_min = first_use[0]
        subj = SUBJECTS[subject]
        tkey = (scopes_of(subj)[0], key or "")
        scopes = scopes_of(subj)
        soft = None if soft_min is None else {"min_amount": soft_min}
        # decide first: it answers what reserve would, but writes nothing, so it does not expire overdue holds.
        ev = self.model.evaluate(scopes, estimate, soft_min)
        seen = self.ledger.decide(subj, ACTION, usd(estimate), soft_landing=soft)
        assert (seen.decision.value, seen.reason_code, seen.scope, seen.remaining) == (
            ev.decision,
            ev.reason,
            ev.scope,
            ev.remaining,
        )
        self.model.before_write(scopes[0])
        payload = (subject, estimate, policy, ttl, grace, dry_run, soft_min)

        def call() -> Any:
            return self.ledger.reserve(
                subj,
                ACTION,
                usd(estimate),
                ttl_ms=ttl,
                grace_period_ms=grace,
                overage_policy=policy,
                idempotency_key=key,
                dry_run=dry_run,
                soft_landing=soft,
            )

        if key is not None and tkey in self.model.reserve_keys:
            first_payload, first = self.model.reserve_keys[tkey]
            if first_payload != payload:
                self.raises(IdempotencyMismatchError, call)
                return
            again = call()  # same key, same payload: the first answer, nothing held twice
            skip = {"balances", "remaining_ttl_ms"}
            assert again.model_dump(exclude=skip) == first.model_dump(exclude=skip)
            if again.expires_at_ms is not None:
                assert again.remaining_ttl_ms == max(0, again.expires_at_ms - self.clock.now)
            self.check_returned(again.balances)
            return

        ev = self.model.evaluate(scopes, estimate, soft_min)  # now on the state after the lazy expiry
        got = call()
        assert got.decision.value == ev.decision
        assert (got.reason_code, got.scope, got.remaining) == (ev.reason, ev.scope, ev.remaining)
        assert got.affected_scopes == scopes
        assert got.dry_run is dry_run
        if dry_run or ev.decision == "DENY":
            assert got.reservation_id is None
            self.check_returned(got.balances)
            if dry_run and key is not None:
                self.model.reserve_keys[tkey] = (payload, got)
            return
        assert got.reservation_id is not None
        assert got.reserved is not None
        assert got.reserved.amount == ev.amount
        budgeted = [s for s in scopes if s in self.model.budgets]
        for s in budgeted:
            self.model.budgets[s].reserved += ev.amount
        self.check_returned(got.balances)
        expires = self.clock.now + (DEFAULT_TTL_MS if ttl is None else ttl)
        assert got.expires_at_ms == expires
        self.model.res[got.reservation_id] = MReservation(
            ev.amount, policy, budgeted, expires, DEFAULT_GRACE_MS if grace is None else grace
        )
        if key is not None:
            self.model.reserve_keys[tkey] = (payload, got)

    @precondition(has_reservations)
    @rule(data=st.data(), actual=small, key=st.sampled_from((None, None, "s1")), retry=retries)
    def commit(self, data: st.DataObject, actual: int, key: str | None, retry: bool) -> None:
        """commit charges exactly what the overage policy allows, or raises its typed error and changes nothing."""
        rid = self.pick(data)
        self.model.before_write(TENANT_TAG if rid in self.model.res else None)
        r0 = self.model.res.get(rid)
        if retry and r0 is not None and r0.settle is not None and r0.settle[0] == "commit":
            actual, key = r0.settle[2], (None if r0.settle[1] == f"commit:{rid}" else r0.settle[1])
        call = (self.ledger.commit, rid, usd(actual))
        kwargs = {"idempotency_key": key}
        if rid not in self.model.res:
            self.raises(NotFoundError, *call, **kwargs)
            return
        r = self.model.res[rid]
        settle_key = key or f"commit:{rid}"
        if r.settle is not None and r.settle[1] == settle_key:
            if r.settle[0] != "commit" or r.settle[2] != actual:
                self.raises(IdempotencyMismatchError, *call, **kwargs)
                return
            got = self.ledger.commit(rid, usd(actual), idempotency_key=key)  # a retry: same answer, no new charge
            assert (got.charged.amount, got.released.amount if got.released else 0) == r.settle[3]
            self.check_returned(got.balances)
            return
        self.model.touch(r)
        if r.status != "ACTIVE":
            err = ReservationExpiredError if r.status == "EXPIRED" else ReservationFinalizedError
            self.raises(err, *call, **kwargs)
            return
        out = self.model.charge(r.budgeted, r.amount, actual, r.policy, is_commit=True)
        if isinstance(out, type):
            self.raises(out, *call, **kwargs)
            return
        released = max(r.amount - actual, 0)
        r.status, r.charged, r.settle = "COMMITTED", out, ("commit", settle_key, actual, (out, released))
        got = self.ledger.commit(rid, usd(actual), idempotency_key=key)
        assert got.charged.amount == out
        assert (got.released.amount if got.released else 0) == released
        self.check_returned(got.balances)

    @precondition(has_reservations)
    @rule(data=st.data(), key=st.sampled_from((None, None, "s1")))
    def release(self, data: st.DataObject, key: str | None) -> None:
        """release returns the whole hold; a retry answers the same, a finalized reservation refuses."""
        rid = self.pick(data)
        self.model.before_write(TENANT_TAG if rid in self.model.res else None)
        if rid not in self.model.res:
            self.raises(NotFoundError, self.ledger.release, rid, idempotency_key=key)
            return
        r = self.model.res[rid]
        settle_key = key or f"release:{rid}"
        if r.settle is not None and r.settle[1] == settle_key:
            if r.settle[0] != "release":
                self.raises(IdempotencyMismatchError, self.ledger.release, rid, idempotency_key=key)
                return
            got = self.ledger.release(rid, idempotency_key=key)
            assert got.released.amount == r.amount
            self.check_returned(got.balances)
            return
        self.model.touch(r)
        if r.status != "ACTIVE":
            err = ReservationExpiredError if r.status == "EXPIRED" else ReservationFinalizedError
            self.raises(err, self.ledger.release, rid, idempotency_key=key)
            return
        for s in r.budgeted:
            self.model.budgets[s].reserved -= r.amount
        r.status, r.settle = "RELEASED", ("release", settle_key, None, r.amount)
        got = self.ledger.release(rid, idempotency_key=key)
        assert got.released.amount == r.amount
        self.check_returned(got.balances)

    @precondition(has_reservations)
    @rule(
        data=st.data(),
        by=st.sampled_from((500, 1_000, 3_000)),
        key=st.sampled_from((None, None, "e1")),
        retry=retries,
    )
    def extend(self, data: st.DataObject, by: int, key: str | None, retry: bool) -> None:
        """extend pushes the expiry of a live reservation, only before it expires and at most MAX_EXTENSIONS times."""
        rid = self.pick(data)
        if retry and (first_use := used(self.model.extend_keys, key)):
            rid, by = first_use[0]
        self.model.before_write(TENANT_TAG if rid in self.model.res else None)
        call = (self.ledger.extend, rid, by)
        kwargs = {"idempotency_key": key}
        if rid not in self.model.res:
            self.raises(NotFoundError, *call, **kwargs)
            return
        tkey = (self.model.res[rid].budgeted[0].split("/")[0] if self.model.res[rid].budgeted else "", key or "")
        if key is not None and tkey in self.model.extend_keys:
            first, expires = self.model.extend_keys[tkey]
            if first != (rid, by):
                self.raises(IdempotencyMismatchError, *call, **kwargs)
                return
            got = self.ledger.extend(rid, by, idempotency_key=key)  # a retry does not extend twice
            assert got.expires_at_ms == expires
            assert got.remaining_ttl_ms == max(0, expires - self.clock.now)
            return
        if rid not in self.model.res:
            self.raises(NotFoundError, *call, **kwargs)
            return
        r = self.model.res[rid]
        self.model.touch(r)
        if r.status == "EXPIRED" or (r.status == "ACTIVE" and self.clock.now > r.expires):
            self.raises(ReservationExpiredError, *call, **kwargs)
            return
        if r.status != "ACTIVE":
            self.raises(ReservationFinalizedError, *call, **kwargs)
            return
        if r.extensions >= MAX_EXTENSIONS:
            self.raises(MaxExtensionsExceededError, *call, **kwargs)
            return
        r.expires += by
        r.extensions += 1
        got = self.ledger.extend(rid, by, idempotency_key=key)
        assert got.expires_at_ms == r.expires
        assert got.remaining_ttl_ms == r.expires - self.clock.now
        if key is not None:
            self.model.extend_keys[tkey] = ((rid, by), r.expires)

    @rule(
        subject=subjects,
        actual=st.integers(0, 6),
        policy=policies,
        key=st.sampled_from((None, None, None, None, "v1", "v2")),
        retry=retries,
    )
    def record_event(self, subject: int, actual: int, policy: str, key: str | None, retry: bool) -> None:
        """record_event debits directly under the overage policy; a replayed key charges once."""
        if retry and (first_use := used(self.model.event_keys, key)):
            subject, actual, policy = first_use[0]
        subj = SUBJECTS[subject]
        scopes = scopes_of(subj)
        self.model.before_write(scopes[0])
        tkey = (scopes[0], key or "")
        payload = (subject, actual, policy)
        call = (self.ledger.record_event, subj, ACTION, usd(actual))
        kwargs = {"overage_policy": policy, "idempotency_key": key}
        if key is not None and tkey in self.model.event_keys:
            first_payload, first = self.model.event_keys[tkey]
            if first_payload != payload:
                self.raises(IdempotencyMismatchError, *call, **kwargs)
                return
            got = self.ledger.record_event(subj, ACTION, usd(actual), overage_policy=policy, idempotency_key=key)
            assert (got.event_id, got.charged) == (first.event_id, first.charged)
            self.check_returned(got.balances)
            return
        present = [s for s in scopes if s in self.model.budgets]
        if not present:
            self.raises(NotFoundError, *call, **kwargs)
            return
        if any(self.model.budgets[s].status == "FROZEN" for s in present):
            self.raises(BudgetFrozenError, *call, **kwargs)
            return
        out = self.model.charge(present, 0, actual, policy, is_commit=False)
        if isinstance(out, type):
            self.raises(out, *call, **kwargs)
            return
        got = self.ledger.record_event(subj, ACTION, usd(actual), overage_policy=policy, idempotency_key=key)
        assert got.charged.amount == out
        self.check_returned(got.balances)
        if key is not None:
            self.model.event_keys[tkey] = (payload, got)

    @rule(ms=st.sampled_from((0, 1, 60, 500, 1_000, 1_001, 2_500, 6_001, 70_000)), sweep=st.booleans())
    def advance_clock(self, ms: int, sweep: bool) -> None:
        """Time passes; holds past expiry + grace return on sweep or lazily on the next write, never on a read."""
        self.clock.now += ms
        if sweep:
            assert self.ledger.sweep() == self.model.expire_overdue()

    @precondition(lambda self: any(r.status == "ACTIVE" for r in self.model.res.values()))
    @rule(data=st.data(), edge=st.sampled_from(("expiry", "deadline")), offset=st.sampled_from((-60, 0, 1, 60)))
    def advance_to_edge(self, data: st.DataObject, edge: str, offset: int) -> None:
        """Time moves to just before, onto or just past a live reservation's expiry or its expiry + grace."""
        ids = list(self.model.res)
        live = [n for n, rid in enumerate(ids) if self.model.res[rid].status == "ACTIVE"]
        r = self.model.res[ids[data.draw(st.sampled_from(live), label="reservation number")]]
        target = (r.expires if edge == "expiry" else r.deadline) + offset
        self.clock.now = max(self.clock.now, target)

    # checks after every step

    @invariant()
    def balances_match_model(self) -> None:
        real = {b.scope: b for b in self.ledger.balances()}
        assert set(real) == set(self.model.budgets)
        for scope, m in self.model.budgets.items():
            b = real[scope]
            assert b.unit.value == UNIT
            got = (b.allocated, b.spent, b.reserved, b.debt, b.overdraft_limit, b.is_over_limit, b.status.value)
            want = (m.allocated, m.spent, m.reserved, m.debt, m.overdraft_limit, m.is_over_limit, m.status)
            assert got == want, f"{scope}: ledger {got} != model {want}"
            assert b.remaining == b.allocated - b.spent - b.reserved - b.debt
            if b.spent + b.reserved <= b.allocated:
                m.cut = False
            # Only an operator cutting the allocation below what is used can put spend above it.
            assert b.spent <= b.allocated or m.cut, f"{scope}: spent {b.spent} > allocated {b.allocated}"
            assert b.spent + b.reserved <= b.allocated or m.cut

    @invariant()
    def reservations_match_model(self) -> None:
        real = {r.reservation_id: r for r in self.ledger.list_reservations(limit=10_000)}
        assert set(real) == set(self.model.res)
        for rid, m in self.model.res.items():
            r = real[rid]
            got = (r.status.value, r.reserved.amount, r.committed.amount if r.committed else None)
            assert got == (m.status, m.amount, m.charged)
            assert (r.expires_at_ms, r.extension_count, r.budgeted_scopes) == (m.expires, m.extensions, m.budgeted)

    @invariant()
    def books_verify(self) -> None:
        assert self.ledger.verify() == []


@pytest.mark.parametrize(
    "backend", [pytest.param("sqlite", marks=pytest.mark.sqlite), pytest.param("redis", marks=pytest.mark.redis)]
)
def test_ledger_matches_model_under_random_operations(backend: str, request: pytest.FixtureRequest) -> None:
    """Random reserve/commit/release/extend/expiry/fund/freeze/event/replay runs keep the ledger equal to the model."""
    machine: type[LedgerMachine] = LedgerMachine
    if backend == "redis":
        target = request.getfixturevalue("redis_server")
        machine = type("RedisLedgerMachine", (LedgerMachine,), {"redis": target})
    run_state_machine_as_test(
        machine,
        settings=settings(max_examples=60, stateful_step_count=40, deadline=None, report_multiple_bugs=False),
    )


def test_lowering_overdraft_limit_below_debt_marks_budget_over_limit(db_url: str) -> None:
    """Lowering a budget's overdraft limit below its debt leaves it over-limit and the books still verify."""
    # Found by the machine before ac9e19e (set_budget then left is_over_limit False, and verify() complained):
    # create_budgets(tenant=0, workflow=None, limits=(1, 0));
    # record_event(subject=0, actual=1, policy='ALLOW_WITH_OVERDRAFT'); operator(op='set', scope=T, limit=0).
    with open_ledger_sync(db_url, clock=Clock()) as led:
        led.set_budget(T, usd(0), overdraft_limit=1)
        led.record_event(SUBJECTS[0], ACTION, usd(1), overage_policy="ALLOW_WITH_OVERDRAFT")
        b = led.set_budget(T, usd(0), overdraft_limit=0)
        assert (b.debt, b.overdraft_limit) == (1, 0)
        assert b.is_over_limit, "debt 1 is above the new overdraft limit 0, so the budget must be over-limit"
        assert led.verify() == []
        assert led.reserve(SUBJECTS[0], ACTION, usd(0)).reason_code == "OVERDRAFT_LIMIT_EXCEEDED"


def test_debit_just_after_a_hold_expires_finds_the_hold_returned(db_url: str) -> None:
    """A debit 1 ms after a hold's expiry + grace is charged in full, as every write first expires overdue holds."""
    # The machine's shortest failing run (lazy expiry skipped within 100 ms of the previous lazy pass):
    # create_budgets(tenant=0, workflow=None, limits=(0, 0)); reserve(estimate=0, ttl=None, grace=0, ...);
    # advance_to_edge(edge='expiry', offset=-60); extend(<unknown id>)  # a write: lazy pass, hold not yet due
    # advance_to_edge(edge='expiry', offset=1); commit(<unknown id>)  # a write: the overdue hold is still ACTIVE
    clock = Clock()
    with open_ledger_sync(db_url, clock=clock) as led:
        led.set_budget(T, usd(10))
        led.reserve(SUBJECTS[0], ACTION, usd(10), ttl_ms=1_000, grace_period_ms=0)
        clock.now += 999
        led.fund(T, usd(0))  # a write while the hold is still live
        clock.now += 2  # now 1 ms past expiry + grace: the hold is overdue and must not count any more
        got = led.record_event(SUBJECTS[0], ACTION, usd(5), overage_policy="ALLOW_IF_AVAILABLE")
        b = led.balance(T)
        assert (got.charged.amount, b.reserved, b.spent, b.is_over_limit) == (5, 0, 5, False)
        assert led.reserve(SUBJECTS[0], ACTION, usd(1)).allowed
        assert led.verify() == []
