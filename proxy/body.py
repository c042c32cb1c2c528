"""Reading a client's request body: whole, before a backend is chosen (routes'
`buffer_requests`), and an idle watchdog for bodies streamed to a backend."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.errors import (
    BadRequestBody,
    BodyTooLarge,
    ClientBodyTimeout,
)

__all__ = ["IdleWatchdog", "read_body"]


class IdleWatchdog:
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


async def read_body(request: web.BaseRequest, limit: int, max_body: int,
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


