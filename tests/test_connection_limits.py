"""Slow and numerous clients: request buffering keeps trickling bodies off backend
connections; max_connections keeps a worker serving under a connection flood."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.edge_protocol import EdgeProtocol
from proxy.server import Edge
from tests.helpers import eventually, free_port, raw_request, start_proxy


class CountingBackend:
    """Counts connections; answers each request (Content-Length bodies read whole)
    with 200, or holds it while `hold` is clear."""

    def __init__(self) -> None:
        self.connections = 0
        self.hold = asyncio.Event()
        self.hold.set()
        self.server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                await self.hold.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


@pytest.fixture
async def backend() -> AsyncIterator[CountingBackend]:
    b = CountingBackend()
    b.server = await asyncio.start_server(b.serve, "127.0.0.1", 0)
    yield b
    b.hold.set()
    b.server.close()


def config(port: int, server: str = "", route: str = "") -> str:
    return f"""
[server]
listen = ["127.0.0.1:{free_port()}"]
access_log = "off"
{server}

[[routes]]
upstream = "app"
{route}

[upstreams.app]
backends = ["127.0.0.1:{port}"]
"""


def handling(edge: Edge) -> int:
    return sum(1 for p in edge.server._connections
               if isinstance(p, EdgeProtocol) and p._request_in_progress)


async def trickle_clients(
        port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """`count` clients that send a head and 10 of 1,000 body bytes, then wait."""
    clients = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n"
                     + b"x" * 10)
        clients.append((reader, writer))
    return clients


@pytest.mark.parametrize("buffered", [True, False])
async def test_trickling_bodies_hold_no_backend_connection(backend: CountingBackend,
                                                           buffered: bool) -> None:
    edge = await start_proxy(config(backend.port, route="" if buffered else
                                    "buffer_requests = 0"))
    clients = await trickle_clients(edge.ports[0], 50)
    try:
        async def all_handled() -> bool:
            return handling(edge) >= 50

        await eventually(all_handled)
        if not buffered:
            # the control: streamed bodies each hold a backend connection
            async def all_forwarded() -> bool:
                return backend.connections >= 50

            await eventually(all_forwarded)
        raw = await raw_request(edge.ports[0], b"GET / HTTP/1.1\r\nHost: t\r\n"
                                b"Connection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200 OK")
        assert backend.connections == (1 if buffered else 51)
        # a buffered body is forwarded once it is whole, with its length
        reader, writer = clients[0]
        writer.write(b"y" * 990)
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\nok"), 10)
        assert answer.startswith(b"HTTP/1.1 200 OK")
    finally:
        for _, writer in clients:
            writer.close()
        await edge.drain(1.0)


async def test_chunked_body_within_the_limit_goes_with_a_length(
        backend: CountingBackend) -> None:
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        seen.append(await reader.readexactly(5))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(record, "127.0.0.1", 0)
    edge = await start_proxy(config(int(server.sockets[0].getsockname()[1])))
    try:
        raw = await raw_request(edge.ports[0], b"POST / HTTP/1.1\r\nHost: t\r\n"
                                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                                b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200 OK")
        assert b"Content-Length: 5\r\n" in seen[0] and b"Transfer-Encoding" not in seen[0]
        assert seen[1] == b"abcde"
    finally:
        await edge.drain(1.0)
        server.close()


async def test_a_connection_flood_does_not_lock_out_a_normal_client(
        backend: CountingBackend) -> None:
    """2,000 connections that send half a head and hold (the header deadline set
    far away, so only max_connections can help): the normal client is served every
    time, and the worker never holds more than max_connections."""
    edge = await start_proxy(config(backend.port, server='max_connections = 200\n'
                                    'request_header_timeout = "60s"'))
    flood: list[asyncio.StreamWriter] = []
    peak = 0
    try:
        for _ in range(2000):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", edge.ports[0])
            except OSError:
                continue
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n")
            flood.append(writer)
            peak = max(peak, len(edge.server._connections))
        for _ in range(20):
            raw = await raw_request(edge.ports[0], b"GET / HTTP/1.1\r\nHost: t\r\n"
                                    b"Connection: close\r\n\r\n")
            assert raw.startswith(b"HTTP/1.1 200 OK"), raw[:100]
            peak = max(peak, len(edge.server._connections))
        assert peak <= 201
        edge.metrics.flush()
        shed = {s.labels["action"]: s.value for family in edge.metrics.connections_shed.collect()
                for s in family.samples if s.name.endswith("_total")}
        assert shed.get("evicted", 0) >= 1800
    finally:
        for writer in flood:
            writer.close()
        await edge.drain(1.0)


async def test_when_every_connection_is_busy_a_new_one_is_refused(
        backend: CountingBackend) -> None:
    edge = await start_proxy(config(backend.port, server="max_connections = 5"))
    backend.hold.clear()
    busy = [asyncio.ensure_future(raw_request(
        edge.ports[0], b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        read_timeout=20)) for _ in range(5)]
    try:
        async def all_busy() -> bool:
            return handling(edge) == 5

        await eventually(all_busy)
        refused = await raw_request(edge.ports[0], b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert refused == b""  # closed at once, without reading the request
        backend.hold.set()
        for raw in await asyncio.gather(*busy):
            assert raw.startswith(b"HTTP/1.1 200 OK")  # the busy ones were kept
    finally:
        backend.hold.set()
        await edge.drain(1.0)
