"""Real redis-server processes on loopback for tests and benches: one server, or a 3-master cluster.

Each server gets a free port and its own directory; `kill()` is SIGKILL and `restart()` comes back on
the same port and directory, so an append-only file is replayed as after a crash.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import redis

__all__ = ["RedisCluster", "RedisServer", "free_port", "redis_available"]


def redis_available() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(port: int, deadline_s: float = 10.0, cluster: bool = False) -> None:
    """Poll until the server answers PING (and, for a cluster node, reports cluster_state:ok)."""
    end = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            with redis.Redis(port=port, socket_timeout=1, decode_responses=True) as r:
                r.ping()
                if not cluster or r.execute_command("CLUSTER INFO").startswith("cluster_state:ok"):
                    return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.02)
    raise RuntimeError(f"redis-server on port {port} not ready after {deadline_s} s: {last}")


def unique_prefix() -> str:
    return "t" + uuid.uuid4().hex[:12]


class RedisServer:
    """One redis-server on 127.0.0.1. `appendfsync="always"` makes every acknowledged write durable."""

    def __init__(self, *, appendonly: bool = False, appendfsync: str = "everysec", extra: list[str] | None = None):
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="cycles-redis-"))
        self.args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "yes" if appendonly else "no",
            "--appendfsync",
            appendfsync,
            *(extra or []),
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ready(self.port)

    def url(self, prefix: str | None = None, **params: object) -> str:
        query = {"prefix": prefix or unique_prefix(), **params}
        return f"redis://127.0.0.1:{self.port}/0?" + "&".join(f"{k}={v}" for k, v in query.items())

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye; only what the AOF already holds survives."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisCluster:
    """Three masters with `--cluster-enabled yes`, joined by `redis-cli --cluster create`."""

    def __init__(self, nodes: int = 3) -> None:
        self.servers = [
            RedisServer(extra=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]) for _ in range(nodes)
        ]
        addrs = [f"127.0.0.1:{s.port}" for s in self.servers]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        for s in self.servers:
            wait_ready(s.port, cluster=True)

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    def url(self, prefix: str | None = None) -> str:
        return f"redis+cluster://127.0.0.1:{self.servers[0].port}?prefix={prefix or unique_prefix()}"

    def stop(self) -> None:
        for s in self.servers:
            s.stop()
