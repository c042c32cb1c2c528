"""The upstream connection's state machine (proxy/upstream/connection.py), without
sockets: a fake transport, bytes fed as the backend would send them."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import UpstreamInvalidResponse, UpstreamProtocolError, UpstreamTimeout
from proxy.upstream.connection import (
    InterimHead,
    Phase,
    ResponseHead,
    ResponseLimits,
    UpstreamConnection,
)
from tests.fakes import FakeTransport

REQUEST = b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"


def connected(limits: ResponseLimits | None = None) -> tuple[UpstreamConnection,
                                                             FakeTransport, list[str]]:
    reports: list[str] = []
    conn = UpstreamConnection(asyncio.get_running_loop(), limits or ResponseLimits(),
                              reports.append)
    transport = FakeTransport(conn)
    conn.connection_made(transport)
    return conn, transport, reports


def send(conn: UpstreamConnection) -> None:
    """Start an exchange with a bodiless request, wholly sent."""
    conn.begin(REQUEST, is_head=False)
    conn.request_sent()


async def exchange(conn: UpstreamConnection, *reads: bytes,
                   is_head: bool = False) -> tuple[ResponseHead, bytes]:
    conn.begin(REQUEST, is_head=is_head)
    conn.request_sent()
    for data in reads:
        conn.data_received(data)
    head = await conn.read_head()
    assert isinstance(head, ResponseHead)
    body = b""
    while chunk := await conn.read_chunk():
        body += chunk
    return head, body


async def test_a_clean_exchange_walks_the_phases_and_is_reusable() -> None:
    conn, transport, reports = connected()
    assert conn.phase is Phase.IDLE
    conn.begin(REQUEST, is_head=False)
    assert conn.phase is Phase.AWAITING_HEAD and transport.take() == REQUEST
    conn.request_sent()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
    assert conn.phase is Phase.READING_BODY
    conn.data_received(b"llo")  # past the parser: the rest of a Content-Length body
    assert conn.phase is Phase.COMPLETE
    head = await conn.read_head()
    assert isinstance(head, ResponseHead) and head.status == 200
    assert conn.take_buffered_body() == b"hello"
    assert conn.finish() is True and conn.phase is Phase.IDLE
    assert reports == [] and transport.reading


@pytest.mark.parametrize(("reads", "is_head", "body"), [
    ((b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n",), False,
     b"ok"),
    ((b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",),
     False, b""),
    ((b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",), True, b""),  # body to HEAD
    ((b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no", b"kEXTRA"), False, b"ok"),
])
async def test_bytes_after_the_response_leave_it_intact_but_unusable(
        reads: tuple[bytes, ...], is_head: bool, body: bytes) -> None:
    conn, transport, reports = connected()
    head, got = await exchange(conn, *reads, is_head=is_head)
    assert got == body and head.reason.endswith(b"OK" if head.status == 200 else b"Content")
    assert b"OKOK" not in head.reason
    assert conn.finish() is False
    assert reports == ["bytes after the end of a response"] and not transport.reading


async def test_bytes_on_an_idle_connection_close_it() -> None:
    conn, transport, reports = connected()
    await exchange(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert conn.finish() is True
    conn.data_received(b"HTTP/1.1 200 OK\r\n")  # nobody asked
    assert conn.closed and transport.aborted
    assert reports == ["bytes from an idle connection"]


async def test_interim_heads_come_first_then_the_final_one() -> None:
    conn, _, _ = connected()
    send(conn)
    conn.data_received(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
    first = await conn.read_head()
    assert isinstance(first, InterimHead) and first.encode().startswith(
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\nVia: 1.1 bascule\r\n\r\n")
    assert conn.phase is Phase.AWAITING_HEAD
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    final = await conn.read_head()
    assert isinstance(final, ResponseHead) and final.status == 200
    assert conn.finish() is True


async def test_a_close_delimited_body_completes_at_close_and_is_not_reused() -> None:
    conn, transport, _ = connected()
    send(conn)
    conn.data_received(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
    assert conn.phase is Phase.READING_BODY
    transport.close()
    assert conn.phase is Phase.COMPLETE
    assert conn.take_buffered_body() == b"until close"
    assert conn.finish() is False


async def test_a_close_before_the_head_fails_the_exchange() -> None:
    conn, transport, _ = connected()
    send(conn)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Len")
    transport.close()
    with pytest.raises(UpstreamProtocolError, match="backend closed the connection"):
        await conn.read_head()
    assert conn.finish() is False


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * 11 + b"\r\n",  # 11 fields, limit 10
    b"HTTP/1.1 200 OK\r\nX: " + b"a" * 3000 + b"\r\n\r\n",  # one read over 2 KiB
])
async def test_head_limits(answer: bytes) -> None:
    conn, transport, _ = connected(ResponseLimits(max_head_size=2048, max_headers=10))
    send(conn)
    conn.data_received(answer)
    with pytest.raises(UpstreamInvalidResponse):
        await conn.read_head()
    assert transport.aborted


async def test_a_head_trickled_over_many_reads_is_cut_at_the_limit() -> None:
    conn, transport, _ = connected(ResponseLimits(max_head_size=2048, max_headers=1000))
    send(conn)
    conn.data_received(b"HTTP/1.1 200 OK\r\n")
    fed = 0
    while not transport.aborted:
        conn.data_received(b"X-Long: " + b"a" * 100)  # one field that never ends
        fed += 1
    assert fed * 108 <= 2048 + 108  # stopped at the first read past the limit
    with pytest.raises(UpstreamInvalidResponse, match="max_response_header_size"):
        await conn.read_head()


async def test_a_request_not_sent_whole_is_never_reused() -> None:
    conn, _, _ = connected()
    conn.begin(REQUEST, is_head=False)  # request_sent() never called: body cut short
    conn.data_received(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
    head = await conn.read_head()
    assert isinstance(head, ResponseHead) and head.status == 413
    assert conn.finish() is False


async def test_the_response_header_deadline() -> None:
    conn, transport, _ = connected()
    send(conn)
    conn.arm_timer(0.01, "response header")
    with pytest.raises(UpstreamTimeout, match="response header timeout"):
        await conn.read_head()
    assert transport.aborted and conn.finish() is False


async def test_a_whole_body_goes_out_with_the_head_in_one_write() -> None:
    conn, transport, _ = connected()
    conn.begin(b"PUT / HTTP/1.1\r\nContent-Length: 6\r\n\r\n", is_head=False,
               body=[b"abc", b"def"])
    assert transport.writes == 1
    assert transport.take() == b"PUT / HTTP/1.1\r\nContent-Length: 6\r\n\r\nabcdef"


RESPONSES = [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-A: 1\r\n\r\nhello world", b"hello world"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
    (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok"),
]


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, len(RESPONSES) - 1),
       cuts=st.lists(st.integers(1, 200), max_size=8),
       junk=st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n\r\n", b"X", b"0\r\n\r\n"]))
def test_any_split_of_the_bytes_gives_the_same_response(which: int, cuts: list[int],
                                                        junk: bytes) -> None:
    """However the backend's bytes are cut into reads, the response is the same, and
    the connection is reusable exactly when nothing follows it."""
    wire, body = RESPONSES[which]
    data = wire + junk
    points = sorted({c for c in cuts if c < len(data)})
    reads = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]

    async def run() -> tuple[bytes, bool]:
        conn, _, _ = connected()
        conn.begin(REQUEST, is_head=False)
        conn.request_sent()
        for piece in reads:
            conn.data_received(piece)
        head = await conn.read_head()
        while isinstance(head, InterimHead):
            head = await conn.read_head()
        assert head.status == 200 and head.reason == b"OK"
        got = b""
        while chunk := await conn.read_chunk():
            got += chunk
        return got, conn.finish()

    got, reusable = asyncio.run(run())
    assert got == body
    assert reusable is (junk == b"")
