"""Distributed store: Redis or Redis Cluster, for many proxy replicas and agents on many hosts.

Each protocol operation is ONE Lua script (`redis.lua`, loaded once and called by SHA; redis-py
reloads it on NOSCRIPT) that applies the rules of `cycles_ledger.rules` atomically on the server's
clock (`TIME`). All keys of one top-level scope (usually the tenant) share a hash tag, e.g.
`cycles:{tenant:acme}:b`, so every script touches one slot and runs unchanged on Redis Cluster.
A reservation id carries its hash tag (`rsv_…@tenant:acme`), so commit, release and extend find
the slot without a lookup.

Retention (settings, also URL query parameters): idempotency records and finalized reservations are
kept `retention_ms` (7 days) and pruned by the sweeper; each tag's event stream keeps about
`event_retention` entries (1,000,000). Budgets never expire. Durability is Redis's: run it with
`appendonly yes` and `appendfsync always` (or replicas and WAIT) if an acknowledged commit must survive
a crash of the server.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from ..errors import ConfigError, CyclesError, InvalidRequestError, StoreUnavailableError, error_from_code
from ..models import Unit, parse_scope
from .base import (
    BudgetCommand,
    CommitCommand,
    EventCommand,
    ExtendCommand,
    ReleaseCommand,
    ReserveCommand,
    Store,
    SupportsSweep,
)

__all__ = ["RedisStore"]

MAX_EXACT = 2**53 - 1  # Lua numbers are doubles: integers are exact up to here
_UNITS = ("CREDITS", "RISK_POINTS", "TOKENS", "USD_MICROCENTS")  # must match UNITS in redis.lua
assert set(_UNITS) == {u.value for u in Unit}, "redis.lua's unit list is out of date"
_OPS = ("reserve", "decide", "commit", "release", "extend", "event", "budget", "sweep")
_JSON = json.JSONEncoder(separators=(",", ":")).encode
Clock = Callable[[], int]


def _scripts() -> dict[str, str]:
    """Split redis.lua into one script per operation: the shared prelude + the operation's section."""
    text = resources.files("cycles_ledger.stores").joinpath("redis.lua").read_text(encoding="utf-8")
    prelude, _, rest = text.partition("--@@ prelude-end")
    out: dict[str, str] = {}
    for chunk in rest.split("--@@ ")[1:]:
        name, _, body = chunk.partition("\n")
        out[name.strip()] = f"{prelude}\n{body}\nreturn OPS.{name.strip()}()\n"
    missing = set(_OPS) - set(out)
    if missing:
        raise RuntimeError(f"redis.lua lacks the scripts {sorted(missing)}")
    return out


_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count()


def _reseed_ids() -> None:
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX = secrets.token_hex(4)
    _ID_COUNTER = itertools.count()


os.register_at_fork(after_in_child=_reseed_ids)


def _new_rid(tag: str) -> str:
    """Time-ordered, unique across processes, and naming its hash tag after the `@`."""
    return f"rsv_{time.time_ns() // 1_000_000:012x}{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFF:06x}@{tag}"


def _event_id(stream_id: str | bytes) -> int:
    """A stream entry id `ms-seq` as one increasing integer."""
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, seq = text.partition("-")
    return (int(ms) << 20) | int(seq)


def _stream_id(event_id: int) -> str:
    return f"{event_id >> 20}-{event_id & 0xFFFFF}"


def _exact(value: int | None, name: str) -> None:
    if value is not None and value > MAX_EXACT:
        raise InvalidRequestError(f"{name} {value} is beyond what the Redis store keeps exactly (2^53 - 1)")


def _tag_of_scope(scope: str) -> str:
    return scope.split("/", 1)[0]


def _tag_of_rid(reservation_id: str) -> str | None:
    tag = reservation_id.rpartition("@")[2]
    if not reservation_id.startswith("rsv_") or "@" not in reservation_id:
        return None
    try:
        parse_scope(tag)
    except CyclesError:
        return None
    return tag


def _under(scope: str | None, prefix: str | None) -> bool:
    return prefix is None or scope == prefix or (scope is not None and scope.startswith(prefix + "/"))


def _raw(value: Any) -> str | None:
    return _JSON(value) if value else None


def _balance(field: str, text: str) -> dict[str, Any]:
    scope, _, unit = field.rpartition("|")
    j = json.loads(text)
    return {
        "scope": scope,
        "unit": unit,
        "allocated": j["a"],
        "spent": j["s"],
        "reserved": j["r"],
        "debt": j["d"],
        "overdraft_limit": j["o"],
        "remaining": j["a"] - j["s"] - j["r"] - j["d"],
        "is_over_limit": j["x"] == 1,
        "status": j["st"],
        "caps": j.get("c"),
    }


def _reservation(rec: dict[str, Any], static: dict[str, Any]) -> dict[str, Any]:
    unit = rec["u"]
    return {
        "reservation_id": rec["id"],
        "status": rec["st"],
        "idempotency_key": static["idempotency_key"],
        "subject": static["subject"],
        "action": static["action"],
        "reserved": {"unit": unit, "amount": rec["e"]},
        "committed": {"unit": unit, "amount": rec["ch"]} if rec.get("ch") is not None else None,
        "overage_policy": rec["op"],
        "created_at_ms": rec["c0"],
        "expires_at_ms": rec["x"],
        "grace_period_ms": rec["g"],
        "finalized_at_ms": rec.get("fin"),
        "scope_path": rec["sp"],
        "affected_scopes": static["affected_scopes"],
        "budgeted_scopes": rec["bs"],
        "extension_count": rec["n"],
        "caps": rec.get("caps") or None,
        "metadata": static.get("metadata"),
    }


def _event(stream_id: str, fields: dict[str, str]) -> dict[str, Any]:
    amount = fields.get("amount")
    data = fields.get("data")
    return {
        "event_id": _event_id(stream_id),
        "ts_ms": int(fields["ts"]),
        "type": fields["type"],
        "scope": fields.get("scope"),
        "unit": fields.get("unit"),
        "amount": int(amount) if amount is not None else None,
        "reservation_id": fields.get("rid"),
        "reason_code": fields.get("reason"),
        "data": json.loads(data) if data else {},
    }


class RedisStore(Store, SupportsSweep):
    """`redis://[:password@]host:6379/0`, `rediss://…` (TLS) or `redis+cluster://host:7000` (Redis Cluster).

    URL query parameters: `prefix` (key prefix, default `cycles`), `timeout` (seconds per command,
    default 2), `retention_ms`, `event_retention`. A lost connection or a timeout is a
    `StoreUnavailableError`; nothing is retried behind the caller's back, and a retry with the same
    idempotency key is safe.
    """

    schemes = ("redis", "rediss", "redis+cluster", "rediss+cluster")

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "cycles",
        clock: Clock | None = None,
        sweep_per_call: int = 64,
        event_retention: int = 1_000_000,
        retention_ms: int = 7 * 24 * 3600 * 1000,
    ) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ConfigError(f"Redis key prefix {prefix!r} must be non-empty and free of braces")
        self._client = client
        self._prefix = prefix
        self._clock = clock  # tests only: replaces Redis TIME so a test can move time by hand
        self._config = [str(sweep_per_call), str(event_retention), str(retention_ms)]
        self._scripts = {name: client.register_script(src) for name, src in _scripts().items()}
        self._tops_key = f"{prefix}:tops"
        self._known_tops: set[str] = set()
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **settings: Any) -> RedisStore:
        try:
            import redis.asyncio as aioredis
            from redis.asyncio.cluster import RedisCluster
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigError("the Redis store needs the redis driver: pip install 'cycles-litellm[redis]'") from exc
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        known = {"prefix", "timeout", "retention_ms", "event_retention", "sweep_per_call"}
        unknown = set(query) - known
        if unknown:
            raise ConfigError(f"unknown Redis URL parameters {sorted(unknown)} in {url!r}; known: {sorted(known)}")
        try:
            timeout = float(query.pop("timeout", settings.pop("timeout", 2.0)))
            for name in ("retention_ms", "event_retention", "sweep_per_call"):
                if name in query:
                    settings[name] = int(query.pop(name))
        except ValueError as exc:
            raise ConfigError(f"bad Redis URL parameter in {url!r}: {exc}") from exc
        if "prefix" in query:
            settings.setdefault("prefix", query.pop("prefix"))
        scheme = parts.scheme.lower()
        cluster = scheme.endswith("+cluster")
        base = urlunsplit((scheme.replace("+cluster", ""), parts.netloc, parts.path, "", ""))
        if not parts.hostname:
            raise ConfigError(f"Redis URL needs a host, like redis://127.0.0.1:6379/0; got {url!r}")
        common: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "decode_responses": True,
        }
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No silent retries on a lost connection: a reserve whose reply was lost must not run twice
        # under a fresh key. The caller sees "unavailable" and may retry with the same key.
        common["retry"] = Retry(NoBackoff(), 0)
        client: Any
        try:
            client = RedisCluster.from_url(base, **common) if cluster else aioredis.from_url(base, **common)
        except ValueError as exc:
            raise ConfigError(f"bad Redis URL {url!r}: {exc}") from exc
        return cls(client, **settings)

    # --- plumbing -----------------------------------------------------------------------------

    def _keys(self, tag: str, idem: str | None = None) -> list[str]:
        base = f"{self._prefix}:{{{tag}}}:"
        return [base + "b", base + "r", base + "due", base + "e", base + "fin", base + "ids", base + (idem or "b")]

    async def _redis(self, call: Awaitable[Any]) -> Any:
        """Await one Redis call; every driver failure is the ledger's "unavailable"."""
        from redis.exceptions import RedisError

        if self._closed:
            raise StoreUnavailableError("the Redis store is closed")
        try:
            return await call
        except RedisError as exc:
            raise StoreUnavailableError(f"Redis ledger unavailable: {type(exc).__name__}: {exc}") from exc
        except (OSError, TimeoutError) as exc:
            raise StoreUnavailableError(f"Redis ledger unavailable: {exc!r}") from exc

    async def _run(self, op: str, tag: str, cmd: dict[str, Any], idem: str | None = None) -> dict[str, Any]:
        now = "" if self._clock is None else str(self._clock())
        out = await self._redis(self._scripts[op](keys=self._keys(tag, idem), args=[now, *self._config, _JSON(cmd)]))
        body: dict[str, Any] = json.loads(out)
        if "err" in body:
            raise error_from_code(body["err"], body["message"], body.get("details"))
        return body

    async def _register(self, tag: str) -> None:
        """Remember a tag in the (unslotted) set of tags, so listings and the sweeper can find it."""
        if tag not in self._known_tops:
            await self._redis(self._client.sadd(self._tops_key, tag))
            self._known_tops.add(tag)

    async def _tags(self, scope_prefix: str | None = None) -> list[str]:
        if scope_prefix:
            return [_tag_of_scope(scope_prefix)]
        members = await self._redis(self._client.smembers(self._tops_key))
        return sorted(members)

    @staticmethod
    def _replayed(body: dict[str, Any]) -> dict[str, Any]:
        """A stored answer, brought up to date: remaining TTL and balances as they are now."""
        if "replay" not in body:
            return body
        prior: dict[str, Any] = body["replay"]  # the stored JSON, spliced in by the script
        prior.pop("budgeted_scopes", None)
        if prior.get("expires_at_ms") is not None:
            prior["remaining_ttl_ms"] = max(0, prior["expires_at_ms"] - body["now"])
        prior["balances"] = body["balances"]
        return prior

    # --- protocol operations ------------------------------------------------------------------

    def _reserve_cmd(self, cmd: ReserveCommand, rid: str) -> dict[str, Any]:
        _exact(cmd.estimate, "estimate")
        if cmd.soft_landing:
            for name in ("min_amount", "fixed_amount", "amount_per_million_tokens"):
                _exact(cmd.soft_landing.get(name), f"soft_landing.{name}")
        static = {
            "idempotency_key": cmd.idempotency_key,
            "subject": cmd.subject,
            "action": cmd.action,
            "affected_scopes": cmd.scopes,
            "metadata": cmd.metadata or None,
        }
        return {
            "op": "reserve",
            "key": cmd.idempotency_key,
            "hash": cmd.payload_hash,
            "rid": rid,
            "subject": _JSON(cmd.subject),
            "action": _JSON(cmd.action),
            "static": _JSON(static),
            "scopes": cmd.scopes,
            "unit": cmd.unit,
            "estimate": cmd.estimate,
            "ttl_ms": cmd.ttl_ms,
            "grace_ms": cmd.grace_period_ms,
            "policy": cmd.overage_policy,
            "dry_run": cmd.dry_run,
            "allow_unbudgeted": cmd.allow_unbudgeted,
            "soft_landing": cmd.soft_landing,
        }

    async def reserve(self, cmd: ReserveCommand) -> dict[str, Any]:
        tag = _tag_of_scope(cmd.scopes[0])
        await self._register(tag)
        idem = f"i:reserve:{cmd.idempotency_key}" if cmd.payload_hash else None
        body = await self._run("reserve", tag, self._reserve_cmd(cmd, _new_rid(tag)), idem)
        return self._replayed(body)

    async def decide(self, cmd: ReserveCommand) -> dict[str, Any]:
        tag = _tag_of_scope(cmd.scopes[0])
        return await self._run("decide", tag, self._reserve_cmd(cmd, ""))

    def _settle_tag(self, reservation_id: str) -> str:
        from ..errors import NotFoundError

        tag = _tag_of_rid(reservation_id)
        if tag is None:
            raise NotFoundError(f"reservation {reservation_id!r} not found", reservation_id=reservation_id)
        return tag

    async def commit(self, cmd: CommitCommand) -> dict[str, Any]:
        _exact(cmd.actual, "actual")
        tag = self._settle_tag(cmd.reservation_id)
        payload = {
            "op": "commit",
            "rid": cmd.reservation_id,
            "key": cmd.idempotency_key,
            "hash": cmd.payload_hash,
            "unit": cmd.unit,
            "actual": cmd.actual,
            "metrics": _raw(cmd.metrics),
            "metadata": _raw(cmd.metadata),
        }
        return self._replayed(await self._run("commit", tag, payload))

    async def release(self, cmd: ReleaseCommand) -> dict[str, Any]:
        tag = self._settle_tag(cmd.reservation_id)
        payload = {
            "op": "release",
            "rid": cmd.reservation_id,
            "key": cmd.idempotency_key,
            "hash": cmd.payload_hash,
            "reason": cmd.reason,
        }
        return self._replayed(await self._run("release", tag, payload))

    async def extend(self, cmd: ExtendCommand) -> dict[str, Any]:
        tag = self._settle_tag(cmd.reservation_id)
        payload = {
            "op": "extend",
            "rid": cmd.reservation_id,
            "key": cmd.idempotency_key,
            "hash": cmd.payload_hash,
            "extend_by_ms": cmd.extend_by_ms,
            "max_extensions": cmd.max_extensions,
        }
        return self._replayed(await self._run("extend", tag, payload, f"i:extend:{cmd.idempotency_key}"))

    async def record_event(self, cmd: EventCommand) -> dict[str, Any]:
        _exact(cmd.actual, "actual")
        tag = _tag_of_scope(cmd.scopes[0])
        await self._register(tag)
        payload = {
            "op": "event",
            "key": cmd.idempotency_key,
            "hash": cmd.payload_hash,
            "subject": _JSON(cmd.subject),
            "action": _JSON(cmd.action),
            "scopes": cmd.scopes,
            "unit": cmd.unit,
            "actual": cmd.actual,
            "policy": cmd.overage_policy,
            "allow_unbudgeted": cmd.allow_unbudgeted,
            "metrics": _raw(cmd.metrics),
            "metadata": _raw(cmd.metadata),
        }
        body = self._replayed(await self._run("event", tag, payload, f"i:event:{cmd.idempotency_key}"))
        body["event_id"] = _event_id(body["event_id"])
        return body

    async def change_budget(self, cmd: BudgetCommand) -> dict[str, Any]:
        _exact(cmd.amount, "amount")
        _exact(cmd.overdraft_limit, "overdraft_limit")
        tag = _tag_of_scope(cmd.scope)
        await self._register(tag)
        payload = {
            "op": cmd.op,
            "scope": cmd.scope,
            "unit": cmd.unit,
            "amount": cmd.amount,
            "overdraft_limit": cmd.overdraft_limit,
            "caps": cmd.caps,
        }
        return await self._run("budget", tag, {k: v for k, v in payload.items() if v is not None})

    # --- reads --------------------------------------------------------------------------------

    async def balances(self, scope_prefix: str | None = None, unit: str | None = None) -> list[dict[str, Any]]:
        out = []
        for tag in await self._tags(scope_prefix):
            raw = await self._redis(self._client.hgetall(self._keys(tag)[0]))
            for field, text in raw.items():
                b = _balance(field, text)
                if _under(b["scope"], scope_prefix) and (unit is None or b["unit"] == unit):
                    out.append(b)
        return sorted(out, key=lambda b: (b["scope"], b["unit"]))

    async def get_reservation(self, reservation_id: str) -> dict[str, Any] | None:
        tag = _tag_of_rid(reservation_id)
        if tag is None:
            return None
        rec, static = await self._redis(self._client.hmget(self._keys(tag)[1], [reservation_id, reservation_id + "|s"]))
        if rec is None or static is None:
            return None
        return _reservation(json.loads(rec), json.loads(static))

    async def list_reservations(
        self,
        *,
        status: str | None = None,
        scope_prefix: str | None = None,
        idempotency_key: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for tag in await self._tags(scope_prefix):
            keys = self._keys(tag)
            start, page, mine = 0, 256, 0
            while mine < limit:
                ids = await self._redis(self._client.zrevrange(keys[5], start, start + page - 1))
                if not ids:
                    break
                start += page
                fields = [f for rid in ids for f in (rid, rid + "|s")]
                values = await self._redis(self._client.hmget(keys[1], fields))
                for i in range(len(ids)):
                    rec, static = values[2 * i], values[2 * i + 1]
                    if rec is None or static is None:
                        continue
                    r = _reservation(json.loads(rec), json.loads(static))
                    if status and r["status"] != status:
                        continue
                    if not _under(r["scope_path"], scope_prefix):
                        continue
                    if idempotency_key and r["idempotency_key"] != idempotency_key:
                        continue
                    found.append(r)
                    mine += 1
                    if mine >= limit:
                        break
        found.sort(key=lambda r: (r["created_at_ms"], r["reservation_id"]), reverse=True)
        return found[:limit]

    async def events(
        self, *, after: int = 0, limit: int = 100, reservation_id: str | None = None, scope_prefix: str | None = None
    ) -> list[dict[str, Any]]:
        if reservation_id is not None:
            rid_tag = _tag_of_rid(reservation_id)
            if rid_tag is None:
                return []
            tags = [rid_tag]
        else:
            tags = await self._tags(scope_prefix)
        found: list[dict[str, Any]] = []
        for tag in tags:
            key = self._keys(tag)[3]
            start = f"({_stream_id(after)}" if after else "-"
            mine = 0
            while mine < limit:
                entries = await self._redis(self._client.xrange(key, start, "+", count=max(limit, 256)))
                if not entries:
                    break
                for sid, fields in entries:
                    if reservation_id is not None and fields.get("rid") != reservation_id:
                        continue
                    if not _under(fields.get("scope"), scope_prefix):
                        continue
                    found.append(_event(sid, fields))
                    mine += 1
                    if mine >= limit:
                        break
                start = f"({entries[-1][0]}"
        found.sort(key=lambda e: e["event_id"])
        return found[:limit]

    # --- sweeping and checking ----------------------------------------------------------------

    async def expire_due(self, limit: int = 1000) -> int:
        """Expire overdue holds in every tag. Safe to run on many replicas at once: each expiry is one
        atomic script that re-checks the reservation is still ACTIVE."""
        total = 0
        for tag in await self._tags():
            body = await self._run("sweep", tag, {"op": "sweep", "limit": limit})
            total += int(body["expired"])
        return total

    async def verify(self) -> list[str]:
        """Rebuild each budget's reserved (from ACTIVE reservations) and spent+debt (from the event log,
        when the stream still holds every event of its tag) and compare."""
        problems: list[str] = []
        for tag in await self._tags():
            keys = self._keys(tag)
            budgets = [_balance(f, t) for f, t in (await self._redis(self._client.hgetall(keys[0]))).items()]
            records = await self._redis(self._client.hgetall(keys[1]))
            held: dict[tuple[str, str], int] = {}
            scopes_of: dict[str, list[str]] = {}
            for field, text in records.items():
                if field.endswith("|s"):
                    continue
                rec = json.loads(text)
                scopes_of[rec["id"]] = rec["bs"]
                if rec["st"] == "ACTIVE":
                    for s in rec["bs"]:
                        held[(s, rec["u"])] = held.get((s, rec["u"]), 0) + rec["e"]
            complete = await self._stream_complete(keys[3])
            charged: dict[tuple[str, str], int] = {}
            if complete:
                async for _sid, fields in self._stream(keys[3]):
                    if fields["type"] == "committed":
                        scopes: Iterable[str] = scopes_of.get(fields.get("rid", ""), [])
                    elif fields["type"] == "debited":
                        scopes = json.loads(fields["data"])["scopes"]
                    else:
                        continue
                    for s in scopes:
                        k = (s, fields["unit"])
                        charged[k] = charged.get(k, 0) + int(fields["amount"])
            for b in budgets:
                key = (b["scope"], b["unit"])
                if b["reserved"] != held.get(key, 0):
                    problems.append(
                        f"{b['scope']} {b['unit']}: reserved {b['reserved']} but active reservations hold "
                        f"{held.get(key, 0)}"
                    )
                if complete and b["spent"] + b["debt"] != charged.get(key, 0):
                    problems.append(
                        f"{b['scope']} {b['unit']}: spent+debt {b['spent'] + b['debt']} but events charged "
                        f"{charged.get(key, 0)}"
                    )
                if min(b["spent"], b["reserved"], b["debt"]) < 0:
                    problems.append(f"{b['scope']} {b['unit']}: negative field in {b}")
                if b["debt"] > b["overdraft_limit"] and not b["is_over_limit"]:
                    problems.append(
                        f"{b['scope']} {b['unit']}: debt {b['debt']} above overdraft limit {b['overdraft_limit']}"
                    )
        return problems

    async def _stream_complete(self, key: str) -> bool:
        """True when the stream was never trimmed (and committed reservations are all still kept)."""
        try:
            info = await self._redis(self._client.xinfo_stream(key))
        except StoreUnavailableError as exc:
            if "no such key" in str(exc).lower():
                return True
            raise
        return int(info.get("entries-added", info["length"])) == int(info["length"])

    async def _stream(self, key: str) -> AsyncIterator[tuple[str, dict[str, str]]]:
        start = "-"
        while True:
            entries = await self._redis(self._client.xrange(key, start, "+", count=1000))
            if not entries:
                return
            for entry in entries:
                yield entry
            start = f"({entries[-1][0]}"

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        close = getattr(self._client, "aclose", None) or self._client.close
        await close()
