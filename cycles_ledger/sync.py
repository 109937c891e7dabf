"""SyncLedger: the same Ledger for synchronous callers.

Each SyncLedger runs the async Ledger on a private event loop in a daemon thread and waits for the
answer, so it works whether or not the calling thread already runs an event loop, and never calls
`asyncio.run` inside library code.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from .ledger import Ledger, open_ledger

__all__ = ["SyncLedger", "open_ledger_sync"]

P = ParamSpec("P")
R = TypeVar("R")


def _twin(method: Callable[Concatenate[Ledger, P], Coroutine[Any, Any, R]]) -> Callable[Concatenate[SyncLedger, P], R]:
    def call(self: SyncLedger, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.run(method(self.ledger, *args, **kwargs))

    call.__name__ = method.__name__
    call.__qualname__ = f"SyncLedger.{method.__name__}"
    call.__doc__ = method.__doc__
    return call


class SyncLedger:
    """Blocking twin of `Ledger`: same methods, same arguments, same results."""

    def __init__(self, ledger_factory: Callable[[], Ledger]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cycles-sync-ledger", daemon=True)
        self._thread.start()
        self._closed = False

        async def make() -> Ledger:
            return ledger_factory()

        try:
            self.ledger: Ledger = self.run(make())
        except BaseException:
            self._stop_loop()  # a ledger that cannot be opened must not leave its thread behind
            raise

    def run(self, coro: Coroutine[Any, Any, R]) -> R:
        """Run `coro` on this ledger's private loop and wait for its answer (how blocking drivers built on the
        async API, like `SyncLifecycle`, share the loop, the store and its heartbeats)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    reserve = _twin(Ledger.reserve)
    decide = _twin(Ledger.decide)
    commit = _twin(Ledger.commit)
    release = _twin(Ledger.release)
    extend = _twin(Ledger.extend)
    record_event = _twin(Ledger.record_event)
    note = _twin(Ledger.note)
    balances = _twin(Ledger.balances)
    balance = _twin(Ledger.balance)
    get_reservation = _twin(Ledger.get_reservation)
    list_reservations = _twin(Ledger.list_reservations)
    events = _twin(Ledger.events)
    set_budget = _twin(Ledger.set_budget)
    fund = _twin(Ledger.fund)
    freeze = _twin(Ledger.freeze)
    unfreeze = _twin(Ledger.unfreeze)
    close_budget = _twin(Ledger.close)
    sweep = _twin(Ledger.sweep)
    verify = _twin(Ledger.verify)

    def close(self) -> None:
        """Close the store and stop the private loop (ending what still runs on it, such as heartbeats)."""
        if self._closed:
            return
        self._closed = True
        self.run(self._shutdown())
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _shutdown(self) -> None:
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await self.ledger.aclose()

    def __enter__(self) -> SyncLedger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_ledger_sync(url: str, **settings: Any) -> SyncLedger:
    """Blocking `open_ledger`; use as `with open_ledger_sync(url) as ledger:`."""
    return SyncLedger(lambda: open_ledger(url, **settings))
