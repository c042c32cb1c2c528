"""The client-bound response for a proxied exchange.

aiohttp's StreamResponse builds a CIMultiDict, adds Content-Type and Server when
missing and re-serialises every header; for a proxy that is both wrong (a proxy must
not invent a Content-Type) and the largest per-request cost after the syscalls. This
subclass writes the backend's already-filtered header lines as they are, and only
decides what is hop-by-hop for the client connection: framing (Content-Length or
chunked, RFC 9112 §6), Connection, and Date when the backend sent none (RFC 9110
§6.6.1). aiohttp's writer still owns the socket, keep-alive and flow control.

Every status line says HTTP/1.1, whatever the client's version: RFC 9112 §2.3 (a
server sends the highest version it conforms to), as nginx does; framing and
Connection still follow the client's version. `plain_answer` is Bascule's own short
error or status answer, written the same way (no Server header, no request bytes).
"""

from __future__ import annotations

from http import HTTPStatus

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.web_request import BaseRequest

__all__ = ["CompleteResponse", "ProxiedResponse", "plain_answer"]

_NO_BODY_STATUS = frozenset({204, 304})


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
        version = request.version
        length = self._upstream_length
        status = self.status
        if status in _NO_BODY_STATUS or 100 <= status < 200:
            framing = b"" if status == 204 or length is None else (
                b"Content-Length: %d\r\n" % length)
        elif request.method == "HEAD":
            framing = b"" if length is None else b"Content-Length: %d\r\n" % length
        elif length is not None:
            writer.length = length
            framing = b"Content-Length: %d\r\n" % length
        elif version >= HttpVersion11:
            writer.enable_chunking()
            codings = self._codings
            framing = (b"Transfer-Encoding: " + codings + b", chunked\r\n" if codings
                       else b"Transfer-Encoding: chunked\r\n")
        else:
            framing = b""
            keep_alive = False  # HTTP/1.0 without a length: the body ends at close
        self._keep_alive = keep_alive
        self._framing = framing + _connection_and_date(version, keep_alive, self._has_date)

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
        version = request.version
        keep_alive = request.keep_alive and not self._close
        status = self.status
        length = self._length
        framing = _connection_and_date(version, keep_alive, self._has_date)
        if length is not None and status != 204 and status >= 200:
            framing = b"Content-Length: %d\r\n" % length + framing
        with_body = request.method != "HEAD" and status not in _NO_BODY_STATUS
        transport.write(b"".join((
            b"HTTP/1.1 %d " % status, self._reason_bytes,
            b"\r\n", self._head_block, framing, b"\r\n",
            self._complete_body if with_body else b"")))
        self._keep_alive = keep_alive
        self._eof_sent = True
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


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
