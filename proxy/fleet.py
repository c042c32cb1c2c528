"""Fleet-wide in-flight counts (`strategy_options.shared = "redis"` on
least_connections and p2c_ewma): least connections that means something when ten
Bascules each see a tenth of the load.

Every worker of every instance is a member. A few times a second (`shared_interval`,
250 ms by default) each member, in one Lua script call: writes its own non-zero
per-backend in-flight counts to a hash of its own that expires after three
intervals, renews its entry in the upstream's member set (scored with Redis' own
clock, so instances' clocks do not matter), drops members that stopped renewing, and
reads the fleet's totals. A dead instance's counts so vanish within three intervals.
Between reads, a backend's load as strategies see it is `inflight` (this worker's,
live) + `fleet_inflight` (everyone else's at the last read: the fleet's total minus
what this member had published). No per-request write: one round trip per interval.

Keys share the upstream's hash tag, so the script runs on one Redis Cluster node.
Redis slow or down: every `fleet_inflight` goes to 0 (local counts only), logged
once, shown in /status and in bascule_fleet_counts_shared; reads resume by
themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any

import redis.asyncio as redis_asyncio
from redis.asyncio.cluster import RedisCluster

from proxy.config import RedisConfig

__all__ = ["FleetCounts"]

log = logging.getLogger("bascule.fleet")

# KEYS[1] members (zset: member -> expiry, ms), KEYS[2] this member's counts (hash)
# ARGV[1] ttl ms, ARGV[2] member id, ARGV[3] counts key prefix, ARGV[4..] id, count...
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
redis.call('DEL', KEYS[2])
if #ARGV > 3 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 4))
  redis.call('PEXPIRE', KEYS[2], ttl)
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ttl * 4)
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local totals = {}
for _, member in ipairs(members) do
  local flat = redis.call('HGETALL', ARGV[3] .. member)
  for i = 1, #flat, 2 do
    totals[flat[i]] = (totals[flat[i]] or 0) + tonumber(flat[i + 1])
  end
end
local out = {#members}
for id, count in pairs(totals) do
  out[#out + 1] = id
  out[#out + 1] = count
end
return out
"""


class FleetCounts:
    def __init__(self, upstream: str, balancer: Any, config: RedisConfig,
                 interval: float) -> None:
        self.upstream = upstream
        self.balancer = balancer
        self.config = config
        self.interval = interval
        self.member = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        tag = f"{config.key_prefix}fleet:{{{upstream}}}"  # one hash slot per upstream
        self._members_key = f"{tag}:members"
        self._counts_prefix = f"{tag}:counts:"
        self.shared_now = False  # the last read succeeded
        self.members = 0
        self.error = ""
        self.last_read = 0.0
        self._client: Any = None
        self._script: Any = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        options = {"socket_timeout": max(self.config.timeout, self.interval),
                   "socket_connect_timeout": max(self.config.timeout, self.interval)}
        if self.config.cluster:
            self._client = RedisCluster.from_url(self.config.url, **options)
        else:
            self._client = redis_asyncio.from_url(self.config.url, **options)
        self._script = self._client.register_script(_SCRIPT)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        ttl_ms = max(int(self.interval * 3000), 100)
        while True:
            try:
                await self.exchange(ttl_ms)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._lost(exc)
            await asyncio.sleep(self.interval)

    async def exchange(self, ttl_ms: int) -> None:
        """Publish this member's counts and take the fleet's."""
        backends = self.balancer.backends
        mine = {b.id: b.inflight for b in backends if b.inflight > 0}
        args: list[Any] = [ttl_ms, self.member, self._counts_prefix]
        for backend_id, count in mine.items():
            args += [backend_id, count]
        reply = await asyncio.wait_for(
            self._script(keys=[self._members_key, self._counts_prefix + self.member],
                         args=args), timeout=max(self.config.timeout, self.interval))
        totals = {_text(reply[i]): int(reply[i + 1]) for i in range(1, len(reply) - 1, 2)}
        for backend in self.balancer.backends:
            backend.fleet_inflight = max(0, totals.get(backend.id, 0) - mine.get(backend.id, 0))
        self.members = int(reply[0])
        self.last_read = time.time()
        if not self.shared_now:
            if self.error:
                log.warning("upstream %s: fleet counts from Redis again (%d members)",
                            self.upstream, self.members)
            self.shared_now, self.error = True, ""

    def _lost(self, exc: Exception) -> None:
        for backend in self.balancer.backends:
            backend.fleet_inflight = 0
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self.shared_now or not self.error:
            log.warning("upstream %s: cannot share in-flight counts through Redis (%s); "
                        "balancing on this worker's counts until it answers",
                        self.upstream, error)
        self.shared_now, self.error = False, error

    def describe(self) -> dict[str, Any]:
        return {"shared": "redis", "state": "fleet" if self.shared_now else "local",
                "members": self.members, "error": self.error or None,
                "last_read_age": round(time.time() - self.last_read, 3)
                if self.last_read else None}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._client is not None:
            # leave the member set now rather than after three intervals
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.zrem(self._members_key, self.member),
                                       timeout=self.config.timeout)
            await self._client.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
