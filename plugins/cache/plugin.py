"""The response cache plugin: a shared cache following RFC 9111 (policy.py) over a
store (store.py: memory per worker; redis_store.py: Redis shared by the fleet).

Per request: look up; serve fresh (or allowed-stale) entries with Age and an RFC 9211
Cache-Status; revalidate stale ones (304 refreshes the stored fields); on a miss make
sure one request fills the key — in this worker (a future per key) and, with a shared
store, in the whole fleet (the store's fill lock) — while the others wait, bounded by
`lock_timeout`, and are served from the fill. The filling response streams to its
client while a copy is kept; the copy is written to the store after the last chunk,
off the client's path. stale-while-revalidate serves at once and refreshes in the
background (one refresh per key in the fleet, through the same lock);
stale-if-error serves stale when the origin fails or answers 5xx.

Its parts: quick.py (fresh hits before the chain), fills.py (one fill per key),
storing.py (what is stored, how long, the streamed copy), answers.py (what a hit
sends); this module the lifecycle, keys, purges and the chain step's decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from multidict import CIMultiDict

from plugins.cache.answers import (
    conditional_copy,
    gateway_timeout,
    mark,
    plain_request,
    serve,
)
from plugins.cache.fills import CoalescesFills
from plugins.cache.near import NearCache
from plugins.cache.options import OPTION_NAMES, CacheOptions
from plugins.cache.policy import (
    accepts,
    age_from,
    age_inputs,
    invalidated_uris,
    vary_key,
)
from plugins.cache.quick import AnswersQuickly
from plugins.cache.redis_store import RedisStore
from plugins.cache.store import CacheStore, Entry, MemoryStore
from plugins.cache.storing import NOT_STORED, StoresResponses, stale_window
from proxy.plugin import Handler, PluginContext, ProxyRequest, ProxyResponse

__all__ = ["Cache"]

log = logging.getLogger("bascule.cache")


class Cache(AnswersQuickly, CoalescesFills, StoresResponses):
    # the keys of the [cache] table, for `bascule schema` (proxy/config/schema.py)
    option_names = frozenset(OPTION_NAMES)

    def __init__(self, options: dict[str, Any]) -> None:
        o = CacheOptions.parse(options)
        self.options = dict(options)
        self.store_kind = o.store_kind
        self.store: CacheStore = MemoryStore(o.memory_max_size)
        self.max_object_size = o.max_object_size
        self.heuristic = o.heuristic
        self.heuristic_cap = o.heuristic_cap
        self.ignore_set_cookie = o.ignore_set_cookie
        self.key_headers = o.key_headers
        self.drop_query = o.drop_query
        self.lock_timeout = o.lock_timeout
        self.stale_while_revalidate = o.stale_while_revalidate
        self.stale_if_error = o.stale_if_error
        self.tag_headers = o.tag_headers
        self.validator_grace = o.validator_grace
        self.near_cache_size = o.near_cache_size
        self.near_cache_ttl = o.near_cache_ttl
        self.targeted = o.targeted
        self._fills: dict[str, asyncio.Future[None]] = {}
        self._refreshing: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._lookups: Callable[..., None] = lambda route, result, count=1: None
        self._metrics: Any = None
        self.quick_hits: dict[str, int] = {}  # route -> hits answered by quick_answer

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, context: PluginContext) -> None:
        metrics = context.metrics
        if metrics is not None and metrics.enabled:
            self._lookups = metrics.record_cache_lookup
            metrics.on_flush(self._flush_quick_hits)
            self._metrics = metrics
        if self.store_kind == "redis" and isinstance(self.store, MemoryStore):
            redis = context.redis
            shared = RedisStore(
                redis.url, cluster=redis.cluster, prefix=redis.key_prefix + "cache:",
                pool_size=redis.pool_size, timeout=redis.timeout,
                breaker_failures=redis.breaker_failures,
                breaker_cooldown=redis.breaker_cooldown,
                on_error=metrics.record_cache_store_error if metrics is not None
                and metrics.enabled else None)
            if self.near_cache_size and self.near_cache_ttl:
                self.store = NearCache(shared, self.near_cache_size, self.near_cache_ttl)
                shared.ensure_listener()  # purge notices reach the near cache
            else:
                self.store = shared

    def status(self) -> dict[str, Any]:
        """For the dashboard: the store and, for Redis, whether its breaker is open
        (lookups then go to the backend; proxy/plugin.py Reports)."""
        remote = getattr(self.store, "remote", self.store)
        breaker = getattr(remote, "breaker", None)
        return {"store": self.store_kind,
                "store_state": "n/a" if breaker is None
                else "open (store unreachable)" if breaker.is_open else "closed"}

    def purge_is_local(self) -> bool:
        """A memory store lives in each worker: a purge must reach every worker."""
        return bool(self.store_kind == "memory")

    def adopt(self, previous: Any) -> None:
        """After a reload with the same options, keep the memory store's entries."""
        if (isinstance(previous, Cache) and previous.options == self.options
                and isinstance(previous.store, MemoryStore)):
            self.store = previous.store
            previous.store = MemoryStore(0)

    async def aclose(self) -> None:
        if self._metrics is not None:
            self._flush_quick_hits()
            self._metrics.off_flush(self._flush_quick_hits)
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(BaseException):
                await task
        await self.store.aclose()

    # -- keys ----------------------------------------------------------------------------

    def primary_key(self, host: str, target: str) -> str:
        path, _, query = target.partition("?")
        if query and self.drop_query:
            kept = [p for p in query.split("&") if p.partition("=")[0] not in self.drop_query]
            query = "&".join(kept)
        return f"{host.lower()}{path}" + (f"?{query}" if query else "")

    def _secondary(self, headers: CIMultiDict[str]) -> Callable[[str], str]:
        prefix = "".join(f"{h}={headers.get(h, '')}\n" for h in self.key_headers)

        def secondary(vary: str) -> str:
            return prefix + vary_key({"Vary": vary}, headers.items()) if vary else prefix

        return secondary

    # -- purge (the admin endpoint) ---------------------------------------------------------

    def _url_key(self, url: str) -> str:
        parts = urlsplit(url if "://" in url else "http://" + url)
        return self.primary_key(parts.netloc, (parts.path or "/")
                                + (f"?{parts.query}" if parts.query else ""))

    async def purge(self, *, url: str | None = None, prefix: str | None = None,
                    tag: str | None = None) -> int:
        if url is not None:
            return await self.store.purge(self._url_key(url))
        if prefix is not None:
            key = self._url_key(prefix)
            if not prefix.rstrip().endswith("/") and key.endswith("/") and (
                    urlsplit(prefix if "://" in prefix else "http://" + prefix).path == ""):
                key = key[:-1]  # "example.com" means everything on that host
            return await self.store.purge_prefix(key)
        if tag is not None:
            return await self.store.purge_tag(tag)
        raise ValueError("give url, prefix or tag")

    # -- the chain step --------------------------------------------------------------------

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        host = request.headers.get("Host", "")
        if request.method not in ("GET", "HEAD"):
            return await self._unsafe(request, call_next, host)
        primary = self.primary_key(host, request.target)
        secondary = self._secondary(request.headers)
        looked_up = request.extra.pop("cache.lookup", None)
        if looked_up is not None and looked_up[0] == primary:
            entry = looked_up[1]  # quick_fetch read it already
        else:
            entry = await self.store.get(primary, secondary)
        token: str | None = None
        if entry is None and request.method == "GET" and "Range" not in request.headers:
            entry, token = await self._claim_fill(primary, secondary)
        if entry is not None:
            return await self._from_entry(request, call_next, primary, secondary, entry)
        return await self._miss(request, call_next, primary, secondary, token)

    async def _unsafe(self, request: ProxyRequest, call_next: Handler, host: str
                      ) -> ProxyResponse:
        response = await call_next(request)
        uri = f"http://{host}{request.target}"
        for target in invalidated_uris(request.method, response.status, uri,
                                       response.headers):
            await self.store.purge(self._url_key(target))
        return response

    async def _from_entry(self, request: ProxyRequest, call_next: Handler, primary: str,
                          secondary: Callable[[str], str], entry: Entry) -> ProxyResponse:
        age = age_from(entry.date, entry.age_value, entry.request_time,
                       entry.response_time, time.time())
        decision = accepts(request.headers, age, entry.lifetime, entry.directives)
        if decision == "fresh":
            self._lookups(request.route, "hit")
            return serve(request, entry, age, "hit")
        if decision == "stale-ok":
            self._lookups(request.route, "stale")
            return serve(request, entry, age, "hit; detail=stale")
        if "only-if-cached" in request.headers.get("Cache-Control", ""):
            self._lookups(request.route, "miss")
            return gateway_timeout("only-if-cached")
        stale_for = age - entry.lifetime
        window = stale_window(entry, "stale-while-revalidate",
                                    self.stale_while_revalidate)
        if 0 <= stale_for <= window and plain_request(request.headers):
            self._lookups(request.route, "stale")
            self._refresh_in_background(request, call_next, primary, secondary, entry)
            return serve(request, entry, age, "hit; detail=stale-while-revalidate")
        return await self._revalidate(request, call_next, primary, secondary, entry, age)

    async def _miss(self, request: ProxyRequest, call_next: Handler, primary: str,
                    secondary: Callable[[str], str], token: str | None) -> ProxyResponse:
        done = self._fill_done(primary, token)
        self._lookups(request.route, "miss")
        if "only-if-cached" in request.headers.get("Cache-Control", ""):
            done()
            return gateway_timeout("only-if-cached")
        if request.method == "HEAD" or "Range" in request.headers:
            # HEAD cannot fill a GET entry; a range request on a miss is passed through
            # (a later full GET fills the entry, and ranges are then served from it).
            done()
            detail = "fwd=miss" if request.method == "HEAD" else "fwd=miss; detail=range"
            return mark(await call_next(request), detail)
        try:
            request_time = time.time()
            response = await call_next(request)
            return await self._maybe_store(request, response, primary, secondary, "fwd=miss",
                                           request_time, done)
        except BaseException:
            done()
            raise

    # -- revalidation ------------------------------------------------------------------------

    async def _revalidate(self, request: ProxyRequest, call_next: Handler, primary: str,
                          secondary: Callable[[str], str], entry: Entry, age: float,
                          *, background: bool = False) -> ProxyResponse:
        stored: CIMultiDict[str] = CIMultiDict(entry.headers)
        conditional = conditional_copy(request, stored)
        sie = stale_window(entry, "stale-if-error", self.stale_if_error)
        within_sie = age - entry.lifetime <= sie
        request_time = time.time()
        try:
            response = await call_next(conditional)
        except Exception:
            if within_sie and sie and not background:
                self._lookups(request.route, "stale")
                return serve(request, entry, age, "hit; detail=stale-if-error")
            raise
        if response.status == 304:
            await response.aclose()
            # §4.3.4: the stored response's fields are updated from the 304
            for name, value in response.headers.items():
                if name.lower() not in NOT_STORED | {"content-length"}:
                    stored[name] = value
            refreshed = self._entry(entry.status, entry.reason, list(stored.items()),
                                    entry.body, request_time, time.time(), entry.vary,
                                    entry.tags, age_inputs(response.headers)[1])
            await self.store.put(primary, secondary(entry.vary), refreshed,
                                 self._ttl(refreshed))
            self._lookups(request.route, "revalidated")
            age = age_from(refreshed.date, refreshed.age_value, refreshed.request_time,
                           refreshed.response_time, time.time())
            return serve(request, refreshed, age, "fwd=stale; fwd-status=304")
        if response.status >= 500 and within_sie and sie and not background:
            await response.aclose()
            self._lookups(request.route, "stale")
            return serve(request, entry, age, "hit; detail=stale-if-error")
        self._lookups(request.route, "expired")
        return await self._maybe_store(request, response, primary, secondary, "fwd=stale",
                                       request_time, lambda: None)

    def _refresh_in_background(self, request: ProxyRequest, call_next: Handler, primary: str,
                               secondary: Callable[[str], str], entry: Entry) -> None:
        if primary in self._refreshing:
            return  # one refresh per key in this worker
        self._refreshing.add(primary)
        copy = dataclasses.replace(request, headers=request.headers.copy())
        for name in ("Range", "If-Range", "If-None-Match", "If-Modified-Since"):
            copy.headers.popall(name, None)

        async def refresh() -> None:
            token = await self.store.lock(primary, self.lock_timeout)
            if token is None:
                return  # another instance refreshes this key
            try:
                current = await self.store.get(primary, secondary)
                if current is not None and current.response_time > entry.response_time:
                    return  # refreshed meanwhile (by another instance): nothing to do
                age = age_from(entry.date, entry.age_value, entry.request_time,
                               entry.response_time, time.time())
                response = await self._revalidate(copy, call_next, primary, secondary,
                                                  entry, age, background=True)
                body = response.body
                if not isinstance(body, bytes):
                    async for _ in body:  # the tee stores it once the body is complete
                        pass
            finally:
                await self.store.unlock(primary, token)

        task = self._spawn(refresh())
        task.add_done_callback(lambda _: self._refreshing.discard(primary))

