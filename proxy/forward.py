"""Forwarding one request to a backend: route match → lease → upstream exchange →
response streamed back. This is the hot path: the per-request work is header
rewriting on bytes, one strategy pick and the exchange itself; bodies stream chunk
by chunk in both directions, with backpressure both ways.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict
from yarl import URL

from proxy.accesslog import AccessLog, AccessRecord
from proxy.errors import (
    AmbiguousPath,
    BadRequestBody,
    BasculeError,
    BodyTooLarge,
    ClientBodyTimeout,
    ClientGone,
    NoBackendError,
    NoRouteError,
    PluginError,
    UpstreamBusy,
    UpstreamConnectError,
    UpstreamInvalidResponse,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from proxy.headers import build_request_head, is_trusted
from proxy.metrics import Metrics
from proxy.models import Backend
from proxy.pathnorm import normal_form
from proxy.plugin import Handler, Plugin, ProxyRequest, ProxyResponse
from proxy.response import CompleteResponse, ProxiedResponse, plain_answer
from proxy.retry import RetryDecision, decide_retry
from proxy.routing import Route, normalise_host, strip_path_prefix
from proxy.runtime import Runtime, Upstream
from proxy.strategy import RequestContext
from proxy.upstream.connection import InterimHead, ResponseHead, UpstreamConnection
from proxy.upstream.pool import BackendPool
from proxy.websocket import WebSocketRequest, tunnel_websocket

__all__ = ["Forwarder", "Outcome", "error_response"]

log = logging.getLogger("bascule.forward")

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# Only these may be answered before the chain (RFC 9111 §4: an unsafe method must
# reach the origin, and invalidates what is stored, §4.4).
_SAFE_BODILESS: Final = frozenset({"GET", "HEAD"})
_NO_BODY_STATUS: Final = frozenset({204, 304})
# Quick answers up to this size go out in one transport write (CompleteResponse).
_COMPLETE_WRITE_MAX: Final = 1024 * 1024


def error_response(status: int, message: str, *, close: bool = False) -> web.StreamResponse:
    """Short plain-text error; never echoes request bytes."""
    return plain_answer(status, message, close=close)


class _IdleWatchdog:
    """Cancels the current task when no progress was made for the phase's limit
    (0: waiting for client body bytes, 1: waiting for the backend to take them).
    One timer per body, re-armed only when it fires, instead of a timeout context
    per chunk."""

    __slots__ = ("_handle", "_last", "_limits", "_loop", "_task", "fired", "phase")

    def __init__(self, loop: asyncio.AbstractEventLoop, client_idle: float,
                 backend_idle: float) -> None:
        self._loop = loop
        self._limits = (client_idle, backend_idle)
        self._task = asyncio.current_task(loop)
        self._last = loop.time()
        self.phase = 0
        self.fired = -1
        self._handle: asyncio.TimerHandle | None = loop.call_later(
            min(self._limits), self._check)

    def progress(self) -> None:
        self._last = self._loop.time()

    def _check(self) -> None:
        limit = self._limits[self.phase]
        idle = self._loop.time() - self._last
        if idle >= limit:
            self._handle = None
            self.fired = self.phase
            if self._task is not None:
                self._task.cancel()
        else:
            self._handle = self._loop.call_later(limit - idle, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


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


class Forwarder:
    def __init__(self, runtime: Runtime, metrics: Metrics | None = None,
                 access_log: AccessLog | None = None) -> None:
        self.metrics = metrics or Metrics(multiprocess=False, enabled=False)
        self.runtime = runtime
        self.access_log = access_log
        self._id_prefix = os.urandom(8).hex().encode()
        self._id_counter = 0

    @property
    def runtime(self) -> Runtime:
        return self._runtime

    @runtime.setter
    def runtime(self, runtime: Runtime) -> None:
        """Serve `runtime` (a reload's commit is this one assignment); each route's
        chain is composed once here, ending in the terminal step that forwards."""
        if runtime.chains and not runtime.handlers:
            runtime.handlers = {name: compose_chain(chain, self._terminal)
                                for name, chain in runtime.chains.items()}
        self._runtime = runtime

    async def _terminal(self, preq: ProxyRequest) -> ProxyResponse:
        """The chain's last step: what the plugins made of the request goes upstream
        (method, target and headers), and the response comes back as a
        ProxyResponse whose body streams from the backend."""
        call: _ChainCall = preq.engine
        line, rest, host = call.request_line, call.head_rest, call.client_host
        original = call.request._message.method
        method = preq.method
        if method != original:
            _check_method_change(original, method)
        if preq.target != call.target or method != original:
            line = (method.encode("ascii") + b" " + preq.target.encode("utf-8", "surrogateescape")
                    + b" HTTP/1.1\r\n")
        if list(preq.headers.items()) != list(call.headers.items()):
            raw = [(k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
                   for k, v in preq.headers.items()]
            runtime = call.runtime
            rest, host, _ = build_request_head(
                raw, peer=call.peer, trusted_peer=is_trusted(call.peer, runtime.trusted),
                framing=call.framing, request_id=call.request_id,
                policy=runtime.header_policy)
        exchange = _Exchange(call.request, call.route, call.upstream, call.runtime, line,
                             rest, host, call.has_body, call.chunked, call.hash_key,
                             self.metrics, call.outcome, call.body, call.body_done,
                             call.continue_sent, method)
        return await exchange.run_to_proxy_response()

    async def _write_proxy_response(self, request: web.BaseRequest, response: ProxyResponse,
                                    outcome: Outcome) -> web.StreamResponse:
        """Write what the plugin chain answered (the only place plugins' responses
        reach aiohttp); framing is decided here, as for direct responses."""
        headers = response.headers
        block = b"".join(f"{k}: {v}\r\n".encode("latin-1", "replace")
                         for k, v in headers.items())
        body = response.body
        no_body = request.method == "HEAD" or response.status in _NO_BODY_STATUS
        length = len(body) if isinstance(body, bytes) and not no_body else response.length
        resp = ProxiedResponse(response.status, response.reason.encode("latin-1", "replace"),
                               block, length, "Date" in headers)
        try:
            if isinstance(body, bytes):
                resp._send_headers_immediately = False
                await resp.prepare(request)
                if not no_body:
                    outcome.bytes_out = len(body)
                await resp.write_eof(b"" if no_body else body)
                return resp
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

    async def _write_quick(self, request: web.BaseRequest,
                           answer: tuple[int, bytes, bytes, bytes, bool],
                           outcome: Outcome) -> web.StreamResponse:
        status, reason, block, body, has_date = answer
        outcome.bytes_out = len(body) if request.method != "HEAD" else 0
        if len(body) <= _COMPLETE_WRITE_MAX:
            # aiohttp's prepare() call writes it, after this handler returns
            return CompleteResponse(status, reason, block, body, has_date)
        resp = ProxiedResponse(status, reason, block, len(body), has_date)
        resp._send_headers_immediately = False
        try:
            await resp.prepare(request)
            if request.method == "HEAD" or status in _NO_BODY_STATUS:
                await resp.write_eof()
            else:
                await resp.write_eof(body)
        except ConnectionError:
            pass
        return resp

    def next_request_id(self) -> bytes:
        # Unique across workers and instances (random 64-bit prefix per worker)
        # without a getrandom() syscall per request.
        self._id_counter += 1
        return b"%s%016x" % (self._id_prefix, self._id_counter)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # One runtime for the whole request: a reload swaps self.runtime, and this
        # request finishes on the runtime it started with.
        runtime = self.runtime
        loop = runtime.loop
        started = loop.time()
        outcome = Outcome()
        status = 499  # as nginx logs a client that went away before the response
        runtime.active += 1
        try:
            response = await self._handle(request, outcome, runtime)
            status = response.status
            return response
        finally:
            runtime.active -= 1
            duration = loop.time() - started
            # for max_connections: how long the connection has been idle
            request.protocol.idle_since = started + duration  # type: ignore[attr-defined]
            route = outcome.route
            message = request._message
            if self.metrics.enabled:
                self.metrics.record_request(route.name if route else "", outcome.upstream,
                                            message.method, status, duration,
                                            outcome.bytes_in, outcome.bytes_out)
            access_log = self.access_log
            if access_log is not None and access_log.enabled and (
                    route is None or route.access_log):
                access_log.log(AccessRecord(
                    time.time() - duration, request.protocol.peer,  # type: ignore[attr-defined]
                    message, status, outcome.bytes_out, duration, outcome.upstream,
                    outcome.backend, "", outcome.request_id))

    async def _handle(self, request: web.BaseRequest, outcome: Outcome,
                      runtime: Runtime) -> web.StreamResponse:
        # The parsed message (aiohttp's RawRequestMessage) is read directly: the
        # request's convenience properties re-derive the same values per access.
        message = request._message
        if message.version.major == 0:
            # HTTP/0.9 has no head: nothing to route or forward unambiguously (HAProxy: 400).
            return error_response(400, "HTTP/0.9 is not supported", close=True)
        target = message.path
        headers = message.headers
        host_header = headers.get("Host", "")
        authority = b""
        if not target.startswith("/"):
            if target == "*":
                path = "/"
            else:
                # absolute-form (RFC 9112 §3.2.2): the target's authority replaces
                # Host, for routing and for what the backend receives (as nginx does).
                try:
                    url = URL(target, encoded=True)
                except ValueError:
                    return error_response(400, "bad request target", close=True)
                if (not url.absolute or not url.raw_host
                        or url.scheme not in ("http", "https")):
                    return error_response(400, "bad request target", close=True)
                host_header = url.raw_authority
                authority = host_header.encode("ascii", "surrogateescape")
                target = url.raw_path_qs or "/"
                path = target.partition("?")[0]
        else:
            query_at = target.find("?")
            path = target if query_at < 0 else target[:query_at]
        try:
            route = runtime.routes.match(normalise_host(host_header), path)
        except AmbiguousPath:
            return error_response(AmbiguousPath.status, AmbiguousPath.public_message)
        if route is None:
            return error_response(NoRouteError.status, NoRouteError.public_message)
        upstream = runtime.upstreams[route.upstream]
        outcome.route = route
        outcome.upstream = upstream.name
        if route.normalise_path or (route.strip_prefix
                                    and not path.startswith(route.path_prefix)):
            # The route matched a normalised reading: forward the normal form (a
            # prefix cannot be stripped from bytes that do not spell it).
            query = target[len(path):]
            target = normal_form(path) + query

        quick = runtime.quick.get(route.name) if runtime.quick else None
        memo: dict[str, Any] | None = None
        if (quick is not None and message.method in _SAFE_BODILESS and not message.chunked
                and "Content-Length" not in headers):
            # The key the chain would see: the target after strip_prefix.
            quick_target = (strip_path_prefix(target, route.path_prefix)
                            if route.strip_prefix and route.path_prefix != "/" else target)
            answer_now, fetch = quick
            host = host_header
            answer = answer_now(message.method, host, quick_target, headers, route.name)
            if answer is None and fetch is not None:
                memo = {}
                answer = await fetch(message.method, host, quick_target, headers, route.name,
                                     memo)
            if answer is not None:
                return await self._write_quick(request, answer, outcome)

        peer = request.protocol.peer  # type: ignore[attr-defined]
        hash_on = upstream.hash_on
        hash_key = hash_on.extract(headers, message.path, peer) if hash_on else None
        if (message.upgrade and route.websocket
                and headers.get("Upgrade", "").lower() == "websocket"):
            return await tunnel_websocket(
                request, route, upstream, runtime,
                WebSocketRequest(target, authority, peer, hash_key, outcome), self.metrics)

        server = runtime.server
        length_text = headers.get("Content-Length")
        length = int(length_text) if length_text is not None else None
        chunked = message.chunked
        max_body = server.max_body_size
        if length is not None and max_body and length > max_body:
            return error_response(413, BodyTooLarge.public_message, close=True)

        if chunked:
            framing = b"Transfer-Encoding: chunked\r\n"
            has_body = True
        elif length is not None and (length > 0 or message.method not in ("GET", "HEAD")):
            framing = b"Content-Length: %d\r\n" % length
            has_body = length > 0
        else:
            framing = b""
            has_body = False

        body: list[bytes] | None = None
        body_done = continue_sent = False
        limit = route.buffer_requests
        if has_body and limit and (chunked or (length is not None and length <= limit)):
            # Read a small body before choosing a backend: a client trickling it then
            # holds no backend connection (nginx buffers every body).
            if (request.version >= (1, 1)
                    and headers.get("Expect", "").lower() == "100-continue"):
                continue_sent = True
                await request.writer.write(_CONTINUE)
            try:
                body, body_done = await _read_body(request, limit, max_body,
                                                   server.body_idle_timeout)
            except BasculeError as exc:
                return error_response(exc.status, exc.public_message, close=True)
            if body_done:
                size = sum(map(len, body))
                outcome.bytes_in = size
                if chunked:  # whole now: sent with a length, as nginx does
                    chunked = False
                    framing = b"Content-Length: %d\r\n" % size
                    has_body = size > 0

        if route.strip_prefix and route.path_prefix != "/":
            target = strip_path_prefix(target, route.path_prefix)
        request_id = b""
        if server.request_id:
            client_id = headers.get("X-Request-Id") if server.trust_request_id else None
            request_id = (client_id.encode("latin-1", "replace") if client_id
                          else self.next_request_id())
            outcome.request_id = request_id
        head_rest, client_host, head_size = build_request_head(
            message.raw_headers,
            peer=peer,
            trusted_peer=is_trusted(peer, runtime.trusted),
            framing=framing,
            request_id=request_id,
            authority=authority,
            policy=runtime.header_policy,
        )
        if head_size > server.max_header_size:
            return error_response(431, "request header fields too large", close=True)
        request_line = (message.method.encode("ascii") + b" "
                        + target.encode("utf-8", "surrogateescape") + b" HTTP/1.1\r\n")
        if length:
            outcome.bytes_in = length
        chain = runtime.chains.get(route.name) if runtime.chains else None
        try:
            if chain:
                chain_headers = CIMultiDict(headers)
                if authority:  # what the backend gets as Host (RFC 9112 §3.2.2)
                    chain_headers["Host"] = host_header
                call = _ChainCall(request, route, upstream, runtime, outcome, target,
                                  request_line, head_rest, client_host, chain_headers,
                                  framing, request_id, peer, has_body, chunked, hash_key,
                                  body, body_done, continue_sent)
                proxy_request = ProxyRequest(message.method, target, chain_headers.copy(),
                                             peer, route.name, upstream.name, memo or {},
                                             engine=call)
                handler = runtime.handlers[route.name]
                return await self._write_proxy_response(request, await handler(proxy_request),
                                                        outcome)
            exchange = _Exchange(request, route, upstream, runtime, request_line, head_rest,
                                 client_host, has_body, chunked, hash_key, self.metrics,
                                 outcome, body, body_done, continue_sent)
            return await exchange.run()
        except NoBackendError:
            reason = runtime.unavailable_reason(upstream.name)
            text = NoBackendError.public_message
            return error_response(503, f"{text}: {reason}" if reason else text)
        except BasculeError as exc:
            if isinstance(exc, PluginError):
                log.error("route %s: %s", route.name, exc)
            return error_response(exc.status, exc.public_message,
                                  close=exc.status in (408, 413))


async def _read_body(request: web.BaseRequest, limit: int, max_body: int,
                     idle: float) -> tuple[list[bytes], bool]:
    """Up to `limit` bytes of the request body (a little more: whole reads), and
    whether that was all of it. What has already arrived is taken without a timer;
    only a wait for more bytes is bounded by `idle`."""
    content = request.content
    chunks: list[bytes] = []
    total = 0
    try:
        while total <= limit:
            chunk = content.read_nowait()
            if not chunk:
                if content.at_eof():
                    return chunks, True
                async with asyncio.timeout(idle or None):
                    chunk = await content.readany()
                if not chunk:
                    return chunks, True
            total += len(chunk)
            if max_body and total > max_body:
                raise BodyTooLarge("body over max_body_size")
            chunks.append(chunk)
    except TimeoutError:
        raise ClientBodyTimeout("client body idle timeout") from None
    except (HttpProcessingError, ConnectionError, OSError) as exc:
        raise BadRequestBody(f"client body: {exc}") from None
    return chunks, False


_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                   "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _check_method_change(original: str, method: str) -> None:
    """A plugin may change the method, to a valid token (RFC 9110 §9.1), but not to
    or from HEAD: the client's response framing depends on it."""
    if not method or not all(c in _TCHAR for c in method):
        raise PluginError(f"a plugin set an invalid method {method!r}")
    if (method == "HEAD") != (original == "HEAD"):
        raise PluginError(f"a plugin changed the method {original} to {method}: "
                          "not to or from HEAD")


def compose_chain(chain: tuple[Plugin, ...], terminal: Handler) -> Handler:
    """One handler for a route: its plugins, outermost first, around `terminal`."""
    handler = terminal
    for plugin in reversed(chain):
        handler = _step(plugin, handler)
    return handler


def _step(plugin: Plugin, call_next: Handler) -> Handler:
    async def step(request: ProxyRequest) -> ProxyResponse:
        return await plugin(request, call_next)
    return step


class _ChainCall:
    """What the chain's terminal step needs of one request beyond the ProxyRequest
    the plugins see and may change."""

    __slots__ = ("body", "body_done", "chunked", "client_host", "continue_sent", "framing",
                 "has_body", "hash_key", "head_rest", "headers", "outcome", "peer",
                 "request", "request_id", "request_line", "route", "runtime", "target",
                 "upstream")

    def __init__(self, request: web.BaseRequest, route: Route, upstream: Upstream,
                 runtime: Runtime, outcome: Outcome, target: str, request_line: bytes,
                 head_rest: bytes, client_host: bytes, headers: CIMultiDict[str],
                 framing: bytes, request_id: bytes, peer: str, has_body: bool,
                 chunked: bool, hash_key: str | None, body: list[bytes] | None,
                 body_done: bool, continue_sent: bool) -> None:
        self.request = request
        self.route = route
        self.upstream = upstream
        self.runtime = runtime
        self.outcome = outcome
        self.target = target
        self.request_line = request_line
        self.head_rest = head_rest
        self.client_host = client_host
        self.headers = headers  # as the chain was given them (changes are detected)
        self.framing = framing
        self.request_id = request_id
        self.peer = peer
        self.has_body = has_body
        self.chunked = chunked
        self.hash_key = hash_key
        self.body = body
        self.body_done = body_done
        self.continue_sent = continue_sent


class _UpstreamBody:
    """A streamed backend body for plugins: chunks as they arrive; the exchange is
    finished (connection and lease released) when it ends, fails or is closed."""

    def __init__(self, exchange: _Exchange, started: float) -> None:
        self._exchange = exchange
        self._started = started
        self._done = False

    def __aiter__(self) -> _UpstreamBody:
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
            exchange._release_conn(conn.finish())
            self._close(True)
            raise StopAsyncIteration
        exchange.outcome.bytes_out += len(chunk)
        return chunk

    async def aclose(self) -> None:
        if not self._done:
            self._close(False)

    def _close(self, ok: bool) -> None:
        self._done = True
        self._exchange._finish(self._started, ok)


class _Exchange:
    """State of one proxied request across its attempts."""

    __slots__ = ("backend", "body_complete", "body_copy", "chunked", "client_host", "conn",
                 "continue_sent", "has_body", "hash_key", "head_rest", "method", "metrics",
                 "outcome", "pool", "request", "request_line", "route", "runtime", "upstream")

    def __init__(
        self, request: web.BaseRequest, route: Route, upstream: Upstream, runtime: Runtime,
        request_line: bytes, head_rest: bytes, client_host: bytes, has_body: bool,
        chunked: bool, hash_key: str | None, metrics: Metrics, outcome: Outcome,
        body: list[bytes] | None = None, body_done: bool = False,
        continue_sent: bool = False, method: str | None = None,
    ) -> None:
        self.method = method or request.method  # as sent upstream (a plugin may change it)
        self.hash_key = hash_key
        self.metrics = metrics
        self.outcome = outcome
        self.request = request
        self.route = route
        self.upstream = upstream
        self.runtime = runtime
        self.request_line = request_line
        self.head_rest = head_rest
        self.client_host = client_host
        self.has_body = has_body
        self.chunked = chunked
        self.backend: Backend | None = None
        self.pool: BackendPool | None = None
        self.conn: UpstreamConnection | None = None
        # Request body kept for a retry while it is within retry.retry_body_limit
        # (read before the backend was chosen when the route buffers requests)
        self.body_copy: list[bytes] | None = body if body is not None else (
            [] if has_body else None)
        self.body_complete = body_done
        self.continue_sent = continue_sent

    async def run(self) -> web.StreamResponse:
        started = self.runtime.loop.time()
        ok = False
        try:
            head = await self._connect_and_send()
            resp = await self._respond(head)
            ok = True
            return resp
        except UpstreamTimeout:
            if self.backend is not None:
                self.metrics.backend(self.upstream.name, self.backend.id).timeouts += 1
            raise
        finally:
            self._finish(started, ok)

    def _finish(self, started: float, ok: bool) -> None:
        """Release the connection (unless already given back) and the lease."""
        if self.conn is not None:
            self._release_conn(False)
        backend = self.backend
        if backend is not None:
            self.backend = None
            latency = self.runtime.loop.time() - started
            self.upstream.balancer.release(backend, latency, ok)
            if self.metrics.enabled:
                self.metrics.backend(self.upstream.name, backend.id).latency.observe(latency)
            self.outcome.backend = backend.id

    async def run_to_proxy_response(self) -> ProxyResponse:
        """The plugin chain's terminal step: the backend's response as a ProxyResponse
        whose body (when not already complete) streams from the connection; the lease
        and connection are released when that body ends or is closed."""
        started = self.runtime.loop.time()
        try:
            head = await self._connect_and_send()
        except BaseException as exc:
            if isinstance(exc, UpstreamTimeout) and self.backend is not None:
                self.metrics.backend(self.upstream.name, self.backend.id).timeouts += 1
            self._finish(started, False)
            raise
        conn = self.conn
        assert conn is not None
        fields = head.fields
        no_body = self.request.method == "HEAD" or head.status in _NO_BODY_STATUS
        if fields.codings and not no_body:
            # A transfer coding other than chunked belongs to this hop's framing, which
            # a plugin's response does not carry: refused rather than passed on mislabelled.
            self._finish(started, False)
            raise UpstreamInvalidResponse("transfer-coded response on a route with plugins")
        headers: CIMultiDict[str] = CIMultiDict(fields.items())
        reason = head.reason.decode("latin-1")
        complete = conn.take_buffered_body()
        if complete is not None:
            self._release_conn(conn.finish())
            self._finish(started, True)
            if no_body:
                return ProxyResponse(head.status, headers, b"", reason, fields.body_length)
            return ProxyResponse(head.status, headers, complete, reason, len(complete))
        return ProxyResponse(head.status, headers, _UpstreamBody(self, started), reason,
                             fields.body_length)

    async def _connect_and_send(self) -> ResponseHead:
        """Attempts on (other) backends until one answers, within the upstream's retry
        policy and budget."""
        upstream = self.upstream
        balancer = upstream.balancer
        ctx = RequestContext(self.hash_key)
        stale_retry_left = True
        attempt = 0
        retrying = False
        try:
            while True:
                attempt += 1
                if upstream.max_inflight and balancer.inflight >= upstream.max_inflight:
                    raise UpstreamBusy("upstream at max_inflight")
                self.backend = backend = balancer.lease(ctx)
                limit = upstream.max_inflight_per_backend
                if limit and backend.inflight > limit:
                    self._drop_attempt(backend, ok=True)
                    ctx.exclude = ctx.exclude | {backend.id}
                    if len(ctx.exclude) >= len(balancer.backends):
                        raise UpstreamBusy("every backend at max_inflight_per_backend")
                    attempt -= 1
                    continue
                self.pool = pool = upstream.pool_for(backend)
                failure: BasculeError
                try:
                    self.conn, reused = await pool.acquire()
                except UpstreamConnectError as exc:
                    self.metrics.backend(upstream.name, backend.id).connect_errors += 1
                    upstream.health.record(backend, failed=True)
                    failure, kind = exc, "connect-failure"
                else:
                    try:
                        head = await self._send(backend)
                    except UpstreamProtocolError as exc:
                        conn = self.conn
                        assert conn is not None
                        if isinstance(exc, UpstreamInvalidResponse):
                            self.metrics.backend(upstream.name, backend.id).invalid_responses += 1
                        # A pooled connection the backend closed while idle fails
                        # before a single response byte; nothing was processed, so a
                        # bodiless request is safely resent once on a fresh one.
                        if (reused and stale_retry_left and not self.has_body
                                and not conn.received_any):
                            stale_retry_left = False
                            self.metrics.record_retry(upstream.name)
                            self._drop_attempt(backend, ok=True)
                            attempt -= 1
                            continue
                        upstream.health.record(backend, failed=True)
                        if conn.received_any:
                            raise  # part of a response came: nothing to retry safely
                        failure, kind = exc, "reset"
                    except UpstreamTimeout as exc:
                        upstream.health.record(backend, failed=True)
                        if self.conn is not None and self.conn.head_received:
                            raise
                        failure, kind = exc, "timeout"
                    else:
                        # passive outlier detection: 5xx counts as a failure
                        upstream.health.record(backend, failed=head.status >= 500)
                        if (head.status not in upstream.retry_statuses
                                or not self._may_retry(attempt, "status", retrying)):
                            return head
                        failure, kind = UpstreamProtocolError(
                            f"backend answered {head.status}"), "status"
                if kind != "status" and not self._may_retry(attempt, kind, retrying):
                    log.warning("upstream %s backend %s: %s", upstream.name, backend.id,
                                failure)
                    raise failure
                log.info("upstream %s backend %s: %s; retrying on another backend",
                         upstream.name, backend.id, failure)
                self._drop_attempt(backend, ok=False)
                ctx.exclude = ctx.exclude | {backend.id}
                self.metrics.record_retry(upstream.name)
                if not retrying and kind in ("status", "timeout"):
                    retrying = True
                    upstream.retries_active += 1
                policy = upstream.retry
                delay = min(policy.backoff_max, policy.backoff_base * 2 ** (attempt - 1))
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
        finally:
            if retrying:
                upstream.retries_active -= 1

    def _may_retry(self, attempt: int, kind: str, retrying: bool) -> bool:
        upstream = self.upstream
        decision = decide_retry(
            upstream.retry_rules, attempt=attempt, kind=kind, already_retrying=retrying,
            method=self.method, has_body=self.has_body, body_kept=self.body_complete,
            retries_active=upstream.retries_active, inflight=upstream.balancer.inflight)
        if decision is RetryDecision.BUDGET_EXHAUSTED:
            self.metrics.record_budget_exhausted(upstream.name)
        return decision is RetryDecision.RETRY

    def _drop_attempt(self, backend: Backend, *, ok: bool) -> None:
        if self.conn is not None:
            self._release_conn(False)
        self.upstream.balancer.release(backend, 0.0, ok)
        self.backend = None

    async def _send(self, backend: Backend) -> ResponseHead:
        conn = self.conn
        assert conn is not None
        timeouts = self.upstream.timeouts
        per_try = self.upstream.retry.per_try_timeout
        head_timeout = min(per_try, timeouts.response_header) if per_try else (
            timeouts.response_header)
        host = self.client_host if self.route.pass_host and self.client_host else (
            backend.address.encode("ascii"))
        out = self.request_line + b"Host: " + host + b"\r\n" + self.head_rest
        kept = self.body_copy
        whole = self.body_complete and not self.chunked and kept is not None
        # A body read whole (buffered, or kept for this retry) goes out with the head:
        # one writev, no copy.
        conn.begin(out, is_head=self.method == "HEAD", body=kept if whole else None)
        if timeouts.total:
            conn.arm_total(timeouts.total)
        if not self.has_body or whole:
            conn.request_sent()
            conn.arm_timer(head_timeout, "response header")
            first = await conn.read_head()
            if isinstance(first, ResponseHead):
                return first
            return await self._final_head(conn, first)
        request = self.request
        if (not self.continue_sent and request.version >= (1, 1)
                and request.headers.get("Expect", "").lower() == "100-continue"):
            self.continue_sent = True
            await request.writer.write(_CONTINUE)
        pump = self.runtime.loop.create_task(self._send_body(conn, head_timeout))
        try:
            head = await self._final_head(conn, None)
        except BaseException:
            pump.cancel()
            raise
        if not pump.done():
            # The backend answered before reading the whole body (e.g. its own 413):
            # stop sending; the connection cannot be reused.
            pump.cancel()
        return head

    async def _final_head(self, conn: UpstreamConnection,
                          head: ResponseHead | InterimHead | None) -> ResponseHead:
        """The final response head (`head`: one already read); interim 1xx heads that
        come before it are relayed to HTTP/1.1 clients as they arrive (RFC 9110 §15.2:
        never to HTTP/1.0 clients) and never stored. 100 Continue is not relayed:
        Bascule answers Expect itself."""
        while True:
            if head is None:
                head = await conn.read_head()
            if isinstance(head, ResponseHead):
                return head
            request = self.request
            transport = request.transport
            if (head.status != 100 and request.version >= (1, 1) and transport is not None
                    and not transport.is_closing()):
                transport.write(head.encode())
            head = None

    async def _send_body(self, conn: UpstreamConnection, head_timeout: float) -> None:
        server = self.runtime.server
        max_body = server.max_body_size
        content = self.request.content
        chunked = self.chunked
        sent = 0
        keep = self.upstream.retry.retry_body_limit
        for chunk in self.body_copy or ():  # a retry: what was kept goes first
            sent += len(chunk)
            conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
        if self.body_complete:
            if chunked:
                conn.write(b"0\r\n\r\n")
            conn.request_sent()
            if not conn.head_received:
                conn.arm_timer(head_timeout, "response header")
            return
        watchdog = _IdleWatchdog(self.runtime.loop, server.body_idle_timeout,
                                 self.upstream.timeouts.read_idle)
        try:
            while True:
                watchdog.phase = 0
                chunk = await content.readany()
                watchdog.progress()
                if not chunk:
                    break
                sent += len(chunk)
                if max_body and sent > max_body:
                    raise BodyTooLarge("body over max_body_size")
                copy = self.body_copy
                if copy is not None:
                    if sent <= keep:
                        copy.append(chunk)
                    else:
                        self.body_copy = None  # too big to keep: not retryable
                if chunked:
                    conn.write(b"%x\r\n" % len(chunk))
                    conn.write(chunk)
                    conn.write(b"\r\n")
                else:
                    conn.write(chunk)
                watchdog.phase = 1
                await conn.drain()
                watchdog.progress()
            if chunked:
                conn.write(b"0\r\n\r\n")
            self.outcome.bytes_in = sent
            self.body_complete = self.body_copy is not None
            conn.request_sent()
            if not conn.head_received:
                conn.arm_timer(head_timeout, "response header")
        except asyncio.CancelledError:
            if watchdog.fired == 0:
                conn.abort(ClientBodyTimeout("client body idle timeout"))
            elif watchdog.fired == 1:
                conn.abort(UpstreamTimeout("backend stopped reading the request body"))
            else:
                raise
        except BodyTooLarge as exc:
            conn.abort(exc)
        except (HttpProcessingError, ConnectionError, OSError) as exc:
            conn.abort(ClientGone(f"client body: {exc}"))
        except BasculeError:
            pass  # the exchange already failed; read_head reports it
        finally:
            watchdog.stop()

    async def _respond(self, head: ResponseHead) -> web.StreamResponse:
        conn = self.conn
        assert conn is not None
        request = self.request
        fields = head.fields
        block, length, has_date = fields.block(), fields.body_length, fields.has_date
        no_body = request.method == "HEAD" or head.status in _NO_BODY_STATUS
        codings = b"" if no_body else fields.codings
        if codings and request.version < (1, 1):
            # RFC 9112 §6.1: no Transfer-Encoding to an HTTP/1.0 client, and without
            # it the body could not be decoded.
            raise UpstreamInvalidResponse("transfer-coded response for an HTTP/1.0 client")
        body = conn.take_buffered_body()
        if body is not None and not codings and len(body) <= _COMPLETE_WRITE_MAX:
            # The whole response is here (the common small case): the connection
            # goes back now and the client gets head and body in one write.
            self._release_conn(conn.finish())
            if no_body:
                return CompleteResponse(head.status, head.reason, block, b"", has_date,
                                        length=length)
            self.outcome.bytes_out = len(body)
            return CompleteResponse(head.status, head.reason, block, body, has_date)
        if length is None and body is not None and not no_body and not codings:
            length = len(body)  # complete already: send it length-delimited
        resp = ProxiedResponse(head.status, head.reason, block, length, has_date, codings)
        try:
            return await self._write_response(resp, body, no_body)
        except ConnectionError:
            # The client went away mid-response; the backend connection is dropped
            # (by run()'s cleanup) because its response was not fully read.
            return resp

    async def _write_response(self, resp: ProxiedResponse, body: bytes | None,
                              no_body: bool) -> web.StreamResponse:
        conn = self.conn
        assert conn is not None
        request = self.request
        if body is not None:
            # Whole response already here: give the connection back before writing,
            # and send head and body in one write (one syscall, not two).
            resp._send_headers_immediately = False
            self._release_conn(conn.finish())
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
                    await self._splice_rest(resp, read_idle)
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
        self._release_conn(conn.finish())
        await resp.write_eof()
        return resp

    async def _splice_rest(self, resp: ProxiedResponse, read_idle: float) -> None:
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

    def _release_conn(self, reusable: bool) -> None:
        conn, pool = self.conn, self.pool
        self.conn = None
        if conn is None or pool is None:
            return
        if not reusable:
            conn.finish()
        pool.release(conn, reusable)
