"""Is the ledger there, and should this proxy get traffic? `/cycles/health` and LiteLLM's `/health/readiness`.

The ledger's sweeper is the probe: each sweep expires overdue holds and then writes and deletes a key of
its own in the store's state (a real write, even when nothing was due), so a store that is down, or a
SQLite file that can no longer be written, fails it, and the next sweep that succeeds says it is back.
The proxy sweeps every few seconds anyway; a health request whose last answer is older than `max_age_s`
sweeps once more itself, and the hook's own reserves count too (a reserve that found the ledger away
marks it down at once).

While the ledger is away and the plugin fails closed (`on_unavailable: fail_closed`, the default when
enforcing), every metered call gets 503: the proxy's `/health/readiness` then answers 503 too, so a load
balancer sends the calls to a proxy whose ledger answers. Failing open (or in shadow mode) the proxy still
serves: readiness stays 200 and `/cycles/health` says `degraded`.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cycles_ledger import CyclesError, Ledger
from cycles_ledger.stores.base import SupportsState

from .settings import Settings

__all__ = ["HEALTH_PATH", "READINESS_PATH", "Check", "LedgerHealth", "add_routes", "install_routes"]

HEALTH_PATH = "/cycles/health"
READINESS_PATH = "/health/readiness"


@dataclass(frozen=True)
class Check:
    """One answer about the ledger: did the last write reach it, and when (time.monotonic())."""

    ok: bool
    at: float
    error: str | None = None


class LedgerHealth:
    """The ledger's state for health routes and metrics, kept by sweeping it."""

    def __init__(
        self,
        ledger: Callable[[], Awaitable[Ledger]],
        settings: Settings,
        *,
        interval_s: float = 5.0,
        max_age_s: float = 2.0,
        timeout_s: float = 2.0,
    ) -> None:
        self._ledger = ledger
        self.settings = settings
        self.interval_s = interval_s
        self.max_age_s = max_age_s
        self.timeout_s = timeout_s
        self.last: Check | None = None
        self.last_ok_at: float | None = None  # the last successful sweep (sweeper lag counts from here)
        self._probe: asyncio.Task[Check] | None = None
        self._key = f"health:probe:{uuid.uuid4().hex}"  # this process's own key: written, then deleted

    def mark(self, ok: bool, error: BaseException | str | None = None) -> None:
        """Record what an operation on the ledger just showed (a reserve, a sweep)."""
        if ok:
            self.last = Check(True, time.monotonic())
        else:
            self.last = Check(False, time.monotonic(), self._redact(str(error or "unavailable")))

    async def sweep(self) -> Check:
        """Expire overdue holds now and prove a write lands; the outcome is the ledger's health."""
        try:
            ledger = await self._ledger()
            await asyncio.wait_for(self._sweep_and_write(ledger), self.timeout_s)
        except (CyclesError, OSError, TimeoutError) as exc:
            self.mark(False, exc if str(exc) else type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - a probe reports any failure; it must never stop sweeping
            self.mark(False, f"{type(exc).__name__}: {exc}")
        else:
            self.mark(True)
            self.last_ok_at = time.monotonic()
        assert self.last is not None
        return self.last

    async def _sweep_and_write(self, ledger: Ledger) -> None:
        await ledger.sweep()
        store = ledger.store
        if isinstance(store, SupportsState):
            stamp = str(time.time_ns())
            await store.state_put(self._key, stamp, None)
            await store.state_put(self._key, None, stamp)

    async def run_forever(self) -> None:
        """The proxy's sweeper: every `interval_s` (expiring crashed callers' holds is its first job)."""
        while True:
            await self.sweep()
            await asyncio.sleep(self.interval_s)

    async def check(self) -> Check:
        """A fresh answer (at most `max_age_s` old); concurrent health requests share one sweep."""
        last = self.last
        if last is not None and time.monotonic() - last.at <= self.max_age_s:
            return last
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self.sweep())
        return await asyncio.shield(self._probe)

    def sweeper_lag_s(self) -> float | None:
        """Seconds since the last successful sweep (None before the first)."""
        return None if self.last_ok_at is None else time.monotonic() - self.last_ok_at

    def refusing(self, check: Check) -> bool:
        """True when every metered call would get 503: the ledger is away and the plugin fails closed."""
        return not check.ok and not self.settings.fail_open()

    def report(self, check: Check) -> dict[str, Any]:
        """The body of /cycles/health (no store address or credentials: the route is public)."""
        status = "ok" if check.ok else ("unavailable" if self.refusing(check) else "degraded")
        body: dict[str, Any] = {
            "status": status,
            "ledger": "ok" if check.ok else "unavailable",
            "serving": not self.refusing(check),
            "mode": self.settings.mode,
            "on_unavailable": "fail_open" if self.settings.fail_open() else "fail_closed",
            "store": self.settings.store_url().split(":", 1)[0],
            "checked_s_ago": round(time.monotonic() - check.at, 3),
        }
        if check.error:
            body["error"] = check.error
        lag = self.sweeper_lag_s()
        if lag is not None:
            body["last_sweep_s_ago"] = round(lag, 3)
        return body

    def _redact(self, text: str) -> str:
        url = self.settings.store_url()
        return text.replace(url, url.split(":", 1)[0] + "://…")[:300]


_current: LedgerHealth | None = None  # the health the installed routes answer from (one plugin per proxy)


def install_routes(health: LedgerHealth) -> bool:
    """Add the routes to the LiteLLM proxy this process runs, if it runs one; True when they are in place."""
    module = sys.modules.get("litellm.proxy.proxy_server")
    app = getattr(module, "app", None)
    return app is not None and add_routes(app, health)


def add_routes(app: Any, health: LedgerHealth) -> bool:
    """`GET /cycles/health` (200 or 503 with the ledger's state), and, with `readiness: true`, LiteLLM's own
    `GET /health/readiness` answering 503 first while the plugin refuses every call. Routes go in front of
    the app's (they are matched in order); a second call only points them at `health`."""
    global _current
    _current = health
    from fastapi import Response
    from fastapi.routing import APIRoute

    routes = app.router.routes
    if any(getattr(r, "path", None) == HEALTH_PATH for r in routes):
        return True
    original = next(
        (
            r.endpoint
            for r in routes
            if isinstance(r, APIRoute) and r.path == READINESS_PATH and "GET" in (r.methods or ())
        ),
        None,
    )
    if original is None:  # the proxy may include its health router after loading its config (and us)
        try:
            from litellm.proxy.health_endpoints._health_endpoints import health_readiness as original
        except ImportError:
            original = None

    async def cycles_health(response: Response) -> dict[str, Any]:
        """The budget ledger's state: 503 while the plugin refuses every metered call."""
        assert _current is not None
        check = await _current.check()
        if _current.refusing(check):
            response.status_code = 503
        return _current.report(check)

    # This module postpones annotations; FastAPI must see the class to inject the response.
    cycles_health.__annotations__["response"] = Response
    added = [APIRoute(HEALTH_PATH, cycles_health, methods=["GET"], tags=["health"])]
    if health.settings.readiness and original is not None:

        async def health_readiness(response: Response) -> Any:
            """LiteLLM's readiness, answered with 503 first while the budget ledger is down and fail-closed."""
            assert _current is not None and original is not None
            check = await _current.check()
            if _current.refusing(check):
                response.status_code = 503
                return {"status": "unhealthy", "cycles": _current.report(check)}
            result = await original(response=response)
            return {**result, "cycles": _current.report(check)} if isinstance(result, dict) else result

        health_readiness.__annotations__["response"] = Response
        added.append(APIRoute(READINESS_PATH, health_readiness, methods=["GET"], tags=["health"]))
    routes[0:0] = added
    return True
