"""The Redis test fixtures themselves: a server that answers, AOF that survives SIGKILL, a working cluster."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from cycles_ledger.redis_server import RedisCluster, RedisServer, RedisTarget, with_prefix
from tests.conftest import need_redis

pytestmark = pytest.mark.redis


@pytest.fixture
def aof_server() -> Iterator[RedisServer]:
    need_redis()
    with RedisServer(appendonly=True, appendfsync="always") as server:
        yield server


def test_session_server_answers_ping_and_urls_are_fresh_namespaces(redis_server: RedisTarget) -> None:
    """The session server answers PING, and every url() names a different, empty prefix."""
    with redis_server.client() as r:
        assert r.ping() is True
    a, b = redis_server.url(), redis_server.url()
    assert a != b and a.startswith("redis://") and "prefix=" in a
    assert redis_server.url("fixed", timeout=5).endswith("prefix=fixed&timeout=5")


def test_with_prefix_keeps_existing_parameters() -> None:
    """A base URL that already has a query gets `&prefix=`, one without gets `?prefix=`."""
    assert with_prefix("redis://h:1/0", "p") == "redis://h:1/0?prefix=p"
    assert with_prefix("redis://h:1/0?timeout=3", "p") == "redis://h:1/0?timeout=3&prefix=p"
    assert RedisTarget("redis://h:1/0?prefix=old&timeout=3").url("p") == "redis://h:1/0?timeout=3&prefix=p"


def test_sigkill_then_restart_keeps_an_appendfsync_always_write(aof_server: RedisServer) -> None:
    """A write acknowledged under appendfsync=always is back after SIGKILL + restart on the same port and dir."""
    port, directory = aof_server.port, aof_server.dir
    with aof_server.client() as r:
        r.set("k", "v")
    aof_server.kill()
    assert not aof_server.running
    with pytest.raises(redis.ConnectionError), aof_server.client() as r:
        r.ping()
    aof_server.restart()
    assert (aof_server.port, aof_server.dir, aof_server.running) == (port, directory, True)
    with aof_server.client() as r:
        assert r.get("k") == "v"
    assert aof_server.url("p") == f"redis://127.0.0.1:{port}/0?prefix=p"
    aof_server.stop()
    assert not directory.exists()


def test_cluster_is_ok_on_every_node_and_a_hash_tag_is_one_slot(redis_cluster: RedisCluster) -> None:
    """Every master reports cluster_state:ok; keys sharing a hash tag map to one slot and one node."""
    assert len(redis_cluster.ports) == 3
    for port in redis_cluster.ports:
        with redis.Redis(host="127.0.0.1", port=port, decode_responses=True) as node:
            info = node.execute_command("CLUSTER INFO")
            assert info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == 3
    tag = "{tenant:acme}"
    keys = [f"t:{tag}:b", f"t:{tag}:r", f"t:{tag}:e"]
    with redis.Redis(host="127.0.0.1", port=redis_cluster.ports[0], decode_responses=True) as node:
        slots = {node.execute_command("CLUSTER KEYSLOT", k) for k in keys}
        assert len(slots) == 1
        assert node.execute_command("CLUSTER KEYSLOT", "t:{tenant:other}:b") not in slots
    with redis_cluster.client() as c:
        c.mset({k: "1" for k in keys})  # one command over several keys: refused with CROSSSLOT unless one slot
        assert c.mget(keys) == ["1", "1", "1"]
    [slot] = slots
    counts = []
    for port in redis_cluster.ports:
        with redis.Redis(host="127.0.0.1", port=port) as node:
            counts.append(int(node.execute_command("CLUSTER COUNTKEYSINSLOT", slot)))
    assert sorted(counts) == [0, 0, 3]  # all three on the one master that owns the slot
    url = redis_cluster.url("p")
    assert url == f"redis+cluster://127.0.0.1:{redis_cluster.ports[0]}?prefix=p"
