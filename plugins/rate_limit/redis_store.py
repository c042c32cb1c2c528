"""The fleet-wide store: one Lua script per decision (one round trip, atomic), the
clock read inside Redis (`TIME`) so instances with skewed clocks agree, one key per
limited key with a TTL of its debt (nothing accumulates), one key per script so
Redis Cluster routes it anywhere. Every call has a deadline and goes through a
breaker (plugins/cache/breaker.py): a slow or dead Redis costs at most `timeout`
per request until the breaker opens, then nothing; the caller applies fail-open or
fail-closed."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

from redis.exceptions import RedisError

from plugins.cache.breaker import Breaker
from plugins.cache.resp import RespClient
from plugins.rate_limit.gcra import Decision, Policy
from plugins.redis_client import connect_timeout, redis_client

__all__ = ["RedisStore", "StoreUnavailable"]

log = logging.getLogger("bascule.rate_limit")

# KEYS[1] the key; ARGV interval_us, tolerance_us. Returns {allowed, retry_after_us,
# ahead_us}. TIME makes this a non-deterministic script: Redis 5+ replicates its
# effects, not the script (the default since Redis 5).
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
if tat - now > tolerance then
  return {0, tat - tolerance - now, tat - now}
end
local new = tat + interval
redis.call('SET', KEYS[1], new, 'PX', math.floor((new - now) / 1000) + 1)
return {1, 0, new - now}
"""


class StoreUnavailable(Exception):
    """Redis did not decide within the deadline, or the breaker is open."""


class RedisStore:
    def __init__(self, url: str, *, cluster: bool, prefix: str, name: str,
                 timeout: float, pool_size: int) -> None:
        self.timeout = timeout
        self.prefix = f"{prefix}rl:{name}:"
        self.breaker = Breaker("redis", what="rate limit store", log=log)
        self.client: Any = redis_client(url, cluster=cluster, pool_size=pool_size,
                                        timeout=timeout)
        self._script = self.client.register_script(_GCRA)
        # A decision per request: through the cache's lean pipelined client
        # (plugins/cache/resp.py, EVAL by its text; Redis caches the compiled
        # script), not redis-py's ~130 us of CPU a call. Cluster stays on redis-py.
        self.fast = None if cluster else RespClient(
            url, connections=min(4, pool_size), connect_timeout=connect_timeout(timeout))

    def key(self, key: str) -> str:
        # Hashed: bounded length whatever the key parts, and no client value in Redis.
        return self.prefix + hashlib.sha256(key.encode()).hexdigest()[:32]

    async def decide(self, key: str, policy: Policy) -> Decision:
        if not self.breaker.allow():
            raise StoreUnavailable("breaker open")
        try:
            async with asyncio.timeout(self.timeout):
                if self.fast is not None:
                    allowed, retry, ahead = await self.fast.execute(
                        "EVAL", _GCRA, 1, self.key(key), policy.interval_us,
                        policy.tolerance_us)
                else:
                    allowed, retry, ahead = await self._script(
                        keys=[self.key(key)], args=[policy.interval_us, policy.tolerance_us])
        except (RedisError, OSError, TimeoutError) as exc:
            self.breaker.failure(exc)
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from None
        self.breaker.success()
        return Decision(bool(allowed), int(retry), int(ahead))

    async def aclose(self) -> None:
        if self.fast is not None:
            self.fast.close()
        await self.client.aclose()
