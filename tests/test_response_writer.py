"""Writing answers that are whole (a response that arrived whole, a cache hit,
Bascule's own errors) without sockets: status line, framing and Connection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11

from proxy.response import CompleteResponse, Framing, frame, plain_answer
from tests.fakes import FakeTransport


@dataclass
class FakeRequest:
    method: str = "GET"
    version: HttpVersion = HttpVersion11
    keep_alive: bool = True
    transport: Any = None
    protocol: Any = None  # the edge protocol: none here, so no connection fields


async def written(response: CompleteResponse, request: FakeRequest) -> bytes:
    transport = FakeTransport()
    request.transport = transport
    await response.prepare(request)  # type: ignore[arg-type]
    assert transport.writes == 1  # head and body in one write
    head = transport.take()
    # Date is added when the response has none; its value changes every second
    return b"\r\n".join(line for line in head.split(b"\r\n") if not line.startswith(b"Date: "))


@pytest.mark.parametrize(("response", "request_", "expected"), [
    (CompleteResponse(200, b"OK", b"X: 1\r\n", b"hello", True), FakeRequest(),
     b"HTTP/1.1 200 OK\r\nX: 1\r\nContent-Length: 5\r\n\r\nhello"),
    (CompleteResponse(200, b"OK", b"", b"", True, length=1234), FakeRequest("HEAD"),
     b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"),
    (CompleteResponse(200, b"OK", b"", b"", True, length=None), FakeRequest("HEAD"),
     b"HTTP/1.1 200 OK\r\n\r\n"),
    (CompleteResponse(204, b"No Content", b"", b"", True), FakeRequest(),
     b"HTTP/1.1 204 No Content\r\n\r\n"),
    (CompleteResponse(304, b"Not Modified", b"", b"", True, length=99), FakeRequest(),
     b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"),
    (CompleteResponse(200, b"OK", b"", b"ok", True), FakeRequest(version=HttpVersion10),
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"),
    (CompleteResponse(200, b"OK", b"", b"ok", True),
     FakeRequest(version=HttpVersion10, keep_alive=False),
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    (plain_answer(414, "request line too long", close=True), FakeRequest(),
     b"HTTP/1.1 414 URI Too Long\r\nContent-Type: text/plain; charset=utf-8\r\n"
     b"Content-Length: 22\r\nConnection: close\r\n\r\nrequest line too long\n"),
])
async def test_whole_answers(response: CompleteResponse, request_: FakeRequest,
                             expected: bytes) -> None:
    assert await written(response, request_) == expected


async def test_an_answer_to_a_closed_client_is_not_written() -> None:
    transport = FakeTransport()
    transport.close()
    with pytest.raises(ConnectionResetError):
        await plain_answer(502, "bad").prepare(
            FakeRequest(transport=transport))  # type: ignore[arg-type]


@pytest.mark.parametrize(("method", "status", "length", "version", "codings", "kind",
                          "lines", "keep"), [
    ("GET", 200, 5, HttpVersion11, b"", Framing.LENGTH, b"Content-Length: 5\r\n", True),
    ("GET", 200, None, HttpVersion11, b"", Framing.CHUNKED,
     b"Transfer-Encoding: chunked\r\n", True),
    ("GET", 200, None, HttpVersion11, b"gzip", Framing.CHUNKED,
     b"Transfer-Encoding: gzip, chunked\r\n", True),
    ("GET", 200, None, HttpVersion10, b"", Framing.CLOSE, b"", False),
    ("HEAD", 200, 7, HttpVersion11, b"", Framing.NONE, b"Content-Length: 7\r\n", True),
    ("HEAD", 200, None, HttpVersion11, b"", Framing.NONE, b"", True),
    ("GET", 204, 0, HttpVersion11, b"", Framing.NONE, b"", True),
    ("GET", 304, 9, HttpVersion11, b"", Framing.NONE, b"Content-Length: 9\r\n", True),
    ("GET", 103, None, HttpVersion11, b"", Framing.NONE, b"", True),
])
def test_frame(method: str, status: int, length: int | None, version: HttpVersion,
               codings: bytes, kind: Framing, lines: bytes, keep: bool) -> None:
    got_kind, got_lines, got_keep = frame(method, status, length, version, True, True,
                                          codings)
    expected = lines + (b"" if version == HttpVersion11 or not keep else
                        b"Connection: keep-alive\r\n")
    assert (got_kind, got_lines, got_keep) == (kind, expected, keep)
