"""Smoke: the fixtures give a working ledger."""

from cycles_ledger import Decision, Ledger


async def test_reserve_then_commit_moves_money(ledger: Ledger) -> None:
    """A reservation holds the estimate, and its commit turns the actual into spend."""
    await ledger.set_budget("tenant:acme", "1usd")
    r = await ledger.reserve({"tenant": "acme"}, {"kind": "tool.x", "name": "x"}, "0.4usd")
    assert r.decision is Decision.ALLOW
    assert (await ledger.balance("tenant:acme")).reserved == 40_000_000
    await ledger.commit(r.reservation_id or "", "0.3usd")
    b = await ledger.balance("tenant:acme")
    assert (b.spent, b.reserved, b.remaining) == (30_000_000, 0, 70_000_000)
