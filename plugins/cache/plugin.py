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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

from multidict import CIMultiDict, istr

from plugins.cache.httpdate import parse_http_date
from plugins.cache.near import NearCache
from plugins.cache.options import OPTION_NAMES, CacheOptions
from plugins.cache.policy import (
    accepts,
    age_from,
    age_inputs,
    freshness_lifetime,
    invalidated_uris,
    parse_cache_control,
    response_directives,
    storable,
    vary_key,
)
from plugins.cache.ranges import RangeAnswer, answer_range
from plugins.cache.redis_store import RedisStore
from plugins.cache.store import CacheStore, Entry, MemoryStore
from proxy.plugin import Handler, PluginContext, ProxyRequest, ProxyResponse

__all__ = ["Cache"]

log = logging.getLogger("bascule.cache")

_NOT_STORED = frozenset({"cache-status", "age"})
_NO_STALE = ("no-cache", "must-revalidate", "proxy-revalidate")
# Request fields that need the full chain (RFC 9111 request directives, RFC 9110
# conditionals and ranges); istr keys so the check against aiohttp's headers is a
# set operation.
_QUICK_SKIP = frozenset(istr(h) for h in (
    "Cache-Control", "Pragma", "Range", "If-Range", "If-None-Match", "If-Modified-Since",
    "If-Match", "If-Unmodified-Since"))


def _seconds(value: str | None) -> float | None:
    return float(value) if value is not None and value.isdigit() else None


class Cache:
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

    def _flush_quick_hits(self) -> None:
        hits, self.quick_hits = self.quick_hits, {}
        for route, count in hits.items():
            self._lookups(route, "hit", count)

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

    # -- the quick path: a fresh memory hit without the chain ------------------------------

    def quick_answer(self, method: str, host: str, target: str, headers: Any, route: str
                     ) -> tuple[int, bytes, bytes, bytes, bool] | None:
        """(status, reason, header block, body, has Date) for a plain GET/HEAD that a
        fresh entry in the memory store answers, else None (the chain decides). No
        awaits, no header copies: the stored block is sent with Age and Cache-Status
        appended. Requests with directives, conditionals or ranges take the chain."""
        store = self.store
        if (method not in ("GET", "HEAD") or _QUICK_SKIP & headers.keys()
                or not isinstance(store, MemoryStore | NearCache)):
            return None
        primary = self.primary_key(host, target)
        vary = store.vary_of(primary)
        if vary is None:
            return None
        secondary = self._secondary(headers)(vary) if vary or self.key_headers else ""
        now = time.time()
        if isinstance(store, MemoryStore):
            entry = store.entry_at(primary, secondary)
            if entry is None or "no-cache" in entry.directives:
                return None
            age = age_from(entry.date, entry.age_value, entry.request_time,
                           entry.response_time, now)
            if age >= entry.lifetime:
                return None
        else:
            entry = store.fresh_now(primary, secondary, now)
            if entry is None or "no-cache" in entry.directives:
                return None
            age = age_from(entry.date, entry.age_value, entry.request_time,
                           entry.response_time, now)
        hits = self.quick_hits
        hits[route] = hits.get(route, 0) + 1
        block = entry.head + b"Age: %d\r\nCache-Status: bascule; hit\r\n" % age
        return entry.status, entry.reason_bytes, block, entry.body, entry.has_date

    async def quick_fetch(self, method: str, host: str, target: str, headers: Any, route: str,
                          memo: dict[str, Any]) -> tuple[int, bytes, bytes, bytes, bool] | None:
        """quick_answer for a shared store: one read, answered here when fresh; what was
        read goes to the chain in `memo`, so a stale entry or a miss is not read twice."""
        store = self.store
        if not store.shared or _QUICK_SKIP & headers.keys() or method not in ("GET", "HEAD"):
            return None
        primary = self.primary_key(host, target)
        entry = await store.get(primary, self._secondary(headers))
        memo["cache.lookup"] = (primary, entry)
        if entry is None or "no-cache" in entry.directives:
            return None
        age = age_from(entry.date, entry.age_value, entry.request_time,
                       entry.response_time, time.time())
        if age >= entry.lifetime:
            return None
        hits = self.quick_hits
        hits[route] = hits.get(route, 0) + 1
        block = entry.head + b"Age: %d\r\nCache-Status: bascule; hit\r\n" % age
        return entry.status, entry.reason_bytes, block, entry.body, entry.has_date

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
            return self._serve(request, entry, age, "hit")
        if decision == "stale-ok":
            self._lookups(request.route, "stale")
            return self._serve(request, entry, age, "hit; detail=stale")
        if "only-if-cached" in request.headers.get("Cache-Control", ""):
            self._lookups(request.route, "miss")
            return _gateway_timeout("only-if-cached")
        stale_for = age - entry.lifetime
        window = self._stale_window(entry, "stale-while-revalidate",
                                    self.stale_while_revalidate)
        if 0 <= stale_for <= window and _plain_request(request.headers):
            self._lookups(request.route, "stale")
            self._refresh_in_background(request, call_next, primary, secondary, entry)
            return self._serve(request, entry, age, "hit; detail=stale-while-revalidate")
        return await self._revalidate(request, call_next, primary, secondary, entry, age)

    def _stale_window(self, entry: Entry, directive: str, default: float) -> float:
        """How long past freshness this entry may be served stale in the given way:
        the origin's own directive (RFC 5861), else the configured default — unless
        a directive forbids serving it stale (RFC 9111 §4.2.4)."""
        directives = entry.directives
        explicit = _seconds(directives.get(directive))
        if any(d in directives for d in _NO_STALE):
            return 0.0
        if explicit is not None:
            return explicit  # the origin asked for it (wins over s-maxage's implied revalidate)
        if "s-maxage" in directives:
            return 0.0
        return float(default)

    async def _claim_fill(self, primary: str, secondary: Callable[[str], str]
                          ) -> tuple[Entry | None, str | None]:
        """Either the entry another request just stored, or the right to fill this key
        (a fill-lock token; None after waiting `lock_timeout` in vain: fill anyway)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lock_timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None, None
            local = self._fills.get(primary)
            if local is not None:  # this worker is filling already
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(local), remaining)
                entry = await self.store.get(primary, secondary)
                if entry is not None or local is self._fills.get(primary):
                    return entry, None
                continue
            fill: asyncio.Future[None] = loop.create_future()
            self._fills[primary] = fill  # this request fills for the worker
            try:
                token = await self.store.lock(primary, self.lock_timeout)
                if token is not None:
                    return None, token
                # Another process fills: wait for it, then look (or take over the
                # lock if its holder died or gave up).
                await self.store.wait_fill(primary, remaining)
                entry = await self.store.get(primary, secondary)
                if entry is not None:
                    self._release_local(primary, fill)
                    return entry, None
            except BaseException:
                self._release_local(primary, fill)
                raise
            self._release_local(primary, fill)

    def _release_local(self, primary: str, fill: asyncio.Future[None]) -> None:
        if self._fills.get(primary) is fill:
            del self._fills[primary]
        if not fill.done():
            fill.set_result(None)

    def _fill_done(self, primary: str, token: str | None) -> Callable[[], None]:
        """What ends a fill: waiters in this worker and the fleet look again."""
        fill = self._fills.get(primary)
        called = False

        def done() -> None:
            nonlocal called
            if called:
                return
            called = True
            if fill is not None:
                self._release_local(primary, fill)
            if token is not None and self.store.shared:
                self._spawn(self.store.unlock(primary, token))

        return done

    async def _miss(self, request: ProxyRequest, call_next: Handler, primary: str,
                    secondary: Callable[[str], str], token: str | None) -> ProxyResponse:
        done = self._fill_done(primary, token)
        self._lookups(request.route, "miss")
        if "only-if-cached" in request.headers.get("Cache-Control", ""):
            done()
            return _gateway_timeout("only-if-cached")
        if request.method == "HEAD" or "Range" in request.headers:
            # HEAD cannot fill a GET entry; a range request on a miss is passed through
            # (a later full GET fills the entry, and ranges are then served from it).
            done()
            detail = "fwd=miss" if request.method == "HEAD" else "fwd=miss; detail=range"
            return _mark(await call_next(request), detail)
        try:
            request_time = time.time()
            response = await call_next(request)
            return await self._maybe_store(request, response, primary, secondary, "fwd=miss",
                                           request_time, done)
        except BaseException:
            done()
            raise

    # -- serving from an entry ---------------------------------------------------------------

    def _serve(self, request: ProxyRequest, entry: Entry, age: float, status: str
               ) -> ProxyResponse:
        headers: CIMultiDict[str] = CIMultiDict(entry.headers)
        headers["Age"] = str(int(age))
        _add_status(headers, f"bascule; {status}")
        if ("If-None-Match" in request.headers or "If-Modified-Since" in request.headers) \
                and _not_modified(request.headers, headers):
            return ProxyResponse(304, CIMultiDict(
                (k, v) for k, v in headers.items()
                if k.lower() not in ("content-type", "content-encoding", "content-language",
                                     "content-length")),
                b"", "Not Modified")
        range_header = request.headers.get("Range")
        if range_header is not None and request.method == "GET" and entry.status == 200:
            answer = answer_range(range_header, request.headers.get("If-Range"), entry)
            if answer is not None:
                return _ranged(headers, entry, answer)
        return ProxyResponse(entry.status, headers, entry.body, entry.reason, len(entry.body))

    # -- revalidation ------------------------------------------------------------------------

    async def _revalidate(self, request: ProxyRequest, call_next: Handler, primary: str,
                          secondary: Callable[[str], str], entry: Entry, age: float,
                          *, background: bool = False) -> ProxyResponse:
        stored: CIMultiDict[str] = CIMultiDict(entry.headers)
        conditional = _conditional_copy(request, stored)
        sie = self._stale_window(entry, "stale-if-error", self.stale_if_error)
        within_sie = age - entry.lifetime <= sie
        request_time = time.time()
        try:
            response = await call_next(conditional)
        except Exception:
            if within_sie and sie and not background:
                self._lookups(request.route, "stale")
                return self._serve(request, entry, age, "hit; detail=stale-if-error")
            raise
        if response.status == 304:
            await response.aclose()
            # §4.3.4: the stored response's fields are updated from the 304
            for name, value in response.headers.items():
                if name.lower() not in _NOT_STORED | {"content-length"}:
                    stored[name] = value
            refreshed = self._entry(entry.status, entry.reason, list(stored.items()),
                                    entry.body, request_time, time.time(), entry.vary,
                                    entry.tags, age_inputs(response.headers)[1])
            await self.store.put(primary, secondary(entry.vary), refreshed,
                                 self._ttl(refreshed))
            self._lookups(request.route, "revalidated")
            age = age_from(refreshed.date, refreshed.age_value, refreshed.request_time,
                           refreshed.response_time, time.time())
            return self._serve(request, refreshed, age, "fwd=stale; fwd-status=304")
        if response.status >= 500 and within_sie and sie and not background:
            await response.aclose()
            self._lookups(request.route, "stale")
            return self._serve(request, entry, age, "hit; detail=stale-if-error")
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

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("cache background work failed: %r", task.exception())

    # -- storing -------------------------------------------------------------------------------

    def _entry(self, status: int, reason: str, fields: list[tuple[str, str]], body: bytes,
               request_time: float, response_time: float, vary: str,
               tags: tuple[str, ...] = (), age_value: int = 0) -> Entry:
        """An entry with what a hit needs already parsed (dates, lifetime, directives).
        `age_value`: the Age the response arrived with (§4.2.3; the stored fields
        leave it out, since a hit sends its own)."""
        headers: CIMultiDict[str] = CIMultiDict(fields)
        date, _ = age_inputs(headers)
        lifetime = freshness_lifetime(headers, heuristic=self.heuristic,
                                      heuristic_cap=self.heuristic_cap, status=status,
                                      targeted=self.targeted,
                                      received=response_time).lifetime
        return Entry(status, reason, fields, body, request_time, response_time, vary, tags,
                     date=date, age_value=age_value, lifetime=lifetime,
                     directives=response_directives(headers, self.targeted)[0])

    def _ttl(self, entry: Entry) -> float:
        """How long an entry is of use: fresh, then stale windows, then (with a
        validator) a grace period for revalidation."""
        stale = max(self._stale_window(entry, "stale-while-revalidate",
                                       self.stale_while_revalidate),
                    self._stale_window(entry, "stale-if-error", self.stale_if_error))
        fields = {k.lower() for k, _ in entry.headers}
        grace = self.validator_grace if fields & {"etag", "last-modified"} else 0.0
        return max(0.0, entry.lifetime - entry.age_value) + stale + grace

    def _tags(self, headers: CIMultiDict[str]) -> tuple[str, ...]:
        tags: list[str] = []
        for name in self.tag_headers:
            for value in headers.getall(name, []):
                tags.extend(t for t in value.replace(",", " ").split() if t)
        return tuple(dict.fromkeys(tags))

    async def _maybe_store(self, request: ProxyRequest, response: ProxyResponse, primary: str,
                           secondary: Callable[[str], str], forward: str, request_time: float,
                           done: Callable[[], None]) -> ProxyResponse:
        tags = self._tags(response.headers)
        for name in self.tag_headers:  # purge tags are for this cache, not for clients
            response.headers.popall(name, None)
        ok, reason = storable(request.method, response.status, request.headers,
                              response.headers, ignore_set_cookie=self.ignore_set_cookie,
                              heuristic=self.heuristic, targeted=self.targeted)
        body = response.body
        size = len(body) if isinstance(body, bytes) else response.length
        if ok and size is not None and size > self.max_object_size:
            ok, reason = False, "too-big"
        if not ok:
            done()
            return _mark(response, f"{forward}; detail={reason}")
        vary = ", ".join(response.headers.getall("Vary", []))  # every line (RFC 9110 §5.3)
        age_value = age_inputs(response.headers)[1]
        fields = [(k, v) for k, v in response.headers.items() if k.lower() not in _NOT_STORED]
        response_time = time.time()
        store = self.store
        variant = secondary(vary)

        async def save(data: bytes) -> None:
            try:
                entry = self._entry(response.status, response.reason, fields, data,
                                    request_time, response_time, vary, tags, age_value)
                await store.put(primary, variant, entry, self._ttl(entry))
            finally:
                done()

        if isinstance(body, bytes):
            await save(body)
        else:
            response.body = self._tee(body, save, done)
        return _mark(response, f"{forward}; stored")

    async def _tee(self, body: AsyncIterator[bytes], save: Callable[[bytes], Any],
                   done: Callable[[], None]) -> AsyncIterator[bytes]:
        """Streams to the client while keeping a copy; once complete, the copy is
        written in the background (the client's response ends without waiting for the
        store). A body that grows past max_object_size is streamed on, unstored."""
        kept: list[bytes] | None = []
        size = 0
        complete = False
        try:
            async for chunk in body:
                if kept is not None:
                    size += len(chunk)
                    if size > self.max_object_size:
                        kept = None
                    else:
                        kept.append(chunk)
                yield chunk
            complete = True
        finally:
            if complete and kept is not None:
                self._spawn(save(b"".join(kept)))
            else:
                done()
            close = getattr(body, "aclose", None)
            if close is not None:
                await close()


def _plain_request(headers: CIMultiDict[str]) -> bool:
    """No request directive that would forbid a stale answer (no-cache, max-age...)."""
    if "Cache-Control" not in headers and "Pragma" not in headers:
        return True
    cc = parse_cache_control(headers.getall("Cache-Control", []))
    return not ({"no-cache", "max-age", "min-fresh"} & cc.keys()) and (
        headers.get("Pragma") != "no-cache" or bool(cc))


def _conditional_copy(request: ProxyRequest, stored: CIMultiDict[str]) -> ProxyRequest:
    """The request to revalidate with: the stored validators instead of the client's
    (the client's conditionals are answered by us from the refreshed entry)."""
    headers = request.headers.copy()
    for header, source in (("If-None-Match", "ETag"), ("If-Modified-Since", "Last-Modified")):
        headers.popall(header, None)
        if source in stored:
            headers[header] = stored[source]
    headers.popall("Range", None)
    headers.popall("If-Range", None)
    return dataclasses.replace(request, headers=headers)


def _ranged(headers: CIMultiDict[str], entry: Entry, answer: RangeAnswer) -> ProxyResponse:
    headers.popall("Content-Length", None)
    if answer.status == 416:
        headers.popall("Content-Type", None)
        headers["Content-Range"] = f"bytes */{len(entry.body)}"
        return ProxyResponse(416, headers, b"", "Range Not Satisfiable", 0)
    headers["Content-Range"] = f"bytes {answer.start}-{answer.end}/{len(entry.body)}"
    part = entry.body[answer.start:answer.end + 1]
    return ProxyResponse(206, headers, part, "Partial Content", len(part))


def _add_status(headers: CIMultiDict[str], value: str) -> None:
    # RFC 9211: caches append themselves, the one nearest the client last
    existing = headers.get("Cache-Status")
    headers["Cache-Status"] = f"{existing}, {value}" if existing else value


def _mark(response: ProxyResponse, status: str) -> ProxyResponse:
    _add_status(response.headers, f"bascule; {status}")
    return response


def _gateway_timeout(detail: str) -> ProxyResponse:
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "text/plain"})
    _add_status(headers, f"bascule; fwd=miss; detail={detail}")
    return ProxyResponse(504, headers, b"not in cache\n", "Gateway Timeout")


def _strip_weak(tag: str) -> str:
    tag = tag.strip()
    return tag[2:] if tag.startswith("W/") else tag


def _not_modified(request_headers: CIMultiDict[str], headers: CIMultiDict[str]) -> bool:
    """RFC 9110 §13.1.2/§13.1.3 for a client's conditional GET on a stored response."""
    inm = request_headers.get("If-None-Match")
    etag = headers.get("ETag")
    if inm is not None:
        if etag is None:
            return False
        return inm.strip() == "*" or _strip_weak(etag) in {_strip_weak(t) for t in inm.split(",")}
    # §13.1.3: an If-Modified-Since that is not a valid HTTP-date is ignored
    since = parse_http_date(request_headers.get("If-Modified-Since"))
    modified = parse_http_date(headers.get("Last-Modified"))
    return since is not None and modified is not None and modified <= since

