"""What a malformed or hostile backend can do to a response, table-driven.

Each case is a backend that answers the first request on each connection with fixed
bytes (one write, so head, body and whatever follows arrive together), and a raw
client. The expectation is the exact response the client gets (status line and
body), and whether the backend connection may be reused. Reference: RFC 9112 §6.3
(message body length), §2.2 (one message per request), RFC 9110 §15.2 (1xx), and
what nginx 1.22 / HAProxy 2.6 deliver for the same bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from proxy.server import Edge
from tests.helpers import port_of, proxy_config, raw_request, start_proxy


@dataclass
class Backend:
    """Answers every request with `answer`; counts connections and requests."""

    answer: bytes = b""
    close_after: bool = False  # close the connection after answering
    connections: int = 0
    requests: int = 0
    server: asyncio.Server | None = None

    script: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]] | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.script is not None:
            await self.script(reader, writer)
            return
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                writer.write(self.answer)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    b = Backend()
    b.server = await asyncio.start_server(b.serve, "127.0.0.1", 0)
    yield b
    b.server.close()


@pytest.fixture
async def edge(backend: Backend) -> AsyncIterator[Edge]:
    assert backend.server is not None
    edge = await start_proxy(proxy_config(
        {"app": [f"127.0.0.1:{port_of(backend.server)}"]},
        upstream_extra='max_response_header_size = "16KiB"\nmax_response_headers = 100\n'
                       'timeouts = { response_header = "3s", read_idle = "3s" }'))
    yield edge
    await edge.drain(1.0)


def split(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """(status line, header block, body) of the final response in `raw`."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status, _, fields = head.partition(b"\r\n")
    return status, fields, body


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# name, backend bytes, method, expected status line, expected body, reusable
CASES = [
    ("clean", OK, "GET", b"HTTP/1.1 200 OK", b"ok", True),
    ("two responses in one write", OK + b"HTTP/1.1 404 OK\r\nContent-Length: 14\r\n\r\n",
     "GET", b"HTTP/1.1 200 OK", b"ok", False),
    ("204 head then another response",
     b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
     "GET", b"HTTP/1.1 204 No Content", b"", False),
    ("304 head then bytes", b"HTTP/1.1 304 Not Modified\r\n\r\nJUNK",
     "GET", b"HTTP/1.1 304 Not Modified", b"", False),
    ("bytes after a Content-Length body in the same read", OK + b"EXTRA-BYTES",
     "GET", b"HTTP/1.1 200 OK", b"ok", False),
    ("bytes after a Connection: close response",
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nokEXTRA",
     "GET", b"HTTP/1.1 200 OK", b"ok", False),
    ("body sent to HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
     "HEAD", b"HTTP/1.1 200 OK", b"", False),
    ("clean HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
     "HEAD", b"HTTP/1.1 200 OK", b"", True),
    ("Content-Length and Transfer-Encoding (nginx: 502)",
     b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"2\r\nok\r\n0\r\n\r\n", "GET", b"HTTP/1.1 502 Bad Gateway", None, False),
    ("negative Content-Length", b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
     "GET", b"HTTP/1.1 502 Bad Gateway", None, False),
    ("duplicate Content-Length",
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
     "GET", b"HTTP/1.1 502 Bad Gateway", None, False),
    ("Content-Length list", b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
     "GET", b"HTTP/1.1 502 Bad Gateway", None, False),
    ("bare LF line ends", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
     "GET", b"HTTP/1.1 502 Bad Gateway", None, False),
    ("bare CR in the head", b"HTTP/1.1 200 OK\rX: y\r\nContent-Length: 2\r\n\r\nok",
     "GET", b"HTTP/1.1 502 Bad Gateway", None, False),
    ("obsolete line folding",
     b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 2\r\n\r\nok",
     "GET", b"HTTP/1.1 502 Bad Gateway", None, False),
    ("NUL in a field value", b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
     "GET", b"HTTP/1.1 502 Bad Gateway", None, False),
    ("HTTP/0.9-style answer", b"ok, no head at all\r\n\r\n",
     "GET", b"HTTP/1.1 502 Bad Gateway", None, False),
    ("transfer coding beside Content-Length (nginx: 502)",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc",
     "GET", b"HTTP/1.1 502 Bad Gateway", None, False),
    ("101 to a plain request",
     b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
     "GET", b"HTTP/1.1 502 Bad Gateway", None, False),
    ("10,000 header lines",
     b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 10_000 + b"Content-Length: 2\r\n\r\nok",
     "GET", b"HTTP/1.1 502 Bad Gateway", None, False),
    ("101 fields in a small head",
     b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * 101 + b"Content-Length: 2\r\n\r\nok",
     "GET", b"HTTP/1.1 502 Bad Gateway", None, False),
    ("1 MiB field", b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 1024 * 1024
     + b"\r\nContent-Length: 2\r\n\r\nok", "GET", b"HTTP/1.1 502 Bad Gateway", None, False),
    ("a head just under the limit",
     b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 15_000 + b"\r\nContent-Length: 2\r\n\r\nok",
     "GET", b"HTTP/1.1 200 OK", b"ok", True),
    ("early close in the head", b"HTTP/1.1 200 OK\r\nContent-Len",
     "GET", b"HTTP/1.1 502 Bad Gateway", None, False),
]


@pytest.mark.parametrize(("answer", "method", "status", "body", "reusable"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_backend_answer(edge: Edge, backend: Backend, answer: bytes, method: str,
                              status: bytes, body: bytes | None, reusable: bool) -> None:
    backend.answer = answer
    backend.close_after = answer.endswith(b"Content-Len")
    raw = await raw_request(edge.ports[0], f"{method} / HTTP/1.1\r\nHost: t\r\n"
                            "Connection: close\r\n\r\n".encode(), read_timeout=5.0)
    got_status, _, got_body = split(raw)
    assert got_status == status, raw[:300]
    if body is not None:
        assert got_body == body, raw[:300]
        assert b"OKOK" not in raw and raw.count(b"HTTP/1.1") == 1
    # A second request shows whether the first connection went back to the pool.
    backend.answer, backend.close_after = OK, False
    raw2 = await raw_request(edge.ports[0],
                             b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert split(raw2)[0] == b"HTTP/1.1 200 OK", raw2[:200]
    assert backend.connections == (1 if reusable else 2)


async def test_early_close_in_the_body_cuts_the_client(edge: Edge, backend: Backend) -> None:
    backend.answer = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"

    async def close_after_write(reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(backend.answer)
        await writer.drain()
        writer.close()

    backend.script = close_after_write
    try:
        raw = await raw_request(edge.ports[0], b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        status, fields, body = split(raw)
        assert status == b"HTTP/1.1 200 OK"
        assert b"Content-Length: 10" in fields and body == b"short"  # cut, never padded
    finally:
        backend.script = None


async def test_huge_head_is_refused_without_reading_it(edge: Edge, backend: Backend) -> None:
    """A 64 MiB head: 502 as soon as the limit is passed; the backend is cut off long
    before it has written it all, and the worker never holds it."""
    assert backend.server is not None
    written = 0
    cut = asyncio.Event()

    async def endless_head(reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        try:
            for _ in range(1024):  # 64 MiB in 64 KiB header lines
                writer.write(b"X-Huge: " + b"a" * 65_536 + b"\r\n")
                await writer.drain()
                written += 65_536
        except ConnectionError:
            cut.set()
        finally:
            writer.close()

    backend.script = endless_head
    try:
        raw = await raw_request(edge.ports[0], b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
                                read_timeout=5.0)
        assert split(raw)[0] == b"HTTP/1.1 502 Bad Gateway"
        await asyncio.wait_for(cut.wait(), 10)
        assert written < 16 * 1024 * 1024
    finally:
        backend.script = None


@pytest.mark.parametrize("codings", [b"gzip", b"gzip, chunked"])
async def test_transfer_codings_are_passed_on(edge: Edge, backend: Backend,
                                              codings: bytes) -> None:
    """RFC 9112 §6.3 rule 4: with a final coding other than chunked the body runs
    until the backend closes (it used to be read as chunked, stall and be cut); the
    codings are passed on so that the client can decode the body."""
    payload = b"\x1f\x8b-coded-bytes"
    assert backend.server is not None
    if codings.endswith(b"chunked"):
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
    else:
        body = payload

    async def coded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + codings + b"\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    backend.script = coded
    try:
        raw = await raw_request(edge.ports[0], b"GET / HTTP/1.1\r\nHost: t\r\n"
                                b"Connection: close\r\n\r\n", read_timeout=5.0)
        status, fields, got = split(raw)
        assert status == b"HTTP/1.1 200 OK"
        assert b"Transfer-Encoding: gzip, chunked" in fields
        assert got == b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
        raw10 = await raw_request(edge.ports[0], b"GET / HTTP/1.0\r\nHost: t\r\n\r\n")
        assert split(raw10)[0] == b"HTTP/1.1 502 Bad Gateway"  # 1.0 cannot take it
    finally:
        backend.script = None


INTERIM = (b"HTTP/1.1 100 Continue\r\n\r\n"
           b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
           b"HTTP/1.1 103 Early Hints\r\nLink: </b.js>; rel=preload\r\n\r\n"
           b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nfinal")


async def test_interim_responses_are_relayed_in_order(edge: Edge, backend: Backend) -> None:
    backend.answer = INTERIM
    raw = await raw_request(edge.ports[0], b"GET / HTTP/1.1\r\nHost: t\r\n"
                            b"Connection: close\r\n\r\n")
    heads = raw.split(b"\r\n\r\n")
    assert heads[0].startswith(b"HTTP/1.1 103 Early Hints\r\n")
    assert b"Link: </a.css>; rel=preload" in heads[0] and b"Via: 1.1 bascule" in heads[0]
    assert heads[1].startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </b.js>")
    assert heads[2].startswith(b"HTTP/1.1 200 OK\r\n") and b"X-Final: yes" in heads[2]
    assert b"Link" not in heads[2] and heads[3] == b"final"
    assert b"100 Continue" not in raw  # Bascule answers Expect itself


async def test_interim_responses_are_not_sent_to_http10_clients(
        edge: Edge, backend: Backend) -> None:
    backend.answer = INTERIM
    raw = await raw_request(edge.ports[0], b"GET / HTTP/1.0\r\nHost: t\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and raw.endswith(b"final")
    assert b"103" not in raw


async def test_interim_heads_count_towards_the_head_limit(edge: Edge, backend: Backend) -> None:
    backend.answer = (b"HTTP/1.1 103 Early Hints\r\nLink: " + b"a" * 9000 + b"\r\n\r\n") * 2 + OK
    raw = await raw_request(edge.ports[0], b"GET / HTTP/1.1\r\nHost: t\r\n"
                            b"Connection: close\r\n\r\n")
    assert raw.split(b"\r\n\r\n")[-2].startswith(b"HTTP/1.1 502 Bad Gateway")


async def test_limit_violations_are_counted(edge: Edge, backend: Backend) -> None:
    backend.answer = b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * 200 + b"\r\n"
    raw = await raw_request(edge.ports[0], b"GET / HTTP/1.1\r\nHost: t\r\n"
                            b"Connection: close\r\n\r\n")
    assert split(raw)[0] == b"HTTP/1.1 502 Bad Gateway"
    edge.metrics.flush()
    samples = [s for family in edge.metrics.invalid_responses.collect()
               for s in family.samples if s.name.endswith("_total")]
    assert [s.value for s in samples] == [1.0]


@pytest.mark.parametrize(("method", "answer", "framing"), [
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", b"Content-Length: 1234"),
    ("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", None),
    ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", None),
    ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n", b"Content-Length: 99"),
    ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"Content-Length: 2"),
])
async def test_bodiless_answers_keep_the_representation_length(
        edge: Edge, backend: Backend, method: str, answer: bytes,
        framing: bytes | None) -> None:
    """RFC 9110 §8.6: a HEAD or 304 answer announces the length the GET would have
    had; a 204 has none; nothing framed by chunked when there is no body."""
    backend.answer = answer
    raw = await raw_request(edge.ports[0], f"{method} / HTTP/1.1\r\nHost: t\r\n"
                            "Connection: close\r\n\r\n".encode())
    _, fields, _ = split(raw)
    lines = fields.split(b"\r\n")
    if framing is None:
        assert not any(line.startswith((b"Content-Length", b"Transfer-Encoding"))
                       for line in lines), raw
    else:
        assert framing in lines, raw
