"""HTTPS to backends: verified against a private CA with SNI and the name checked,
an untrusted certificate refused with a clear log line, mTLS, HTTPS health checks,
verification off logged, and TLS switched on per Consul instance."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.server import Edge
from tests.consul_emulator import ConsulEmulator
from tests.helpers import eventually, free_port, start_proxy_with_admin
from tests.tls.pki import Pki


class HttpsBackend:
    """An aiohttp backend behind TLS; notes each request's client certificate."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.port = free_port()
        self.health = 200
        self.probes = 0
        self.peers: list[Any] = []
        self.runner: web.AppRunner | None = None

    async def handler(self, request: web.Request) -> web.StreamResponse:
        ssl_object = request.transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
        self.peers.append(ssl_object.getpeercert() if ssl_object else None)
        if request.path == "/health":
            self.probes += 1
            return web.Response(status=self.health)
        return web.Response(text=f"secure {request.headers.get('Host')}")

    async def __aenter__(self) -> HttpsBackend:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handler)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port,
                          ssl_context=self.context).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


async def edge_to(port: int, tls: str, extra: str = "") -> Edge:
    return await start_proxy_with_admin(
        f'[[routes]]\nupstream = "app"\n[upstreams.app]\n'
        f'backends = ["127.0.0.1:{port}"]\ntls = {{ {tls} }}\nretry = {{ attempts = 1 }}\n'
        f"{extra}\n")


async def get(edge: Edge) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{edge.ports[0]}/x", headers={"Host": "site.test"}) as resp:
        return resp.status, await resp.text()


async def test_https_backend_verified_by_name_with_connections_reused(pki: Pki) -> None:
    async with HttpsBackend(pki.server_context("backend.internal")) as backend:
        edge = await edge_to(backend.port, f'ca_file = "{pki.ca_file}", '
                                           'server_name = "backend.internal"')
        try:
            for _ in range(3):
                assert await get(edge) == (200, "secure site.test")
            pool = edge.runtime.upstreams["app"].pools[f"127.0.0.1:{backend.port}"]
            assert pool.tls is not None and pool.idle_count == 1  # one, kept alive
        finally:
            await edge.drain(1.0)


async def test_an_untrusted_backend_certificate_is_a_502_with_a_clear_log_line(
        pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async with HttpsBackend(pki.server_context("backend.internal")) as backend:
        # System CAs do not know our private CA; and a wrong name fails too.
        for tls, why in [("", "unable to get local issuer certificate"),
                         (f'ca_file = "{pki.ca_file}", server_name = "other.internal"',
                          "Hostname mismatch")]:
            edge = await edge_to(backend.port, tls)
            try:
                caplog.clear()
                with caplog.at_level(logging.WARNING, logger="bascule"):
                    status, _ = await get(edge)
                assert status == 502
                lines = [r.getMessage() for r in caplog.records]
                assert any("TLS certificate verification failed" in line and why in line
                           for line in lines), lines
            finally:
                await edge.drain(1.0)


async def test_mtls_to_a_backend_that_requires_a_client_certificate(pki: Pki) -> None:
    client_cert, client_key = pki.issue("bascule.internal", stem="client")
    context = pki.server_context("backend.internal", require_client_cert=True)
    async with HttpsBackend(context) as backend:
        without = await edge_to(backend.port, f'ca_file = "{pki.ca_file}", '
                                              'server_name = "backend.internal"')
        try:
            assert (await get(without))[0] == 502
        finally:
            await without.drain(1.0)
        edge = await edge_to(backend.port, f'ca_file = "{pki.ca_file}", '
                                           f'server_name = "backend.internal", '
                                           f'cert = "{client_cert}", key = "{client_key}"')
        try:
            assert await get(edge) == (200, "secure site.test")
            peer = backend.peers[-1]
            assert ("DNS", "bascule.internal") in peer["subjectAltName"]
        finally:
            await edge.drain(1.0)


async def test_health_checks_speak_https_with_the_same_settings(pki: Pki) -> None:
    async with HttpsBackend(pki.server_context("backend.internal")) as backend:
        edge = await edge_to(
            backend.port, f'ca_file = "{pki.ca_file}", server_name = "backend.internal"',
            '[upstreams.app.health]\npath = "/health"\ninterval = "100ms"\n'
            'jitter = "10ms"\nfall = 2\nrise = 1\n')
        try:
            backend.health = 503

            async def down() -> bool:
                return not edge.runtime.upstreams["app"].balancer.backends[0].healthy

            await eventually(down, timeout=5)
            assert backend.probes >= 2  # they got through TLS to answer
            backend.health = 200

            async def up() -> bool:
                return edge.runtime.upstreams["app"].balancer.backends[0].healthy

            await eventually(up, timeout=5)
        finally:
            await edge.drain(1.0)


async def test_verification_off_works_and_is_logged(
        pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async with HttpsBackend(pki.server_context("backend.internal")) as backend:
        with caplog.at_level(logging.WARNING, logger="bascule"):
            edge = await edge_to(backend.port, "verify = false")
        try:
            assert await get(edge) == (200, "secure site.test")
            assert any("TLS verification of its backends is OFF" in r.getMessage()
                       for r in caplog.records)
        finally:
            await edge.drain(1.0)


@pytest.fixture
async def consul() -> AsyncIterator[ConsulEmulator]:
    emulator = ConsulEmulator()
    await emulator.start()
    yield emulator
    await emulator.stop()


async def test_a_consul_instance_tagged_proto_https_is_spoken_to_over_tls(
        pki: Pki, consul: ConsulEmulator) -> None:
    async with HttpsBackend(pki.server_context("127.0.0.1")) as backend:
        await consul.add("web", "web-1", backend.port, tags=["proto=https"])
        edge = await start_proxy_with_admin(f"""
[consul]
address = "{consul.address}"
startup_wait = "3s"
[[routes]]
upstream = "web"
[upstreams.web]
consul = {{ service = "web" }}
tls = {{ ca_file = "{pki.ca_file}" }}
""")
        try:
            assert await get(edge) == (200, "secure site.test")
        finally:
            await edge.drain(1.0)
