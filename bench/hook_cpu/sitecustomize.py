"""Loaded into one proxy by `bench/proxy_overhead.py --hook-cpu` (PYTHONPATH=bench/hook_cpu): the thread CPU
of the plugin's own steps, written as JSON lines to $CYCLES_HOOK_CPU_FILE every 250 pre-call hooks.

Counted: each hook's coroutine steps (not the time it waits), the background tasks it spawns (the settle),
the commits the SQLite store's timer writes alone, and inside the pre-call hook the payer, the estimate and
the reserve. The plugin does what it always does; the wrappers add a few microseconds per call.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

_FILE = os.environ.get("CYCLES_HOOK_CPU_FILE")
_SPENT: dict[str, list[int]] = {}  # name -> [runs, thread CPU ns]
_HOOKS = (
    "async_pre_call_hook",
    "async_pre_call_deployment_hook",
    "async_post_call_response_headers_hook",
    "async_logging_hook",
    "async_log_success_event",
    "async_post_call_failure_hook",
    "async_log_failure_event",
)


def _add(name: str, ns: int) -> None:
    slot = _SPENT.setdefault(name, [0, 0])
    slot[0] += 1
    slot[1] += ns
    if name == "async_pre_call_hook" and slot[0] % 250 == 0 and _FILE:
        with open(_FILE, "a") as f:
            f.write(json.dumps(_SPENT) + "\n")


class _Steps:
    """Awaits a coroutine, summing the thread CPU of its own steps only."""

    def __init__(self, name: str, coro: Any) -> None:
        self.name, self.coro = name, coro

    def __await__(self) -> Any:
        gen = self.coro.__await__()
        spent, value, error = 0, None, None
        try:
            while True:
                started = time.thread_time_ns()
                try:
                    step = gen.throw(error) if error is not None else gen.send(value)
                except StopIteration as done:
                    spent += time.thread_time_ns() - started
                    return done.value
                except BaseException:
                    spent += time.thread_time_ns() - started
                    raise
                spent += time.thread_time_ns() - started
                try:
                    value, error = (yield step), None
                except BaseException as exc:  # noqa: BLE001 - handed to the coroutine, as await would
                    value, error = None, exc
        finally:
            _add(self.name, spent)


async def _run(name: str, coro: Any) -> Any:
    return await _Steps(name, coro)


def _timed_async(name: str, fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return _run(name, fn(*args, **kwargs))

    return wrapper


def _timed_sync(name: str, fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            _add(name, time.thread_time_ns() - started)

    return wrapper


def install() -> None:
    from cycles_ledger.lifecycle import Lifecycle
    from cycles_ledger.stores.sqlite import SqliteStore
    from cycles_litellm import handler

    cls = handler.CyclesCallback
    for name in _HOOKS:
        setattr(cls, name, _timed_async(name, getattr(cls, name)))
    spawn = cls._spawn
    cls._spawn = lambda self, coro: spawn(self, _run("task " + getattr(coro, "__name__", "?"), coro))  # type: ignore[method-assign]
    handler.payer_from_request = _timed_sync("  of which the payer", handler.payer_from_request)
    handler.estimate_call = _timed_sync("  of which the estimate", handler.estimate_call)
    Lifecycle.reserve = _timed_async("  of which the reserve", Lifecycle.reserve)  # type: ignore[method-assign]
    SqliteStore._flush = _timed_async("commits the timer writes alone", SqliteStore._flush)  # type: ignore[method-assign]


if _FILE:
    install()
