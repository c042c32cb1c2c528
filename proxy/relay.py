"""Relaying a backend's response: to the client (one write when it arrived whole,
streamed or spliced otherwise), or to the plugin chain as a body that streams from
the connection (`UpstreamBody`), and what the chain answered back to the client
(`write_chain_response`). A response cut by the backend is cut for the client
too: a truncated body never looks complete. And what a request's handling records for
metrics and the access log (`Outcome`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from aiohttp import web

from proxy.errors import UpstreamInvalidResponse, UpstreamProtocolError, UpstreamTimeout
from proxy.plugin import ProxyResponse, headers_version
from proxy.response import ProxiedResponse, has_no_body, whole_answer
from proxy.routing import Route
from proxy.upstream.heads import ResponseHead

if TYPE_CHECKING:
    from proxy.exchange import Exchange

__all__ = ["TUNNELLED", "Outcome", "UpstreamBody", "respond", "write_chain_response"]

TUNNELLED: Final = "bascule.tunnelled"  # ProxyResponse.extra: a WebSocket already relayed

log = logging.getLogger("bascule.forward")


class Outcome:
    """What the metrics and the access log need to know about one request."""

    __slots__ = ("backend", "bytes_in", "bytes_out", "request_id", "route", "upstream")

    def __init__(self) -> None:
        self.route: Route | None = None
        self.upstream = ""
        self.backend = ""
        self.bytes_in = 0
        self.bytes_out = 0
        self.request_id = b""


class UpstreamBody:
    """A streamed backend body for plugins: chunks as they arrive; the exchange is
    finished (connection and lease released) when it ends, fails or is closed."""

    def __init__(self, exchange: Exchange, started: float) -> None:
        self._exchange = exchange
        self._started = started
        self._done = False

    def __aiter__(self) -> UpstreamBody:
        return self

    async def __anext__(self) -> bytes:
        exchange = self._exchange
        conn = exchange.conn
        if self._done or conn is None:
            raise StopAsyncIteration
        conn.arm_timer(exchange.upstream.timeouts.read_idle, "read idle")
        try:
            chunk = await conn.read_chunk()
        except BaseException:
            self._close(False)
            raise
        if not chunk:
            exchange.release_conn(conn.finish())
            self._close(True)
            raise StopAsyncIteration
        exchange.outcome.bytes_out += len(chunk)
        return chunk

    async def aclose(self) -> None:
        if not self._done:
            self._close(False)

    def _close(self, ok: bool) -> None:
        self._done = True
        self._exchange.finish(self._started, ok)


async def respond(self: Exchange, head: ResponseHead) -> web.StreamResponse:
    """The backend's response to the client: in one write when it arrived whole,
    else streamed (spliced inside the upstream protocol for the rest of a
    Content-Length body), cut rather than completed when the backend fails."""
    conn = self.conn
    assert conn is not None
    request = self.request
    fields = head.fields
    block, length, has_date = fields.block(), fields.body_length, fields.has_date
    if self.upstream.sticky is not None:
        block += self.sticky_cookie()
    no_body = has_no_body(request.method, head.status)
    codings = b"" if no_body else fields.codings
    if codings and request.version < (1, 1):
        # RFC 9112 §6.1: no Transfer-Encoding to an HTTP/1.0 client, and without
        # it the body could not be decoded.
        raise UpstreamInvalidResponse("transfer-coded response for an HTTP/1.0 client")
    body = conn.take_buffered_body()
    if body is not None and not codings:
        # The whole response is here (the common small case): the connection
        # goes back now and the client gets head and body in one write.
        self.release_conn(conn.finish())
        if no_body:
            return whole_answer(head.status, head.reason, block, b"", has_date,
                                length=length)
        self.outcome.bytes_out = len(body)
        return whole_answer(head.status, head.reason, block, body, has_date)
    if length is None and body is not None and not no_body and not codings:
        length = len(body)  # complete already: send it length-delimited
    resp = ProxiedResponse(head.status, head.reason, block, length, has_date, codings)
    try:
        return await _write_response(self, resp, body, no_body)
    except ConnectionError:
        # The client went away mid-response; the backend connection is dropped
        # (by run()'s cleanup) because its response was not fully read.
        return resp

async def _write_response(self: Exchange, resp: ProxiedResponse, body: bytes | None,
                          no_body: bool) -> web.StreamResponse:
    conn = self.conn
    assert conn is not None
    request = self.request
    if body is not None:
        # Whole response already here: give the connection back before writing,
        # and send head and body in one write (one syscall, not two).
        resp._send_headers_immediately = False
        self.release_conn(conn.finish())
        await resp.prepare(request)
        if no_body:
            await resp.write_eof()
        else:
            self.outcome.bytes_out = len(body)
            await resp.write_eof(body)
        return resp
    # Headers go out with the first body bytes when some already arrived;
    # otherwise at once, so SSE/long-poll clients see the response start.
    resp._send_headers_immediately = not conn.has_buffered_body
    await resp.prepare(request)
    read_idle = self.upstream.timeouts.read_idle
    try:
        while True:
            if conn.can_splice and not conn.has_buffered_body and resp.prepared:
                await _splice_rest(self, resp, read_idle)
                break
            conn.arm_timer(read_idle, "read idle")
            chunk = await conn.read_chunk()
            if not chunk:
                break
            self.outcome.bytes_out += len(chunk)
            await resp.write(chunk)
    except (UpstreamProtocolError, UpstreamTimeout) as exc:
        # Cut the client's response: a truncated body must never look complete.
        log.warning("upstream %s backend %s died mid-response: %s",
                    self.upstream.name, self.backend.id if self.backend else "?", exc)
        transport = request.transport
        if transport is not None:
            transport.abort()
        return resp
    self.release_conn(conn.finish())
    await resp.write_eof()
    return resp

async def _splice_rest(self: Exchange, resp: ProxiedResponse, read_idle: float) -> None:
    """The rest of a Content-Length body goes backend → client inside the
    upstream protocol; this task only wakes when the client must drain."""
    conn = self.conn
    transport = self.request.transport
    writer = resp._payload_writer
    assert conn is not None and writer is not None
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client connection closed")
    await writer.drain()  # headers and earlier chunks flushed past the high-water mark
    conn.splice(transport, read_idle)
    while not await conn.splice_event():
        await writer.drain()
        conn.splice_resume()
    length = resp.content_length
    if length is not None:
        self.outcome.bytes_out = length


async def write_chain_response(request: web.BaseRequest, response: ProxyResponse,
                               outcome: Outcome) -> web.StreamResponse:
    """Write what the plugin chain answered (the only place plugins' responses
    reach aiohttp); framing is response.py's, as for every answer."""
    tunnelled = response.extra.get(TUNNELLED)
    if isinstance(tunnelled, web.StreamResponse):
        return tunnelled  # a WebSocket tunnel, written while it ran
    headers = response.headers
    ready = response.ready_block
    if ready is not None and headers_version(headers) == ready[0]:
        block = ready[1]  # no plugin changed the backend's fields
    else:
        block = b"".join(f"{k}: {v}\r\n".encode("latin-1", "replace")
                         for k, v in headers.items())
    body = response.body
    reason = response.reason.encode("latin-1", "replace")
    no_body = has_no_body(request.method, response.status)
    if isinstance(body, bytes):
        outcome.bytes_out = 0 if no_body else len(body)
        return whole_answer(response.status, reason, block, b"" if no_body else body,
                            "Date" in headers,
                            length=response.length if no_body else len(body))
    resp = ProxiedResponse(response.status, reason, block, response.length,
                           "Date" in headers)
    try:
        await resp.prepare(request)
        async for chunk in body:
            await resp.write(chunk)
        await resp.write_eof()
        return resp
    except (UpstreamProtocolError, UpstreamTimeout) as exc:
        # Cut the client's response: a truncated body must never look complete.
        log.warning("upstream %s died mid-response: %s", outcome.upstream, exc)
        if request.transport is not None:
            request.transport.abort()
        return resp
    except ConnectionError:
        return resp
    finally:
        await response.aclose()
