"""Shared helpers for the review11b tests (real redis-server, killed and started again on its AOF)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from cycles_ledger import Amount, Unit
from cycles_ledger.redis_server import RedisServer
from tests.conftest import need_redis

SUBJECT = {"tenant": "kept"}
ACTION = {"kind": "llm.completion", "name": "m"}
USD = 10**8


def usd(cents: int) -> Amount:
    return Amount(unit=Unit.USD_MICROCENTS, amount=cents * USD // 100)


def cents(n: int) -> int:
    return n * USD // 100


@pytest.fixture
def server() -> Iterator[RedisServer]:
    need_redis()
    srv = RedisServer(appendonly=True, appendfsync="always")
    try:
        yield srv
    finally:
        srv.stop()


async def until(pred: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
