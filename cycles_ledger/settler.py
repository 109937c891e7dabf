"""Settling a finished action in the background: commit its actual cost (or, with no hold, record it
as a debit), retrying while the ledger is away, optionally in a helper process.

Why a helper process: a host whose event loop is busy with other work (the LiteLLM proxy) runs a
commit on cold CPU caches. There it cost ~0.39 ms of the loop's CPU after every answer, 40 % of
everything the plugin added; handing the order to `SettleProcess` costs a few tens of microseconds.

Delivery: orders go over a private SOCK_SEQPACKET socketpair (one order per message, never torn).
The helper acknowledges each order once it is settled (or given up, counted and logged); the host
keeps what is unacknowledged, and if the helper dies it settles those itself. Settling twice is
harmless: a commit is keyed by its reservation and a debit by `actual:<key>`, so a repeat replays.
The helper exits when the host's end closes (the host exited), after finishing what it began; it runs
in its own session, so a Ctrl-C aimed at the host does not cut it short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from .errors import (
    IdempotencyMismatchError,
    NotFoundError,
    ReservationExpiredError,
    ReservationFinalizedError,
    StoreUnavailableError,
)
from .ledger import Ledger, open_ledger
from .models import Amount

__all__ = ["SettleOrder", "SettleProcess", "retrying", "settle"]

log = logging.getLogger("cycles_ledger.settler")

Count = Callable[[str], None]
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RESPAWN_EVERY_S = 5.0
_MAX_MESSAGE = 1 << 20


@dataclass(frozen=True, slots=True)
class SettleOrder:
    key: str  # the action's own id: acknowledgements, and the debit's idempotency key `actual:<key>`
    reservation_id: str | None  # None: nothing is held (shadow mode), record the spend as a debit
    subject: dict[str, str]  # for the debit: who spent
    action: dict[str, str]
    unit: str
    actual: int
    metrics: dict[str, Any] | None = None


async def retrying(
    what: str, key: str, attempt: Callable[[], Awaitable[bool]], retries: int, count: Count
) -> bool:
    """Run `attempt` until it reports done, backing off while the ledger is unreachable; counts
    `settle_retries` per retry and `settle_failures` when it gives up."""
    for n in range(retries + 1):
        try:
            if await attempt():
                return True
        except StoreUnavailableError as exc:
            count("settle_retries")
            log.warning("cycles: %s of %s failed (%s), attempt %d", what, key, exc, n + 1)
            await asyncio.sleep(0.2 * 2**n)
    count("settle_failures")
    return False


async def settle(ledger: Ledger, order: SettleOrder, *, retries: int, count: Count) -> bool:
    """Commit (or record as a debit) the order's actual cost; True once nothing is left to do."""
    amount = Amount(unit=order.unit, amount=order.actual)
    rid = order.reservation_id

    async def attempt() -> bool:
        nonlocal rid
        try:
            if rid is None:
                await ledger.record_event(
                    order.subject, order.action, amount, idempotency_key=f"actual:{order.key}", metrics=order.metrics
                )
            else:
                await ledger.commit(rid, amount, metrics=order.metrics)
        except (ReservationFinalizedError, IdempotencyMismatchError):
            pass  # another path settled it first
        except ReservationExpiredError:
            rid = None  # the hold is gone but the spend happened: record it as a direct debit next
            return False
        except NotFoundError:
            log.info("cycles: no budget for %s; spend of %s not recorded", order.subject, amount)
        return True

    if await retrying("settle", order.key, attempt, retries, count):
        return True
    log.error("cycles: could not settle %s; its hold expires with the reservation TTL", order.key)
    return False


class SettleProcess:
    """The host's handle on a helper process that settles orders on the ledger at `store_url`.

    `submit` never blocks: it returns False when the helper cannot take the order (it is restarting,
    or its socket is full), and the caller settles in-process. Counters the helper reports (settle
    retries and failures) reach `count` in the host. Bound to the event loop of the first `submit`."""

    def __init__(
        self,
        store_url: str,
        *,
        ledger_settings: dict[str, Any] | None = None,
        retries: int = 3,
        count: Count | None = None,
        fallback: Callable[[SettleOrder], Coroutine[Any, Any, Any]] | None = None,
    ) -> None:
        self.store_url = store_url
        self.ledger_settings = dict(ledger_settings or {})
        self.retries = retries
        self.count: Count = count or (lambda name: None)
        self.fallback = fallback
        self.unacked: dict[str, SettleOrder] = {}
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started_at = -_RESPAWN_EVERY_S
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def submit(self, order: SettleOrder) -> bool:
        if self._closed:
            return False
        if self._sock is None and not self._start():
            return False
        assert self._sock is not None
        try:
            self._sock.send(pickle.dumps(order, protocol=pickle.HIGHEST_PROTOCOL), socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False  # the helper is behind: settle this one in-process
        except OSError:
            self._lost()
            return False
        self.unacked[order.key] = order
        return True

    def _start(self) -> bool:
        """Start the helper (at most once every few seconds); False if that is not possible now."""
        if time.monotonic() - self._started_at < _RESPAWN_EVERY_S:
            return False
        self._started_at = time.monotonic()
        self._loop = self._loop or asyncio.get_running_loop()
        host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        # The helper must import this very copy of cycles_ledger, however the host found it.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        try:
            host.send(pickle.dumps((self.store_url, self.ledger_settings, self.retries)))  # the helper's first read
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "cycles_ledger.settler", str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        except (OSError, pickle.PickleError) as exc:
            log.warning("cycles: cannot start the settle process (%s); settling in-process", exc)
            host.close()
            return False
        finally:
            child.close()
        self._sock = host
        self._loop.add_reader(host.fileno(), self._on_readable)
        return True

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                data = sock.recv(_MAX_MESSAGE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            kind, payload = pickle.loads(data)
            if kind == "done":
                for key in payload:
                    self.unacked.pop(key, None)
            elif kind == "count":
                for name, n in payload.items():
                    for _ in range(n):
                        self.count(name)

    def _lost(self) -> None:
        """The helper is gone: settle what it had not acknowledged here (a repeat is a replay)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(sock.fileno())
            sock.close()
        code = self._proc.poll() if self._proc is not None else None
        orders, self.unacked = list(self.unacked.values()), {}
        if orders or not self._closed:
            log.warning("cycles: the settle process exited (code %s); settling %d orders in-process", code, len(orders))
        if self.fallback is not None and self._loop is not None:
            for order in orders:
                task = self._loop.create_task(self.fallback(order))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def aclose(self, timeout_s: float = 30.0) -> None:
        """Stop taking orders; wait (up to `timeout_s`) for the helper to finish what it has."""
        if self._closed:
            return
        self._closed = True
        if self._sock is not None:
            self._sock.shutdown(socket.SHUT_WR)  # the helper sees the end, settles the rest and exits
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.get_running_loop().run_in_executor(None, proc.wait, timeout_s)
            self._on_readable()  # its last acknowledgements
            if proc.poll() is None:
                proc.kill()
        self._lost()
        if self._tasks:
            await asyncio.wait(set(self._tasks))


# --- the helper process ---------------------------------------------------------------------------


async def _serve(sock: socket.socket) -> None:
    store_url, ledger_settings, retries = pickle.loads(sock.recv(_MAX_MESSAGE))
    ledger = open_ledger(store_url, **ledger_settings)
    loop = asyncio.get_running_loop()
    done: list[str] = []
    counts: dict[str, int] = {}
    running: set[asyncio.Task[None]] = set()
    eof: asyncio.Future[None] = loop.create_future()
    flush_due = False

    def flush() -> None:
        # One message per loop tick for the counters, one for the acknowledgements (blocking sends: the
        # host drains them). Counters go first: once an order is acknowledged, its counts are in the host.
        nonlocal flush_due
        flush_due = False
        if counts:
            sock.sendall(pickle.dumps(("count", dict(counts))))
            counts.clear()
        if done:
            sock.sendall(pickle.dumps(("done", done[:])))
            done.clear()

    def soon() -> None:
        nonlocal flush_due
        if not flush_due:
            flush_due = True
            loop.call_soon(flush)

    def count(name: str) -> None:
        counts[name] = counts.get(name, 0) + 1
        soon()

    async def run(order: SettleOrder) -> None:
        try:
            await settle(ledger, order, retries=retries, count=count)
        except Exception:  # acknowledge anyway, or the host would settle it again
            log.exception("cycles: settling %s failed", order.key)
            count("settle_failures")
        done.append(order.key)
        soon()

    def on_readable() -> None:
        while True:
            try:
                data = sock.recv(_MAX_MESSAGE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(sock.fileno())
                if not eof.done():
                    eof.set_result(None)
                return
            task = loop.create_task(run(pickle.loads(data)))
            running.add(task)
            task.add_done_callback(running.discard)

    loop.add_reader(sock.fileno(), on_readable)
    try:
        await eof
        while running:
            await asyncio.wait(set(running))
        await asyncio.sleep(0)  # the last flush
        with contextlib.suppress(OSError):
            flush()
    finally:
        await ledger.aclose()


def _main(argv: list[str]) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the host decides when we stop: by closing its end
    logging.basicConfig(level=logging.INFO, format="%(asctime)s cycles-settler[%(process)d] %(message)s")
    sock = socket.socket(fileno=int(argv[1]))
    asyncio.run(_serve(sock))


if __name__ == "__main__":
    _main(sys.argv)
