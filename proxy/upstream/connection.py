"""One keep-alive HTTP/1.1 connection to a backend, as an asyncio protocol.

An exchange is: `begin()` (new llhttp parser, head written), optional body writes with
`drain()`, `read_head()`, `read_chunk()` until b"", then `finish()` says whether the
pool may put the connection back on its idle list.

The exchange is a written state machine (`Phase`); the socket's own end is the
separate fact `closed`, and a failure is `_error` (what read_head/read_chunk raise):

    IDLE ──begin()──► AWAITING_HEAD ──1xx head──► AWAITING_HEAD (queued for relay)
                          │   └──final head, body follows──► READING_BODY
                          └──final head of HEAD/204/304──► COMPLETE
    READING_BODY ──last body byte (length, last chunk, or close when close-delimited)──► COMPLETE
    any ──finish() / close()──► IDLE

Invariants that decide reuse — `finish()` is True only when all hold: the phase is
COMPLETE; the request was sent whole; the backend allowed keep-alive; no error; the
socket is open; no body byte is left unread; and nothing arrived after the response
(`_discarding`). Bytes in IDLE close the connection; bytes in COMPLETE set
`_discarding`. Response framing
follows RFC 9112 §6.3: HEAD and 1xx/204/304 have no body; Content-Length or chunked
delimit it; otherwise it runs to connection close (then the connection is not reused).
All timeouts are a single loop timer re-armed per phase, not a task or context
manager per request.

Exactly one response per request: parsing stops at the end of the final response
(a parser callback raises `_StopParsing` when another message would begin, or when
bytes follow a bodiless HEAD/204/304 response). Whatever follows — more bytes in the
same read or a later one — cannot belong to any request, so the response already
received is delivered intact and the connection is closed instead of reused (as
nginx and HAProxy do), reported once per backend. Interim 1xx heads are queued for
the exchange to relay (RFC 9110 §15.2). The heads' total size and each head's field
count are bounded (`ResponseLimits`); over them the exchange fails with
`UpstreamInvalidResponse` before the parser has buffered more than one read beyond
the limit.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable

import httptools

from proxy.errors import UpstreamInvalidResponse, UpstreamProtocolError, UpstreamTimeout
from proxy.headers import ResponseHeaderFilter
from proxy.upstream.heads import InterimHead, ResponseHead, ResponseLimits

__all__ = ["InterimHead", "Phase", "ResponseHead", "ResponseLimits", "UpstreamConnection"]


class Phase(enum.Enum):
    """Where an upstream connection is in its exchange (module docstring)."""

    IDLE = "idle"
    AWAITING_HEAD = "awaiting head"
    READING_BODY = "reading body"
    COMPLETE = "complete"


IDLE, AWAITING_HEAD, READING_BODY, COMPLETE = (
    Phase.IDLE, Phase.AWAITING_HEAD, Phase.READING_BODY, Phase.COMPLETE)

# Upstream body bytes buffered before we stop reading the socket (backpressure
# from a slow client reaches the backend through TCP flow control).
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024


class _StopParsing(Exception):
    """Raised from a parser callback: the final response is complete and what the
    parser is looking at is not part of it."""


_DEFAULT_LIMITS = ResponseLimits()


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop,
                 limits: ResponseLimits = _DEFAULT_LIMITS,
                 on_violation: Callable[[str], None] | None = None) -> None:
        self._loop = loop
        self._limits = limits
        self._on_violation = on_violation
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.phase = IDLE
        self.received_any = False
        self._parser: httptools.HttpResponseParser | None = None
        self._is_head = False
        self._interim = False
        self._reason = b""
        self._fields = ResponseHeaderFilter()
        self._head: ResponseHead | None = None
        self._interims: deque[InterimHead] = deque()
        self._head_bytes = 0  # bytes received before the final head was complete
        self._head_size = 0  # parsed size of the heads so far (status lines and fields)
        self._feeding = 0  # size of the read being parsed
        self._discarding = False  # bytes followed the response: not reusable
        self._head_waiter: asyncio.Future[None] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._body_seen = 0
        self._raw_length = -1  # Content-Length of the body being received, once known
        self._raw_left = 0  # body bytes still expected once the parser is bypassed
        self._body_waiter: asyncio.Future[None] | None = None
        self._keep_alive = False
        self._close_delimited = False
        self._error: BaseException | None = None
        self._reading_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._total_timer: asyncio.TimerHandle | None = None
        self._sink: asyncio.Transport | None = None  # client transport while splicing
        self._sink_high = 0
        self._sink_paused = False
        self._splice_waiter: asyncio.Future[None] | None = None
        self._idle_limit = 0.0
        self._last_data = 0.0
        self._request_sent = False

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase is IDLE:
            # Bytes from an idle connection cannot be framed: the connection is unusable.
            self._fail(UpstreamProtocolError("unexpected data from backend"))
            self._report("bytes from an idle connection")
            return
        if phase is COMPLETE:
            self._after_response()
            return
        self.received_any = True
        raw_left = self._raw_left
        if raw_left > 0:
            # Content-Length body past the first packet: the bytes are the body, so
            # they skip the parser and are passed on without another copy.
            size = len(data)
            if size > raw_left:
                # More than Content-Length: the body is what was announced (as nginx
                # does); the excess cannot be framed, so the connection is not reused.
                data = data[:raw_left]
                size = raw_left
                self._after_response()
            self._raw_left = raw_left - size
            sink = self._sink
            if sink is None:
                self.on_body(data)
                if self._raw_left == 0:
                    self.phase = COMPLETE
                    self._wake_body()
                return
            if sink.is_closing():
                self._fail(ConnectionResetError("client connection closed"))
                return
            sink.write(data)
            self._last_data = self._loop.time()
            if self._raw_left == 0:
                self.phase = COMPLETE
                self._wake_splice()
            elif sink.get_write_buffer_size() > self._sink_high:
                # The client is slower than the backend: stop reading until it drains.
                self.transport.pause_reading()  # type: ignore[union-attr]
                self._sink_paused = True
                self._wake_splice()
            return
        in_head = self._head is None
        self._feeding = len(data)
        try:
            self._parser.feed_data(data)  # type: ignore[union-attr]
        except httptools.HttpParserUpgrade:
            if self.phase is COMPLETE:
                self._after_response()
            else:
                self._fail(UpstreamInvalidResponse("backend switched protocols unexpectedly"))
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, UpstreamInvalidResponse):
                self._fail(cause)
            elif self.phase is COMPLETE:
                # _StopParsing, or llhttp refusing bytes after a `Connection: close`
                # response: either way the response is whole and nothing follows it.
                self._after_response()
            else:
                self._fail(UpstreamInvalidResponse(f"invalid HTTP from backend: {exc}"))
            return
        if in_head and self._head is None:
            # Still no final head: bound what the parser holds before it is complete.
            self._head_bytes += len(data)
            if self._head_bytes > self._limits.max_head_size:
                self._fail(UpstreamInvalidResponse(
                    "response head over max_response_header_size"))
                return
        if self._raw_length >= 0 and self.phase is READING_BODY:
            self._raw_left = self._raw_length - self._body_seen
            self._raw_length = -1

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self._cancel_timer()
        self._cancel_total()
        phase = self.phase
        if phase is not IDLE and phase is not COMPLETE and self._error is None:
            if phase is READING_BODY and self._close_delimited:
                self.phase = COMPLETE
                self._keep_alive = False
                self._wake_body()
                self._wake_splice()
            else:
                self._set_error(UpstreamProtocolError("backend closed the connection"))
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self._reason += status

    # on_header is bound per exchange to the ResponseHeaderFilter's add() (see
    # _new_fields), so each header costs one call and no second pass.

    def on_message_begin(self) -> None:
        if self.phase is COMPLETE:
            raise _StopParsing  # a second response: never merged into the first

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        fields = self._fields
        limits = self._limits
        if len(fields.kept) + fields.dropped > limits.max_headers:
            raise UpstreamInvalidResponse("response head over max_response_headers")
        if self._head_bytes + self._feeding > limits.max_head_size:
            # Only when every byte received so far could exceed the limit is the
            # head measured (the common small response skips it).
            self._head_size += len(self._reason) + fields.size + 15
            if self._head_size > limits.max_head_size:
                raise UpstreamInvalidResponse("response head over max_response_header_size")
        if status == 101:
            raise UpstreamInvalidResponse("backend switched protocols unexpectedly")
        if 100 <= status < 200:
            # Interim responses (100 Continue, 103 Early Hints) are queued for the
            # exchange to relay; the response-header deadline keeps running.
            self._interim = True
            self._interims.append(InterimHead(status, self._reason, fields.block()))
            fields.__init__()  # type: ignore[misc]  # same object: the parser holds its add()
            self._reason = b""
            waiter = self._head_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            return
        self._head = ResponseHead(status, self._reason, fields)
        self._keep_alive = parser.should_keep_alive()
        if self._is_head or status in (204, 304):
            self.phase = COMPLETE
        else:
            self.phase = READING_BODY
            self._close_delimited = not fields.delimited
            if self._close_delimited:
                self._keep_alive = False
            elif fields.body_length is not None:
                self._raw_length = fields.body_length
        self._cancel_timer()
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.phase is COMPLETE:
            # Bytes after a HEAD/204/304 head (or past the body): not this response's.
            raise _StopParsing
        self._chunks.append(body)
        self._body_seen += len(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._wake_body()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.phase is COMPLETE:
            # HEAD/204/304 completed at the head; llhttp agrees, nothing to do.
            return
        self.phase = COMPLETE
        self._keep_alive = self._keep_alive and self._parser.should_keep_alive()  # type: ignore[union-attr]
        self._wake_body()

    # -- the exchange API -------------------------------------------------------------

    def begin(self, head: bytes, *, is_head: bool, body: list[bytes] | None = None) -> None:
        """Start one request/response exchange and write the request head (and a
        whole body in the same write, when given)."""
        self.phase = AWAITING_HEAD
        self.received_any = False
        self._new_fields()
        self._parser = httptools.HttpResponseParser(self)
        self._is_head = is_head
        self._interim = False
        self._reason = b""
        self._head = None
        self._interims.clear()
        self._head_bytes = 0
        self._head_size = 0
        self._discarding = False
        self._chunks.clear()
        self._buffered = 0
        self._body_seen = 0
        self._raw_length = -1
        self._raw_left = 0
        self._keep_alive = False
        self._close_delimited = False
        self._error = None
        self._request_sent = False
        if body:
            self.transport.writelines([head, *body])  # type: ignore[union-attr]
        else:
            self.transport.write(head)  # type: ignore[union-attr]

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self.transport.write(data)  # type: ignore[union-attr]

    async def drain(self) -> None:
        if self._error is not None:
            raise self._error
        if self._write_paused and not self.closed:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter
            self._drain_waiter = None
            if self._error is not None:
                raise self._error

    def request_sent(self) -> None:
        self._request_sent = True

    @property
    def head_received(self) -> bool:
        return self._head is not None

    async def read_head(self) -> ResponseHead | InterimHead:
        """The next head: interim 1xx heads in order, then the final one."""
        if not self._interims and self._head is None and self._error is None:
            self._head_waiter = self._loop.create_future()
            try:
                await self._head_waiter
            finally:
                self._head_waiter = None
        if self._interims:
            return self._interims.popleft()
        if self._error is not None:
            raise self._error
        assert self._head is not None
        return self._head

    @property
    def has_buffered_body(self) -> bool:
        return bool(self._chunks)

    def take_buffered_body(self) -> bytes | None:
        """The whole body if it has already arrived (the common small-response case),
        else None; lets the caller answer with one write instead of streaming."""
        if self.phase is not COMPLETE or self._error is not None:
            return None
        body = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return body

    async def read_chunk(self) -> bytes:
        """The next piece of the body; b"" once the body is complete."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.phase is COMPLETE:
                return b""
            self._body_waiter = self._loop.create_future()
            try:
                await self._body_waiter
            finally:
                self._body_waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._reading_paused and self._buffered < _LOW_WATER and self.phase is not COMPLETE:
            self._reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        return chunk

    # -- splicing: the rest of a Content-Length body straight to the client --------

    @property
    def can_splice(self) -> bool:
        """True once a Content-Length body is being received past the parser."""
        return self._raw_left > 0 and self._error is None and self.phase is READING_BODY

    def splice(self, sink: asyncio.Transport, read_idle: float) -> None:
        """From now on, body bytes go from data_received straight to the client's
        transport: no task switch, queue or extra copy per chunk. The caller has
        written everything buffered so far. Backpressure: reading from the backend
        pauses while the client's write buffer is over its high-water mark."""
        self._sink = sink
        self._sink_high = sink.get_write_buffer_limits()[1]
        self._sink_paused = False
        self._idle_limit = read_idle
        self._last_data = self._loop.time()
        self._cancel_timer()
        if read_idle:
            self._timer = self._loop.call_later(read_idle, self._check_idle)

    async def splice_event(self) -> bool:
        """Wait until the spliced body is complete (True) or the client needs to
        drain (False, then call splice_resume() once it has); raises on failure."""
        while True:
            if self._error is not None:
                raise self._error
            if self.phase is COMPLETE:
                return True
            if self._sink_paused:
                return False
            self._splice_waiter = self._loop.create_future()
            try:
                await self._splice_waiter
            finally:
                self._splice_waiter = None

    def splice_resume(self) -> None:
        if self._sink_paused and not self.closed:
            self._sink_paused = False
            self._last_data = self._loop.time()
            self.transport.resume_reading()  # type: ignore[union-attr]

    def _check_idle(self) -> None:
        # One timer per body rather than one per chunk: it re-arms for what is left.
        idle = self._loop.time() - self._last_data
        if self._sink_paused or idle < self._idle_limit:
            remaining = self._idle_limit if self._sink_paused else self._idle_limit - idle
            self._timer = self._loop.call_later(remaining, self._check_idle)
        else:
            self._timer = None
            self._fail(UpstreamTimeout("read idle timeout"))

    def _wake_splice(self) -> None:
        waiter = self._splice_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def arm_timer(self, seconds: float | None, what: str) -> None:
        self._cancel_timer()
        if seconds:
            self._timer = self._loop.call_later(seconds, self._on_timeout, what)

    def arm_total(self, seconds: float) -> None:
        self._total_timer = self._loop.call_later(seconds, self._on_timeout, "total")

    def abort(self, exc: BaseException) -> None:
        """Fail the exchange with `exc` (what read_head/read_chunk will raise)."""
        self._fail(exc)

    def finish(self) -> bool:
        """End the exchange; True when the connection may be reused."""
        self._cancel_timer()
        self._cancel_total()
        complete = self.phase is COMPLETE
        self.phase = IDLE
        self._parser = None
        self._sink = None
        return (
            complete and self._keep_alive and self._request_sent
            and not self._discarding and self._error is None and not self.closed
            and not self._chunks
        )

    def close(self) -> None:
        self._cancel_timer()
        self._cancel_total()
        self._sink = None
        self.phase = IDLE
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True

    # -- internals --------------------------------------------------------------------

    def _after_response(self) -> None:
        """Bytes followed the complete response: it stands as received, but the
        connection is read no further and never reused."""
        self._keep_alive = False
        if not self._discarding:
            self._discarding = True
            if self.transport is not None and not self.closed:
                self.transport.pause_reading()
            self._report("bytes after the end of a response")

    def _report(self, what: str) -> None:
        if self._on_violation is not None:
            self._on_violation(what)

    def _new_fields(self) -> None:
        # httptools looks on_header up once, when the parser is made.
        fields = self._fields = ResponseHeaderFilter()
        self.on_header = fields.add

    def _on_timeout(self, what: str) -> None:
        if what == "total":
            self._total_timer = None
        else:
            self._timer = None
        self._fail(UpstreamTimeout(f"{what} timeout"))

    def _fail(self, exc: BaseException) -> None:
        self._set_error(exc)
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True

    def _set_error(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        for waiter in (self._head_waiter, self._body_waiter, self._drain_waiter,
                       self._splice_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _wake_body(self) -> None:
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _cancel_total(self) -> None:
        if self._total_timer is not None:
            self._total_timer.cancel()
            self._total_timer = None

    def __repr__(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        state = "closed" if self.closed else self.phase.value
        return f"UpstreamConnection({peer}, {state})"
