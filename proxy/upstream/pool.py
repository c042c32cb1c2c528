"""Keep-alive connection pool for one backend (per worker).

Like nginx's `keepalive N`: at most `max_idle` idle connections are kept (LIFO, so
the warmest is reused and the rest age out); more connections are opened on demand
and closed after use rather than queued, so a burst is never stalled by the pool.
Idle connections older than `idle_timeout` are closed by a sweeper.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from proxy.errors import UpstreamConnectError
from proxy.tls.client import verify_failure
from proxy.upstream.connection import ResponseLimits, UpstreamConnection

__all__ = ["BackendPool"]

log = logging.getLogger("bascule.upstream")

_RCVBUF = 512 * 1024


class BackendPool:
    def __init__(
        self, host: str, port: int, *, max_idle: int, idle_timeout: float,
        connect_timeout: float, limits: ResponseLimits | None = None,
        tls: ssl.SSLContext | None = None, server_name: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls  # HTTPS to this backend (proxy/tls/client.py)
        self.server_name = server_name or host
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._idle: list[UpstreamConnection] = []
        self.limits = limits or ResponseLimits()
        self._reported = False
        # Kept rather than looked up: asyncio.get_running_loop() costs a getpid()
        # syscall per call on Python 3.11, which shows on the hot path.
        self._loop = asyncio.get_running_loop()

    async def acquire(self) -> tuple[UpstreamConnection, bool]:
        """A connection and whether it was reused from the idle list."""
        idle = self._idle
        if idle:
            deadline = self._loop.time() - self.idle_timeout
            while idle:
                conn = idle.pop()
                if not conn.closed and conn.idle_since > deadline:
                    return conn, True
                conn.close()
        return await self.connect(), False

    async def connect(self) -> UpstreamConnection:
        loop = self._loop
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.tls is None:
                    _, conn = await loop.create_connection(
                        lambda: UpstreamConnection(loop, self.limits, self._report),
                        self.host, self.port)
                else:
                    _, conn = await loop.create_connection(
                        lambda: UpstreamConnection(loop, self.limits, self._report),
                        self.host, self.port, ssl=self.tls,
                        server_hostname=self.server_name)
        except TimeoutError:
            raise UpstreamConnectError(
                f"connect to {self.host}:{self.port} timed out") from None
        except ssl.SSLError as exc:
            raise UpstreamConnectError(
                f"connect to {self.host}:{self.port} (as {self.server_name!r}): "
                f"{verify_failure(exc)}") from None
        except OSError as exc:
            raise UpstreamConnectError(
                f"connect to {self.host}:{self.port} failed: {exc.strerror or exc}") from None
        sock = conn.transport.get_extra_info("socket") if conn.transport else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # A fixed 512 KiB receive buffer (the kernel doubles it) lets one read
            # take up to uvloop's 256 KB instead of the ~64 KB a fresh autotuned
            # socket allows: a third of the syscalls for large bodies.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        return conn

    def _report(self, what: str) -> None:
        """A framing violation (bytes after a response, or on an idle connection):
        logged once per backend and worker, so a broken backend cannot flood the log."""
        if not self._reported:
            self._reported = True
            log.warning("backend %s:%s sent %s; its connections are closed instead of "
                        "reused (logged once)", self.host, self.port, what)

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        if reusable and len(self._idle) < self.max_idle and not conn.closed:
            conn.idle_since = self._loop.time()
            self._idle.append(conn)
        else:
            conn.close()

    def sweep(self, now: float) -> None:
        """Close idle connections past idle_timeout or closed by the backend."""
        deadline = now - self.idle_timeout
        keep = []
        for conn in self._idle:
            if conn.closed or conn.idle_since <= deadline:
                conn.close()
            else:
                keep.append(conn)
        self._idle = keep

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def __repr__(self) -> str:
        return f"BackendPool({self.host}:{self.port}, idle={len(self._idle)})"
