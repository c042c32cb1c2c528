"""The plugin chain (DESIGN.md §2): order, short-circuits, streaming bodies through a
plugin, request changes reaching the backend, config errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from proxy.errors import ConfigError
from proxy.server import Edge
from tests.example_plugins import Count
from tests.helpers import edge_url, port_of, proxy_config, raw_request, start_backend, start_proxy

BIG = bytes(range(256)) * 4096  # 1 MiB


async def backend(request: web.BaseRequest) -> web.StreamResponse:
    if request.path == "/big":
        resp = web.StreamResponse()
        resp.content_length = len(BIG)
        await resp.prepare(request)
        for i in range(0, len(BIG), 65536):
            await resp.write(BIG[i:i + 65536])
            await asyncio.sleep(0)
        return resp
    return web.json_response({"chain": request.headers.getall("X-Chain", []),
                              "path": request.raw_path, "method": request.method,
                              "override": request.headers.get("X-HTTP-Method-Override")})


PLUGINS = """
[[plugins]]
name = "outer"
use = "tests.example_plugins:Tag"
options = { label = "outer" }

[[plugins]]
name = "inner"
use = "tests.example_plugins:Tag"
options = { label = "inner" }

[[plugins]]
name = "deny"
use = "tests.example_plugins:Deny"

[[plugins]]
name = "count"
use = "tests.example_plugins:Count"

[[plugins]]
name = "override"
use = "tests.example_plugins:MethodOverride"
"""


@pytest.fixture
async def edge() -> AsyncIterator[Edge]:
    _, listener = await start_backend(backend)
    routes = PLUGINS + """
[[routes]]
path_prefix = "/plain"
upstream = "app"

[[routes]]
path_prefix = "/api"
upstream = "app"
plugins = ["override"]

[[routes]]
upstream = "app"
plugins = ["outer", "deny", "inner", "count"]
"""
    edge = await start_proxy(proxy_config({"app": [f"127.0.0.1:{port_of(listener)}"]},
                                          routes=routes))
    yield edge
    await edge.drain(1.0)
    listener.close()


async def test_order_and_request_changes(edge: Edge) -> None:
    async with aiohttp.ClientSession() as session, session.get(
            edge_url(edge) + "/x?q=1") as resp:
        seen = json.loads(await resp.read())
        # outermost first on the way in, last on the way out
        assert seen == {"chain": ["outer", "inner"], "path": "/x?q=1", "method": "GET",
                        "override": None}
        assert resp.headers.getall("X-Chain-Out") == ["inner", "outer"]
        assert resp.headers["Via"] == "1.1 bascule"


@pytest.mark.parametrize(("override", "status", "method"), [
    ("PUT", 200, "PUT"), ("DELETE", 200, "DELETE"),
    ("HEAD", 500, None),  # the client's framing depends on HEAD: refused
    ("BAD METHOD", 500, None),
])
async def test_a_plugin_changes_the_method(edge: Edge, override: str, status: int,
                                           method: str | None) -> None:
    async with aiohttp.ClientSession() as session, session.post(
            edge_url(edge) + "/api/x", data=b"body",
            headers={"X-HTTP-Method-Override": override}) as resp:
        assert resp.status == status
        if method is not None:
            seen = json.loads(await resp.read())
            assert (seen["method"], seen["override"]) == (method, None)


async def test_short_circuit_never_reaches_the_backend(edge: Edge) -> None:
    async with aiohttp.ClientSession() as session, session.get(
            edge_url(edge) + "/private/file") as resp:
        assert resp.status == 403 and await resp.text() == "denied\n"
        assert resp.headers.getall("X-Chain-Out") == ["outer"]  # inner never ran


async def test_streamed_body_through_a_plugin(edge: Edge) -> None:
    Count.seen.clear()
    async with aiohttp.ClientSession() as session, session.get(
            edge_url(edge) + "/big") as resp:
        assert resp.headers["Content-Length"] == str(len(BIG))
        assert hashlib.sha256(await resp.read()).digest() == hashlib.sha256(BIG).digest()
    assert Count.seen == [len(BIG)]
    pool = next(iter(edge.runtime.upstreams["app"].pools.values()))
    assert pool.idle_count == 1  # body consumed: the connection went back to the pool
    assert edge.runtime.upstreams["app"].balancer.inflight == 0


async def test_head_through_the_chain(edge: Edge) -> None:
    raw = await raw_request(edge.ports[0], b"HEAD /big HTTP/1.1\r\nHost: t\r\n"
                            b"Connection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: 1048576\r\n" in raw and raw.endswith(b"\r\n\r\n")


async def test_routes_without_plugins_are_untouched(edge: Edge) -> None:
    async with aiohttp.ClientSession() as session, session.get(
            edge_url(edge) + "/plain") as resp:
        assert json.loads(await resp.read())["chain"] == []
        assert "X-Chain-Out" not in resp.headers


@pytest.mark.parametrize(("plugins", "route_plugins", "expected"), [
    ('[[plugins]]\nname = "a"\nuse = "no_such_plugin"', '["a"]',
     "<test>: plugins[0].use: unknown plugin 'no_such_plugin' (available: "),
    ('[[plugins]]\nname = "a"\nuse = "tests.example_plugins:Tag"\noptions = { label = 3 }',
     '["a"]', "<test>: plugins[0].options.label: must be a non-empty string"),
    ('[[plugins]]\nname = "a"\nuse = "tests.example_plugins:Deny"', '["b"]',
     "<test>: routes[0].plugins[0]: plugin 'b' is not defined in [[plugins]] (defined: a, cache)"),
])
async def test_plugin_config_errors(plugins: str, route_plugins: str, expected: str) -> None:
    routes = f'{plugins}\n[[routes]]\nupstream = "app"\nplugins = {route_plugins}\n'
    with pytest.raises(ConfigError) as err:
        await start_proxy(proxy_config({"app": ["127.0.0.1:1"]}, routes=routes))
    assert any(str(p).startswith(expected) for p in err.value.problems), err.value.problems




async def test_chains_are_composed_once_per_route(edge: Edge) -> None:
    """Each route's chain is composed when its runtime starts serving, not per
    request: the same handler serves every request of the route."""
    handlers = dict(edge.runtime.handlers)
    assert set(handlers) == {"routes[1]", "routes[2]"}  # the routes with plugins
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(edge_url(edge) + "/x") as resp:
                assert resp.status == 200
    assert all(edge.runtime.handlers[name] is handler for name, handler in handlers.items())
