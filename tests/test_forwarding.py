"""End to end through an in-process Bascule edge to real aiohttp backends."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from proxy.server import Edge
from tests.helpers import (
    edge_url,
    port_of,
    proxy_config,
    raw_request,
    start_backend,
    start_proxy,
)


async def echo(request: web.BaseRequest) -> web.StreamResponse:
    """Answers with what it received, as JSON (headers in order, raw)."""
    body = await request.read()
    port = request.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
    return web.json_response({
        "backend": port, "method": request.method, "target": request.raw_path,
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        "body_sha256": hashlib.sha256(body).hexdigest(), "body_len": len(body),
    }, headers={"Connection": "keep-alive, X-Backend-Secret", "X-Backend-Secret": "s",
                "Keep-Alive": "timeout=5"})


@pytest.fixture
async def echo_backends() -> AsyncIterator[list[int]]:
    servers = [await start_backend(echo) for _ in range(3)]
    yield [port_of(listener) for _, listener in servers]
    for _, listener in servers:
        listener.close()


@pytest.fixture
async def proxy(echo_backends: list[int]) -> AsyncIterator[Edge]:
    routes = """
[[routes]]
upstream = "app"

[[routes]]
host = "api.example.com"
upstream = "api"

[[routes]]
host = "*.example.com"
path_prefix = "/wild"
upstream = "wild"

[[routes]]
path_prefix = "/strip/me"
strip_prefix = true
upstream = "api"

[[routes]]
path_prefix = "/nohost"
pass_host = false
upstream = "api"
"""
    a, b, c = echo_backends
    edge = await start_proxy(proxy_config(
        {"app": [f"127.0.0.1:{a}", f"127.0.0.1:{b}", f"127.0.0.1:{c}"],
         "api": [f"127.0.0.1:{b}"], "wild": [f"127.0.0.1:{c}"]},
        routes=routes, server='trusted_proxies = ["10.0.0.0/8"]'))
    yield edge
    await edge.drain(1.0)


async def get_json(client: aiohttp.ClientSession, url: str, **kw: object) -> dict:  # type: ignore[type-arg]
    async with client.get(url, **kw) as resp:  # type: ignore[arg-type]
        assert resp.status == 200, await resp.text()
        return json.loads(await resp.read())


def header(seen: dict, name: str) -> list[str]:  # type: ignore[type-arg]
    return [v for k, v in seen["headers"] if k.lower() == name.lower()]


async def test_round_robin_over_three_backends(proxy: Edge, echo_backends: list[int],
                                               client: aiohttp.ClientSession) -> None:
    seen = [(await get_json(client, edge_url(proxy) + "/x"))["backend"] for _ in range(6)]
    assert seen == echo_backends * 2


async def test_host_wildcard_prefix_and_strip(proxy: Edge, echo_backends: list[int],
                                              client: aiohttp.ClientSession) -> None:
    a, b, c = echo_backends
    url = edge_url(proxy)
    api = await get_json(client, url + "/x", headers={"Host": "api.example.com"})
    assert api["backend"] == b
    wild = await get_json(client, url + "/wild/1", headers={"Host": "shop.example.com"})
    assert wild["backend"] == c
    # wildcard host matched but its only prefix did not: falls through to the catch-all
    other = await get_json(client, url + "/other", headers={"Host": "shop.example.com"})
    assert other["backend"] in (a, b, c)
    stripped = await get_json(client, url + "/strip/me/deeper/path?q=1")
    assert stripped["backend"] == b and stripped["target"] == "/deeper/path?q=1"
    root = await get_json(client, url + "/strip/me")
    assert root["target"] == "/"


async def test_no_route_is_404(echo_backends: list[int], client: aiohttp.ClientSession) -> None:
    edge = await start_proxy(proxy_config(
        {"app": [f"127.0.0.1:{echo_backends[0]}"]},
        routes='[[routes]]\nhost = "only.test"\nupstream = "app"'))
    try:
        async with client.get(edge_url(edge) + "/") as resp:
            assert resp.status == 404
            assert await resp.text() == "no route for this request\n"
    finally:
        await edge.drain(1.0)


async def test_pass_host(proxy: Edge, echo_backends: list[int],
                         client: aiohttp.ClientSession) -> None:
    url = edge_url(proxy)
    kept = await get_json(client, url + "/x", headers={"Host": "public.test"})
    assert header(kept, "Host") == ["public.test"]
    rewritten = await get_json(client, url + "/nohost", headers={"Host": "public.test"})
    assert header(rewritten, "Host") == [f"127.0.0.1:{echo_backends[1]}"]
    assert header(rewritten, "X-Forwarded-Host") == ["public.test"]


async def test_request_header_rewriting(proxy: Edge, client: aiohttp.ClientSession) -> None:
    seen = await get_json(client, edge_url(proxy) + "/h", headers={
        "Host": "public.test",
        "Connection": "keep-alive, X-Forwarded-For, X-Drop-Me",
        "X-Drop-Me": "1", "X-Keep-Me": "2", "Keep-Alive": "timeout=1", "TE": "trailers",
        "Proxy-Authorization": "Basic eA==", "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Proto": "https",
    })
    names = {k.lower() for k, _ in seen["headers"]}
    assert "x-drop-me" not in names and "keep-alive" not in names and "te" not in names
    assert "proxy-authorization" not in names and "connection" not in names
    assert header(seen, "X-Keep-Me") == ["2"]
    # the client is not a trusted proxy: its forwarding fields are replaced, and
    # "Connection: X-Forwarded-For" cannot remove the one Bascule adds
    assert header(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert header(seen, "X-Forwarded-Proto") == ["http"]
    assert header(seen, "X-Forwarded-Host") == ["public.test"]
    assert header(seen, "Via") == ["1.1 bascule"]


async def test_response_header_rewriting(proxy: Edge, client: aiohttp.ClientSession) -> None:
    async with client.get(edge_url(proxy) + "/") as resp:
        assert resp.status == 200
        assert "X-Backend-Secret" not in resp.headers
        assert "Keep-Alive" not in resp.headers
        assert resp.headers["Via"] == "1.1 bascule"
        assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
        assert "Date" in resp.headers


async def test_path_and_query_are_byte_exact(proxy: Edge) -> None:
    target = b"/a/../b/%2e%2e/c%2Fd;p?x=%41&y=a+b&&z=%zz"
    raw = await raw_request(proxy.ports[0],
                            b"GET " + target + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert body["target"].encode() == target


async def test_absolute_form_target(proxy: Edge, echo_backends: list[int]) -> None:
    raw = await raw_request(proxy.ports[0], b"GET http://api.example.com/p?q=1 HTTP/1.1\r\n"
                            b"Host: ignored.test\r\nConnection: close\r\n\r\n")
    body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert body["target"] == "/p?q=1" and body["backend"] == echo_backends[1]


async def test_post_body_with_length_and_chunked(proxy: Edge,
                                                 client: aiohttp.ClientSession) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    async with client.post(edge_url(proxy) + "/p", data=data) as resp:
        seen = json.loads(await resp.read())
    assert seen["body_sha256"] == hashlib.sha256(data).hexdigest()
    assert header(seen, "Content-Length") == [str(len(data))]

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(16):
            yield data[i * 65536:(i + 1) * 65536]

    async with client.post(edge_url(proxy) + "/p", data=chunks()) as resp:
        seen = json.loads(await resp.read())
    assert seen["body_sha256"] == hashlib.sha256(data).hexdigest()
    assert header(seen, "Transfer-Encoding") == ["chunked"]
    assert header(seen, "Content-Length") == []


async def test_head_204_304(client: aiohttp.ClientSession) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/204":
            return web.Response(status=204)
        if request.path == "/304":
            return web.Response(status=304, headers={"ETag": '"x"'})
        return web.Response(body=b"x" * 100, content_type="text/plain")

    _, listener = await start_backend(handler)
    edge = await start_proxy(proxy_config({"app": [f"127.0.0.1:{port_of(listener)}"]}))
    try:
        raw = await raw_request(edge.ports[0], b"HEAD /head HTTP/1.1\r\nHost: t\r\n\r\n"
                                b"GET /204 HTTP/1.1\r\nHost: t\r\n\r\n"
                                b"GET /304 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        responses = raw.split(b"HTTP/1.1 ")[1:]
        assert [r[:3] for r in responses] == [b"200", b"204", b"304"]
        assert b"Content-Length: 100\r\n" in responses[0]
        assert responses[0].endswith(b"\r\n\r\n")  # no body after HEAD
        assert b"Content-Length" not in responses[1] and responses[1].endswith(b"\r\n\r\n")
        assert b'ETag: "x"' in responses[2] and responses[2].endswith(b"\r\n\r\n")
    finally:
        await edge.drain(1.0)
        listener.close()


async def test_expect_100_continue(proxy: Edge) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports[0])
    writer.write(b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                 b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    rest = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert rest.startswith(b"HTTP/1.1 200")
    seen = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert seen["body_len"] == 5 and header(seen, "Expect") == []


async def test_expect_100_continue_over_limit_gets_413_without_continue() -> None:
    edge = await start_proxy(proxy_config({"app": ["127.0.0.1:1"]},
                                          server='max_body_size = "10"'))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.ports[0])
        writer.write(b"POST / HTTP/1.1\r\nHost: t\r\n"
                     b"Content-Length: 11\r\nExpect: 100-continue\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        assert head.startswith(b"HTTP/1.1 413 ")
        assert b"Connection: close" in head
    finally:
        await edge.drain(1.0)


async def test_sse_first_event_arrives_before_stream_ends(
        client: aiohttp.ClientSession) -> None:
    release = asyncio.Event()

    async def sse(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await release.wait()
        await resp.write(b"data: last\n\n")
        await resp.write_eof()
        return resp

    _, listener = await start_backend(sse)
    edge = await start_proxy(proxy_config({"app": [f"127.0.0.1:{port_of(listener)}"]}))
    try:
        async with client.get(edge_url(edge) + "/events") as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
            assert first == b"data: first\n\n"
            release.set()
            assert await resp.content.read() == b"data: last\n\n"
    finally:
        await edge.drain(1.0)
        listener.close()


async def test_websocket_echo(client: aiohttp.ClientSession) -> None:
    async def ws_echo(request: web.BaseRequest) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=["chat"])
        await ws.prepare(request)  # type: ignore[arg-type]
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    _, listener = await start_backend(ws_echo)
    edge = await start_proxy(proxy_config({"app": [f"127.0.0.1:{port_of(listener)}"]}))
    try:
        async with client.ws_connect(edge_url(edge) + "/ws", protocols=["chat"]) as ws:
            assert ws.protocol == "chat"
            await ws.send_str("hi")
            assert (await ws.receive(timeout=5)).data == "echo:hi"
            await ws.send_bytes(b"abc")
            assert (await ws.receive(timeout=5)).data == b"cba"
    finally:
        await edge.drain(1.0)
        listener.close()


async def test_websocket_refused_on_route_without_it(client: aiohttp.ClientSession) -> None:
    async def plain(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(text="plain")

    _, listener = await start_backend(plain)
    edge = await start_proxy(proxy_config(
        {"app": [f"127.0.0.1:{port_of(listener)}"]},
        routes='[[routes]]\nupstream = "app"\nwebsocket = false'))
    try:
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await client.ws_connect(edge_url(edge) + "/ws")
    finally:
        await edge.drain(1.0)
        listener.close()


async def test_keepalive_connections_are_reused(client: aiohttp.ClientSession) -> None:
    peers: set[tuple[str, int]] = set()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        peers.add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        return web.Response(text="ok")

    _, listener = await start_backend(handler)
    edge = await start_proxy(proxy_config({"app": [f"127.0.0.1:{port_of(listener)}"]}))
    try:
        for _ in range(20):
            async with client.get(edge_url(edge) + "/") as resp:
                assert await resp.text() == "ok"
        assert len(peers) == 1
    finally:
        await edge.drain(1.0)
        listener.close()
