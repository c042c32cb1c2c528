"""The keep-alive pool without sockets: connections handed back, reused LIFO,
bounded, swept."""

from __future__ import annotations

import asyncio

from proxy.upstream.connection import UpstreamConnection
from proxy.upstream.pool import BackendPool
from tests.fakes import FakeTransport


def fake_connection() -> UpstreamConnection:
    conn = UpstreamConnection(asyncio.get_running_loop())
    conn.connection_made(FakeTransport(conn))
    return conn


async def test_a_reusable_connection_comes_back_first() -> None:
    pool = BackendPool("127.0.0.1", 9, max_idle=2, idle_timeout=10, connect_timeout=1)
    a, b = fake_connection(), fake_connection()
    pool.release(a, True)
    pool.release(b, True)
    assert pool.idle_count == 2
    conn, reused = await pool.acquire()
    assert (conn, reused) == (b, True)  # the warmest first


async def test_unusable_connections_are_closed_not_kept() -> None:
    pool = BackendPool("127.0.0.1", 9, max_idle=1, idle_timeout=10, connect_timeout=1)
    kept, extra, broken = fake_connection(), fake_connection(), fake_connection()
    pool.release(kept, True)
    pool.release(extra, True)  # over max_idle
    pool.release(broken, False)
    assert pool.idle_count == 1 and extra.closed and broken.closed and not kept.closed


async def test_a_connection_the_backend_closed_while_idle_is_skipped() -> None:
    pool = BackendPool("127.0.0.1", 9, max_idle=4, idle_timeout=10, connect_timeout=1)
    stale, fresh = fake_connection(), fake_connection()
    pool.release(fresh, True)
    pool.release(stale, True)
    assert stale.transport is not None
    stale.transport.close()  # the backend went away
    conn, reused = await pool.acquire()
    assert conn is fresh and reused


async def test_sweep_closes_connections_idle_too_long() -> None:
    pool = BackendPool("127.0.0.1", 9, max_idle=4, idle_timeout=5, connect_timeout=1)
    old = fake_connection()
    pool.release(old, True)
    pool.sweep(old.idle_since + 4)
    assert pool.idle_count == 1
    pool.sweep(old.idle_since + 6)
    assert pool.idle_count == 0 and old.closed
