"""One whole request/response on a pooled upstream connection, for a plugin that
asks another service before forwarding (forward authentication): the same HTTP/1.1
client, limits and framing checks as forwarding, a deadline over the whole exchange,
a bounded body. A kept-alive connection that turns out closed before any answer
byte is retried once on a new one (the request was never seen)."""

from __future__ import annotations

import asyncio

from proxy.errors import UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout
from proxy.upstream.heads import ResponseHead
from proxy.upstream.pool import BackendPool

__all__ = ["SubrequestError", "fetch"]


class SubrequestError(Exception):
    """The service could not be asked: `timeout` True when it was too slow."""

    def __init__(self, message: str, *, timeout: bool) -> None:
        super().__init__(message)
        self.timeout = timeout


async def fetch(pool: BackendPool, head: bytes, *, timeout: float, max_body: int,
                body: bytes = b"") -> tuple[ResponseHead, bytes]:
    """Send `head` (a complete request head, with Content-Length when `body`); the
    final response head and its body (at most `max_body` bytes)."""
    try:
        async with asyncio.timeout(timeout):
            for attempt in (1, 2):
                conn, reused = await pool.acquire()
                reusable = False
                try:
                    conn.begin(head, is_head=False, body=[body] if body else None)
                    conn.request_sent()
                    try:
                        answer = await conn.read_head()
                        while not isinstance(answer, ResponseHead):  # 1xx: skipped
                            answer = await conn.read_head()
                    except (UpstreamConnectError, UpstreamProtocolError, OSError):
                        if reused and attempt == 1 and not conn.received_any:
                            continue  # a stale kept-alive connection: once more
                        raise
                    received = bytearray()
                    while chunk := await conn.read_chunk():
                        received += chunk
                        if len(received) > max_body:
                            raise SubrequestError(f"answer body over {max_body} bytes",
                                                  timeout=False)
                    reusable = True
                    return answer, bytes(received)
                finally:
                    pool.release(conn, conn.finish() and reusable)
    except TimeoutError:
        raise SubrequestError(f"no answer within {timeout:g}s", timeout=True) from None
    except UpstreamTimeout as exc:
        raise SubrequestError(str(exc), timeout=True) from None
    except (UpstreamConnectError, UpstreamProtocolError, OSError) as exc:
        raise SubrequestError(str(exc), timeout=False) from None
    raise SubrequestError("no answer", timeout=False)
