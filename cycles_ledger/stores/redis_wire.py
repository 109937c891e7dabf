"""The Redis store's own wire: a lean plain-TCP connection for its script calls, and the one place where
Redis failures become the ledger's typed errors.

Errors, all here: a driver or socket failure (redis-py's `RedisError` family, `RedisClusterException`,
`OSError`, `TimeoutError`), a lost connection or a reply later than the timeout is `StoreUnavailableError`
(raised `from` the cause); a script's refusal (`{"err", CODE, message, details}`) is the `CyclesError` of
its protocol code; a script that failed (a bug: `{"raise", message}`) is unavailable for its caller only.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import StoreUnavailableError, error_from_code

__all__ = [
    "Wire",
    "connection_class",
    "driver_errors",
    "evalsha_commands",
    "is_noscript",
    "script_reply",
    "unavailable",
    "unavailable_from",
]

Command = tuple[Any, ...]


# --- errors ---------------------------------------------------------------------------------------


def unavailable(reason: str) -> StoreUnavailableError:
    """The ledger's error for a Redis it could not reach or that did not answer (`reason` says how)."""
    return StoreUnavailableError(f"Redis ledger unavailable: {reason}")


def unavailable_from(exc: BaseException) -> StoreUnavailableError:
    """Any failure met on the way to Redis and back, as unavailable (a typed one passes through)."""
    if isinstance(exc, StoreUnavailableError):
        return exc
    if isinstance(exc, OSError):
        return unavailable(repr(exc))
    return unavailable(f"{type(exc).__name__}: {exc}")


@contextmanager
def driver_errors() -> Iterator[None]:
    """Inside: every redis-py and socket failure is raised again as `StoreUnavailableError` from itself."""
    from redis.exceptions import RedisClusterException, RedisError

    try:
        yield
    except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
        raise unavailable_from(exc) from exc


def script_reply(entry: Any) -> list[Any]:
    """One operation's entry of a script reply; a refusal raises its typed error, a failure (an exception
    instead of an entry, or a script error) raises unavailable."""
    if isinstance(entry, StoreUnavailableError):
        raise entry
    if isinstance(entry, BaseException):
        raise unavailable_from(entry) from entry
    if entry[0] == "err":
        raise error_from_code(entry[1], entry[2], json.loads(entry[3]))
    if entry[0] == "raise":
        raise unavailable(f"script error: {entry[1]}")
    return entry  # type: ignore[no-any-return]


def is_noscript(reply: Any) -> bool:
    """A script call the server did not run because it does not have the script (restarted, flushed)."""
    return isinstance(reply, Exception) and str(reply).startswith("NOSCRIPT")


# --- connections ----------------------------------------------------------------------------------


def evalsha_commands(scripts: list[tuple[str, list[str], list[str]]]) -> list[Command]:
    """The EVALSHA commands of `(sha, KEYS, ARGV)` script calls."""
    return [("EVALSHA", sha, len(keys), *keys, *args) for sha, keys, args in scripts]


def connection_class(scheme: str) -> Any:
    """redis-py's asyncio connections pack commands in Python; with hiredis installed (the `redis` extra
    brings it) they pack in C, as redis-py's sync connections already do: ~8 µs less per call."""
    from redis.asyncio.connection import Connection, SSLConnection

    base = SSLConnection if scheme == "rediss" else Connection
    try:
        import hiredis
    except ImportError:  # pragma: no cover - hiredis comes with the extra
        return base

    class HiredisPacking(base):  # type: ignore[valid-type,misc]
        def pack_command(self, *args: Any) -> list[bytes]:
            if isinstance(args[0], str) and " " in args[0]:  # "SCRIPT LOAD" goes as two words, as redis-py does
                args = (*args[0].split(), *args[1:])
            return [hiredis.pack_command(args)]

    return HiredisPacking


class Wire(asyncio.Protocol):
    """One plain-TCP connection for the script calls: a tick's commands are packed by hiredis and written
    at once, replies are parsed by hiredis and handed to their requests in order, with none of a general
    client's per-command layers. A reply later than `timeout`, or a lost connection, fails every request
    in flight (unavailable) and the connection is dropped; the next call connects again."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        import hiredis

        self.loop = loop
        self.timeout = timeout
        self.pack = hiredis.pack_command
        self.reader = hiredis.Reader(encoding="utf-8")  # an error reply comes back as a hiredis.ReplyError
        self.pending: deque[tuple[float, Callable[[Any], None]]] = deque()
        self.transport: asyncio.Transport | None = None
        self.broken: StoreUnavailableError | None = None
        self.timer: asyncio.TimerHandle | None = None

    @classmethod
    async def connect(
        cls, host: str, port: int, db: int, user: str | None, password: str | None, timeout: float
    ) -> Wire:
        """A connection ready for script calls (authenticated, on its database), or unavailable."""
        loop = asyncio.get_running_loop()
        wire = cls(loop, timeout)
        try:
            await asyncio.wait_for(loop.create_connection(lambda: wire, host, port), timeout)
        except (OSError, TimeoutError) as exc:
            wire.close()
            raise unavailable(f"cannot connect to {host}:{port}: {exc!r}") from exc
        hello: list[Command] = []
        if password is not None:
            hello.append(("AUTH", user, password) if user else ("AUTH", password))
        if db:
            hello.append(("SELECT", db))
        if hello:
            for reply in await wire.request(hello):
                if isinstance(reply, Exception):
                    wire.close()
                    raise unavailable(str(reply))
        return wire

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (uvloop's is no asyncio.Transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        gets, pending = self.reader.gets, self.pending
        while pending:
            reply = gets()
            if reply is False:
                break
            pending.popleft()[1](reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(unavailable(f"connection lost ({exc or 'closed by the server'})"))

    def fail(self, exc: StoreUnavailableError) -> None:
        if self.broken is None:
            self.broken = exc
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.abort()
        while self.pending:
            self.pending.popleft()[1](exc)

    def request(self, commands: list[Command]) -> asyncio.Future[list[Any]]:
        """Send `commands` in one write; the future gets their replies (error replies as objects)."""
        done: asyncio.Future[list[Any]] = self.loop.create_future()
        if self.broken is not None or self.transport is None:
            done.set_exception(self.broken or unavailable("not connected"))
            return done
        replies: list[Any] = []
        count = len(commands)

        def on_reply(reply: Any) -> None:
            if done.done():  # failed already, or its caller gave up
                return
            if isinstance(reply, StoreUnavailableError):
                done.set_exception(reply)
                return
            replies.append(reply)
            if len(replies) == count:
                done.set_result(replies)

        deadline = self.loop.time() + self.timeout
        self.pending.extend((deadline, on_reply) for _ in commands)
        self.transport.write(b"".join([self.pack(c) for c in commands]))
        if self.timer is None:
            self.timer = self.loop.call_at(deadline, self._check)
        return done

    def _check(self) -> None:
        self.timer = None
        if not self.pending:
            return
        deadline = self.pending[0][0]
        if self.loop.time() >= deadline:
            self.fail(unavailable(f"TimeoutError: no answer within {self.timeout:g} s"))
        else:
            self.timer = self.loop.call_at(deadline, self._check)

    def close(self) -> None:
        """Close the connection, from its own loop or from any other thread."""
        if self.transport is None or self.loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.transport.close()
        else:
            self.loop.call_soon_threadsafe(self.transport.close)
