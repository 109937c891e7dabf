"""A free loopback port for the servers that tests, benchmarks and the demo start (redis-server, LiteLLM, fakes)."""

from __future__ import annotations

import random
import socket

__all__ = ["free_port"]


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1", *, cluster_bus: bool = False) -> int:
    """A port nobody listens on now (not reserved: a caller that loses the race retries with another).

    `cluster_bus`: port + 10000 (Redis Cluster's bus) is free too, and the port is at most 55535 as
    redis-server demands, taken below Linux's ephemeral range (32768+) so outgoing connections do not grab it
    meanwhile.
    """
    if not cluster_bus:
        with socket.socket() as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(12_000, 22_767)
        if _bindable(host, port) and _bindable(host, port + 10_000):
            return port
    raise RuntimeError("no free port pair (p, p + 10000) for a Redis Cluster node")
