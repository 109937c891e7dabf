"""Loaded into one proxy by `bench/proxy_overhead.py --bounds` (PYTHONPATH=bench/bounds): the plugin with part of
its ledger work cut out, to measure what a different ledger design could save at best. Never for real traffic.

$CYCLES_BOUND picks the cut:
- `no-reserve`: every call is allowed without a ledger operation, and its cost is then debited directly (one
  transaction per call). The best case of any design that decides in memory (per-process budget leases,
  say) and still writes each call's charge as it settles.
- `no-ledger`: no reserve and no settle either: the plugin's own work (payer, estimate, headers, logging
  fields, metrics) with nothing written. No ledger design can cost less.
"""

from __future__ import annotations

import os
from typing import Any

_BOUND = os.environ.get("CYCLES_BOUND", "")
BOUNDS = ("no-reserve", "no-ledger")


def install(bound: str) -> None:
    from cycles_ledger.lifecycle import Hold, HoldState, Lifecycle
    from cycles_ledger.models import Decision, ReserveResult

    if bound not in BOUNDS:
        raise SystemExit(f"CYCLES_BOUND must be one of {', '.join(BOUNDS)}, got {bound!r}")

    async def reserve(self: Lifecycle, subject: Any, action: Any, estimate: Any, **kw: Any) -> Hold:
        await self.ledger()  # opened as the plugin would (the sweeper, the metrics' ledger readings)
        scope = str(getattr(subject, "scope_path", ""))
        result = ReserveResult(decision=Decision.ALLOW, scope_path=scope, affected_scopes=[scope], reserved=estimate)
        # RELEASED: nothing holds the call's cost, so the settle debits it directly, as after an expired hold.
        key = kw.get("debit_key") or f"actual:{kw.get('idempotency_key')}"
        return Hold(result, subject, action, estimate, key, kw.get("label") or key, HoldState.RELEASED)

    async def settle_nothing(self: Lifecycle, hold: Hold, actual: Any, **kw: Any) -> None:
        return None

    Lifecycle.reserve = reserve  # type: ignore[method-assign]
    if bound == "no-ledger":
        Lifecycle.commit = settle_nothing  # type: ignore[method-assign]


if _BOUND:
    install(_BOUND)
