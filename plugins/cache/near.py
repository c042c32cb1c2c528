"""A worker-local near cache in front of a shared store (Redis): fresh entries read
from or written to Redis are also kept in this worker's memory for at most `ttl`
(default one second), so a hot key costs one Redis read per worker per second
instead of one per request.

Purges and unsafe-method invalidations are published by the shared store and every
worker drops its copies when the notice arrives; where notices cannot arrive (Redis
Cluster, or pub/sub down), `ttl` bounds how long a purged entry can still be served.
Only entries fresh by their own HTTP lifetime are served from here: a stale one is
looked up in Redis again, where another instance may have refreshed it.
"""

from __future__ import annotations

import time

from plugins.cache.policy import age_from
from plugins.cache.redis_store import RedisStore
from plugins.cache.store import Entry, MemoryStore, SecondaryKey

__all__ = ["NearCache"]


class NearCache:
    name = "redis"
    shared = True

    def __init__(self, remote: RedisStore, max_bytes: int, ttl: float) -> None:
        self.remote = remote
        self.local = MemoryStore(max_bytes)
        self.ttl = ttl
        self._until: dict[tuple[str, str], float] = {}
        remote.on_invalidate = self._invalidated

    # -- the quick path (no awaits) ----------------------------------------------------

    def fresh_now(self, primary: str, secondary: str | None, now: float) -> Entry | None:
        """A fresh local copy for (primary, variant), or None. `secondary` None means
        "compute it": the caller passes the variant once it knows the Vary."""
        if secondary is None:
            return None
        key = (primary, secondary)
        until = self._until.get(key)
        if until is None or until < time.monotonic():
            return None
        entry = self.local.entry_at(primary, secondary)
        if entry is None:
            return None
        age = age_from(entry.date, entry.age_value, entry.request_time,
                       entry.response_time, now)
        return entry if age < entry.lifetime else None

    def vary_of(self, primary: str) -> str | None:
        return self.local.vary_of(primary)

    # -- CacheStore ------------------------------------------------------------------------

    async def get(self, primary: str, secondary: SecondaryKey) -> Entry | None:
        vary = self.local.vary_of(primary)
        if vary is not None:
            entry = self.fresh_now(primary, secondary(vary), time.time())
            if entry is not None:
                return entry
        entry = await self.remote.get(primary, secondary)
        if entry is not None:
            self._keep(primary, secondary(entry.vary), entry)
        return entry

    def _keep(self, primary: str, secondary: str, entry: Entry) -> None:
        if self.ttl <= 0 or self.local.max_bytes <= 0:
            return
        self.local.put_now(primary, secondary, entry)
        self._until[(primary, secondary)] = time.monotonic() + self.ttl
        if len(self._until) > 4 * max(1, len(self.local)):
            self._until = {k: v for k, v in self._until.items() if self.local.has(k)}

    async def put(self, primary: str, secondary: str, entry: Entry, ttl: float) -> None:
        await self.remote.put(primary, secondary, entry, ttl)
        self._keep(primary, secondary, entry)

    async def purge(self, primary: str) -> int:
        await self.local.purge(primary)
        return await self.remote.purge(primary)

    async def purge_prefix(self, prefix: str) -> int:
        await self.local.purge_prefix(prefix)
        return await self.remote.purge_prefix(prefix)

    async def purge_tag(self, tag: str) -> int:
        await self.local.purge_tag(tag)
        return await self.remote.purge_tag(tag)

    async def _invalidated(self, kind: str, value: str) -> None:
        """A purge notice from any instance (this one's too)."""
        if kind == "url":
            await self.local.purge(value)
        elif kind == "prefix":
            await self.local.purge_prefix(value)
        elif kind == "tag":
            await self.local.purge_tag(value)

    async def lock(self, primary: str, ttl: float) -> str | None:
        return await self.remote.lock(primary, ttl)

    async def unlock(self, primary: str, token: str) -> None:
        await self.remote.unlock(primary, token)

    async def wait_fill(self, primary: str, timeout: float) -> bool:
        return await self.remote.wait_fill(primary, timeout)

    async def aclose(self) -> None:
        await self.remote.aclose()
