"""The client-bound response for a proxied exchange.

aiohttp's StreamResponse builds a CIMultiDict, adds Content-Type and Server when
missing and re-serialises every header; for a proxy that is both wrong (a proxy must
not invent a Content-Type) and the largest per-request cost after the syscalls. This
subclass writes the backend's already-filtered header lines as they are, and only
decides what is hop-by-hop for the client connection: framing (Content-Length or
chunked, RFC 9112 §6), Connection, and Date when the backend sent none (RFC 9110
§6.6.1). aiohttp's writer still owns the socket, keep-alive and flow control.

This module is the one response writer: every answer Bascule gives — a proxied
stream, a response that arrived whole, a plugin's response, a quick answer from a
cache, an error page — gets its status line and framing from `frame()`, which owns
the rules: HEAD and 1xx/204/304 carry no body (RFC 9112 §6.3) but a HEAD or 304
keeps the representation's Content-Length, 204 and 1xx none; a known length is sent
as Content-Length; otherwise chunked to HTTP/1.1 clients (after any transfer coding
the backend applied) or close-delimited to HTTP/1.0 clients.

Every status line says HTTP/1.1, whatever the client's version: RFC 9112 §2.3 (a
server sends the highest version it conforms to), as nginx does; framing and
Connection still follow the client's version. `plain_answer` is Bascule's own short
error or status answer, written the same way (no Server header, no request bytes).
"""

from __future__ import annotations

import enum
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.web_request import BaseRequest

from proxy.routing import normalise_host

__all__ = ["COMPLETE_WRITE_MAX", "CompleteResponse", "Framing", "ProxiedResponse", "frame",
           "has_no_body", "https_redirect", "plain_answer", "whole_answer"]

_NO_BODY_STATUS = frozenset({204, 304})
# Whole answers up to this size go out in one transport write (CompleteResponse).
COMPLETE_WRITE_MAX = 1024 * 1024


def has_no_body(method: str, status: int) -> bool:
    """RFC 9112 §6.3: the answer to HEAD, and 1xx, 204 and 304 answers, have no body."""
    return method == "HEAD" or status in _NO_BODY_STATUS or 100 <= status < 200


class Framing(enum.Enum):
    NONE = "no body"
    LENGTH = "Content-Length"
    CHUNKED = "chunked"
    CLOSE = "until close"


def frame(method: str, status: int, length: int | None, version: HttpVersion,
          keep_alive: bool, has_date: bool, codings: bytes = b""
          ) -> tuple[Framing, bytes, bool]:
    """How an answer is framed for this client: the kind, the framing/Connection/Date
    lines, and whether the connection stays open after it."""
    if has_no_body(method, status):
        kind = Framing.NONE
        lines = b"" if length is None or status == 204 or status < 200 else (
            b"Content-Length: %d\r\n" % length)
    elif length is not None:
        kind, lines = Framing.LENGTH, b"Content-Length: %d\r\n" % length
    elif version >= HttpVersion11:
        kind = Framing.CHUNKED
        lines = (b"Transfer-Encoding: " + codings + b", chunked\r\n" if codings
                 else b"Transfer-Encoding: chunked\r\n")
    else:
        kind, lines = Framing.CLOSE, b""
        keep_alive = False  # HTTP/1.0 without a length: the body ends at close
    return kind, lines + _connection_and_date(version, keep_alive, has_date), keep_alive


def _connection_and_date(version: HttpVersion, keep_alive: bool, has_date: bool) -> bytes:
    """Connection as the client's HTTP version needs it, and Date when the stored or
    upstream fields have none (RFC 9110 §6.6.1)."""
    fields = b""
    if not keep_alive:
        if version == HttpVersion11:
            fields = b"Connection: close\r\n"
    elif version == HttpVersion10:
        fields = b"Connection: keep-alive\r\n"
    if not has_date:
        fields += b"Date: " + rfc822_formatted_time().encode("ascii") + b"\r\n"
    return fields


def _connection_fields(request: BaseRequest) -> bytes:
    """Fields the connection adds to every answer (Strict-Transport-Security on a TLS
    listener; proxy/server.py sets them per connection)."""
    return getattr(request.protocol, "response_fields", b"")


class ProxiedResponse(web.StreamResponse):
    def __init__(self, status: int, reason: bytes, head_block: bytes,
                 length: int | None, has_date: bool, codings: bytes = b"") -> None:
        super().__init__(status=status)
        self._codings = codings  # transfer codings applied before chunked, e.g. b"gzip"
        self._reason_bytes = reason
        self._head_block = head_block
        self._upstream_length = length
        self._has_date = has_date
        self._framing = b""

    async def _prepare_headers(self) -> None:
        request = self._req
        writer = self._payload_writer
        assert request is not None and writer is not None
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = request.keep_alive
        kind, self._framing, self._keep_alive = frame(
            request.method, self.status, self._upstream_length, request.version,
            keep_alive, self._has_date, self._codings)
        self._framing += _connection_fields(request)
        if kind is Framing.LENGTH:
            writer.length = self._upstream_length
        elif kind is Framing.CHUNKED:
            writer.enable_chunking()

    async def _write_headers(self) -> None:
        request = self._req
        writer = self._payload_writer
        assert request is not None and writer is not None
        reason = self._reason_bytes or self.reason.encode("latin-1")
        head = b"".join((
            b"HTTP/1.1 %d " % self.status, reason, b"\r\n",
            self._head_block, self._framing, b"\r\n",
        ))
        # Same hand-off as StreamWriter.write_headers(), minus re-serialising:
        # the head is sent with the first body bytes (or at once, below).
        writer._headers_buf = head  # type: ignore[attr-defined]
        writer._headers_written = False  # type: ignore[attr-defined]
        if self._send_headers_immediately:
            writer.send_headers()


_BODY_LENGTH = -1  # CompleteResponse: Content-Length is the body's length


class CompleteResponse(web.StreamResponse):
    """A response whose head and body are in hand (a small backend response already
    received whole, a cache hit, Bascule's own answers): one transport write, without
    StreamResponse's preparation or the payload writer's buffering. Framing and
    Connection are decided as in ProxiedResponse: `length` is the Content-Length to
    announce when it is not the body's (a HEAD or 304 answer announces the
    representation's, None for none). Meant for small bodies: the bytes go to the
    transport at once, without waiting for the client to drain."""

    def __init__(self, status: int, reason: bytes, head_block: bytes, body: bytes,
                 has_date: bool, *, close: bool = False,
                 length: int | None = _BODY_LENGTH) -> None:
        super().__init__(status=status)
        self._close = close
        self._length = len(body) if length == _BODY_LENGTH else length
        self._reason_bytes = reason
        self._head_block = head_block
        self._complete_body = body
        self._has_date = has_date

    async def prepare(self, request: BaseRequest) -> None:
        if self._eof_sent:
            return None
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client connection closed")
        status = self.status
        kind, framing, keep_alive = frame(
            request.method, status, self._length, request.version,
            request.keep_alive and not self._close, self._has_date)
        with_body = kind is not Framing.NONE
        transport.write(b"".join((
            b"HTTP/1.1 %d " % status, self._reason_bytes,
            b"\r\n", self._head_block, framing, _connection_fields(request), b"\r\n",
            self._complete_body if with_body else b"")))
        self._keep_alive = keep_alive
        self._eof_sent = True
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None

    @property
    def whole_body(self) -> bytes:
        return self._complete_body


_TEXT_PLAIN = b"Content-Type: text/plain; charset=utf-8\r\n"
# RFC 9110's reason phrases where Python 3.11's HTTPStatus still has RFC 7231's
_PHRASES = {413: b"Content Too Large", 414: b"URI Too Long", 422: b"Unprocessable Content"}


def plain_answer(status: int, message: str, *, close: bool = False,
                 fields: bytes = b"") -> CompleteResponse:
    """Bascule's own answer: `message` as text/plain, an HTTP/1.1 status line, and
    `Connection: close` when `close` (after a framing or size error the rest of the
    connection cannot be trusted). `fields` are extra ready-made header lines."""
    reason = _PHRASES.get(status)
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase.encode("ascii")
        except ValueError:
            reason = b"Error"
    return CompleteResponse(status, reason, _TEXT_PLAIN + fields,
                            message.encode("utf-8") + b"\n", False, close=close)


def whole_answer(status: int, reason: bytes, head_block: bytes, body: bytes, has_date: bool,
                 *, length: int | None = _BODY_LENGTH) -> web.StreamResponse:
    """An answer whose body is in hand: one write when small, else streamed from the
    bytes with backpressure (aiohttp writes it when the handler returns it)."""
    if len(body) <= COMPLETE_WRITE_MAX:
        return CompleteResponse(status, reason, head_block, body, has_date, length=length)
    return _BytesResponse(status, reason, head_block, body, has_date)


class _BytesResponse(ProxiedResponse):
    """A large whole body, written through aiohttp's payload writer (it drains)."""

    def __init__(self, status: int, reason: bytes, head_block: bytes, body: bytes,
                 has_date: bool) -> None:
        super().__init__(status, reason, head_block, len(body), has_date)
        self._whole_body = body
        self._send_headers_immediately = False

    async def prepare(self, request: BaseRequest) -> Any:
        writer = await super().prepare(request)
        if not has_no_body(request.method, self.status):
            await self.write(self._whole_body)
        return writer


def https_redirect(host_header: str, target: str, port: int) -> CompleteResponse:
    """`[server.tls] redirect_http`: 308 to the same URL over HTTPS (308 keeps the
    method and body, RFC 9110 §15.4.9), on the first TLS listener's port."""
    host = normalise_host(host_header)
    if not host:
        return plain_answer(400, "a Host is needed to redirect to HTTPS")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    authority = host if port == 443 else f"{host}:{port}"
    return plain_answer(308, f"https://{authority}{target}",
                        fields=b"Location: https://" + authority.encode("idna")
                        + target.encode("latin-1", "replace") + b"\r\n")
