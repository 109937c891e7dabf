"""Shared fixtures: a ledger on each store (a real SQLite file, a real redis-server), and a clock the
test moves by hand.

`db_url` is parametrized over the backends, so every test that takes it is part of the conformance
suite and runs once per store (markers `sqlite` and `redis`). Redis comes from `$CYCLES_TEST_REDIS_URL`
(`.ci/run` starts one) or from a redis-server this session starts; every test gets a fresh key prefix.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cycles_ledger import Ledger, open_ledger
from tests.support.redis_server import RedisCluster, RedisServer, redis_available, unique_prefix, wait_ready


class FakeClock:
    """Milliseconds that advance only when the test says so (passed to the store as `clock`)."""

    def __init__(self, start_ms: int = 1_800_000_000_000) -> None:
        self.now = start_ms

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


def _need_redis() -> None:
    if not redis_available():
        message = "redis-server is not installed (apt-get install redis-server; .ci/run does it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class RedisTarget:
    """Where the Redis tests go: `url()` gives a fresh, empty namespace on the session's server."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")
        self.port = urlsplit(base).port

    def url(self, prefix: str | None = None) -> str:
        sep = "&" if "?" in self.base else "?"
        return f"{self.base}{sep}prefix={prefix or unique_prefix()}"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisTarget]:
    given = os.environ.get("CYCLES_TEST_REDIS_URL")
    if given:
        port = urlsplit(given).port or 6379
        wait_ready(port)
        yield RedisTarget(given)
        return
    _need_redis()
    server = RedisServer()
    try:
        yield RedisTarget(f"redis://127.0.0.1:{server.port}/0")
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    _need_redis()
    cluster = RedisCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture(
    params=[pytest.param("sqlite", marks=pytest.mark.sqlite), pytest.param("redis", marks=pytest.mark.redis)]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store of each kind: the conformance suite runs once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    target: RedisTarget = request.getfixturevalue("redis_server")
    return target.url()


@pytest.fixture
async def ledger(db_url: str, clock: FakeClock) -> AsyncIterator[Ledger]:
    async with open_ledger(db_url, clock=clock) as led:
        yield led
