"""The response cache plugin (in progress, issue #4): a shared cache following RFC
9111 (policy.py) over a store (store.py). Done so far: memory store; storing only what
a shared cache may store; serving fresh hits with Age; request directives; Vary
variants; HEAD from GET entries; revalidation with If-None-Match / If-Modified-Since
and 304 refreshes; client conditionals answered from fresh entries; stale-if-error;
invalidation by unsafe methods; concurrent misses for one key coalesced within the
worker; RFC 9211 Cache-Status on every response; bodies teed into the store while
streaming to the first client. To come: the Redis store and fleet-wide coalescing,
stale-while-revalidate, purge, and the `[cache]` table / `cache = true` route switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from multidict import CIMultiDict

from plugins.cache.policy import (
    accepts,
    age_from,
    age_inputs,
    freshness_lifetime,
    invalidated_uris,
    parse_cache_control,
    storable,
    vary_key,
)
from plugins.cache.store import Entry, MemoryStore
from proxy.plugin import Handler, ProxyRequest, ProxyResponse
from proxy.units import parse_duration, parse_size

__all__ = ["Cache"]

_OPTIONS = {"memory_max_size", "max_object_size", "heuristic_freshness", "heuristic_cap",
            "ignore_set_cookie", "key_headers", "drop_query", "lock_timeout",
            "stale_if_error"}
_NOT_STORED = frozenset({"cache-status", "age"})


def _option(options: dict[str, Any], name: str, default: Any, parse: Callable[[Any], Any]
            ) -> Any:
    try:
        return parse(options.get(name, default))
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be a list of strings, got {value!r}")
    return tuple(value)


class Cache:
    def __init__(self, options: dict[str, Any]) -> None:
        for key in options:
            if key not in _OPTIONS:
                raise ValueError(f"{key}: unknown option (allowed: {', '.join(sorted(_OPTIONS))})")
        self.store = MemoryStore(_option(options, "memory_max_size", "64MiB", parse_size))
        self.max_object_size = _option(options, "max_object_size", "8MiB", parse_size)
        self.heuristic = _option(options, "heuristic_freshness", True, _bool)
        self.heuristic_cap = _option(options, "heuristic_cap", "1h", parse_duration)
        self.ignore_set_cookie = _option(options, "ignore_set_cookie", False, _bool)
        self.key_headers = tuple(h.lower() for h in _option(options, "key_headers", [], _names))
        self.drop_query = frozenset(_option(options, "drop_query", [], _names))
        self.lock_timeout = _option(options, "lock_timeout", "5s", parse_duration)
        self.stale_if_error = _option(options, "stale_if_error", "0s", parse_duration)
        self._fills: dict[str, asyncio.Future[None]] = {}

    # -- keys -------------------------------------------------------------------------

    def _primary(self, host: str, target: str, headers: CIMultiDict[str] | None = None) -> str:
        path, _, query = target.partition("?")
        if query and self.drop_query:
            kept = [p for p in query.split("&") if p.partition("=")[0] not in self.drop_query]
            query = "&".join(kept)
        key = f"{host.lower()}{path}" + (f"?{query}" if query else "")
        if self.key_headers and headers is not None:
            key += "".join(f"\n{h}={headers.get(h, '')}" for h in self.key_headers)
        return key

    async def _lookup(self, primary: str, request: ProxyRequest) -> tuple[str, Entry | None]:
        vary = await self.store.get_vary(primary)
        key = primary + "\n\n" + (vary_key({"Vary": vary}, request.headers.items())
                                  if vary else "")
        return key, await self.store.get(key)

    # -- the chain step ----------------------------------------------------------------

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        host = request.headers.get("Host", "")
        if request.method not in ("GET", "HEAD"):
            response = await call_next(request)
            uri = f"http://{host}{request.target}"
            for target in invalidated_uris(request.method, response.status, uri,
                                           response.headers):
                parts = urlsplit(target)
                path = parts.path + (f"?{parts.query}" if parts.query else "")
                await self.store.delete_prefix(self._primary(parts.netloc, path) + "\n")
            return response
        primary = self._primary(host, request.target, request.headers)
        key, entry = await self._lookup(primary, request)
        req_cc = parse_cache_control(request.headers.getall("Cache-Control", []))
        if entry is None and request.method == "GET":
            waiter = self._fills.get(primary)
            if waiter is not None:  # someone is fetching this key: wait, then look again
                with contextlib.suppress(TimeoutError):  # bounded: then fetch ourselves
                    await asyncio.wait_for(asyncio.shield(waiter), self.lock_timeout)
                key, entry = await self._lookup(primary, request)
        if entry is not None:
            age = age_from(entry.date, entry.age_value, entry.request_time,
                           entry.response_time, time.time())
            decision = accepts(request.headers, age, entry.lifetime, entry.directives)
            if decision in ("fresh", "stale-ok"):
                return self._serve(request, entry, age, "hit" if decision == "fresh"
                                   else "hit; detail=stale")
            if "only-if-cached" in req_cc:
                return _gateway_timeout("only-if-cached")
            return await self._revalidate(request, call_next, primary, key, entry, age)
        if "only-if-cached" in req_cc:
            return _gateway_timeout("only-if-cached")
        if request.method == "HEAD":
            return _mark(await call_next(request), "fwd=miss")
        fill: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._fills[primary] = fill

        def done() -> None:
            if self._fills.get(primary) is fill:
                del self._fills[primary]
            if not fill.done():
                fill.set_result(None)

        try:
            request_time = time.time()
            response = await call_next(request)
            return await self._maybe_store(request, response, primary, "fwd=miss",
                                           request_time, done)
        except BaseException:
            done()
            raise

    # -- helpers ------------------------------------------------------------------------

    def _serve(self, request: ProxyRequest, entry: Entry, age: float, status: str
               ) -> ProxyResponse:
        headers: CIMultiDict[str] = CIMultiDict(entry.headers)
        headers["Age"] = str(int(age))
        _add_status(headers, f"bascule; {status}")
        if ("If-None-Match" in request.headers or "If-Modified-Since" in request.headers) \
                and _not_modified(request.headers, headers):
            return ProxyResponse(304, CIMultiDict(
                (k, v) for k, v in headers.items()
                if k.lower() not in ("content-type", "content-encoding", "content-language")),
                b"", "Not Modified")
        return ProxyResponse(entry.status, headers, entry.body, entry.reason, len(entry.body))

    async def _revalidate(self, request: ProxyRequest, call_next: Handler, primary: str,
                          key: str, entry: Entry, age: float) -> ProxyResponse:
        stored: CIMultiDict[str] = CIMultiDict(entry.headers)
        client_conditionals = {h: request.headers.get(h)
                               for h in ("If-None-Match", "If-Modified-Since")}
        for header, source in (("If-None-Match", "ETag"), ("If-Modified-Since", "Last-Modified")):
            request.headers.popall(header, None)
            if source in stored:
                request.headers[header] = stored[source]
        request_time = time.time()
        try:
            response = await call_next(request)
        except Exception:
            if self.stale_if_error and age - self._lifetime(entry) <= self.stale_if_error:
                return self._serve(request, entry, age, "hit; detail=stale-if-error")
            raise
        finally:
            for header, value in client_conditionals.items():
                request.headers.popall(header, None)
                if value is not None:
                    request.headers[header] = value
        if response.status == 304:
            await response.aclose()
            # §4.3.4: the stored response's fields are updated from the 304
            for name, value in response.headers.items():
                if name.lower() not in _NOT_STORED | {"content-length"}:
                    stored[name] = value
            refreshed = self._entry(entry.status, entry.reason, list(stored.items()),
                                    entry.body, request_time, time.time(), entry.vary)
            await self.store.put(key, refreshed)
            return self._serve(request, refreshed, 0.0, "fwd=stale; fwd-status=304")
        if response.status >= 500 and self.stale_if_error and (
                age - self._lifetime(entry) <= self.stale_if_error):
            await response.aclose()
            return self._serve(request, entry, age, "hit; detail=stale-if-error")
        return await self._maybe_store(request, response, primary, "fwd=stale", request_time,
                                       lambda: None)

    def _lifetime(self, entry: Entry) -> float:
        return entry.lifetime

    def _entry(self, status: int, reason: str, fields: list[tuple[str, str]], body: bytes,
               request_time: float, response_time: float, vary: str) -> Entry:
        """An entry with what a hit needs already parsed (dates, lifetime, directives)."""
        headers: CIMultiDict[str] = CIMultiDict(fields)
        date, age_value = age_inputs(headers)
        lifetime = freshness_lifetime(headers, heuristic=self.heuristic,
                                      heuristic_cap=self.heuristic_cap,
                                      status=status).lifetime
        return Entry(status, reason, fields, body, request_time, response_time, vary,
                     date=date, age_value=age_value, lifetime=lifetime,
                     directives=parse_cache_control(headers.getall("Cache-Control", [])))

    async def _maybe_store(self, request: ProxyRequest, response: ProxyResponse, primary: str,
                           forward: str, request_time: float, done: Callable[[], None]
                           ) -> ProxyResponse:
        ok, reason = storable(request.method, response.status, request.headers,
                              response.headers, ignore_set_cookie=self.ignore_set_cookie,
                              heuristic=self.heuristic)
        body = response.body
        size = len(body) if isinstance(body, bytes) else response.length
        if ok and size is not None and size > self.max_object_size:
            ok, reason = False, "too-big"
        if not ok:
            done()
            return _mark(response, f"{forward}; detail={reason}")
        vary = response.headers.get("Vary", "")
        fields = [(k, v) for k, v in response.headers.items() if k.lower() not in _NOT_STORED]
        response_time = time.time()
        store = self.store
        key = primary + "\n\n" + (vary_key({"Vary": vary}, request.headers.items())
                                  if vary else "")

        async def save(data: bytes) -> None:
            if vary:
                await store.put_vary(primary, vary)
            await store.put(key, self._entry(response.status, response.reason, fields, data,
                                             request_time, response_time, vary))

        if isinstance(body, bytes):
            await save(body)
            done()
        else:
            response.body = self._tee(body, save, done)
        return _mark(response, f"{forward}; stored")

    async def _tee(self, body: AsyncIterator[bytes],
                   save: Callable[[bytes], Any], done: Callable[[], None]
                   ) -> AsyncIterator[bytes]:
        """Streams to the client while keeping a copy; stores it once complete (a
        body that grows past max_object_size is streamed on, unstored)."""
        kept: list[bytes] | None = []
        size = 0
        try:
            async for chunk in body:
                if kept is not None:
                    size += len(chunk)
                    if size > self.max_object_size:
                        kept = None
                    else:
                        kept.append(chunk)
                yield chunk
            if kept is not None:
                await save(b"".join(kept))
        finally:
            done()
            close = getattr(body, "aclose", None)
            if close is not None:
                await close()


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
    ims, modified = request_headers.get("If-Modified-Since"), headers.get("Last-Modified")
    if ims and modified:
        try:
            return parsedate_to_datetime(modified) <= parsedate_to_datetime(ims)
        except (TypeError, ValueError):
            return False
    return False
