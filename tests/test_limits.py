"""A slow or greedy client cannot pin resources: deadlines and size limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from proxy.server import Edge
from tests.helpers import edge_url, port_of, proxy_config, raw_request, start_backend, start_proxy

received: list[int] = []


async def counting(request: web.BaseRequest) -> web.StreamResponse:
    body = await request.read()
    received.append(len(body))
    return web.Response(text=f"got {len(body)}")


@pytest.fixture
async def edge() -> AsyncIterator[Edge]:
    received.clear()
    _, listener = await start_backend(counting)
    edge = await start_proxy(proxy_config(
        {"app": [f"127.0.0.1:{port_of(listener)}"]},
        server='request_header_timeout = "300ms"\nbody_idle_timeout = "300ms"\n'
               'max_body_size = "1KiB"\nmax_header_size = "2KiB"\nmax_headers = 20'))
    yield edge
    await edge.drain(1.0)
    listener.close()


async def read_until_closed(reader: asyncio.StreamReader, limit: float) -> bytes:
    async with asyncio.timeout(limit):
        return await reader.read()


async def test_slowloris_header_deadline(edge: Edge) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.ports[0])
    writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n")

    async def trickle() -> None:
        # one header line every 100 ms, for ever: a per-line deadline would never
        # fire; the deadline is for the whole head
        for i in range(1000):
            await asyncio.sleep(0.1)
            writer.write(b"X-Slow-%d: 1\r\n" % i)

    trickling = asyncio.ensure_future(trickle())
    try:
        data = await read_until_closed(reader, 10.0)
    finally:
        trickling.cancel()
        writer.close()
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")


async def test_idle_connection_without_request_is_closed(edge: Edge) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.ports[0])
    data = await read_until_closed(reader, 3.0)
    writer.close()
    assert data.startswith(b"HTTP/1.1 408 ")


async def test_keepalive_request_after_deadline_window_is_fine(
        edge: Edge, client: aiohttp.ClientSession) -> None:
    # The deadline covers receiving a head, not the idle time between requests.
    async with client.get(edge_url(edge) + "/") as resp:
        assert resp.status == 200
    await asyncio.sleep(0.5)
    async with client.get(edge_url(edge) + "/") as resp:
        assert resp.status == 200


async def test_body_idle_timeout_is_408(edge: Edge) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.ports[0])
    writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhello")
    data = await read_until_closed(reader, 3.0)
    writer.close()
    assert data.startswith(b"HTTP/1.1 408 ")
    assert received == []  # the backend never saw a complete request


async def test_content_length_over_limit_is_413_without_contacting_backend(edge: Edge) -> None:
    raw = await raw_request(edge.ports[0], b"POST / HTTP/1.1\r\nHost: t\r\n"
                            b"Content-Length: 1025\r\nConnection: close\r\n\r\n" + b"x" * 1025)
    assert raw.startswith(b"HTTP/1.1 413 ")
    assert received == []


async def test_chunked_body_over_limit_is_413(edge: Edge) -> None:
    chunk = b"x" * 600
    body = b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2 + b"0\r\n\r\n"
    raw = await raw_request(edge.ports[0], b"POST / HTTP/1.1\r\nHost: t\r\n"
                            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body)
    assert raw.startswith(b"HTTP/1.1 413 ")
    assert all(n <= 1024 for n in received)


async def test_body_at_limit_passes(edge: Edge, client: aiohttp.ClientSession) -> None:
    async with client.post(edge_url(edge) + "/", data=b"x" * 1024) as resp:
        assert await resp.text() == "got 1024"


async def test_one_huge_header_is_431(edge: Edge) -> None:
    raw = await raw_request(edge.ports[0], b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: "
                            + b"a" * 4096 + b"\r\n\r\n")
    assert raw.split(b" ", 2)[1] == b"431"
    assert b"aaaa" not in raw


async def test_headers_over_total_size_are_431(edge: Edge) -> None:
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 200) for i in range(15))
    raw = await raw_request(edge.ports[0], b"GET / HTTP/1.1\r\nHost: t\r\n" + headers
                            + b"Connection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 431 ")


async def test_too_many_headers_is_rejected(edge: Edge) -> None:
    headers = b"".join(b"X-H%d: 1\r\n" % i for i in range(30))
    raw = await raw_request(edge.ports[0], b"GET / HTTP/1.1\r\nHost: t\r\n" + headers + b"\r\n")
    assert raw.split(b" ", 2)[1] == b"431"
    assert received == []
