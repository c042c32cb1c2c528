"""Storing a response: whether it may be (RFC 9111 §3), the entry with what a hit
needs parsed once, how long it is kept, and the copy taken while the body streams to
the client and written to the store after the last chunk, in the background."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from multidict import CIMultiDict

from plugins.cache.answers import mark
from plugins.cache.policy import age_inputs, freshness_lifetime, response_directives, storable
from plugins.cache.store import CacheStore, Entry
from proxy.plugin import ProxyRequest, ProxyResponse

__all__ = ["NOT_STORED", "StoresResponses", "stale_window"]

log = logging.getLogger("bascule.cache")

NOT_STORED = frozenset({"cache-status", "age"})
_NO_STALE = ("no-cache", "must-revalidate", "proxy-revalidate")


def _seconds(value: str | None) -> float | None:
    return float(value) if value is not None and value.isdigit() else None


def stale_window(entry: Entry, directive: str, default: float) -> float:
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


class StoresResponses:
    """The Cache plugin's storing half (plugins/cache/plugin.py)."""

    store: CacheStore
    heuristic: bool
    heuristic_cap: float
    targeted: tuple[str, ...]
    ignore_set_cookie: bool
    max_object_size: int
    tag_headers: tuple[str, ...]
    stale_while_revalidate: float
    stale_if_error: float
    validator_grace: float
    _background: set[asyncio.Task[Any]]

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
        stale = max(stale_window(entry, "stale-while-revalidate",
                                       self.stale_while_revalidate),
                    stale_window(entry, "stale-if-error", self.stale_if_error))
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
            return mark(response, f"{forward}; detail={reason}")
        vary = ", ".join(response.headers.getall("Vary", []))  # every line (RFC 9110 §5.3)
        age_value = age_inputs(response.headers)[1]
        fields = [(k, v) for k, v in response.headers.items() if k.lower() not in NOT_STORED]
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
        return mark(response, f"{forward}; stored")

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

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("cache background work failed: %r", task.exception())
