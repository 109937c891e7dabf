"""Events answer "who spent what on which model": every event names its call, model and route, from its
own data or from its reservation, on every store."""

from __future__ import annotations

from cycles_ledger import Ledger

SUBJ = {"tenant": "t", "agent": "a"}
ACT = {"kind": "llm.chat", "name": "openai:gpt-4o-mini"}


async def test_reservation_events_name_call_model_and_route(ledger: Ledger) -> None:
    await ledger.set_budget("tenant:t", "1usd")
    meta = {"model": "cheap-chat", "route": "acompletion"}
    r = await ledger.reserve(SUBJ, ACT, "0.5usd", idempotency_key="call-1", metadata=meta)
    await ledger.commit(r.reservation_id or "", "0.2usd")
    r2 = await ledger.reserve(SUBJ, ACT, "0.1usd", idempotency_key="call-2")  # no metadata: the action names it
    await ledger.release(r2.reservation_id or "")
    denied = await ledger.reserve(SUBJ, ACT, "5usd", idempotency_key="call-3", metadata=meta)
    assert not denied.allowed
    await ledger.note(
        "tenant:t", "PRICE_UNKNOWN", data={"call_id": "call-4", "model": "mystery", "route": "aembedding"}
    )
    got = {(e.type, e.call_id, e.model, e.route) for e in await ledger.events()}
    assert {
        ("reserved", "call-1", "cheap-chat", "acompletion"),
        ("committed", "call-1", "cheap-chat", "acompletion"),
        ("reserved", "call-2", "openai:gpt-4o-mini", "llm.chat"),
        ("released", "call-2", "openai:gpt-4o-mini", "llm.chat"),
        ("denied", "call-3", "openai:gpt-4o-mini", "llm.chat"),
        ("denied", "call-4", "mystery", "aembedding"),
    } <= got
    newest = await ledger.events(newest=True, limit=2)
    assert [e.call_id for e in newest] == ["call-4", "call-3"]


async def test_events_without_calls_skip_the_reservation_read(ledger: Ledger) -> None:
    """`calls=False` (burn-rate readers) returns the same events and amounts; a reservation's events then name
    only what they carry themselves, so no reservation row is read for them."""
    await ledger.set_budget("tenant:t", "1usd")
    r = await ledger.reserve(SUBJ, ACT, "0.5usd", idempotency_key="call-9", metadata={"model": "m", "route": "x"})
    await ledger.commit(r.reservation_id or "", "0.2usd")
    reads = 0
    original = ledger.store.get_reservation

    async def counting(rid: str) -> object:
        nonlocal reads
        reads += 1
        return await original(rid)

    ledger.store.get_reservation = counting  # type: ignore[method-assign]
    plain = await ledger.events(calls=False)
    assert reads == 0
    named = await ledger.events()
    assert reads == 1  # once per reservation, however many of its events
    assert [(e.event_id, e.type, e.amount, e.scope) for e in plain] == [
        (e.event_id, e.type, e.amount, e.scope) for e in named
    ]
    committed = next(e for e in named if e.type == "committed")
    assert (committed.call_id, committed.model) == ("call-9", "m")
    assert next(e for e in plain if e.type == "committed").model is None
