"""Failures are fast and clear: dead, slow and broken backends."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from tests.helpers import (
    dead_port,
    edge_url,
    port_of,
    proxy_config,
    raw_request,
    start_backend,
    start_proxy,
)


async def ok(request: web.BaseRequest) -> web.StreamResponse:
    await request.read()
    return web.Response(text=f"ok {request.method}")


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_refused_backend_is_skipped_for_any_method(
        method: str, client: aiohttp.ClientSession) -> None:
    _, listener = await start_backend(ok)
    dead = dead_port()
    edge = await start_proxy(proxy_config({"app": [f"127.0.0.1:{dead}",
                                                   f"127.0.0.1:{port_of(listener)}"]}))
    try:
        for _ in range(4):  # round robin lands on the dead one every other time
            async with client.request(method, edge_url(edge) + "/", data=b"x" * 10) as resp:
                assert resp.status == 200
                assert await resp.text() == f"ok {method}"
    finally:
        await edge.drain(1.0)
        listener.close()


async def test_all_backends_refusing_is_502(client: aiohttp.ClientSession) -> None:
    edge = await start_proxy(proxy_config({"app": [f"127.0.0.1:{dead_port()}",
                                                   f"127.0.0.1:{dead_port()}"]}))
    try:
        async with client.get(edge_url(edge) + "/") as resp:
            assert resp.status == 502
            assert await resp.text() == "could not connect to any backend\n"
    finally:
        await edge.drain(1.0)


async def test_no_healthy_backend_is_503(client: aiohttp.ClientSession) -> None:
    edge = await start_proxy(proxy_config({"app": ["127.0.0.1:1"]}))
    try:
        for backend in edge.runtime.upstreams["app"].balancer.backends:
            backend.healthy = False
        async with client.get(edge_url(edge) + "/") as resp:
            assert resp.status == 503
            assert await resp.text() == "no backend available\n"
    finally:
        await edge.drain(1.0)


async def test_response_header_timeout_is_504(client: aiohttp.ClientSession) -> None:
    async def slow(request: web.BaseRequest) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.Response(text="late")

    _, listener = await start_backend(slow)
    edge = await start_proxy(proxy_config(
        {"app": [f"127.0.0.1:{port_of(listener)}"]},
        upstream_extra='timeouts = { response_header = "200ms" }'))
    try:
        # The backend would answer 200 after 5 s: a 504 is the deadline at work.
        async with client.get(edge_url(edge) + "/") as resp:
            assert resp.status == 504
            assert await resp.text() == "backend timed out\n"
    finally:
        await edge.drain(1.0)
        listener.close()


@pytest.mark.parametrize("chunked", [False, True])
async def test_backend_dying_mid_response_cuts_the_client(
        chunked: bool, client: aiohttp.ClientSession) -> None:
    async def dies(request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/fine":
            return web.Response(text="fine")
        resp = web.StreamResponse()
        if not chunked:
            resp.content_length = 1_000_000
        await resp.prepare(request)
        await resp.write(b"x" * 1000)
        await asyncio.sleep(0.05)
        request.transport.abort()  # type: ignore[union-attr]
        return resp

    _, listener = await start_backend(dies)
    edge = await start_proxy(proxy_config({"app": [f"127.0.0.1:{port_of(listener)}"]}))
    try:
        # Cut, not left hanging: the guard fails the test if the client waits on.
        with pytest.raises(aiohttp.ClientPayloadError):
            async with asyncio.timeout(10), client.get(edge_url(edge) + "/die") as resp:
                assert resp.status == 200
                await resp.read()
        pool = next(iter(edge.runtime.upstreams["app"].pools.values()))
        assert pool.idle_count == 0  # the broken connection was not pooled
        async with client.get(edge_url(edge) + "/fine") as resp:
            assert await resp.text() == "fine"
    finally:
        await edge.drain(1.0)
        listener.close()


async def test_read_idle_timeout_cuts_a_stalled_body(client: aiohttp.ClientSession) -> None:
    released = asyncio.Event()

    async def stalls(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 100
        await resp.prepare(request)
        await resp.write(b"x" * 10)
        await released.wait()  # stalls until the test ends: only read_idle can cut it
        return resp

    _, listener = await start_backend(stalls)
    edge = await start_proxy(proxy_config(
        {"app": [f"127.0.0.1:{port_of(listener)}"]},
        upstream_extra='timeouts = { read_idle = "300ms" }'))
    try:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with asyncio.timeout(10), client.get(edge_url(edge) + "/") as resp:
                await resp.read()
    finally:
        released.set()
        await edge.drain(1.0)
        listener.close()


async def test_stale_pooled_connection_is_retried_transparently(
        client: aiohttp.ClientSession) -> None:
    seen: list[object] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        transport = request.transport
        if transport in seen:
            # A keep-alive connection the backend gives up on just as the request
            # arrives: closed without a byte of response.
            transport.abort()  # type: ignore[union-attr]
        seen.append(transport)
        return web.Response(text="ok")

    _, listener = await start_backend(handler)
    edge = await start_proxy(proxy_config({"app": [f"127.0.0.1:{port_of(listener)}"]}))
    try:
        for _ in range(3):
            async with client.get(edge_url(edge) + "/") as resp:
                assert resp.status == 200 and await resp.text() == "ok"
        # every second request hit a dying pooled connection and was resent once
        assert len(seen) == 5
        assert len(set(map(id, seen))) == 3
    finally:
        await edge.drain(1.0)
        listener.close()


async def test_early_response_stops_the_upload(client: aiohttp.ClientSession) -> None:
    async def rejects(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(status=413, text="backend says too big")

    _, listener = await start_backend(rejects)
    edge = await start_proxy(proxy_config({"app": [f"127.0.0.1:{port_of(listener)}"]}))
    try:
        async def slow_body():  # type: ignore[no-untyped-def]
            for _ in range(5):
                yield b"x" * 1000
                await asyncio.sleep(0.05)

        async with client.post(edge_url(edge) + "/", data=slow_body()) as resp:
            assert resp.status == 413
            assert await resp.text() == "backend says too big"
    finally:
        await edge.drain(1.0)
        listener.close()


async def test_error_responses_never_echo_request_bytes() -> None:
    edge = await start_proxy(proxy_config({"app": ["127.0.0.1:1"]}))
    try:
        marker = b"<script>MARKER</script>"
        raw = await raw_request(edge.ports[0], b"GET /" + marker + b" HTTP/1.1\r\nHost: t\r\n"
                                b"Bad Header" + marker + b"\r\n\r\n")
        assert raw.split(b" ", 2)[1] == b"400"
        assert b"MARKER" not in raw
        assert raw.endswith(b"bad request\n")
    finally:
        await edge.drain(1.0)


async def raw_backend(response: bytes) -> asyncio.Server:
    """A backend that reads one request head and answers with fixed bytes."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def test_interim_responses_are_consumed(client: aiohttp.ClientSession) -> None:
    backend = await raw_backend(
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nfinal")
    edge = await start_proxy(proxy_config({"app": [f"127.0.0.1:{port_of(backend)}"]}))
    try:
        async with client.get(edge_url(edge) + "/") as resp:
            assert resp.status == 200 and await resp.text() == "final"
            assert resp.headers["X-Final"] == "yes" and "Link" not in resp.headers
    finally:
        await edge.drain(1.0)
        backend.close()


async def test_close_delimited_response_is_forwarded_whole(
        client: aiohttp.ClientSession) -> None:
    body = b"no length, ends at close " * 1000
    backend = await raw_backend(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                b"Connection: close\r\n\r\n" + body)
    edge = await start_proxy(proxy_config({"app": [f"127.0.0.1:{port_of(backend)}"]}))
    try:
        async with client.get(edge_url(edge) + "/") as resp:
            assert await resp.read() == body
    finally:
        await edge.drain(1.0)
        backend.close()


async def test_garbage_from_backend_is_502(client: aiohttp.ClientSession) -> None:
    backend = await raw_backend(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    edge = await start_proxy(proxy_config({"app": [f"127.0.0.1:{port_of(backend)}"]}))
    try:
        async with client.get(edge_url(edge) + "/") as resp:
            assert resp.status == 502
            assert await resp.text() == "bad response from backend\n"
    finally:
        await edge.drain(1.0)
        backend.close()


async def test_bytes_beyond_content_length_are_not_forwarded(
        client: aiohttp.ClientSession) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # the body arrives in a packet of its own
        writer.write(b"helloEXTRA-BYTES")
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.close()

    backend = await asyncio.start_server(serve, "127.0.0.1", 0)
    edge = await start_proxy(proxy_config({"app": [f"127.0.0.1:{port_of(backend)}"]}))
    try:
        async with client.get(edge_url(edge) + "/") as resp:
            assert await resp.read() == b"hello"
        pool = next(iter(edge.runtime.upstreams["app"].pools.values()))
        assert pool.idle_count == 0
    finally:
        await edge.drain(1.0)
        backend.close()


async def test_total_timeout_cuts_a_long_exchange(client: aiohttp.ClientSession) -> None:
    async def trickles(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 100  # complete after ~5 s unless cut
        await resp.prepare(request)
        for _ in range(100):  # each piece well within read_idle, the whole far over total
            await resp.write(b"x")
            await asyncio.sleep(0.05)
        return resp

    _, listener = await start_backend(trickles)
    edge = await start_proxy(proxy_config(
        {"app": [f"127.0.0.1:{port_of(listener)}"]},
        upstream_extra='timeouts = { total = "400ms", read_idle = "1s" }'))
    try:
        # Left alone the body would complete in ~5 s; read_idle (1 s) never fires
        # between 50 ms pieces, so a cut body is the total deadline at work.
        with pytest.raises(aiohttp.ClientPayloadError):
            async with client.get(edge_url(edge) + "/") as resp:
                await resp.read()
    finally:
        await edge.drain(1.0)
        listener.close()
