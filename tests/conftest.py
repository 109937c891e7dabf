"""Shared fixtures: a ledger on each store (a real SQLite file, a real redis-server), and a clock the
test moves by hand.

`db_url` is parametrized over the backends, so every test that takes it is part of the conformance
suite and runs once per store (markers `sqlite` and `redis`). Redis comes from `$CYCLES_TEST_REDIS_URL`
(`.ci/run` starts one) or from a redis-server this session starts; every test gets a fresh key prefix.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

# LiteLLM fetches its price map from GitHub on import unless told otherwise: offline, that is three failed
# attempts and ~7 s per test process. Tests price from the map bundled with the installed LiteLLM.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from cycles_ledger import Ledger, open_ledger
from cycles_ledger.redis_server import RedisCluster, RedisServer, RedisTarget, redis_available, wait_ready

__all__ = ["FakeClock", "RedisTarget", "need_redis"]


class FakeClock:
    """Milliseconds that advance only when the test says so (passed to the store as `clock`)."""

    def __init__(self, start_ms: int = 1_800_000_000_000) -> None:
        self.now = start_ms

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


def need_redis() -> None:
    """Skip without redis-server / redis-cli, or fail when `$CI` is set (CI must run the Redis tests)."""
    if not redis_available():
        message = "redis-server / redis-cli not installed (apt-get install redis-server; .ci/run does it)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run the Redis tests")
        pytest.skip(message)


_need_redis = need_redis  # the older name, still imported by tests/integration/test_redis_faults.py


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisTarget]:
    """The session's Redis: `$CYCLES_TEST_REDIS_URL` if set (probed with PING for up to 10 s), else a
    redis-server started here on a free loopback port. Its `url()` is a fresh namespace per call."""
    given = os.environ.get("CYCLES_TEST_REDIS_URL")
    if given:
        try:
            wait_ready(given, deadline_s=10.0)
        except RuntimeError as exc:
            pytest.fail(f"CYCLES_TEST_REDIS_URL={given} does not answer: {exc}")
        target = RedisTarget(given)
        try:
            yield target
        finally:
            target.wipe()  # a server we did not start keeps running: leave it as we found it
        return
    need_redis()
    with RedisServer() as server:
        yield RedisTarget(f"redis://127.0.0.1:{server.port}/0")


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """Three Redis Cluster masters on loopback for the session; `url()` is `redis+cluster://…?prefix=<fresh>`."""
    need_redis()
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite file, for tests that are about SQLite itself (files, WAL, the writer thread)."""
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture(
    params=[
        pytest.param("sqlite", marks=pytest.mark.sqlite),
        pytest.param("memory", marks=pytest.mark.memory),
        pytest.param("redis", marks=pytest.mark.redis),
    ]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store of each kind: the conformance suite runs once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}"  # named: reopening the URL in a test finds the same ledger
    target: RedisTarget = request.getfixturevalue("redis_server")
    return target.url()


@pytest.fixture(
    params=[pytest.param("sqlite", marks=pytest.mark.sqlite), pytest.param("redis", marks=pytest.mark.redis)]
)
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store that outlives a process and is shared between processes (SQLite, Redis): for the CLI
    (each command is one process) and the many-process tests."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    target: RedisTarget = request.getfixturevalue("redis_server")
    return target.url()


@pytest.fixture
async def ledger(db_url: str, clock: FakeClock) -> AsyncIterator[Ledger]:
    async with open_ledger(db_url, clock=clock) as led:
        yield led


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line saying how to run the Redis suite when this machine could not (no redis-server)."""
    skipped = [
        r
        for r in terminalreporter.stats.get("skipped", [])
        if "redis-server / redis-cli not installed" in str(r.longrepr)
    ]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} Redis tests skipped: redis-server is not installed. Install it "
            "(`sudo apt-get install redis-server`) and `make test` starts a throwaway one; or run `bash .ci/run`.",
            yellow=True,
        )
