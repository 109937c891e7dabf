"""Throwaway redis-server processes on loopback for tests, benchmarks and demos: one server, or a cluster.

Not used by the ledger itself; it needs `redis-server` (and `redis-cli` for a cluster) on PATH and the
`redis` extra. Each server gets a free port and its own directory; `kill()` is SIGKILL and `restart()`
comes back on the same port and directory, so an append-only file is replayed as after a crash.
Readiness is polled (PING, and `cluster_state:ok` for cluster nodes) against a deadline; nothing sleeps
a fixed time. `url()` hands out a fresh key prefix per call, so callers sharing one server never meet.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("cycles_ledger.redis_server needs the redis driver: pip install 'cycles-litellm[redis]'") from exc

from .ports import free_port

__all__ = [
    "AppendFsync",
    "RedisCluster",
    "RedisServer",
    "RedisTarget",
    "redis_available",
    "session_stem",
    "unique_prefix",
    "wait_ready",
    "with_prefix",
]

AppendFsync = Literal["always", "everysec", "no"]

# Every prefix this process hands out starts with this stem, so a session can wipe what it wrote on a
# server it did not start (`RedisTarget.wipe`).
_STEM = "t" + uuid.uuid4().hex[:6]


def redis_available() -> bool:
    """Whether redis-server and redis-cli are on PATH."""
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def session_stem() -> str:
    """The start of every prefix this process hands out (what `RedisTarget.wipe` deletes)."""
    return _STEM


def unique_prefix() -> str:
    """A key prefix nobody else uses: an empty namespace on a shared server."""
    return _STEM + uuid.uuid4().hex[:10]


def with_prefix(base: str, prefix: str | None = None, **params: object) -> str:
    """`base` with `prefix=` (fresh unless given) and any other store parameters added to its query."""
    query = "&".join(f"{k}={v}" for k, v in {"prefix": prefix or unique_prefix(), **params}.items())
    return f"{base}{'&' if '?' in base else '?'}{query}"


def _fail_fast() -> dict[str, Any]:
    # redis-py retries a refused connection 3 times with back-off (~4 s): callers want the error at once.
    return {"retry": Retry(NoBackoff(), 0), "socket_connect_timeout": 2}


def _client(target: int | str, **kwargs: Any) -> redis.Redis:
    """A sync client that fails fast (callers poll themselves)."""
    kwargs = {**_fail_fast(), "socket_timeout": 1, **kwargs}
    if isinstance(target, int):
        return redis.Redis(host="127.0.0.1", port=target, **kwargs)
    # Drop the query: store parameters (prefix, timeout, …) are not redis-py's.
    parts = urlsplit(target)
    url = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return redis.Redis.from_url(url, **kwargs)


def _cluster_state(client: redis.Redis) -> str:
    info = client.cluster("INFO")  # redis-py parses it into a dict; be lenient about that
    if isinstance(info, dict):
        return str(info.get("cluster_state", ""))
    text = info.decode() if isinstance(info, bytes) else str(info)
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("cluster_state:")), "")


def wait_ready(
    target: int | str,
    deadline_s: float = 10.0,
    *,
    cluster: bool = False,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll a loopback port or a `redis://` URL until PING answers (cluster nodes: and `cluster_state:ok`).

    With `proc`, a server that exits while we wait is reported at once instead of at the deadline.
    """
    end = time.monotonic() + deadline_s
    last = "no answer"
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"redis-server for {target} exited with code {proc.returncode}")
        try:
            with _client(target, decode_responses=True) as r:
                r.ping()
                if not cluster:
                    return
                last = f"cluster_state:{_cluster_state(r)}"
                if last == "cluster_state:ok":
                    return
        except (redis.RedisError, OSError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= end:
            raise RuntimeError(f"redis at {target} not ready after {deadline_s} s ({last})")
        time.sleep(0.01)


class RedisServer:
    """One redis-server on 127.0.0.1, started at construction.

    `appendonly=True` keeps an append-only file in `dir`; with `appendfsync="always"` every acknowledged
    write is on disk, so it survives `kill()` + `restart()`. `cluster=True` makes it a Redis Cluster node
    (its bus port, port + 10000, free too); `extra` is passed to redis-server as is.
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        appendfsync: AppendFsync = "everysec",
        cluster: bool = False,
        extra: Sequence[str] = (),
        deadline_s: float = 10.0,
    ) -> None:
        self.cluster = cluster
        self.dir = Path(tempfile.mkdtemp(prefix="cycles-redis-"))
        self.log = self.dir / "redis.log"
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.extra = list(extra)
        self.deadline_s = deadline_s
        self.proc: subprocess.Popen[bytes] | None = None
        # free_port() cannot reserve the port: if someone takes it before redis-server binds, take another.
        for attempt in range(3):
            self.port = free_port(cluster_bus=cluster)
            try:
                self.start()
                return
            except RuntimeError:
                self.kill()
                if attempt == 2:
                    shutil.rmtree(self.dir, ignore_errors=True)
                    raise

    @property
    def args(self) -> list[str]:
        return [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.log),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            *(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"] if self.cluster else []),
            *self.extra,
        ]

    def start(self) -> None:
        """Start the process on this server's port and directory (replaying its AOF, if any) and wait for PING."""
        if self.proc is not None:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            wait_ready(self.port, self.deadline_s, proc=self.proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; log tail:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def url(self, prefix: str | None = None, **params: object) -> str:
        """`redis://127.0.0.1:PORT/0?prefix=…` (a fresh prefix unless given) plus any store parameters."""
        return with_prefix(f"redis://127.0.0.1:{self.port}/0", prefix, **params)

    def client(self, **kwargs: Any) -> redis.Redis:
        """A sync redis-py client on db 0 that does not retry (`decode_responses=True` unless overridden)."""
        return redis.Redis(host="127.0.0.1", port=self.port, **{"decode_responses": True, **_fail_fast(), **kwargs})

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye; only what the AOF already holds survives."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        """SIGKILL if running, then start again on the same port and directory."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """Kill the process and delete its directory."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class RedisCluster:
    """`masters` redis-servers with `--cluster-enabled yes`, joined by `redis-cli --cluster create`, no replicas.

    Ready when every node reports `cluster_state:ok`.
    """

    def __init__(self, masters: int = 3, deadline_s: float = 30.0) -> None:
        self.servers: list[RedisServer] = []
        try:
            for _ in range(masters):
                self.servers.append(RedisServer(cluster=True))
            addrs = [f"127.0.0.1:{s.port}" for s in self.servers]
            created = subprocess.run(
                ["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=deadline_s,
            )
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}{created.stderr}")
            end = time.monotonic() + deadline_s
            for s in self.servers:
                wait_ready(s.port, max(end - time.monotonic(), 0.1), cluster=True, proc=s.proc)
        except BaseException:
            self.stop()
            raise

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    def url(self, prefix: str | None = None, **params: object) -> str:
        """`redis+cluster://127.0.0.1:PORT?prefix=…` (the first node; clients discover the others)."""
        return with_prefix(f"redis+cluster://127.0.0.1:{self.servers[0].port}", prefix, **params)

    def client(self, **kwargs: Any) -> redis.RedisCluster:
        """A sync cluster-aware redis-py client (`decode_responses=True` unless overridden)."""
        return redis.RedisCluster(host="127.0.0.1", port=self.servers[0].port, **{"decode_responses": True, **kwargs})

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def __enter__(self) -> RedisCluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class RedisTarget:
    """A server the tests share (started here or given by URL): `url()` is a fresh, empty namespace on it."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        # Any `prefix` in the given URL is replaced per test; other store parameters are kept.
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "prefix"])
        self.base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") or "", query, ""))
        self.port = parts.port or 6379

    def url(self, prefix: str | None = None, **params: object) -> str:
        return with_prefix(self.base, prefix, **params)

    def client(self, **kwargs: Any) -> redis.Redis:
        """A sync client for the same host, port, db and password, no retries (`decode_responses=True`)."""
        return _client(self.base, **{"decode_responses": True, "socket_timeout": None, **kwargs})

    def wipe(self) -> int:
        """Delete every key this process's prefixes created; returns how many."""
        deleted = 0
        with self.client() as r:
            batch: list[str] = []
            for key in r.scan_iter(match=f"{_STEM}*", count=1000):
                batch.append(key)
                if len(batch) == 500:
                    deleted += int(r.unlink(*batch))
                    batch.clear()
            if batch:
                deleted += int(r.unlink(*batch))
        return deleted
