"""The redis-py client a stateful plugin (cache, rate limit) opens on the `[redis]`
table: Redis Cluster or a single server, and how long connecting may take."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

__all__ = ["connect_timeout", "redis_client"]


def connect_timeout(timeout: float) -> float:
    """Connecting may take longer than one call's deadline; calls are bounded by
    asyncio.timeout around them, not by socket timeouts."""
    return max(timeout, 0.5)


def redis_client(url: str, *, cluster: bool, pool_size: int, timeout: float) -> Any:
    if cluster:
        # The cluster client keeps a pool per node and raises when one is full, so its
        # pools are left unbounded (connections grow with concurrency).
        return RedisCluster.from_url(url, socket_connect_timeout=connect_timeout(timeout))
    # A full pool makes a call wait for a connection (within the call's deadline)
    # instead of failing and tripping the breaker.
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=pool_size, timeout=None,
        socket_connect_timeout=connect_timeout(timeout))
    return aioredis.Redis(connection_pool=pool)
