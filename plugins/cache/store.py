"""Where cached responses live. The policy (RFC 9111, plugins/cache/policy.py) is apart
from storage: a store only keeps entries by key. `MemoryStore` is per worker and
bounded by bytes (least recently used goes first); a Redis store shares one cache
across workers and instances (to come)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["CacheStore", "Entry", "MemoryStore"]


@dataclass
class Entry:
    status: int
    reason: str
    headers: list[tuple[str, str]]  # end-to-end fields as received
    body: bytes
    request_time: float
    response_time: float
    vary: str = ""  # the response's Vary field ("" when none)
    tags: tuple[str, ...] = field(default=())
    # Parsed once when stored, so a hit is arithmetic rather than date parsing:
    date: float | None = None  # the Date field
    age_value: int = 0  # the Age field
    lifetime: float = 0.0  # freshness lifetime (RFC 9111 §4.2.1)
    directives: dict[str, str | None] = field(default_factory=dict)  # Cache-Control

    @property
    def size(self) -> int:
        return len(self.body) + sum(len(k) + len(v) + 4 for k, v in self.headers) + 256


class CacheStore(Protocol):
    async def get(self, key: str) -> Entry | None: ...

    async def put(self, key: str, entry: Entry) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def get_vary(self, primary: str) -> str | None: ...

    async def put_vary(self, primary: str, vary: str) -> None: ...


class MemoryStore:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._vary: dict[str, str] = {}

    async def get(self, key: str) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    async def put(self, key: str, entry: Entry) -> None:
        if entry.size > self.max_bytes:
            return
        await self.delete(key)
        self._entries[key] = entry
        self.used += entry.size
        while self.used > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.used -= evicted.size

    async def delete(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.used -= old.size

    async def delete_prefix(self, prefix: str) -> int:
        doomed = [k for k in self._entries if k.startswith(prefix)]
        for key in doomed:
            await self.delete(key)
        return len(doomed)

    async def get_vary(self, primary: str) -> str | None:
        return self._vary.get(primary)

    async def put_vary(self, primary: str, vary: str) -> None:
        self._vary[primary] = vary

    def __len__(self) -> int:
        return len(self._entries)
