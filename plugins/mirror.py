"""`mirror`: send a copy of a share of requests to another service, fire and forget
(nginx's `mirror`, Traefik's mirroring) — to try a new version on real traffic.

- `url`: where copies go (`http://` or `https://`, verified); the copy keeps the
  method, the request-target (after the plugins before this one) and the end-to-end
  header fields; `Host` becomes the mirror's unless `keep_host = true`.
- `percent` (default 100): the share mirrored, chosen deterministically (an
  accumulator: exactly that share over any run, no random clumps); `methods` limits
  it to some methods.
- The client's response never waits for the copy, and the copy's response is read
  and discarded. `max_inflight` copies at most (default 64): a mirror that is slow
  or down fills them, and further copies are dropped and counted, so the primary is
  never affected. `timeout` (default 5 s) bounds each copy.
- Bodies are mirrored up to `max_body` (default 64 KiB) when the engine read them
  whole before the chain (a route's `buffer_requests`); a larger or streamed body
  is not mirrored (counted).

Metric: `bascule_mirror_requests_total{route, result}`, result one of sent,
failed, dropped_busy, dropped_body.

    [[plugins]]
    name = "shadow"
    use = "mirror"
    options = { url = "http://canary.internal:8080", percent = 10, methods = ["GET"] }
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from plugins.service import ServiceUrl
from proxy.plugin import (
    Handler,
    PluginContext,
    ProxyRequest,
    ProxyResponse,
    refuse_unknown_options,
)
from proxy.units import parse_duration, parse_size
from proxy.upstream.pool import BackendPool
from proxy.upstream.subrequest import SubrequestError, fetch

__all__ = ["Mirror"]

log = logging.getLogger("bascule.mirror")

_OPTIONS = {"url", "percent", "methods", "max_inflight", "max_body", "timeout",
            "keep_host"}
_NOT_COPIED = {"connection", "keep-alive", "proxy-connection", "te", "trailer",
               "transfer-encoding", "upgrade", "content-length", "expect"}


class Mirror:
    def __init__(self, options: dict[str, Any]) -> None:
        refuse_unknown_options(options, _OPTIONS)
        self.url = ServiceUrl.parse("url", options.get("url"), "http://canary.internal:8080")
        self.host, self.port, self.authority = self.url.host, self.url.port, self.url.authority
        self.tls = ssl.create_default_context() if self.url.scheme == "https" else None
        percent = options.get("percent", 100)
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) or \
                not 0 < percent <= 100:
            raise ValueError("percent: must be more than 0 and at most 100")
        self.percent = float(percent)
        methods = options.get("methods")
        if methods is not None and (not isinstance(methods, list) or not all(
                isinstance(m, str) and m for m in methods)):
            raise ValueError('methods: must be a list like ["GET", "HEAD"]')
        self.methods = frozenset(m.upper() for m in methods) if methods else None
        inflight = options.get("max_inflight", 64)
        if isinstance(inflight, bool) or not isinstance(inflight, int) or inflight < 1:
            raise ValueError("max_inflight: must be an integer >= 1")
        self.max_inflight = inflight
        try:
            self.max_body = parse_size(options.get("max_body", "64KiB"))
        except ValueError as exc:
            raise ValueError(f"max_body: {exc}") from None
        try:
            self.timeout = parse_duration(options.get("timeout", "5s"))
        except ValueError as exc:
            raise ValueError(f"timeout: {exc}") from None
        self.keep_host = bool(options.get("keep_host", False))
        self._credit = 0.0
        self.inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._record: Any = lambda route, result: None
        self.pool: BackendPool | None = None

    async def start(self, context: PluginContext) -> None:
        metrics = context.metrics
        if metrics is not None and hasattr(metrics, "record_mirror"):
            self._record = metrics.record_mirror
        self.pool = self.url.pool(max_idle=self.max_inflight, connect_timeout=self.timeout,
                                  tls=self.tls)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.pool is not None:
            self.pool.close()

    def _sampled(self) -> bool:
        self._credit += self.percent
        if self._credit >= 100.0:
            self._credit -= 100.0
            return True
        return False

    def _head(self, request: ProxyRequest, body: bytes) -> bytes:
        lines = [request.method.encode("ascii") + b" "
                 + request.target.encode("utf-8", "surrogateescape") + b" HTTP/1.1\r\n"]
        host = request.headers.get("Host") if self.keep_host else None
        lines.append(b"Host: " + (host or self.authority).encode("latin-1", "replace")
                     + b"\r\n")
        for name, value in request.headers.items():
            lower = name.lower()
            if lower in _NOT_COPIED or lower == "host":
                continue
            lines.append(name.encode("latin-1", "replace") + b": "
                         + value.encode("latin-1", "replace") + b"\r\n")
        if body:
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        return b"".join(lines)

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        if (self.methods is None or request.method in self.methods) and self._sampled():
            self._copy(request)
        return await call_next(request)

    def _copy(self, request: ProxyRequest) -> None:
        body = request.whole_body
        if body is None or len(body) > self.max_body:
            self._record(request.route, "dropped_body")
            return
        if self.inflight >= self.max_inflight:
            self._record(request.route, "dropped_busy")
            return
        # The head is made now: the plugins after this one may change the request.
        head = self._head(request, body)
        self.inflight += 1
        task = asyncio.get_running_loop().create_task(self._send(request.route, head, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, route: str, head: bytes, body: bytes) -> None:
        assert self.pool is not None
        try:
            await fetch(self.pool, head, timeout=self.timeout, max_body=16 * 1024 * 1024,
                        body=body)
            self._record(route, "sent")
        except SubrequestError as exc:
            self._record(route, "failed")
            log.debug("mirror %s:%d: %s", self.host, self.port, exc)
        finally:
            self.inflight -= 1
