"""Forwarding one request: target and route (on normalised path readings), quick
answers for GET/HEAD, a small body read whole, the forwarded head built, then the
route's plugin chain (proxy/chain.py) or straight to the exchange with a backend
(proxy/exchange.py). This is the hot path: the per-request work is header rewriting
on bytes, one strategy pick and the exchange itself; bodies stream chunk by chunk in
both directions, with backpressure both ways.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Final

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.accesslog import AccessLog, AccessRecord
from proxy.body import read_body
from proxy.chain import ChainCall, check_method_change, compose_chain
from proxy.client_address import client_address
from proxy.errors import (
    AmbiguousPath,
    BasculeError,
    BodyTooLarge,
    NoBackendError,
    NoRouteError,
    PluginError,
)
from proxy.exchange import Exchange, Outcome
from proxy.headers import build_request_head, is_trusted
from proxy.metrics import Metrics
from proxy.pathnorm import normal_form
from proxy.plugin import ProxyRequest, ProxyResponse, QuickAnswer, headers_version
from proxy.relay import TUNNELLED, write_chain_response
from proxy.response import (
    CompleteResponse,
    has_no_body,
    https_redirect,
    plain_answer,
    whole_answer,
)
from proxy.routing import normalise_host, strip_path_prefix
from proxy.runtime import Runtime
from proxy.websocket import WebSocketRequest, tunnel_websocket

__all__ = ["Forwarder", "error_response"]

log = logging.getLogger("bascule.forward")

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_PLAIN: Final = {"Content-Type": "text/plain; charset=utf-8"}
# Only these may be answered before the chain (RFC 9111 §4: an unsafe method must
# reach the origin, and invalidates what is stored, §4.4).
_SAFE_BODILESS: Final = frozenset({"GET", "HEAD"})


def error_response(status: int, message: str, *, close: bool = False) -> web.StreamResponse:
    """Short plain-text error; never echoes request bytes."""
    return plain_answer(status, message, close=close)


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
        call: ChainCall = preq.engine
        if call.websocket is not None:
            return await self._tunnel(call, preq)
        line, rest, host = call.request_line, call.head_rest, call.client_host
        original = call.request._message.method
        method = preq.method
        if method != original:
            check_method_change(original, method)
        if preq.target != call.target or method != original:
            line = (method.encode("ascii") + b" " + preq.target.encode("utf-8", "surrogateescape")
                    + b" HTTP/1.1\r\n")
        if (headers_version(preq.headers) != call.headers_version if call.headers_version
                is not None else list(preq.headers.items()) != list(call.headers.items())):
            raw = [(k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
                   for k, v in preq.headers.items()]
            runtime = call.runtime
            rest, host, _ = build_request_head(
                raw, peer=call.peer, trusted_peer=is_trusted(call.peer, runtime.trusted),
                proto=call.request.protocol.proto,  # type: ignore[attr-defined]
                framing=call.framing, request_id=call.request_id,
                policy=runtime.header_policy)
        exchange = Exchange(call.request, call.route, call.upstream, call.runtime, line,
                             rest, host, call.has_body, call.chunked, call.hash_key,
                             self.metrics, call.outcome, call.body, call.body_done,
                             call.continue_sent, method)
        return await exchange.run_to_proxy_response()

    async def _tunnel(self, call: ChainCall, preq: ProxyRequest) -> ProxyResponse:
        """The terminal step of an upgrade: the WebSocket tunnel, run to its end. A
        refusal comes back as an ordinary response; a tunnel, already written, as a
        101 the writer passes through."""
        ws = call.websocket
        assert ws is not None
        if (headers_version(preq.headers) != call.headers_version if call.headers_version
                is not None else list(preq.headers.items()) != list(call.headers.items())):
            ws.headers = [(k.encode("utf-8", "surrogateescape"),
                           v.encode("utf-8", "surrogateescape"))
                          for k, v in preq.headers.items()]
        answer = await tunnel_websocket(call.request, call.route, call.upstream,
                                        call.runtime, ws, self.metrics)
        if isinstance(answer, CompleteResponse):
            return ProxyResponse(answer.status, CIMultiDict(_PLAIN), answer.whole_body,
                                 answer.reason)
        return ProxyResponse(101, CIMultiDict(), b"", "Switching Protocols",
                             extra={TUNNELLED: answer})

    @staticmethod
    def _write_quick(request: web.BaseRequest, answer: QuickAnswer,
                     outcome: Outcome) -> web.StreamResponse:
        status, reason, block, body, has_date = answer
        outcome.bytes_out = 0 if has_no_body(request.method, status) else len(body)
        return whole_answer(status, reason, block, body, has_date)

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
        if runtime.https_port is not None and not request.protocol.tls:  # type: ignore[attr-defined]
            return https_redirect(host_header, target, runtime.https_port)
        try:
            route = runtime.routes.match(normalise_host(host_header), path)
        except AmbiguousPath:
            return error_response(AmbiguousPath.status, AmbiguousPath.public_message)
        if route is None:
            return error_response(NoRouteError.status, NoRouteError.public_message)
        peer = request.protocol.peer  # type: ignore[attr-defined]
        split = route.split
        upstream = runtime.upstreams[route.upstream if split is None
                                     else split.choose(headers, target, peer)]
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
                return self._write_quick(request, answer, outcome)

        hash_key = upstream.hash_on.extract(headers, message.path, peer)
        if (message.upgrade and route.websocket
                and headers.get("Upgrade", "").lower() == "websocket"):
            ws = WebSocketRequest(target, authority, peer, hash_key, outcome)
            upgrade_chain = runtime.handlers.get(route.name)
            if upgrade_chain is None:
                return await tunnel_websocket(request, route, upstream, runtime, ws,
                                              self.metrics)
            # Through the route's plugins like any request: they may refuse the
            # upgrade (auth, limits) or change its headers before the handshake.
            chain_headers = CIMultiDict(headers)
            call = ChainCall(request, route, upstream, runtime, outcome, target, b"", b"",
                             b"", chain_headers, b"", b"", peer, False, False, hash_key,
                             None, True, False, websocket=ws)
            try:
                response = await upgrade_chain(ProxyRequest(
                    message.method, target, chain_headers.copy(),
                    client_address(peer, headers, runtime.trusted), route.name,
                    upstream.name, engine=call))
            except BasculeError as exc:
                return error_response(exc.status, exc.public_message)
            return await write_chain_response(request, response, outcome)

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
                body, body_done = await read_body(request, limit, max_body,
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
            proto=request.protocol.proto,  # type: ignore[attr-defined]
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
                call = ChainCall(request, route, upstream, runtime, outcome, target,
                                  request_line, head_rest, client_host, chain_headers,
                                  framing, request_id, peer, has_body, chunked, hash_key,
                                  body, body_done, continue_sent)
                proxy_request = ProxyRequest(message.method, target, chain_headers.copy(),
                                             client_address(peer, headers, runtime.trusted),
                                             route.name, upstream.name, memo or {},
                                             engine=call,
                                             scheme="https" if request.protocol.tls  # type: ignore[attr-defined]
                                             else "http",
                                             request_id=request_id.decode("latin-1"),
                                             whole_body=b"".join(body) if body_done and body
                                             else (b"" if not has_body else None))
                call.headers_version = headers_version(proxy_request.headers)
                handler = runtime.handlers[route.name]
                return await write_chain_response(request, await handler(proxy_request),
                                                        outcome)
            exchange = Exchange(request, route, upstream, runtime, request_line, head_rest,
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
