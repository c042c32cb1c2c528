"""A lean Redis client for the cache's hot read (HMGET/HGET on a hit): RESP2 over an
asyncio protocol, replies parsed by hiredis, commands pipelined on a few connections.

redis-py's asyncio client spends ~130 µs of CPU per call here (connection pool,
retries, command dispatch, response callbacks); a hit that reads Redis on every request
cannot afford it. Everything else (writes, locks, scripts, pub/sub, Cluster) stays on
redis-py. Replies come back in the order commands were sent (Redis pipelining), so
each connection keeps a FIFO of futures; a caller that gives up (its deadline) leaves
its future in the FIFO to be skipped, and the connection is dropped so that a stuck
Redis does not keep a queue of doomed commands.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import ssl
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis

__all__ = ["RespClient"]


def _pack(args: tuple[bytes | str | int, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8", "surrogateescape")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: Any = None  # asyncio's or uvloop's transport
        self.closed = False
        self._outgoing: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(ConnectionError(f"redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not self.waiters:
                self._fail(ConnectionError("redis sent a reply nobody asked for"))
                return
            waiter = self.waiters.popleft()
            if waiter.done():
                continue  # its caller gave up
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(ConnectionError(f"redis error: {reply}"))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        error = ConnectionError(f"redis connection lost: {exc}" if exc else
                                "redis connection closed")
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def _fail(self, error: Exception) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.connection_lost(error)

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """Queue a command; the commands of one loop iteration go out in one write
        (automatic pipelining: one syscall for many concurrent hits)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        self.waiters.append(waiter)
        if not self._outgoing:
            loop.call_soon(self._flush)
        self._outgoing.append(command)
        return waiter

    def _flush(self) -> None:
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        if not self.closed and self.transport is not None:
            self.transport.write(data)


class RespClient:
    def __init__(self, url: str, *, connections: int = 2, connect_timeout: float = 1.0
                 ) -> None:
        parts = urlsplit(url)
        self.scheme = parts.scheme
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.path = unquote(parts.path) if parts.scheme == "unix" else ""
        db = parts.path.strip("/") if parts.scheme != "unix" else ""
        query_db = dict(p.partition("=")[::2] for p in parts.query.split("&") if p).get("db")
        self.db = int(db or query_db or 0)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.connect_timeout = connect_timeout
        self._slots: list[_Connection | None] = [None] * max(1, connections)
        self._connecting: list[asyncio.Future[_Connection] | None] = [None] * len(self._slots)
        self._next = itertools.cycle(range(len(self._slots)))

    async def execute(self, *args: bytes | str | int) -> Any:
        conn = await self._connection()
        waiter = conn.send(_pack(args))
        try:
            return await waiter
        except asyncio.CancelledError:
            # A deadline passed with the command in flight: drop the connection
            # rather than queue more behind a Redis that does not answer.
            conn.closed = True
            if conn.transport is not None:
                conn.transport.abort()
            raise

    async def _connection(self) -> _Connection:
        index = next(self._next)
        conn = self._slots[index]
        if conn is not None and not conn.closed:
            return conn
        pending = self._connecting[index]
        if pending is None:
            pending = asyncio.ensure_future(self._connect())
            self._connecting[index] = pending
            pending.add_done_callback(lambda _: self._connected(index))
        return await asyncio.shield(pending)

    def _connected(self, index: int) -> None:
        pending = self._connecting[index]
        self._connecting[index] = None
        if pending is not None and not pending.cancelled() and pending.exception() is None:
            self._slots[index] = pending.result()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            if self.scheme == "unix":
                _, conn = await loop.create_unix_connection(_Connection, self.path)
            else:
                context = ssl.create_default_context() if self.scheme == "rediss" else None
                _, conn = await loop.create_connection(_Connection, self.host, self.port,
                                                       ssl=context)
            setup: list[tuple[bytes | str | int, ...]] = []
            if self.password is not None:
                setup.append(("AUTH", self.username, self.password) if self.username
                             else ("AUTH", self.password))
            if self.db:
                setup.append(("SELECT", self.db))
            for command in setup:
                await conn.send(_pack(command))
        return conn

    def close(self) -> None:
        for conn in self._slots:
            if conn is not None and conn.transport is not None:
                conn.transport.close()
