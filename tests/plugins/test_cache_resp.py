"""The lean pipelined Redis client of the cache's hit path, against a real Redis."""

from __future__ import annotations

import asyncio

import pytest

from plugins.cache.resp import RespClient
from tests.redis_servers import RedisServer


async def test_pipelined_replies_match_their_commands(redis_server: RedisServer) -> None:
    client = RespClient(redis_server.url.replace("/0", "/3"), connections=2)
    try:
        for i in range(50):
            await client.execute("HSET", f"k{i}", "f", f"v{i}")
        replies = await asyncio.gather(*(client.execute("HMGET", f"k{i}", "f", "none")
                                         for i in range(50)))
        assert replies == [[f"v{i}".encode(), None] for i in range(50)]
        assert redis_server.cli("-n", "3", "hget", "k7", "f").strip() == "v7"  # SELECT 3
        with pytest.raises(ConnectionError, match="WRONGTYPE"):
            await client.execute("GET", "k1")
    finally:
        client.close()


async def test_a_command_that_times_out_drops_its_connection(
        redis_server: RedisServer) -> None:
    client = RespClient(redis_server.url, connections=1)
    try:
        assert await client.execute("PING") == b"PONG"
        assert redis_server.proc is not None
        redis_server.proc.send_signal(19)  # SIGSTOP
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await client.execute("PING")
        finally:
            redis_server.proc.send_signal(18)  # SIGCONT
        assert await client.execute("PING") == b"PONG"  # on a new connection
        redis_server.kill()
        with pytest.raises(ConnectionError):
            await client.execute("PING")
    finally:
        client.close()
