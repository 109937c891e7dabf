"""`rediss://` against a real redis-server with TLS on loopback (a certificate made here by openssl):
certificates are verified by default, a private CA is given in the URL, and bad TLS settings are
typed errors."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cycles_ledger import ConfigError, StoreUnavailableError, open_ledger
from cycles_ledger.ports import free_port
from cycles_ledger.redis_server import RedisServer

pytestmark = pytest.mark.redis


class TlsServer:
    def __init__(self, workdir: Path) -> None:
        self.cert, self.key = workdir / "cert.pem", workdir / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(self.key), "-out", str(self.cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        self.tls_port = free_port()
        tls = ["--tls-port", str(self.tls_port), "--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key)]
        tls += ["--tls-ca-cert-file", str(self.cert), "--tls-auth-clients", "no"]
        self.server = RedisServer(extra=tls)  # ready once its plain port answers; TLS listens beside it

    def url(self, **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"prefix": "tls", **params}.items())
        return f"rediss://127.0.0.1:{self.tls_port}/0?{query}"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    if shutil.which("redis-server") is None or shutil.which("openssl") is None:
        pytest.skip("needs redis-server and openssl")
    server = TlsServer(tmp_path_factory.mktemp("tls"))
    yield server
    server.server.stop()


async def test_a_private_ca_in_the_url_carries_the_ledger_over_tls(tls_server: TlsServer) -> None:
    async with open_ledger(tls_server.url(ssl_ca_certs=str(tls_server.cert))) as ledger:
        await ledger.set_budget("tenant:tls", "1usd")
        r = await ledger.reserve({"tenant": "tls"}, {"kind": "tool.x", "name": "y"}, "0.4usd")
        await ledger.commit(r.reservation_id or "", "0.25usd")
        balance = await ledger.balance("tenant:tls")
        assert (balance.spent, balance.reserved) == (25_000_000, 0)
        assert await ledger.verify() == []
    # It really went through this server: the budget is there on its plain port too.
    assert tls_server.server.client().hget("tls:{tenant:tls}:b", "tenant:tls|USD_MICROCENTS")


async def test_an_unknown_certificate_is_refused_by_default(tls_server: TlsServer) -> None:
    async with open_ledger(tls_server.url(timeout="1")) as ledger:
        with pytest.raises(StoreUnavailableError, match=r"(?i)certificate"):
            await ledger.balances()


async def test_verification_can_be_turned_off_explicitly(tls_server: TlsServer) -> None:
    async with open_ledger(tls_server.url(ssl_cert_reqs="none", prefix="tls-none")) as ledger:
        await ledger.set_budget("tenant:n", "2usd")
        assert (await ledger.balance("tenant:n")).remaining == 200_000_000


def test_bad_tls_settings_are_config_errors(tls_server: TlsServer, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ssl_cert_reqs"):
        open_ledger(tls_server.url(ssl_cert_reqs="sometimes"))
    with pytest.raises(ConfigError, match="does not exist"):
        open_ledger(tls_server.url(ssl_ca_certs=str(tmp_path / "missing.pem")))
    with pytest.raises(ConfigError, match="TLS only"):
        open_ledger(f"redis://127.0.0.1:{tls_server.server.port}/0?ssl_ca_certs={tls_server.cert}")
