"""`mirror`: copies reach the mirror with their body; the sampled share is exact; a
dead mirror and a stalled one never touch the primary (copies bounded, the rest
dropped and counted); bodies over the limit are not mirrored."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import build_runtime
from proxy.config import parse_config
from proxy.server import Edge
from tests.helpers import dead_port, eventually, free_port, port_of, start_backend


class MirrorTarget:
    def __init__(self, stall: bool = False) -> None:
        self.seen: list[tuple[str, str, bytes, str]] = []
        self.stall = stall
        self.release = asyncio.Event()
        self.port = 0
        self.server: Any = None
        self.listener: Any = None

    async def handler(self, request: web.BaseRequest) -> web.StreamResponse:
        self.seen.append((request.method, request.raw_path, await request.read(),
                          request.headers.get("Host", "")))
        if self.stall:
            await self.release.wait()
        return web.Response(text="mirror says hi")

    async def __aenter__(self) -> MirrorTarget:
        self.server, self.listener = await start_backend(self.handler)
        self.port = port_of(self.listener)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        self.listener.close()
        await self.server.shutdown(0.1)


@pytest.fixture
async def backend() -> AsyncIterator[int]:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        return web.Response(text="primary")

    server, listener = await start_backend(handler)
    yield port_of(listener)
    listener.close()
    await server.shutdown(0.1)


async def edge_with(backend: int, options: str) -> Edge:
    text = f"""
[server]
listen = ["127.0.0.1:{free_port()}"]
access_log = "off"
[[plugins]]
name = "shadow"
use = "mirror"
[plugins.options]
{options}
[[routes]]
name = "web"
upstream = "app"
plugins = ["shadow"]
[upstreams.app]
backends = ["127.0.0.1:{backend}"]
"""
    edge = Edge(build_runtime(parse_config(tomllib.loads(text), "<test>"), "<test>"))
    await edge.start(admin=False)
    return edge


def mirrored(edge: Edge) -> dict[str, float]:
    edge.metrics.flush()
    found = {}
    for line in edge.metrics.exposition().decode().splitlines():
        if line.startswith("bascule_mirror_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            found[labels.split('result="')[1].split('"')[0]] = float(value)
    return found


async def send(edge: Edge, session: aiohttp.ClientSession, method: str = "GET",
               data: bytes = b"", path: str = "/p?q=1") -> str:
    async with session.request(method, f"http://127.0.0.1:{edge.ports[0]}{path}",
                               data=data) as resp:
        assert resp.status == 200
        return await resp.text()


async def test_copies_arrive_with_their_body_and_the_share_is_exact(backend: int) -> None:
    async with MirrorTarget() as target:
        edge = await edge_with(backend, f'url = "http://127.0.0.1:{target.port}"\n'
                                        "percent = 25\n")
        try:
            async with aiohttp.ClientSession() as session:
                for i in range(40):
                    assert await send(edge, session, "POST", b"body %d" % i) == "primary"

            async def all_copies() -> bool:
                return len(target.seen) == 10

            await eventually(all_copies, timeout=5)
            assert target.seen[0] == ("POST", "/p?q=1", b"body 3",
                                      f"127.0.0.1:{target.port}")
            assert mirrored(edge) == {"sent": 10.0}
        finally:
            await edge.drain(1.0)


async def test_a_dead_mirror_never_touches_the_primary(backend: int) -> None:
    edge = await edge_with(backend, f'url = "http://127.0.0.1:{dead_port()}"\n')
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(10):
                assert await send(edge, session) == "primary"

        async def counted() -> bool:
            return mirrored(edge).get("failed") == 10.0

        await eventually(counted, timeout=5)
    finally:
        await edge.drain(1.0)


async def test_a_stalled_mirror_fills_its_bound_and_the_rest_is_dropped(
        backend: int) -> None:
    async with MirrorTarget(stall=True) as target:
        edge = await edge_with(backend, f'url = "http://127.0.0.1:{target.port}"\n'
                                        'max_inflight = 2\ntimeout = "30s"\n')
        try:
            async with aiohttp.ClientSession() as session:
                # Every primary answer comes back while two copies hang at the mirror.
                for _ in range(20):
                    assert await asyncio.wait_for(send(edge, session), 5) == "primary"
            assert len(target.seen) == 2
            assert mirrored(edge) == {"dropped_busy": 18.0}
        finally:
            target.release.set()
            await edge.drain(1.0)


async def test_methods_and_body_limits(backend: int) -> None:
    async with MirrorTarget() as target:
        edge = await edge_with(backend, f'url = "http://127.0.0.1:{target.port}"\n'
                                        'methods = ["POST"]\nmax_body = "10"\n')
        try:
            async with aiohttp.ClientSession() as session:
                await send(edge, session, "GET")
                await send(edge, session, "POST", b"small")
                await send(edge, session, "POST", b"x" * 100)

            async def one() -> bool:
                return len(target.seen) == 1

            await eventually(one, timeout=5)
            assert target.seen[0][2] == b"small"
            assert mirrored(edge) == {"sent": 1.0, "dropped_body": 1.0}
        finally:
            await edge.drain(1.0)
