"""The cache in Redis, shared by every worker and every Bascule instance using it.

Layout, per primary key (URL plus key headers), with the primary escaped so that
`{` and `}` cannot end the hash tag early (every key of one URL is on one Cluster slot):
- `PREFIX{primary}`          a hash: field `vary` (the stored Vary value) and one field
                             `e:<variant>` per variant, each an encoded Entry (codec.py);
                             one HSET writes an entry whole, and the key's TTL is raised to
                             cover the longest-lived variant (one Lua call: atomic).
- `PREFIX{primary}:lock`     the fill lock: SET NX PX with a random token, deleted only by
                             its holder (compare-and-delete in Lua), who then publishes on
- `PREFIX{primary}:filled`   (a channel) so waiters look again at once; waiters also poll,
                             so a lost message or a dead holder costs at most the lock's TTL.
- `PREFIX#tag:<tag>`         a set of entry keys carrying that Cache-Tag / Surrogate-Key.

Every call has a deadline (`timeout`) and goes through a breaker: Redis down, slow or
answering garbage makes the cache a pass-through, never a 5xx.
Followed: redis.io docs for SET (NX, PX), "Distributed locks with Redis" (single
instance: random value, delete only if it matches), PSUBSCRIBE, SCAN (MATCH, TYPE),
and "Redis cluster specification: hash tags".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote

from redis.exceptions import RedisError

from plugins.cache.breaker import Breaker
from plugins.cache.codec import CorruptEntry, decode, encode
from plugins.cache.resp import RespClient
from plugins.cache.store import Entry, SecondaryKey
from plugins.redis_client import connect_timeout, redis_client

__all__ = ["RedisStore"]

log = logging.getLogger("bascule.cache")
T = TypeVar("T")

_PUT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], 'vary', ARGV[3])
local ttl = tonumber(ARGV[4])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], '1')
  return 1
end
return 0
"""
_WRITE_RATE = 20_000_000  # bytes/s assumed for a write's deadline beyond `timeout`
_GLOB_SPECIAL = str.maketrans({c: "\\" + c for c in "*?[]\\"})


_SAFE = "/:?&=;,+!$'()*@~-._[]|^<>\"#` "


def _escape(primary: str) -> str:
    """Percent-encoded but for common URL characters: injective (`%` is always
    encoded), ASCII, and free of the braces that delimit the hash tag."""
    return quote(primary.encode("utf-8", "surrogateescape"), safe=_SAFE)


class RedisStore:
    name = "redis"
    shared = True

    def __init__(self, url: str, *, cluster: bool = False, prefix: str = "bascule:cache:",
                 pool_size: int = 32, timeout: float = 0.05,
                 breaker_failures: int = 3, breaker_cooldown: float = 5.0,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.prefix = prefix
        self.timeout = timeout
        self.cluster = cluster
        self.breaker = Breaker("redis", breaker_failures, breaker_cooldown)
        self.on_error = on_error or (lambda store: None)
        self.client: Any = redis_client(url, cluster=cluster, pool_size=pool_size,
                                        timeout=timeout)
        # The hit path's reads go through a lean pipelined client (resp.py).
        self.reads = None if cluster else RespClient(
            url, connections=min(4, pool_size), connect_timeout=connect_timeout(timeout))
        self._put = self.client.register_script(_PUT)
        self._unlock = self.client.register_script(_UNLOCK)
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._notified = False  # pub/sub is up: polls can be rarer
        # Called with ("url" | "prefix" | "tag", value) for every purge notice
        self.on_invalidate: Callable[[str, str], Awaitable[None]] | None = None
        self._purge_channel = f"{prefix}purge"

    # -- keys ------------------------------------------------------------------------

    def _key(self, primary: str) -> str:
        return f"{self.prefix}{{{_escape(primary)}}}"

    # -- the guarded call --------------------------------------------------------------

    async def _call(self, make: Callable[[], Awaitable[T]], default: T,
                    timeout: float | None = None) -> T:
        if not self.breaker.allow():
            return default
        try:
            async with asyncio.timeout(timeout or self.timeout):
                result = await make()
        except (RedisError, OSError, TimeoutError, CorruptEntry, UnicodeError) as exc:
            self.breaker.failure(exc)
            self.on_error(self.name)
            log.debug("redis cache call failed: %r", exc)
            return default
        except Exception as exc:  # a bug here must still not turn a request into a 500
            self.breaker.failure(exc)
            self.on_error(self.name)
            log.warning("redis cache call failed unexpectedly", exc_info=True)
            return default
        self.breaker.success()
        return result

    # -- entries -----------------------------------------------------------------------

    async def get(self, primary: str, secondary: SecondaryKey) -> Entry | None:
        key = self._key(primary)

        plain_field = "e:" + secondary("")

        reads = self.reads
        if reads is not None:
            async def fetch() -> bytes | None:
                vary, plain = await reads.execute("HMGET", key, "vary", plain_field)
                if vary is None:
                    return None
                if not vary:
                    return plain  # type: ignore[no-any-return]
                return await reads.execute(  # type: ignore[no-any-return]
                    "HGET", key, "e:" + secondary(vary.decode("latin-1")))
        else:
            async def fetch() -> bytes | None:
                vary, plain = await self.client.hmget(key, ["vary", plain_field])
                if vary is None:
                    return None
                if not vary:
                    return plain  # type: ignore[no-any-return]
                return await self.client.hget(key,  # type: ignore[no-any-return]
                                              "e:" + secondary(vary.decode("latin-1")))

        data = await self._call(fetch, None)
        if data is None:
            return None
        try:
            return decode(data)
        except CorruptEntry as exc:
            # Garbage is a miss (and counted), never a 500; the next fill overwrites it.
            log.warning("corrupt cache entry at %s: %s", key, exc)
            self.on_error(self.name)
            return None

    async def put(self, primary: str, secondary: str, entry: Entry, ttl: float) -> None:
        key = self._key(primary)
        blob = encode(entry)
        ttl_ms = max(1000, int(ttl * 1000))

        async def write() -> None:
            await self._put(keys=[key], args=["e:" + secondary, blob, entry.vary, ttl_ms])

        await self._call(write, None, timeout=self.timeout + len(blob) / _WRITE_RATE)
        for tag in entry.tags:
            await self._call(functools.partial(self._tag, tag, key, ttl_ms), None)

    async def _tag(self, tag: str, key: str, ttl_ms: int) -> None:
        tag_key = f"{self.prefix}#tag:{tag}"
        await self.client.sadd(tag_key, key)
        if await self.client.pttl(tag_key) < ttl_ms:
            await self.client.pexpire(tag_key, ttl_ms)

    # -- purge (admin: slower deadlines, errors reported, not swallowed) ------------------

    async def _announce(self, kind: str, value: str) -> None:
        """Tell every instance's near cache (near.py) to drop what was purged."""
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(max(self.timeout, 1.0)):
                await self.client.publish(self._purge_channel,
                                          json.dumps({"k": kind, "v": value}))

    async def purge(self, primary: str) -> int:
        removed = int(await self.client.delete(self._key(primary)))
        await self._announce("url", primary)
        return removed

    async def purge_prefix(self, prefix: str) -> int:
        # SCAN walks the keyspace (on every primary in a cluster): an admin operation,
        # like a Varnish ban; exact URLs and tags are single-key deletes.
        pattern = f"{self.prefix}{{{_escape(prefix).translate(_GLOB_SPECIAL)}*"
        purged = 0
        async for key in self.client.scan_iter(match=pattern, count=1000, _type="hash"):
            purged += int(await self.client.delete(key))
        await self._announce("prefix", prefix)
        return purged

    async def purge_tag(self, tag: str) -> int:
        tag_key = f"{self.prefix}#tag:{tag}"
        members = await self.client.smembers(tag_key)
        purged = 0
        for key in members:
            purged += int(await self.client.delete(key))
        await self.client.delete(tag_key)
        await self._announce("tag", tag)
        return purged

    # -- the fleet-wide fill lock ---------------------------------------------------------

    async def lock(self, primary: str, ttl: float) -> str | None:
        token = os.urandom(12).hex()
        taken = await self._call(lambda: self.client.set(
            self._key(primary) + ":lock", token, nx=True, px=max(1, int(ttl * 1000))), None)
        if taken is None and self.breaker.is_open:
            return "unshared"  # Redis is away: fill without coordination
        return token if taken else None

    async def unlock(self, primary: str, token: str) -> None:
        if token == "unshared":
            return
        key = self._key(primary)
        await self._call(lambda: self._unlock(keys=[key + ":lock"], args=[token, key + ":filled"]),
                         None)

    async def wait_fill(self, primary: str, timeout: float) -> bool:
        """True once the lock is gone (filled, given up, or expired with its holder)."""
        key = self._key(primary)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waiter: asyncio.Future[None] = loop.create_future()
        channel = key + ":filled"
        self._ensure_listener()
        self._waiters.setdefault(channel, []).append(waiter)
        try:
            while True:
                held = await self._call(lambda: self.client.exists(key + ":lock"), 0)
                if not held or self.breaker.is_open:
                    return True
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                poll = 0.25 if self._notified else 0.02
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(waiter), min(poll, remaining))
                    return True
        finally:
            waiters = self._waiters.get(channel)
            if waiters is not None:
                with contextlib.suppress(ValueError):
                    waiters.remove(waiter)
                if not waiters:
                    del self._waiters[channel]

    def ensure_listener(self) -> None:
        self._ensure_listener()

    def _ensure_listener(self) -> None:
        if self.cluster or self._listener is not None:
            return  # Cluster: polling only (pub/sub there is per node)
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        """One PSUBSCRIBE per worker for every fill notice of this prefix; reconnects
        with a pause while Redis is away (polling covers the gap)."""
        pattern = f"{self.prefix}{{*}}:filled"
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.psubscribe(pattern)
                await pubsub.subscribe(self._purge_channel)
                self._notified = True
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=30.0)
                    if message is None:
                        continue
                    channel = message["channel"]
                    if isinstance(channel, bytes):
                        channel = channel.decode("utf-8", "surrogateescape")
                    if channel == self._purge_channel:
                        await self._invalidate(message["data"])
                        continue
                    for waiter in self._waiters.pop(channel, ()):
                        if not waiter.done():
                            waiter.set_result(None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: poll meanwhile, then retry
                self._notified = False
                log.debug("cache fill notifications lost (%r); polling", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _invalidate(self, data: Any) -> None:
        if self.on_invalidate is None:
            return
        try:
            notice = json.loads(data)
            await self.on_invalidate(str(notice["k"]), str(notice["v"]))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a malformed purge notice: %r", exc)

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(BaseException):
                await self._listener
        if self.reads is not None:
            self.reads.close()
        with contextlib.suppress(Exception):
            await self.client.aclose()
