"""Ambiguous framing is refused with 400 and never forwarded (RFC 9112 §6.1, §6.3)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from proxy.server import Edge
from tests.helpers import port_of, proxy_config, raw_request, start_backend, start_proxy

seen: list[bytes] = []


async def record(request: web.BaseRequest) -> web.StreamResponse:
    seen.append(await request.read())
    return web.Response(text="ok")


@pytest.fixture
async def edge() -> AsyncIterator[Edge]:
    seen.clear()
    _, listener = await start_backend(record)
    edge = await start_proxy(proxy_config({"app": [f"127.0.0.1:{port_of(listener)}"]}))
    yield edge
    await edge.drain(1.0)
    listener.close()


@pytest.mark.parametrize("head", [
    b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length : 5\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: +5\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: t\r\nX-A: 1\r\n folded\r\nContent-Length: 5\r\n\r\n",
    b"POST / HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
])
async def test_ambiguous_framing_is_rejected(edge: Edge, head: bytes) -> None:
    raw = await raw_request(edge.ports[0], head + b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n"
                            b"Host: t\r\n\r\n", read_timeout=2.0)
    assert raw.split(b" ", 2)[1] == b"400", raw[:100]
    assert seen == []


async def test_pipelined_requests_are_answered_in_order(edge: Edge) -> None:
    raw = await raw_request(edge.ports[0],
                            b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
                            b"GET /b HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert raw.count(b"HTTP/1.1 200 OK") == 2
    assert seen == [b"abc", b""]


async def test_http10_client_gets_a_close_delimited_or_sized_response(edge: Edge) -> None:
    raw = await raw_request(edge.ports[0], b"GET / HTTP/1.0\r\nHost: t\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")  # RFC 9112 §2.3, as nginx answers
    assert raw.endswith(b"\r\n\r\nok")
    assert b"Transfer-Encoding" not in raw
