"""Deliver chosen ledger events to webhooks: signed, retried, at least once, nothing lost across restarts.

The ledger's event log is the outbox. A `Notifier` reads it after its cursor, posts each chosen event to
each webhook in order, and moves that webhook's cursor on only once the event was delivered or given up
on; the cursor, a lease (one notifier delivers at a time, however many proxies run one) and the dead
letters live in the ledger's own store (`SupportsState`). A crash between a delivery and its cursor write
sends that event again: receivers dedupe on `X-Cycles-Delivery`.

Each request is JSON (or a Slack-compatible `{"text": …}`) signed with HMAC-SHA256 over
`"<timestamp>.<body>"` in `X-Cycles-Signature: t=<timestamp>,v1=<hex>` (`verify_signature` checks one).
Failures are retried with exponential back-off and jitter; a 4xx other than 408/429 is not retried. An
event that still fails is a dead letter, visible in `cycles alerts` and delivered again by
`cycles alerts replay`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .errors import ConfigError
from .models import LedgerEvent, format_amount
from .stores.base import SupportsState

if TYPE_CHECKING:
    import httpx

    from .ledger import Ledger

__all__ = [
    "DEFAULT_EVENTS",
    "DeadLetter",
    "Notifier",
    "Webhook",
    "sign",
    "verify_signature",
    "webhooks_from_settings",
]

log = logging.getLogger("cycles.notify")

DEFAULT_EVENTS = frozenset(
    {"threshold_crossed", "denied", "would_deny", "over_limit", "debt", "frozen", "period_reset"}
)
_KEY = "notify:"


@dataclass(frozen=True)
class Webhook:
    """Where chosen events go. `secret` signs them; `scope` keeps only events at or below that scope."""

    name: str
    url: str
    secret: str | None = None
    events: frozenset[str] = DEFAULT_EVENTS
    format: Literal["json", "slack"] = "json"
    scope: str | None = None

    def wants(self, e: LedgerEvent) -> bool:
        if e.type not in self.events:
            return False
        return self.scope is None or (e.scope or "") == self.scope or (e.scope or "").startswith(self.scope + "/")


@dataclass(frozen=True)
class DeadLetter:
    webhook: str
    event_id: int
    attempts: int
    error: str
    failed_at_ms: int
    event: dict[str, Any] = field(default_factory=dict)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(
    secret: str, header: str, body: bytes, *, tolerance_s: int = 300, now: float | None = None
) -> bool:
    """What a receiver checks: the signature matches and its timestamp is recent (no replays of old posts)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        ts = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), f"t={ts},v1={parts.get('v1', '')}")


def summary(e: LedgerEvent) -> str:
    """One line a person reads in Slack."""
    amount = format_amount(e.amount, e.unit) if e.amount is not None and e.unit else ""
    d = e.data or {}
    if e.type == "threshold_crossed":
        alloc = format_amount(d.get("allocated", 0), e.unit or "USD_MICROCENTS")
        return f"{e.scope}: {d.get('threshold')}% of its budget spent ({amount} of {alloc})"
    if e.type in ("denied", "would_deny"):
        verb = "denied" if e.type == "denied" else "would be denied (shadow)"
        return f"{e.scope}: a call {verb}, {e.reason_code} ({amount}{', model ' + e.model if e.model else ''})"
    if e.type == "frozen":
        return f"{e.scope}: budget frozen ({e.reason_code or 'by hand'}); `cycles budget unfreeze {e.scope}` reopens it"
    if e.type == "period_reset":
        spent = format_amount(d.get("spent", 0), e.unit or "USD_MICROCENTS")
        return f"{e.scope}: a new period began; the last one spent {spent}"
    if e.type == "debt":
        return f"{e.scope}: {amount} of new debt (now {format_amount(d.get('debt', 0), e.unit or 'USD_MICROCENTS')})"
    if e.type == "over_limit":
        return f"{e.scope}: spent past its budget (over limit)"
    return f"{e.scope}: {e.type} {amount}".rstrip()


class _Permanent(Exception):
    """A failure retrying cannot fix (a 4xx other than 408/429)."""


Sleep = Callable[[float], Awaitable[None]]


class Notifier:
    """Delivers the events `webhooks` want from `ledger`'s log. `run_once` for one pass (and `cycles notify
    --once`), `run_forever` in the proxy or `cycles notify`."""

    def __init__(
        self,
        ledger: Ledger,
        webhooks: Iterable[Webhook],
        *,
        client: httpx.AsyncClient | None = None,
        max_attempts: int = 6,
        base_delay_s: float = 1.0,
        max_delay_s: float = 300.0,
        lease_ms: int = 30_000,
        batch: int = 200,
        timeout_s: float = 10.0,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.ledger = ledger
        self.webhooks = list(webhooks)
        names = [h.name for h in self.webhooks]
        if len(set(names)) != len(names):
            raise ConfigError(f"webhook names must be unique, got {names}")
        if not isinstance(ledger.store, SupportsState):
            raise ConfigError(f"{type(ledger.store).__name__} cannot keep the notifier's cursor and dead letters")
        self.state: SupportsState = ledger.store
        self._client = client
        self._own_client = client is None
        self.max_attempts = max_attempts
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.lease_ms = lease_ms
        self.batch = batch
        self.timeout_s = timeout_s
        self.sleep = sleep
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

    # --- the loop ---------------------------------------------------------------------------------

    async def run_forever(self, interval_s: float = 1.0) -> None:
        try:
            while True:
                try:
                    await self.run_once()
                except Exception:
                    log.exception("cycles notifier pass failed; trying again in %.1fs", interval_s)
                await asyncio.sleep(interval_s)
        finally:
            await self.aclose()

    async def run_once(self) -> int:
        """One pass: every webhook up to the end of the log. Returns how many posts were delivered (0 when
        another process holds the lease)."""
        if not await self._lease():
            return 0
        delivered = 0
        for hook in self.webhooks:
            delivered += await self._drain(hook)
        return delivered

    async def aclose(self) -> None:
        if self._client is not None and self._own_client:
            await self._client.aclose()
            self._client = None
        await self._release()

    async def _lease(self) -> bool:
        """Take or renew the lease; False while another live notifier has it."""
        key = _KEY + "lease"
        now = int(time.time() * 1000)
        current = await self.state.state_get(key)
        if current is not None:
            held = json.loads(current)
            if held["owner"] != self.owner and held["until_ms"] > now:
                return False
        mine = json.dumps({"owner": self.owner, "until_ms": now + self.lease_ms})
        return await self.state.state_put(key, mine, current)

    async def _release(self) -> None:
        key = _KEY + "lease"
        current = await self.state.state_get(key)
        if current is not None and json.loads(current)["owner"] == self.owner:
            await self.state.state_put(key, None, current)

    # --- one webhook --------------------------------------------------------------------------------

    async def _cursor(self, hook: Webhook) -> tuple[int, str | None]:
        key = f"{_KEY}cursor:{hook.name}"
        raw = await self.state.state_get(key)
        if raw is not None:
            return int(raw), raw
        # A new webhook starts at the end of the log: it is told what happens from now on, not the history.
        newest = await self.ledger.events(newest=True, limit=1)
        start = newest[0].event_id if newest else 0
        await self.state.state_put(key, str(start), None)
        return start, str(start)

    async def _drain(self, hook: Webhook) -> int:
        after, raw = await self._cursor(hook)
        delivered = 0
        while True:
            events = await self.ledger.events(after=after, limit=self.batch)
            if not events:
                return delivered
            for e in events:
                if hook.wants(e) and await self._deliver(hook, e):
                    delivered += 1
                new = str(e.event_id)
                if not await self.state.state_put(f"{_KEY}cursor:{hook.name}", new, raw):
                    log.warning("cycles notifier: cursor of %s moved under us; stopping this pass", hook.name)
                    return delivered
                after, raw = e.event_id, new
                await self._lease()  # renew while working

    async def _deliver(self, hook: Webhook, e: LedgerEvent) -> bool:
        """Post with retries; a dead letter when it keeps failing. True when delivered."""
        error = ""
        for attempt in range(1, self.max_attempts + 1):
            try:
                await self._post(hook, e)
                return True
            except _Permanent as exc:
                error = str(exc)
                break
            except Exception as exc:  # noqa: BLE001 - any transport failure is retried the same way
                error = f"{type(exc).__name__}: {exc}"
            if attempt < self.max_attempts:
                delay = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
                await self.sleep(delay)
        letter = {
            "webhook": hook.name,
            "event_id": e.event_id,
            "attempts": attempt,
            "error": error[:500],
            "failed_at_ms": int(time.time() * 1000),
            "event": e.model_dump(mode="json"),
        }
        await self.state.state_put(f"{_KEY}dead:{hook.name}:{e.event_id:020d}", json.dumps(letter), None)
        log.error(
            "cycles notifier: event %s to %s failed %s times (%s); kept as a dead letter",
            e.event_id,
            hook.name,
            attempt,
            error,
        )
        return False

    def _body(self, hook: Webhook, e: LedgerEvent) -> bytes:
        if hook.format == "slack":
            return json.dumps({"text": summary(e)}).encode()
        payload = {"webhook": hook.name, "summary": summary(e), "event": e.model_dump(mode="json")}
        return json.dumps(payload, separators=(",", ":")).encode()

    async def _post(self, hook: Webhook, e: LedgerEvent) -> None:
        client = self._http()
        body = self._body(hook, e)
        headers = {
            "content-type": "application/json",
            "x-cycles-event": e.type,
            "x-cycles-delivery": f"{hook.name}:{e.event_id}",
        }
        if hook.secret:
            headers["x-cycles-signature"] = sign(hook.secret, int(time.time()), body)
        response = await client.post(hook.url, content=body, headers=headers, timeout=self.timeout_s)
        status = response.status_code
        if 200 <= status < 300:
            return
        if 400 <= status < 500 and status not in (408, 429):
            raise _Permanent(f"HTTP {status}: {response.text[:200]}")
        raise RuntimeError(f"HTTP {status}")

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            try:
                import httpx
            except ImportError:
                raise ConfigError("webhooks need httpx: pip install 'cycles-litellm[http]'") from None
            self._client = httpx.AsyncClient(follow_redirects=False)
        return self._client

    # --- dead letters ---------------------------------------------------------------------------------

    async def dead_letters(self) -> list[DeadLetter]:
        rows = await self.state.state_list(f"{_KEY}dead:")
        return [DeadLetter(**json.loads(v)) for v in rows.values()]

    async def replay(self, webhook: str | None = None, event_id: int | None = None) -> tuple[int, int]:
        """Deliver dead letters again (all, one webhook's, or one event); a delivered one is removed.
        Returns (delivered, still failing)."""
        hooks = {h.name: h for h in self.webhooks}
        ok = failed = 0
        for key, raw in (await self.state.state_list(f"{_KEY}dead:")).items():
            letter = json.loads(raw)
            if webhook is not None and letter["webhook"] != webhook:
                continue
            if event_id is not None and letter["event_id"] != event_id:
                continue
            hook = hooks.get(letter["webhook"])
            if hook is None:
                failed += 1
                continue
            event = LedgerEvent.model_validate(letter["event"])
            await self.state.state_put(key, None, raw)  # _deliver writes it back if it fails again
            if await self._deliver(hook, event):
                ok += 1
            else:
                failed += 1
        return ok, failed


def webhooks_from_settings(raw: Any, where: str = "notify") -> list[Webhook]:
    """`notify: {webhooks: [{name, url, secret | secret_env, events, format, scope}]}` from cycles.yaml."""
    if raw is None:
        return []
    if not isinstance(raw, Mapping) or not isinstance(raw.get("webhooks", []), list):
        raise ConfigError(f"{where}: expected `webhooks:` as a list of {{name, url, ...}}")
    out = []
    for i, item in enumerate(raw.get("webhooks") or []):
        at = f"{where}.webhooks[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{at}: expected a mapping with name and url")
        unknown = set(item) - {"name", "url", "secret", "secret_env", "events", "format", "scope", "__line__"}
        if unknown:
            raise ConfigError(f"{at}: unknown key(s) {', '.join(sorted(unknown))}")
        url = item.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"{at}: url must be an http(s) URL")
        secret = item.get("secret")
        if item.get("secret_env"):
            secret = os.environ.get(str(item["secret_env"]))
            if not secret:
                raise ConfigError(f"{at}: ${item['secret_env']} (secret_env) is not set")
        events = item.get("events")
        if events is not None and (not isinstance(events, list) or not all(isinstance(t, str) for t in events)):
            raise ConfigError(f"{at}: events must be a list of event types such as [threshold_crossed, denied]")
        fmt = item.get("format", "json")
        if fmt not in ("json", "slack"):
            raise ConfigError(f"{at}: format must be json or slack")
        out.append(
            Webhook(
                name=str(item.get("name") or f"hook{i}"),
                url=url,
                secret=str(secret) if secret else None,
                events=frozenset(events) if events is not None else DEFAULT_EVENTS,
                format=fmt,
                scope=item.get("scope"),
            )
        )
    return out
