"""The public listener's protocol: aiohttp's request handler plus what aiohttp lacks
for a public listener — a request-header deadline (slowloris) answered with 408,
head-limit errors answered with 414/431/400 without echoing request bytes, and a cap
on client connections per worker (`max_connections`: at the cap a new connection
replaces the one idle longest, as nginx reuses its "reusable" connections, or is
closed when none is idle). The worker's lifecycle is proxy/server.py's."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import http_parser, web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

from proxy.config import ServerConfig
from proxy.metrics import Metrics
from proxy.response import plain_answer

__all__ = ["BasculeServer", "EdgeProtocol", "c_parser_in_use", "parser_limits"]

log = logging.getLogger("bascule.server")

_TIMEOUT_BODY = b"request header timeout\n"
_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
                b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


def c_parser_in_use() -> bool:
    """aiohttp's pure-Python parser has had request-smuggling bugs; refuse it."""
    return http_parser.HttpRequestParser.__module__ == "aiohttp._http_parser"


class EdgeProtocol(RequestHandler):
    """aiohttp's request handler plus a deadline for receiving a request's head.

    The deadline costs one clock read per request: `head_started` is set at the
    first byte of a head (or at connect) and cleared once the head is parsed; the
    worker's HeadDeadlineSweeper closes connections whose head is overdue."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_started = 0.0
        self.idle_since = 0.0  # when the last response ended (or the connection came)
        self.timed_out = False
        self.peer = ""
        self.metrics: Metrics | None = None
        self.tls = False  # accepted on a TLS listener (set once the handshake is done)
        self.proto = b"http"  # for X-Forwarded-Proto
        self.response_fields = b""  # added to every answer (HSTS on TLS connections)

    @property
    def busy(self) -> bool:
        """A request is being handled or waits in the queue (not evictable)."""
        return self._request_in_progress or bool(self._messages)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.idle_since = self._loop.time()
        manager = self._manager
        if isinstance(manager, BasculeServer):
            manager.admit(self)
        # Looked up once per connection: aiohttp's request.remote asks the socket
        # (a getpeername() syscall) on every request.
        peername = transport.get_extra_info("peername")
        self.peer = str(peername[0]) if isinstance(peername, (tuple, list)) else ""
        if transport.get_extra_info("sslcontext") is not None:
            self.tls = True
            self.proto = b"https"
            if isinstance(manager, BasculeServer):
                self.response_fields = manager.tls_response_fields
        self.head_started = self._loop.time()

    def data_received(self, data: bytes) -> None:
        if self.timed_out:
            return  # answered 408: what still arrives is read and dropped
        if not self.head_started and not self._request_in_progress and not self._messages:
            self.head_started = self._loop.time()
        super().data_received(data)
        if self.head_started and (self._messages or self._request_in_progress):
            self.head_started = 0.0

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.metrics is not None:
            self.metrics.open_connections -= 1
            self.metrics = None  # counted once
        self.head_started = 0.0
        super().connection_lost(exc)

    def head_overdue(self, now: float, timeout: float) -> bool:
        return bool(self.head_started) and now - self.head_started >= timeout and not (
            self._request_in_progress or self._messages)

    def close_with_408(self) -> None:
        """408, then a lingering close: our side is shut at once, but the socket stays
        open a moment to swallow what the client is still sending — closing it with
        unread data would make the kernel send a reset that can destroy the 408."""
        self.head_started = 0.0
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.timed_out = True
        transport.write(_TIMEOUT_408)
        if transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(1.0, self.force_close)

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # Never echo request bytes back (aiohttp's messages quote the bad line).
        manager = self._manager
        if isinstance(exc, LineTooLong):
            # aiohttp reports the request line and a field alike; its limit tells
            # them apart (BasculeServer keeps the two limits distinct).
            if isinstance(manager, BasculeServer) and exc.args[1] == manager.line_limit:
                status, text = 414, "request line too long"
            else:
                status, text = 431, "request header field too large"
        elif exc is not None and "too many headers" in str(exc).lower():
            status, text = 431, "too many request header fields"
        elif status == 400:
            text = "bad request"
        elif status == 500:
            text = "internal error"
            log.error("error handling request", exc_info=exc)
        else:
            text = "error"
        return plain_answer(status, text, close=True)


def parser_limits(cfg: ServerConfig) -> dict[str, int]:
    """aiohttp's parser limits from [server]. The field limit is kept one byte
    apart from the request-line limit when they are equal, so that handle_error can
    tell which one a LineTooLong broke (414 vs 431)."""
    field = cfg.max_field_size
    if field == cfg.max_request_line:
        field += 1
    return {"max_line_size": cfg.max_request_line, "max_field_size": field,
            "max_headers": cfg.max_headers}


class BasculeServer(web.Server):
    def __init__(self, handler: Any, *, header_timeout: float, metrics: Metrics,
                 max_connections: int, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout = header_timeout
        self.metrics = metrics
        self.max_connections = max_connections
        self.tls_response_fields = b""  # Strict-Transport-Security, with [server.tls] hsts

    @property
    def line_limit(self) -> int:
        return int(self._kwargs.get("max_line_size", 0))

    def admit(self, proto: EdgeProtocol) -> None:
        """Keep the worker within max_connections: a new connection over the cap
        replaces the idle connection that has waited longest (idle keep-alive, or a
        head not yet complete, which is how a flood holds connections), or is closed
        at once when every connection is busy with a request."""
        connections = self._connections
        if len(connections) <= self.max_connections:
            return
        victim: EdgeProtocol | None = None
        for other in connections:
            if (other is not proto and isinstance(other, EdgeProtocol) and not other.busy
                    and (victim is None or other.idle_since < victim.idle_since)):
                victim = other
        if victim is not None:
            self.metrics.record_shed("evicted")
            victim.force_close()
        else:
            self.metrics.record_shed("refused")
            proto.force_close()

    async def enforce_head_deadline(self) -> None:
        """Answer 408 and close connections whose request head is overdue. Checks a
        few times per timeout, so the deadline is kept within a quarter of it."""
        timeout = self.header_timeout
        if not timeout:
            return
        interval = min(1.0, timeout / 4)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for proto in list(self._connections):
                if isinstance(proto, EdgeProtocol) and proto.head_overdue(now, timeout):
                    proto.close_with_408()

    def __call__(self) -> RequestHandler:
        proto = EdgeProtocol(self, loop=self._loop, **self._kwargs)
        proto.metrics = self.metrics
        self.metrics.open_connections += 1
        return proto
