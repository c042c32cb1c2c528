"""WebSocket upgrades take the same path as other requests: hash key, max_inflight,
connect failures counted and retried, the backend in flight for the tunnel's life."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from proxy.server import Edge
from tests.helpers import (
    dead_port,
    edge_url,
    eventually,
    port_of,
    proxy_config,
    start_backend,
    start_proxy,
)


class NamedBackends:
    """WebSocket backends that greet with their name."""

    def __init__(self) -> None:
        self.listeners: list[asyncio.Server] = []

    async def start(self, name: str) -> int:
        async def greet(request: web.BaseRequest) -> web.StreamResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(request)  # type: ignore[arg-type]
            await ws.send_str(name)
            async for _ in ws:
                pass
            return ws

        _, listener = await start_backend(greet)
        self.listeners.append(listener)
        return port_of(listener)

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()


@pytest.fixture
async def backends() -> AsyncIterator[NamedBackends]:
    b = NamedBackends()
    yield b
    b.close()


async def greeting(session: aiohttp.ClientSession, edge: Edge, **headers: str) -> str:
    async with session.ws_connect(edge_url(edge) + "/ws", headers=headers) as ws:
        return str((await ws.receive(timeout=5)).data)


async def test_consistent_hash_keeps_a_user_on_one_backend(backends: NamedBackends) -> None:
    ports = [await backends.start(f"b{i}") for i in range(3)]
    edge = await start_proxy(proxy_config(
        {"app": [f"127.0.0.1:{p}" for p in ports]},
        upstream_extra='strategy = "consistent_hash"\n'
                       'strategy_options = { hash_on = "header:X-User" }'))
    try:
        async with aiohttp.ClientSession() as session:
            chosen: dict[str, set[str]] = {}
            for user in range(30):
                for _ in range(3):
                    name = await greeting(session, edge, **{"X-User": f"user{user}"})
                    chosen.setdefault(f"user{user}", set()).add(name)
        assert all(len(names) == 1 for names in chosen.values()), chosen
        assert len(set().union(*chosen.values())) > 1
    finally:
        await edge.drain(1.0)


async def test_max_inflight_counts_open_tunnels(backends: NamedBackends) -> None:
    port = await backends.start("only")
    edge = await start_proxy(proxy_config({"app": [f"127.0.0.1:{port}"]},
                                          upstream_extra="max_inflight = 1"))
    try:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(edge_url(edge) + "/ws") as first:
                assert (await first.receive(timeout=5)).data == "only"
                assert edge.runtime.upstreams["app"].balancer.inflight == 1
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await session.ws_connect(edge_url(edge) + "/ws")
                assert refused.value.status == 503

            async def released() -> bool:
                return edge.runtime.upstreams["app"].balancer.inflight == 0

            await eventually(released)
            assert await greeting(session, edge) == "only"
    finally:
        await edge.drain(1.0)


async def test_a_dead_backend_is_counted_and_skipped(backends: NamedBackends) -> None:
    good = await backends.start("good")
    dead = dead_port()
    edge = await start_proxy(proxy_config({"app": [f"127.0.0.1:{dead}",
                                                   f"127.0.0.1:{good}"]}))
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(4):  # round robin lands on the dead one every other time
                assert await greeting(session, edge) == "good"
        edge.metrics.flush()
        errors = {s.labels["backend"]: s.value
                  for family in edge.metrics.connect_errors.collect()
                  for s in family.samples if s.name.endswith("_total")}
        assert errors.get(f"127.0.0.1:{dead}", 0) >= 1
        dead_backend = next(b for b in edge.runtime.upstreams["app"].balancer.backends
                            if b.port == dead)
        assert dead_backend.inflight == 0
    finally:
        await edge.drain(1.0)


async def test_upgrades_go_through_the_route_plugins(backends: NamedBackends) -> None:
    """A plugin that refuses a path refuses its upgrades too, and a plugin's header
    reaches the backend's handshake (the same pipeline as any request)."""
    seen: list[str] = []

    async def record(request: web.BaseRequest) -> web.StreamResponse:
        seen.append(request.headers.get("X-Chain", ""))
        ws = web.WebSocketResponse()
        await ws.prepare(request)  # type: ignore[arg-type]
        await ws.send_str("tagged:" + request.headers.get("X-Chain", ""))
        async for _ in ws:
            pass
        return ws

    _, listener = await start_backend(record)
    backends.listeners.append(listener)
    routes = """
[[plugins]]
name = "deny"
use = "tests.example_plugins:Deny"

[[plugins]]
name = "tag"
use = "tests.example_plugins:Tag"
options = { label = "edge" }

[[routes]]
upstream = "app"
plugins = ["deny", "tag"]
"""
    edge = await start_proxy(proxy_config({"app": [f"127.0.0.1:{port_of(listener)}"]},
                                          routes=routes))
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(edge_url(edge) + "/private/ws")
            assert refused.value.status == 403
            assert seen == []  # never reached the backend
            async with session.ws_connect(edge_url(edge) + "/ws") as ws:
                assert (await ws.receive(timeout=5)).data == "tagged:edge"
        assert seen == ["edge"]

        async def released() -> bool:  # once the edge has seen the close
            return edge.runtime.upstreams["app"].balancer.inflight == 0

        await eventually(released)
    finally:
        await edge.drain(1.0)
