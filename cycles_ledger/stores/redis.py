"""Distributed store: Redis or Redis Cluster, for many proxy replicas and agents on many hosts.

Each protocol operation is ONE Lua script (`redis.lua`, loaded once and called by SHA; loaded again
when a server answers NOSCRIPT) that applies the rules of `cycles_ledger.rules` in the order of
`cycles_ledger.operations`, atomically on the server's clock (`TIME`); rule vectors check that it answers
like the Python engine. Concurrent calls of one tenant and operation from one event loop tick go as one
batch in one call of their script; on plain TCP (`redis://`) script calls use a lean connection of the
store's own (`redis_wire`, which also maps every Redis failure to the ledger's errors), reads and TLS or
Cluster use redis-py. `redis_format` reads the stored texts and the scripts' replies. All keys of one top-level scope
(usually the tenant) share a hash tag, e.g. `cycles:{tenant:acme}:b`, so every script touches one slot
and runs unchanged on Redis Cluster. A reservation id carries its hash tag (`rsv_…@tenant:acme`), so
commit, release and extend find the slot without a lookup.

Time policies (issue 14) run in the scripts too, on Redis time. Periods roll over in the first write after
their end and in the sweep, once (the roll-over is written with the write); a fixed-duration period's next
bounds are arithmetic, a calendar period's (local midnight in a time zone) come from the boundaries this
client computes with the time-zone database and stores per tag and period (`:pb`), months ahead; a script
that runs past them answers "bounds" having done nothing else, and `_run` stores new ones and runs it again
(`_store_bounds`). A rate-limited budget has an exact spend log (a zset `:w:<scope>|<unit>`
of `<ref> <amount>` scored by time) and keeps each limit's window sum in its own text, brought up to date
from the entries that moved since. The notifier's records (`SupportsState`) live in one hash
(`<prefix>:state`) outside any tag, changed by a compare-and-set script.

Retention (settings, also URL query parameters): idempotency records and finalized reservations are
kept `retention_ms` (7 days) and pruned by the sweeper; each tag's event stream keeps about
`event_retention` entries (1,000,000). Budgets never expire. Durability is Redis's: run it with
`appendonly yes` and `appendfsync always` (or replicas and WAIT) if an acknowledged commit must survive
a crash of the server.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import re
import time
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from .. import operations
from ..errors import ConfigError, CyclesError, InvalidRequestError, NotFoundError, StoreUnavailableError
from ..models import Unit, parse_scope
from ..rules import ReservationState
from ..timing import CALENDAR, period_bounds
from . import redis_format as fmt
from ._ids import reservation_id
from .base import (
    BudgetCommand,
    CommitCommand,
    EventCommand,
    ExtendCommand,
    NoteCommand,
    ReleaseCommand,
    ReserveCommand,
    Store,
    SupportsState,
    SupportsSweep,
)
from .redis_format import SEP
from .redis_wire import (
    Wire,
    connection_class,
    driver_errors,
    evalsha_commands,
    is_noscript,
    script_reply,
)

__all__ = ["RedisStore"]

MAX_EXACT = 2**53 - 1  # Lua numbers are doubles: integers are exact up to here
_UNITS = ("CREDITS", "RISK_POINTS", "TOKENS", "USD_MICROCENTS")  # must match UNITS in redis.lua
assert set(_UNITS) == {u.value for u in Unit}, "redis.lua's unit list is out of date"
_OPS = ("reserve", "decide", "commit", "release", "extend", "event", "note", "budget", "sweep", "read")
_JSON = json.JSONEncoder(separators=(",", ":")).encode
_CLUSTER_IN_FLIGHT = 64  # below redis-py's 100 connections per cluster node
_BATCH_MAX = 128  # operations per script call: bounds how long one call holds the server
Clock = Callable[[], int]
# Calendar periods: how many boundaries ahead of now the scripts know (about four months of days, a year of
# weeks, two years of months); a script that runs past the last one asks for more ("bounds"). The first one is
# a period before now less this margin, so a server clock a little behind the client's still finds its period.
_BOUNDS_AHEAD = {"daily": 120, "weekly": 56, "monthly": 24}
_BOUNDS_MARGIN_MS = 2 * 86_400_000
# Compare-and-set of one notifier record (SupportsState): KEYS[1] the state hash; ARGV key, "1" and the
# expected value (or "0": absent), "1" and the new value (or "0": delete). Returns 1 when it wrote.
_STATE_CAS = """local cur = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '1' then
  if cur ~= ARGV[3] then return 0 end
elseif cur then
  return 0
end
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[5]) else redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1"""
_Address = tuple[str, int, int, str | None, str | None, float]  # host, port, db, user, password, timeout


def _scripts() -> dict[str, str]:
    """Split redis.lua into one script per operation: the shared prelude, the sections the operation's
    section `--@include`s (and theirs, each once, included before includer), then the operation's section."""
    text = resources.files("cycles_ledger.stores").joinpath("redis.lua").read_text(encoding="utf-8")
    prelude, _, rest = text.partition("--@@ prelude-end")
    sections: dict[str, str] = {}
    for chunk in rest.split("--@@ ")[1:]:
        name, _, body = chunk.partition("\n")
        sections[name.strip()] = body

    def with_includes(name: str, order: list[str]) -> list[str]:
        for line in sections[name].splitlines():
            if line.startswith("--@include "):
                included = line.split()[1]
                if included not in order:
                    with_includes(included, order)
        if name not in order:
            order.append(name)
        return order

    missing = set(_OPS) - set(sections)
    if missing:
        raise RuntimeError(f"redis.lua lacks the scripts {sorted(missing)}")
    return {
        name: "\n".join([prelude, *(sections[s] for s in with_includes(name, [])), f"return run_batch(OPS.{name})"])
        for name in _OPS
    }


def _new_rid(tag: str) -> str:
    """A reservation id naming its hash tag after the `@`, so commit/release/extend find the slot."""
    return f"{reservation_id(time.time_ns() // 1_000_000)}@{tag}"


def _exact(value: int | None, name: str) -> None:
    if value is not None and value > MAX_EXACT:
        raise InvalidRequestError(f"{name} {value} is beyond what the Redis store keeps exactly (2^53 - 1)")


def _tag_of_scope(scope: str) -> str:
    return scope.split("/", 1)[0]


_RID = re.compile(r"rsv_[0-9a-f]{26}@([a-z]+:[A-Za-z0-9_.-]{1,128})")


def _tag_of_rid(reservation_id: str) -> str | None:
    """The hash tag a reservation id names, or None when it is not one of ours (then it is not found)."""
    m = _RID.fullmatch(reservation_id) if isinstance(reservation_id, str) else None
    if m is None:
        return None
    tag = m.group(1)
    return tag if _is_scope(tag) else None


@functools.lru_cache(maxsize=1024)  # a few tags, seen again and again
def _is_scope(text: str) -> bool:
    try:
        parse_scope(text)
    except CyclesError:
        return False
    return True


class _JsonOf:
    """JSON text of the subjects and actions the ledger passes: its cached dicts come again and again, so
    their text is remembered by identity (the ledger treats them as read-only), holding them alive."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[int, tuple[Any, str]] = {}

    def __call__(self, value: Any) -> str:
        hit = self._seen.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
        text = _JSON(value)
        if len(self._seen) >= 1024:
            self._seen.clear()
        self._seen[id(value)] = (value, text)
        return text


def _under(scope: str | None, prefix: str | None) -> bool:
    return prefix is None or scope == prefix or (scope is not None and scope.startswith(prefix + "/"))


def _raw(value: Any) -> str:
    return _JSON(value) if value else ""


def _check_text(value: str, what: str) -> None:
    """Refuse text Redis cannot carry (lone surrogates), before it can sink the calls batched with it."""
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"{what} {value!r} is not valid Unicode text") from exc


# TLS settings a `rediss://` URL may carry (redis-py's own names): a private CA, client certificates.
_TLS_PARAMS = ("ssl_ca_certs", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile")


def _tls_settings(url: str, query: dict[str, str]) -> dict[str, Any]:
    """Pop and check the TLS parameters: only on rediss URLs, files that exist, a known `ssl_cert_reqs`.
    Certificates are verified unless `ssl_cert_reqs=none` says otherwise."""
    tls = {name: query.pop(name) for name in _TLS_PARAMS if name in query}
    if not tls:
        return {}
    if not url.lower().startswith("rediss"):
        raise ConfigError(f"{', '.join(sorted(tls))} apply to TLS only (rediss://…), not to {url!r}")
    reqs = tls.get("ssl_cert_reqs")
    if reqs is not None and reqs not in ("required", "optional", "none"):
        raise ConfigError(f"ssl_cert_reqs must be required, optional or none; got {reqs!r}")
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if name in tls and not os.path.isfile(tls[name]):
            raise ConfigError(f"{name} file {tls[name]!r} (in {url!r}) does not exist")
    return tls


class _Batch:
    """Calls issued in the same loop tick go to Redis together: the calls of one tenant and operation as
    one script call that runs them in order, all such calls in one pipeline. One round trip, one wake-up
    and one script setup for many operations. A task sends the batch on the next tick and hands every
    caller its own reply or error through the caller's own future (a cancelled caller cancels only that)."""

    __slots__ = ("calls", "waiters")

    def __init__(self) -> None:
        self.calls: list[_Op] = []
        self.waiters: list[asyncio.Future[Any]] = []


# One operation for a script: (operation, tag, now, idempotency key name or None, key, fields, text).
_Op = tuple[str, str, str, str | None, str, str, str]


def calendar_bounds(spec: dict[str, Any], now_ms: int) -> list[int]:
    """The boundaries of a calendar period from the one before `now_ms` (less a margin) to `_BOUNDS_AHEAD`
    periods after it, ascending: what the scripts read to roll the period over in Redis time."""
    start, end = period_bounds(spec, now_ms - _BOUNDS_MARGIN_MS)
    out, ahead = [start, end], int(end > now_ms)
    while ahead < _BOUNDS_AHEAD[spec["every"]]:
        out.append(period_bounds(spec, out[-1])[1])
        ahead += out[-1] > now_ms
    return out


class RedisStore(Store, SupportsSweep, SupportsState):
    """`redis://[:password@]host:6379/0`, `rediss://…` (TLS) or `redis+cluster://host:7000` (Redis Cluster).

    URL query parameters: `prefix` (key prefix, default `cycles`), `timeout` (seconds per command,
    default 2), `retention_ms`, `event_retention`, `sweep_per_call`. A lost connection or a timeout is
    a `StoreUnavailableError`; nothing is retried behind the caller's back, and a retry with the same
    idempotency key is safe.
    """

    schemes = ("redis", "rediss", "redis+cluster", "rediss+cluster")
    time_policies = True

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "cycles",
        clock: Clock | None = None,
        sweep_per_call: int = 64,
        event_retention: int = 1_000_000,
        retention_ms: int = 7 * 24 * 3600 * 1000,
        cluster: bool = False,
        direct: _Address | None = None,
    ) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ConfigError(f"Redis key prefix {prefix!r} must be non-empty and free of braces")
        if retention_ms < 1 or event_retention < 1 or sweep_per_call < 0:
            raise ConfigError(
                f"Redis store needs retention_ms >= 1, event_retention >= 1 and sweep_per_call >= 0; got "
                f"{retention_ms}, {event_retention}, {sweep_per_call}"
            )
        self._client = client
        self._prefix = prefix
        self._clock = clock  # tests only: replaces Redis TIME so a test can move time by hand
        self._config = SEP.join((str(sweep_per_call), str(event_retention), str(retention_ms)))
        self._event_retention = event_retention
        self._sources = _scripts()
        self._shas = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in self._sources.items()}
        self._by_sha = {sha: self._sources[name] for name, sha in self._shas.items()}
        self._tops_key = f"{prefix}:tops"
        self._state_key = f"{prefix}:state"
        self._known_tops: set[str] = set()
        self._closed = False
        self._batches: dict[asyncio.AbstractEventLoop, _Batch] = {}
        self._json_of = _JsonOf()
        self._sending: set[asyncio.Task[None]] = set()
        self._pipelined = not cluster  # a cluster splits pipelines by node; there each script call goes alone
        self._needs_init = cluster
        self._init_lock = asyncio.Lock()
        # Cluster calls are not pipelined and each holds a connection; redis-py allows 100 per node and
        # fails the 101st, so calls in flight are capped below that and the rest queue here.
        self._gate = asyncio.Semaphore(_CLUSTER_IN_FLIGHT) if cluster else None
        # Plain TCP to one server: script calls skip the general client and go over a Wire of their own.
        self._direct = None if cluster else direct
        # One connection (and one batch) per event loop: a proxy may call from more than one loop.
        self._wires: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Wire] = weakref.WeakKeyDictionary()
        self._connecting: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[Wire]] = (
            weakref.WeakKeyDictionary()
        )

    @classmethod
    def from_url(cls, url: str, **settings: Any) -> RedisStore:
        try:
            import redis.asyncio as aioredis
            from redis.asyncio.cluster import RedisCluster
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigError("the Redis store needs the redis driver: pip install 'cycles-litellm[redis]'") from exc
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        known = {"prefix", "timeout", "retention_ms", "event_retention", "sweep_per_call", *_TLS_PARAMS}
        unknown = set(query) - known
        if unknown:
            raise ConfigError(f"unknown Redis URL parameters {sorted(unknown)} in {url!r}; known: {sorted(known)}")
        tls = _tls_settings(url, query)
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
        if not parts.hostname:
            raise ConfigError(f"Redis URL needs a host, like redis://127.0.0.1:6379/0; got {url!r}")
        base = urlunsplit((scheme.replace("+cluster", ""), parts.netloc, parts.path, "", ""))
        # No silent retries on a lost connection: a reserve whose reply was lost must not run twice
        # under a fresh key. The caller sees "unavailable" and may retry with the same key.
        common: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "decode_responses": True,
            "retry": Retry(NoBackoff(), 0),
            **tls,
        }
        client: Any
        try:
            if cluster:
                client = RedisCluster.from_url(base, **common)
            else:
                client = aioredis.from_url(base, connection_class=connection_class(scheme), **common)
        except ValueError as exc:
            raise ConfigError(f"bad Redis URL {url!r}: {exc}") from exc
        direct: _Address | None = None
        if scheme == "redis":
            try:
                db = int(parts.path.strip("/") or 0)
            except ValueError as exc:
                raise ConfigError(f"bad Redis URL {url!r}: the path must be a database number") from exc
            user, password = (unquote(v) if v else None for v in (parts.username, parts.password))
            direct = (parts.hostname, parts.port or 6379, db, user, password, timeout)
        return cls(client, cluster=cluster, direct=direct, **settings)

    # --- plumbing -----------------------------------------------------------------------------

    def _keys(self, tag: str) -> list[str]:
        base = f"{self._prefix}:{{{tag}}}:"
        return [base + "b", base + "r", base + "due", base + "e", base + "fin", base + "ids", base + "pd", base + "pb"]

    async def _redis(self, call: Coroutine[Any, Any, Any]) -> Any:
        """Await one Redis call; every driver failure is the ledger's "unavailable" (redis_wire.driver_errors)."""
        try:
            if self._closed:
                raise StoreUnavailableError("the Redis store is closed")
            with driver_errors():
                if self._needs_init:
                    await self._initialize()
                if self._gate is None:
                    return await call
                async with self._gate:  # wait for a connection rather than fail past the pool's limit
                    return await call
        finally:
            call.close()  # a call that never ran (closed store, failed start) must not warn "never awaited"

    async def _initialize(self) -> None:
        """A cluster client learns the slot map once, before its first command: redis-py's async cluster
        client fails commands that arrive while its first `initialize()` is still running."""
        async with self._init_lock:
            if self._needs_init:
                await self._client.initialize()
                self._needs_init = False

    async def _evalsha(self, sha: str, keys: list[str], args: list[str]) -> Any:
        from redis.exceptions import NoScriptError

        try:
            return await self._client.evalsha(sha, len(keys), *keys, *args)
        except NoScriptError:  # a restarted or new server: load the script, then run it (it did not run)
            await self._client.script_load(self._by_sha[sha])
            return await self._client.evalsha(sha, len(keys), *keys, *args)

    async def _pipeline(self, scripts: list[tuple[str, list[str], list[str]]]) -> list[Any]:
        from redis.exceptions import NoScriptError

        pipe = self._client.pipeline(transaction=False)
        for sha, keys, args in scripts:
            pipe.evalsha(sha, len(keys), *keys, *args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        for i, res in enumerate(results):
            if isinstance(res, NoScriptError):
                results[i] = await self._evalsha(*scripts[i])
        return results

    async def _over_wire(
        self, scripts: list[tuple[str, list[str], list[str]]], replies: list[Any] | None = None
    ) -> list[Any]:
        """Run script calls over the store's own connection (or take their `replies` already in); a
        NOSCRIPT one is loaded and run again."""
        wire = await self._wire_ready()
        if replies is None:
            replies = await wire.request(evalsha_commands(scripts))
        for i, reply in enumerate(replies):
            if is_noscript(reply):
                sha, keys, args = scripts[i]
                load = ("SCRIPT", "LOAD", self._by_sha[sha])
                replies[i] = (await wire.request([load, ("EVALSHA", sha, len(keys), *keys, *args)]))[1]
        return replies

    async def _wire_ready(self) -> Wire:
        loop = asyncio.get_running_loop()
        wire = self._wires.get(loop)
        if wire is not None and wire.broken is None:
            return wire
        task = self._connecting.get(loop)
        if task is None or task.done():
            task = self._connecting[loop] = loop.create_task(self._connect())
        return await asyncio.shield(task)

    async def _connect(self) -> Wire:
        assert self._direct is not None
        loop = asyncio.get_running_loop()
        old = self._wires.pop(loop, None)
        if old is not None:
            old.close()
        wire = await Wire.connect(*self._direct)
        self._wires[loop] = wire
        return wire

    def _script(self, ops: list[_Op]) -> tuple[str, list[str], list[str]]:
        """SHA, KEYS and ARGV of one script call running `ops` (one operation, tag and `now`) in order."""
        op, tag, now = ops[0][0], ops[0][1], ops[0][2]
        keys = self._keys(tag)
        base = keys[0][:-1]
        args = [now, self._config]
        index: dict[str, str] = {}
        for _, _, _, idem, key, joined, text in ops:
            if idem is None:
                i = "1"  # no idempotency record: KEYS[1] stands in, never read
            elif (i := index.get(idem, "")) == "":
                keys.append(base + idem)
                i = index[idem] = str(len(keys))
            args += (i, key, joined, text)
        return self._shas[op], keys, args

    async def _call(self, op: _Op) -> Any:
        loop = asyncio.get_running_loop()
        batch = self._batches.get(loop)
        if batch is None:  # the first call of this tick opens a batch, sent on the next tick
            batch = self._batches[loop] = _Batch()
            loop.call_soon(self._dispatch, loop, batch)
        waiter = loop.create_future()
        batch.calls.append(op)
        batch.waiters.append(waiter)
        return await waiter

    def _background(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> None:
        task = loop.create_task(coro)
        self._sending.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._sending.discard)

    def _dispatch(self, loop: asyncio.AbstractEventLoop, batch: _Batch) -> None:
        """Send a tick's batch: straight onto a connected wire of this loop, else (connecting, TLS, Cluster)
        from a task. Every caller gets its own reply or error."""
        del self._batches[loop]
        wire = self._wires.get(loop) if self._direct is not None else None
        if wire is None or wire.broken is not None or self._closed:
            self._background(loop, self._flush(batch))
            return
        chunks, scripts = self._plan(batch.calls)
        done = wire.request(evalsha_commands(scripts))
        done.add_done_callback(lambda d: self._on_replies(loop, batch, chunks, scripts, d))

    def _on_replies(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: _Batch,
        chunks: list[list[int]],
        scripts: list[tuple[str, list[str], list[str]]],
        done: asyncio.Future[list[Any]],
    ) -> None:
        replies: list[Any]
        try:
            replies = done.result()
        except StoreUnavailableError as exc:
            replies = [exc] * len(scripts)
        if any(is_noscript(r) for r in replies):  # a restarted server: load the script, run those again
            self._background(loop, self._rerun(batch, chunks, scripts, replies))
            return
        self._hand_out(batch, self._results(len(batch.calls), chunks, replies))

    async def _rerun(
        self,
        batch: _Batch,
        chunks: list[list[int]],
        scripts: list[tuple[str, list[str], list[str]]],
        replies: list[Any],
    ) -> None:
        try:
            replies = await self._redis(self._over_wire(scripts, replies))
        except StoreUnavailableError as exc:
            replies = [exc if is_noscript(r) else r for r in replies]
        self._hand_out(batch, self._results(len(batch.calls), chunks, replies))

    async def _flush(self, batch: _Batch) -> None:
        try:
            results = await self._send(batch.calls)
        except BaseException as exc:  # noqa: BLE001 - every caller hears of it; this task must not die silently
            results = [exc] * len(batch.calls)
        self._hand_out(batch, results)

    @staticmethod
    def _hand_out(batch: _Batch, results: list[Any]) -> None:
        for waiter, result in zip(batch.waiters, results, strict=True):
            if not waiter.done():  # its caller may have been cancelled
                waiter.set_result(result)

    def _plan(self, calls: list[_Op]) -> tuple[list[list[int]], list[tuple[str, list[str], list[str]]]]:
        """Group a tick's calls by (operation, tag, now), at most _BATCH_MAX per script call."""
        groups: dict[tuple[str, str, str], list[int]] = {}
        for i, c in enumerate(calls):
            groups.setdefault(c[:3], []).append(i)
        chunks = [m[k : k + _BATCH_MAX] for m in groups.values() for k in range(0, len(m), _BATCH_MAX)]
        return chunks, [self._script([calls[i] for i in members]) for members in chunks]

    @staticmethod
    def _results(count: int, chunks: list[list[int]], replies: list[Any]) -> list[Any]:
        """Each call's own reply entry, or its script call's error."""
        results: list[Any] = [None] * count
        for members, reply in zip(chunks, replies, strict=True):
            if isinstance(reply, BaseException):
                for i in members:
                    results[i] = reply
            else:
                for i, entry in zip(members, reply, strict=True):
                    results[i] = entry
        return results

    async def _send(self, calls: list[_Op]) -> list[Any]:
        chunks, scripts = self._plan(calls)
        replies: list[Any]
        if self._direct is not None:
            try:
                replies = await self._redis(self._over_wire(scripts))
            except StoreUnavailableError as exc:
                replies = [exc] * len(scripts)
        elif self._pipelined:
            try:
                if len(scripts) == 1:
                    replies = [await self._redis(self._evalsha(*scripts[0]))]
                else:
                    replies = list(await self._redis(self._pipeline(scripts)))
            except StoreUnavailableError as exc:
                replies = [exc] * len(scripts)
        else:  # a cluster: each script call goes to its tag's node
            calls_out = (self._redis(self._evalsha(*script)) for script in scripts)
            replies = list(await asyncio.gather(*calls_out, return_exceptions=True))
        return self._results(len(calls), chunks, replies)

    async def _run(
        self, op: str, tag: str, fields: list[Any], *, key: str = "", idem: str | None = None, text: str = ""
    ) -> list[Any]:
        """Run one operation's script. `key` (the idempotency key) and `text` travel as they are; the other
        fields are joined by \\x1f, which none of them can contain (ids are checked, JSON escapes it)."""
        if not key.isascii():
            _check_text(key, "idempotency key")
        if not text.isascii():
            _check_text(text, "text")
        now = "" if self._clock is None else str(self._clock())
        joined = SEP.join(["" if f is None else f if f.__class__ is str else str(f) for f in fields])
        call = (op, tag, now, idem, key, joined, text)
        reply = script_reply(await self._call(call))
        stored: set[str] = set()
        while reply[0] == "bounds":  # a calendar period ran past its stored boundaries: nothing else was done
            if reply[1] in stored:
                raise StoreUnavailableError(
                    f"Redis ledger unavailable: the boundaries of period {reply[1]} computed here do not reach "
                    "the Redis server's time; are the clocks of this host and the server far apart?"
                )
            stored.add(reply[1])
            await self._store_bounds(tag, reply[1])
            reply = script_reply(await self._call(call))
        return reply

    async def _store_bounds(self, tag: str, period: str) -> None:
        """The coming boundaries of a calendar period (`daily:Europe/Paris`), from the time-zone database the
        scripts cannot read, for the tag's budgets with that period."""
        every, _, tz = period.partition(":")
        bounds = ",".join(map(str, calendar_bounds({"every": every, "tz": tz}, self._now_ms())))
        await self._redis(self._client.hset(self._keys(tag)[7], period, bounds))

    async def _register(self, tag: str, *, always: bool = False) -> None:
        """Remember a tag in the (unslotted) set of tags, so listings and the sweeper can find it. Runtime
        operations do it once per process; budget changes every time, so a server that lost its data
        learns the tag again when the budget is set again."""
        if always or tag not in self._known_tops:
            await self._redis(self._client.sadd(self._tops_key, tag))
            self._known_tops.add(tag)

    async def _tags(self, scope_prefix: str | None = None) -> list[str]:
        if scope_prefix:
            return [_tag_of_scope(scope_prefix)]
        members = await self._redis(self._client.smembers(self._tops_key))
        return sorted(members)

    # --- protocol operations ------------------------------------------------------------------

    def _reserve_fields(self, cmd: ReserveCommand, rid: str) -> list[Any]:
        _exact(cmd.estimate, "estimate")
        for unit, amount in cmd.also:
            _exact(amount, f"also ({unit})")
        soft = cmd.soft_landing or {}
        for name in ("min_amount", "fixed_amount", "amount_per_million_tokens"):
            _exact(soft.get(name), f"soft_landing.{name}")
        if soft.get("amount_per_million_tokens") is not None:  # the script's exact division needs 10x headroom
            _exact(soft["amount_per_million_tokens"] * 10, "soft_landing.amount_per_million_tokens x 10")
        return [
            cmd.payload_hash,
            rid,
            cmd.unit,
            cmd.estimate,
            cmd.ttl_ms,
            cmd.grace_period_ms,
            cmd.overage_policy,
            "1" if cmd.dry_run else "0",
            "1" if cmd.allow_unbudgeted else "0",
            soft.get("min_amount") if cmd.soft_landing else None,
            soft.get("fixed_amount", 0) if cmd.soft_landing else None,
            soft.get("amount_per_million_tokens"),
            fmt.amounts_text(cmd.also) if cmd.also else "",
            self._json_of(cmd.subject),
            self._json_of(cmd.action),
            _raw(cmd.metadata),
            *cmd.scopes,
        ]

    @staticmethod
    def _decision(cmd: ReserveCommand, f: list[Any]) -> dict[str, Any]:
        """A reserve answer from its reply fields (decision … budgeted scopes, unit that denied, holds in
        other units), shaped like the Python engine's. Answers kept before holds in other units have 11."""
        body: dict[str, Any] = {
            "decision": f[0],
            "scope_path": cmd.scopes[-1],
            "affected_scopes": cmd.scopes,
            "caps": json.loads(f[4]) if f[4] else None,
            "reason_code": f[1] or None,
            "scope": f[2] or None,
            "remaining": int(f[3]) if f[3] else None,
            "dry_run": f[5] == "1",
        }
        if len(f) > 11 and f[11]:
            body["unit"] = f[11]
        if f[1] == "RATE_EXCEEDED":
            body["retry_after_ms"] = int(f[13]) if len(f) > 13 and f[13] else None
        if f[6]:
            body.update(
                reservation_id=f[6],
                reserved={"unit": cmd.unit, "amount": int(f[7])},
                expires_at_ms=int(f[8]),
            )
            held = fmt.holds(f[12]) if len(f) > 12 and f[12] else None
            if held:
                body["also_reserved"] = [{"unit": unit, "amount": amount} for unit, amount, _, _ in held]
            body["remaining_ttl_ms"] = int(f[9])
        return body

    async def reserve(self, cmd: ReserveCommand) -> dict[str, Any]:
        tag = _tag_of_scope(cmd.scopes[0])
        if tag not in self._known_tops:
            await self._register(tag)
        idem = f"i:reserve:{cmd.idempotency_key}" if cmd.payload_hash else None
        fields = self._reserve_fields(cmd, _new_rid(tag))
        reply = await self._run("reserve", tag, fields, key=cmd.idempotency_key, idem=idem)
        if reply[0] == "replay":
            body = self._decision(cmd, reply[1].split(SEP))
            if body.get("expires_at_ms") is not None:
                body["remaining_ttl_ms"] = max(0, body["expires_at_ms"] - int(reply[2]))
            body["balances"] = fmt.balances(reply, 3)
            return body
        body = self._decision(cmd, reply[1:15])
        body["balances"] = fmt.balances(reply, 15)
        return body

    async def decide(self, cmd: ReserveCommand) -> dict[str, Any]:
        tag = _tag_of_scope(cmd.scopes[0])
        reply = await self._run("decide", tag, self._reserve_fields(cmd, ""), key=cmd.idempotency_key)
        body = self._decision(cmd, reply[1:15])
        del body["dry_run"]
        body["balances"] = fmt.balances(reply, 15)
        return body

    @staticmethod
    def _settle_tag(reservation_id: str) -> str:
        tag = _tag_of_rid(reservation_id)
        if tag is None:
            raise NotFoundError(f"reservation {reservation_id!r} not found", reservation_id=reservation_id)
        return tag

    @staticmethod
    def _answer(reply: list[Any], live: int) -> tuple[list[str], int]:
        """The answer fields of a settle or debit reply (`live` of them after its kind) and where its
        balances start; a replay carries them joined, as kept."""
        if reply[0] == "replay":
            return reply[1].split(SEP), 3
        return reply[1 : 1 + live], 1 + live

    async def commit(self, cmd: CommitCommand) -> dict[str, Any]:
        _exact(cmd.actual, "actual")
        for unit, amount in cmd.also:
            _exact(amount, f"also ({unit})")
        tag = self._settle_tag(cmd.reservation_id)
        also = fmt.amounts_text(cmd.also) if cmd.also else ""
        fields = [
            cmd.reservation_id,
            cmd.payload_hash,
            cmd.unit,
            cmd.actual,
            also,
            _raw(cmd.metrics),
            _raw(cmd.metadata),
        ]
        reply = await self._run("commit", tag, fields, key=cmd.idempotency_key)
        f, start = self._answer(reply, 3)
        charged, released = int(f[0]), int(f[1])
        body: dict[str, Any] = {
            "reservation_id": cmd.reservation_id,
            "status": "COMMITTED",
            "charged": {"unit": cmd.unit, "amount": charged},
            "released": {"unit": cmd.unit, "amount": released} if released else None,
        }
        held = fmt.holds(f[2]) if len(f) > 2 and f[2] else None
        if held:
            body["also_charged"] = [{"unit": unit, "amount": got} for unit, _, got, _ in held]
        body["balances"] = fmt.balances(reply, start)
        return body

    async def release(self, cmd: ReleaseCommand) -> dict[str, Any]:
        tag = self._settle_tag(cmd.reservation_id)
        fields = [cmd.reservation_id, cmd.payload_hash]
        reply = await self._run("release", tag, fields, key=cmd.idempotency_key, text=cmd.reason or "")
        f, start = self._answer(reply, 3)
        balances = fmt.balances(reply, start)
        if len(f) > 1:
            unit = f[1]
        elif balances:  # kept before answers named their unit
            unit = balances[0]["unit"]
        else:
            unit = await self._unit_of(tag, cmd.reservation_id)
        body: dict[str, Any] = {
            "reservation_id": cmd.reservation_id,
            "status": "RELEASED",
            "released": {"unit": unit, "amount": int(f[0])},
        }
        held = fmt.holds(f[2]) if len(f) > 2 and f[2] else None
        if held:
            body["also_released"] = [{"unit": u, "amount": amount} for u, amount, _, _ in held]
        body["balances"] = balances
        return body

    async def _unit_of(self, tag: str, reservation_id: str) -> str:
        text = await self._redis(self._client.hget(self._keys(tag)[1], reservation_id))
        return str(text.split(" ", 2)[1]) if text else Unit.USD_MICROCENTS.value

    async def extend(self, cmd: ExtendCommand) -> dict[str, Any]:
        tag = self._settle_tag(cmd.reservation_id)
        fields = [cmd.reservation_id, cmd.payload_hash, cmd.extend_by_ms, cmd.max_extensions]
        idem = f"i:extend:{cmd.idempotency_key}"
        reply = await self._run("extend", tag, fields, key=cmd.idempotency_key, idem=idem)
        # A replay answers for the reservation the key was first used on (kept since answers name it).
        kept = reply[1].split(SEP)
        expires, now = int(kept[0]), int(reply[2])
        return {
            "reservation_id": kept[1] if len(kept) > 1 else cmd.reservation_id,
            "status": "ACTIVE",
            "expires_at_ms": expires,
            "remaining_ttl_ms": max(0, expires - now),
            "balances": fmt.balances(reply, 3),
        }

    async def record_event(self, cmd: EventCommand) -> dict[str, Any]:
        _exact(cmd.actual, "actual")
        for unit, amount in cmd.also:
            _exact(amount, f"also ({unit})")
        tag = _tag_of_scope(cmd.scopes[0])
        await self._register(tag)
        fields = [
            cmd.payload_hash,
            cmd.unit,
            cmd.actual,
            cmd.overage_policy,
            "1" if cmd.allow_unbudgeted else "0",
            fmt.amounts_text(cmd.also) if cmd.also else "",
            _JSON(cmd.subject),
            _JSON(cmd.action),
            _raw(cmd.metrics),
            _raw(cmd.metadata),
            *cmd.scopes,
        ]
        idem = f"i:event:{cmd.idempotency_key}"
        reply = await self._run("event", tag, fields, key=cmd.idempotency_key, idem=idem)
        f, start = self._answer(reply, 4)
        body: dict[str, Any] = {
            "status": "APPLIED",
            "event_id": fmt.event_id(f[0]),
            "charged": {"unit": cmd.unit, "amount": int(f[1])},
        }
        charges = fmt.holds(f[3]) if len(f) > 3 and f[3] else None
        if charges:
            body["also_charged"] = [{"unit": unit, "amount": got} for unit, _, got, _ in charges]
        body["balances"] = fmt.balances(reply, start)
        return body

    async def note(self, cmd: NoteCommand) -> int:
        tag = _tag_of_scope(cmd.scope)
        await self._register(tag)
        reply = await self._run("note", tag, [cmd.type, cmd.scope, cmd.reason_code, _raw(cmd.data)])
        return fmt.event_id(reply[1])

    async def change_budget(self, cmd: BudgetCommand) -> dict[str, Any]:
        _exact(cmd.amount, "amount")
        _exact(cmd.overdraft_limit, "overdraft_limit")
        for name, value in (cmd.caps or {}).items():
            if isinstance(value, int):
                _exact(value, f"caps.{name}")
        for lim in cmd.rate_limits or ():
            _exact(lim["amount"], "rate limit amount")
        tag = _tag_of_scope(cmd.scope)
        await self._register(tag, always=True)
        caps = None if cmd.caps is None else _JSON(cmd.caps)
        period = fmt.period_text(cmd.period)
        bounds = ""
        if cmd.period and cmd.period.get("every") in CALENDAR:
            bounds = ",".join(map(str, calendar_bounds(cmd.period, self._now_ms())))
        limits, alerts = fmt.limits_text(cmd.rate_limits), fmt.alerts_text(cmd.alerts)
        fields = [cmd.op, cmd.scope, cmd.unit, cmd.amount, cmd.overdraft_limit, caps, period, bounds, limits, alerts]
        reply = await self._run("budget", tag, fields)
        return fmt.balance(reply[1], reply[2])

    def _now_ms(self) -> int:
        """This client's idea of now (the scripts use Redis time; boundaries are computed around this)."""
        return self._clock() if self._clock is not None else time.time_ns() // 1_000_000

    # --- reads --------------------------------------------------------------------------------

    async def balances(self, scope_prefix: str | None = None, unit: str | None = None) -> list[dict[str, Any]]:
        """Budgets as of now (a read script on Redis time: an ended period shows its new one, a rate-limited
        budget what each window holds, `burn`)."""
        out = []
        for tag in await self._tags(scope_prefix):
            out += fmt.read_balances(await self._run("read", tag, [scope_prefix or "", unit or ""]))
        return sorted(out, key=lambda b: (b["scope"], b["unit"]))

    async def _reservations(self, tag: str, ids: list[str]) -> list[dict[str, Any]]:
        fields = [f for rid in ids for f in (rid, rid + "|s", rid + "|c")]
        values = await self._redis(self._client.hmget(self._keys(tag)[1], fields))
        out = []
        for i, rid in enumerate(ids):
            rec, static, caps = values[3 * i : 3 * i + 3]
            if rec is not None and static is not None:
                out.append(fmt.reservation(fmt.record(rid, rec), json.loads(static), caps))
        return out

    async def get_reservation(self, reservation_id: str) -> dict[str, Any] | None:
        tag = _tag_of_rid(reservation_id)
        if tag is None:
            return None
        found = await self._reservations(tag, [reservation_id])
        return found[0] if found else None

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
            start, page, mine = 0, 256, 0
            while mine < limit:
                ids = await self._redis(self._client.zrevrange(self._keys(tag)[5], start, start + page - 1))
                if not ids:
                    break
                start += page
                for r in await self._reservations(tag, ids):
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
        self,
        *,
        after: int = 0,
        limit: int = 100,
        reservation_id: str | None = None,
        scope_prefix: str | None = None,
        newest: bool = False,
    ) -> list[dict[str, Any]]:
        if reservation_id is not None:
            rid_tag = _tag_of_rid(reservation_id)
            if rid_tag is None:
                return []
            tags = [rid_tag]
        else:
            tags = await self._tags(scope_prefix)
        found: list[dict[str, Any]] = []
        floor = f"({fmt.stream_id(after)}" if after else "-"
        for tag in tags:
            key = self._keys(tag)[3]
            start, end = (floor, "+") if not newest else ("+", floor)
            mine = 0
            while mine < limit:
                if newest:
                    entries = await self._redis(self._client.xrevrange(key, start, end, count=max(limit, 256)))
                else:
                    entries = await self._redis(self._client.xrange(key, start, end, count=max(limit, 256)))
                if not entries:
                    break
                for sid, fields in entries:
                    if reservation_id is not None and fields.get("rid") != reservation_id:
                        continue
                    if not _under(fields.get("scope"), scope_prefix):
                        continue
                    found.append(fmt.event(sid, fields))
                    mine += 1
                    if mine >= limit:
                        break
                start = f"({entries[-1][0]}"
        found.sort(key=lambda e: e["event_id"], reverse=newest)
        return found[:limit]

    # --- sweeping and checking ----------------------------------------------------------------

    async def expire_due(self, limit: int = 1000) -> int:
        """Expire overdue holds in every tag. Safe on many replicas at once: each expiry is one atomic
        script that re-checks the reservation is still ACTIVE, so none is released twice."""
        total = 0
        for tag in await self._tags():
            reply = await self._run("sweep", tag, [limit])
            total += int(reply[1])
        return total

    async def verify(self) -> list[str]:
        """Rebuild each budget's reserved (from ACTIVE reservations) and spent+debt (from the event log,
        when the stream still holds every event of its tag) and compare."""
        problems: list[str] = []
        for tag in await self._tags():
            keys = self._keys(tag)
            budgets = [fmt.balance(f, t) for f, t in (await self._redis(self._client.hgetall(keys[0]))).items()]
            records = await self._redis(self._client.hgetall(keys[1]))
            held: dict[tuple[str, str], int] = {}
            found: dict[str, ReservationState] = {}
            for field, text in records.items():
                if "|" in field:
                    continue
                rec = found[field] = fmt.record(field, text)
                if rec.status == "ACTIVE":
                    for unit, amount, scopes in rec.holds():
                        for s in scopes:
                            held[(s, unit)] = held.get((s, unit), 0) + amount
            complete = await self._stream_complete(keys[3])
            charged: dict[tuple[str, str], int] = {}
            if complete:
                async for _sid, fields in self._stream(keys[3]):
                    kind = fields["type"]
                    if kind not in ("committed", "debited", "period_reset"):
                        continue
                    r = found.get(fields.get("rid", ""))
                    if kind == "committed" and r is None:  # pruned after its retention
                        complete = False
                        break
                    data = json.loads(fields.get("data") or "{}")
                    for unit, amount, scopes in operations.charges_of(
                        kind, fields["unit"], int(fields["amount"]), data, r, fields.get("scope")
                    ):
                        for s in scopes:
                            charged[(s, unit)] = charged.get((s, unit), 0) + amount
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
        """True when the stream was never trimmed and no committed reservation was pruned."""
        try:
            info = await self._redis(self._client.xinfo_stream(key))
        except StoreUnavailableError as exc:
            if "no such key" in str(exc).lower():
                return True
            raise
        added = info.get("entries-added")  # Redis >= 7; without it, a trimmed stream cannot be told apart
        return added is not None and int(added) == int(info["length"])

    async def _stream(self, key: str) -> AsyncIterator[tuple[str, dict[str, str]]]:
        start = "-"
        while True:
            entries = await self._redis(self._client.xrange(key, start, "+", count=1000))
            if not entries:
                return
            for entry in entries:
                yield entry
            start = f"({entries[-1][0]}"

    # --- keyed state (the notifier's cursor, lease and dead letters) --------------------------------

    async def state_get(self, key: str) -> str | None:
        value = await self._redis(self._client.hget(self._state_key, key))
        return None if value is None else str(value)

    async def state_put(self, key: str, value: str | None, expected: str | None) -> bool:
        _check_text(key, "state key")
        args = [key, "0" if expected is None else "1", expected or "", "0" if value is None else "1", value or ""]
        return bool(await self._redis(self._client.eval(_STATE_CAS, 1, self._state_key, *args)))

    async def state_list(self, prefix: str) -> dict[str, str]:
        found = await self._redis(self._client.hgetall(self._state_key))
        return {k: found[k] for k in sorted(found) if k.startswith(prefix)}

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for wire in list(self._wires.values()):
            wire.close()
        close = getattr(self._client, "aclose", None) or self._client.close
        await close()
