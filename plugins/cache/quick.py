"""The cache's quick path: a fresh hit answered before the plugin chain runs (no
awaits for the memory store, one read for a shared one), counted as hits at the
next metrics flush (proxy/plugin.py AnswersEarly, FetchesEarly)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from multidict import CIMultiDict, istr

from plugins.cache.near import NearCache
from plugins.cache.policy import age_from
from plugins.cache.store import CacheStore, MemoryStore

__all__ = ["AnswersQuickly"]

# Request fields that need the full chain (RFC 9111 request directives, RFC 9110
# conditionals and ranges); istr keys so the check against aiohttp's headers is a
# set operation.
_QUICK_SKIP = frozenset(istr(h) for h in (
    "Cache-Control", "Pragma", "Range", "If-Range", "If-None-Match", "If-Modified-Since",
    "If-Match", "If-Unmodified-Since"))


class AnswersQuickly:
    """The Cache plugin's quick path (plugins/cache/plugin.py)."""

    store: CacheStore
    key_headers: tuple[str, ...]
    quick_hits: dict[str, int]
    _lookups: Callable[..., None]
    primary_key: Callable[[str, str], str]
    _secondary: Callable[[CIMultiDict[str]], Callable[[str], str]]

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

    def _flush_quick_hits(self) -> None:
        hits, self.quick_hits = self.quick_hits, {}
        for route, count in hits.items():
            self._lookups(route, "hit", count)
