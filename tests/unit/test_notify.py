"""The notifier against a real HTTP receiver on loopback: signed posts, retries with back-off, dead letters
and replay, one notifier at a time (lease), a cursor that survives restarts (no double sends)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cycles_ledger import ConfigError, Ledger
from cycles_ledger.notify import Notifier, Webhook, sign, verify_signature, webhooks_from_settings
from tests.support.webhook_receiver import Receiver

SUBJ = {"tenant": "t", "agent": "a"}
ACT = {"kind": "tool.search", "name": "web"}
SECRET = "s3cret"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture(autouse=True)
def _store_keeps_state(request: pytest.FixtureRequest) -> None:
    if "ledger" in request.fixturenames:
        from cycles_ledger.stores.base import SupportsState

        if not isinstance(request.getfixturevalue("ledger").store, SupportsState):
            pytest.skip("this store does not keep notifier state yet")


async def spend(ledger: Ledger, cents: int) -> None:
    r = await ledger.reserve(SUBJ, ACT, f"0.{cents:02d}usd")
    await ledger.commit(r.reservation_id or "", f"0.{cents:02d}usd")


def quick(ledger: Ledger, hooks: list[Webhook], **kw: Any) -> tuple[Notifier, list[float]]:
    delays: list[float] = []

    async def no_wait(s: float) -> None:
        delays.append(s)

    return Notifier(ledger, hooks, sleep=no_wait, **kw), delays


async def test_threshold_alert_is_signed_and_sent_once(ledger: Ledger, receiver: Receiver) -> None:
    await ledger.set_budget("tenant:t", "1usd", alerts=[50, 80])
    n, _ = quick(ledger, [Webhook("ops", receiver.url, SECRET)])
    assert await n.run_once() == 0  # a new webhook starts at the end of the log
    await spend(ledger, 60)
    await spend(ledger, 10)
    assert await n.run_once() == 1
    assert await n.run_once() == 0
    [post] = receiver.posts
    assert verify_signature(SECRET, post["headers"]["x-cycles-signature"], post["body"])
    assert not verify_signature(SECRET, post["headers"]["x-cycles-signature"], post["body"] + b" ")
    body = json.loads(post["body"])
    assert body["event"]["type"] == "threshold_crossed" and body["event"]["data"]["threshold"] == 50
    assert "50% of its budget spent ($0.60 of $1.00)" in body["summary"]
    assert post["headers"]["x-cycles-delivery"] == f"ops:{body['event']['event_id']}"
    await n.aclose()


async def test_failures_are_retried_with_growing_back_off(ledger: Ledger, receiver: Receiver) -> None:
    await ledger.set_budget("tenant:t", "1usd", alerts=[50])
    n, delays = quick(ledger, [Webhook("ops", receiver.url)], base_delay_s=1.0)
    await n.run_once()
    receiver.plan = [500, 503, 429]
    await spend(ledger, 60)
    assert await n.run_once() == 1
    assert [p["status"] for p in receiver.posts] == [500, 503, 429, 200]
    assert len(delays) == 3 and 0.5 <= delays[0] <= 1.5 and 1.0 <= delays[1] <= 3.0 and 2.0 <= delays[2] <= 6.0
    assert await n.dead_letters() == []
    await n.aclose()


async def test_a_rejected_event_is_a_dead_letter_until_replayed(ledger: Ledger, receiver: Receiver) -> None:
    await ledger.set_budget("tenant:t", "1usd")
    n, _ = quick(ledger, [Webhook("ops", receiver.url, events=frozenset({"denied"}))])
    await n.run_once()
    receiver.plan = [400]
    assert not (await ledger.reserve(SUBJ, ACT, "5usd")).allowed
    assert await n.run_once() == 0
    [letter] = await n.dead_letters()
    assert (letter.webhook, letter.attempts, letter.error[:8]) == ("ops", 1, "HTTP 400")
    assert not (await ledger.reserve(SUBJ, ACT, "6usd")).allowed  # later events still flow
    assert await n.run_once() == 1
    assert await n.replay() == (1, 0)
    assert await n.dead_letters() == []
    amounts = [b["event"]["amount"] for b in receiver.delivered()]
    assert amounts == [600_000_000, 500_000_000]
    await n.aclose()


async def test_one_notifier_at_a_time_and_no_double_send_after_a_crash(ledger: Ledger, receiver: Receiver) -> None:
    await ledger.set_budget("tenant:t", "1usd")
    hooks = [Webhook("ops", receiver.url, events=frozenset({"denied"}))]
    a, _ = quick(ledger, hooks, lease_ms=200)
    await a.run_once()
    await ledger.reserve(SUBJ, ACT, "2usd")
    assert await a.run_once() == 1
    await ledger.reserve(SUBJ, ACT, "3usd")
    b, _ = quick(ledger, hooks, lease_ms=200)  # a "crashed": its lease is still there
    assert await b.run_once() == 0
    time.sleep(0.25)
    assert await b.run_once() == 1  # the lease expired; b takes over where a's cursor stopped
    assert [d["event"]["amount"] for d in receiver.delivered()] == [200_000_000, 300_000_000]
    await b.aclose()


async def test_slack_format_and_scope_filter(ledger: Ledger, receiver: Receiver) -> None:
    await ledger.set_budget("tenant:t", "1usd")
    await ledger.set_budget("tenant:u", "1usd")
    hook = Webhook("slack", receiver.url, events=frozenset({"denied"}), format="slack", scope="tenant:t")
    n, _ = quick(ledger, [hook])
    await n.run_once()
    await ledger.reserve({"tenant": "u"}, ACT, "2usd")
    await ledger.reserve(SUBJ, ACT, "2usd")
    assert await n.run_once() == 1
    [body] = receiver.delivered()
    assert set(body) == {"text"} and body["text"].startswith(
        "tenant:t: a call denied, BUDGET_EXCEEDED ($2.00, model web)"
    )
    await n.aclose()


def test_signatures_expire() -> None:
    body = b'{"x":1}'
    header = sign(SECRET, 1_000, body)
    assert verify_signature(SECRET, header, body, now=1_100)
    assert not verify_signature(SECRET, header, body, now=2_000)
    assert not verify_signature("other", header, body, now=1_100)
    assert not verify_signature(SECRET, "garbage", body, now=1_100)


def test_webhook_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", "abc")
    [hook] = webhooks_from_settings(
        {"webhooks": [{"name": "ops", "url": "https://x.example/h", "secret_env": "HOOK_SECRET", "events": ["debt"]}]}
    )
    assert (hook.secret, hook.events, hook.format) == ("abc", frozenset({"debt"}), "json")
    for bad in (
        {"webhooks": [{"url": "ftp://x"}]},
        {"webhooks": [{"url": "https://x", "secret_env": "NOT_SET_ANYWHERE"}]},
        {"webhooks": [{"url": "https://x", "format": "teams"}]},
        {"webhooks": [{"url": "https://x", "colour": "red"}]},
        {"webhooks": "https://x"},
    ):
        with pytest.raises(ConfigError):
            webhooks_from_settings(bad)


def test_cli_notify_alerts_and_replay(tmp_path: Any, receiver: Receiver, capsys: pytest.CaptureFixture[str]) -> None:
    """`cycles notify --once` delivers to the webhooks of cycles.yaml; `cycles alerts` lists what failed and
    `cycles alerts replay` sends it again."""
    from cycles_ledger.cli import main

    db = tmp_path / "l.db"
    cfg = tmp_path / "cycles.yaml"
    cfg.write_text(
        f"store: sqlite:///{db}\n"
        "notify:\n"
        "  webhooks:\n"
        f"    - {{name: ops, url: '{receiver.url}', events: [denied, threshold_crossed]}}\n"
    )
    run = ["--config", str(cfg)]
    assert main([*run, "budget", "set", "tenant:t", "1usd"]) == 0
    assert main([*run, "notify", "--once"]) == 0  # starts at the end of the log
    assert main([*run, "reserve", "tenant:t", "2usd"]) == 1
    receiver.plan = [404]
    capsys.readouterr()
    assert main([*run, "notify", "--once"]) == 0
    assert "delivered 0" in capsys.readouterr().out
    assert main([*run, "alerts"]) == 0
    out = capsys.readouterr().out
    assert "ops" in out and "denied" in out and "HTTP 404" in out
    assert main([*run, "alerts", "replay"]) == 0
    assert "delivered 1, still failing 0" in capsys.readouterr().out
    assert [d["event"]["type"] for d in receiver.delivered()] == ["denied"]
    cfg.write_text(f"store: sqlite:///{db}\n")
    assert main([*run, "notify", "--once"]) == 2
    assert "no webhooks" in capsys.readouterr().err
