"""Idempotency fingerprints: the reserve's, put together from cached parts, hashes the canonical JSON."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cycles_ledger import Action, Amount, InvalidRequestError, OveragePolicy, SoftLanding, Subject, Unit
from cycles_ledger.ledger import Ledger

NAMES = st.text(alphabet="abcXYZ019_.-", min_size=1, max_size=12)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def subjects(draw: st.DrawFn) -> Any:
    levels = draw(st.dictionaries(st.sampled_from(["tenant", "workspace", "app", "agent"]), NAMES, min_size=1))
    if draw(st.booleans()):
        levels["dimensions"] = draw(st.dictionaries(NAMES, st.text(max_size=8), max_size=2))
    return Subject(**levels) if draw(st.booleans()) else levels


@st.composite
def actions(draw: st.DrawFn) -> Any:
    fields: dict[str, Any] = {"kind": draw(NAMES), "name": draw(st.text(min_size=1, max_size=10))}
    if draw(st.booleans()):
        fields["tags"] = draw(st.lists(NAMES, max_size=3))
    return Action(**fields) if draw(st.booleans()) else fields


def old_fingerprint(payload: dict[str, Any]) -> str:
    raw = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(raw.encode()).hexdigest()


@settings(max_examples=300, deadline=None)
@given(
    subject=subjects(),
    action=actions(),
    amount=st.integers(0, 2**63 - 1),
    unit=st.sampled_from(list(Unit)),
    ttl=st.none() | st.integers(1_000, 86_400_000),
    grace=st.none() | st.integers(0, 60_000),
    policy=st.none() | st.sampled_from(list(OveragePolicy)),
    dry_run=st.booleans(),
    metadata=st.none() | st.dictionaries(st.text(max_size=6), JSON, max_size=4),
    soft=st.none() | st.builds(SoftLanding, min_amount=st.integers(0, 10**9), fixed_amount=st.integers(0, 10**9)),
)
def test_reserve_fingerprint_is_the_canonical_json_hash(
    subject: Any,
    action: Any,
    amount: int,
    unit: Unit,
    ttl: int | None,
    grace: int | None,
    policy: OveragePolicy | None,
    dry_run: bool,
    metadata: dict[str, Any] | None,
    soft: SoftLanding | None,
) -> None:
    """Same hash as sha256 of the sorted-keys JSON of the whole request, so replays match across versions."""
    ledger = Ledger(store=None)  # type: ignore[arg-type]  # building a command touches no store
    for _ in range(2):  # the second time the subject's and action's JSON come from the cache
        cmd = ledger._reserve_command(
            subject, action, Amount(unit=unit, amount=amount), ttl, grace, policy, "key", dry_run, metadata, soft
        )
        payload = {
            "subject": cmd.subject,
            "action": cmd.action,
            "estimate": {"unit": unit.value, "amount": amount},
            "ttl_ms": cmd.ttl_ms,
            "grace_period_ms": cmd.grace_period_ms,
            "overage_policy": cmd.overage_policy,
            "dry_run": dry_run,
            "metadata": metadata,
            "soft_landing": soft.model_dump() if soft else None,
        }
        assert cmd.payload_hash == old_fingerprint(payload)


def test_reserve_metadata_must_be_json() -> None:
    """Metadata that JSON cannot encode is refused before the store is touched, with or without a key."""
    ledger = Ledger(store=None)  # type: ignore[arg-type]
    for key in ("key", None):
        with pytest.raises(InvalidRequestError, match="metadata must be JSON-serialisable"):
            ledger._reserve_command(
                {"tenant": "a"}, {"kind": "k", "name": "n"}, "1usd", None, None, None, key, False, {"x": {1, 2}}, None
            )
