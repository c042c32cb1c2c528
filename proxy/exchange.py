"""One proxied request's exchange with its upstream, across attempts: lease a
backend, send the request (head, then body with backpressure), relay interim heads,
retry within the upstream's rules (proxy/retry.py), and write the response back —
streamed, spliced, or in one write when it is already whole."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from proxy.body import IdleWatchdog
from proxy.errors import (
    BasculeError,
    BodyTooLarge,
    ClientBodyTimeout,
    ClientGone,
    UpstreamBusy,
    UpstreamConnectError,
    UpstreamInvalidResponse,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from proxy.metrics import Metrics
from proxy.models import Backend
from proxy.plugin import ProxyResponse, headers_version
from proxy.relay import Outcome, UpstreamBody, respond
from proxy.response import has_no_body
from proxy.retry import RetryDecision, decide_retry
from proxy.routing import Route
from proxy.runtime import Runtime, Upstream
from proxy.strategy import RequestContext
from proxy.upstream.connection import InterimHead, ResponseHead, UpstreamConnection
from proxy.upstream.pool import BackendPool

__all__ = ["Exchange", "Outcome"]


log = logging.getLogger("bascule.forward")

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


class Exchange:
    """State of one proxied request across its attempts."""

    __slots__ = ("backend", "body_complete", "body_copy", "chunked", "client_host", "conn",
                 "continue_sent", "has_body", "hash_key", "head_rest", "method", "metrics",
                 "outcome", "pinned_by", "pool", "request", "request_line", "route",
                 "runtime", "upstream")

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
        self.pinned_by: str | None = None  # the sticky cookie's value the request carried

    async def run(self) -> web.StreamResponse:
        started = self.runtime.loop.time()
        ok = False
        try:
            head = await self._connect_and_send()
            resp = await respond(self, head)
            ok = True
            return resp
        except UpstreamTimeout:
            if self.backend is not None:
                self.metrics.backend(self.upstream.name, self.backend.id).timeouts += 1
            raise
        finally:
            self.finish(started, ok)

    def sticky_cookie(self) -> bytes:
        """The Set-Cookie line pinning the client to the backend that answered, or b""."""
        sticky, backend = self.upstream.sticky, self.backend
        return b"" if sticky is None or backend is None else sticky.answered(
            self.pinned_by, backend, bool(self.request.protocol.tls))  # type: ignore[attr-defined]

    def finish(self, started: float, ok: bool) -> None:
        """Release the connection (unless already given back) and the lease."""
        if self.conn is not None:
            self.release_conn(False)
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
            self.finish(started, False)
            raise
        conn = self.conn
        assert conn is not None
        fields = head.fields
        no_body = has_no_body(self.request.method, head.status)
        if fields.codings and not no_body:
            # A transfer coding other than chunked belongs to this hop's framing, which
            # a plugin's response does not carry: refused rather than passed on mislabelled.
            self.finish(started, False)
            raise UpstreamInvalidResponse("transfer-coded response on a route with plugins")
        headers: CIMultiDict[str] = CIMultiDict(fields.items())
        pin = self.sticky_cookie()
        if pin:
            headers.add("Set-Cookie", pin[len(b"Set-Cookie: "):-2].decode("ascii"))
        ready = (headers_version(headers), fields.block() + pin)
        reason = head.reason.decode("latin-1")
        complete = conn.take_buffered_body()
        if complete is not None:
            self.release_conn(conn.finish())
            self.finish(started, True)
            if no_body:
                return ProxyResponse(head.status, headers, b"", reason, fields.body_length,
                                     ready_block=ready)
            return ProxyResponse(head.status, headers, complete, reason, len(complete),
                                 ready_block=ready)
        return ProxyResponse(head.status, headers, UpstreamBody(self, started), reason,
                             fields.body_length, ready_block=ready)

    async def _connect_and_send(self) -> ResponseHead:
        """Attempts on (other) backends until one answers, within the upstream's retry
        policy and budget."""
        upstream = self.upstream
        balancer = upstream.balancer
        ctx = RequestContext(self.hash_key)
        if upstream.sticky is not None:
            self.pinned_by = upstream.sticky.pin(ctx, self.request._message.headers.get("Cookie"))
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
                        if head.status >= 500 and self.metrics.enabled:
                            self.metrics.backend(upstream.name, backend.id).server_errors += 1
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
            self.release_conn(False)
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
        watchdog = IdleWatchdog(self.runtime.loop, server.body_idle_timeout,
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

    def release_conn(self, reusable: bool) -> None:
        conn, pool = self.conn, self.pool
        self.conn = None
        if conn is None or pool is None:
            return
        if not reusable:
            conn.finish()
        pool.release(conn, reusable)
