"""Where cached responses live. The policy (RFC 9111, plugins/cache/policy.py) is apart
from storage: a store keeps entries by primary key (the URL, plus any configured key
headers) and secondary key (the request's values of the fields the response varies
on), remembers each primary's Vary, indexes entries by purge tag, and for stores
shared by several processes offers a fill lock so one of them fetches a cold key.

`MemoryStore` is per worker and bounded by bytes (least recently used goes first);
`RedisStore` (redis_store.py) shares one cache across workers and instances.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
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
    tags: tuple[str, ...] = field(default=())  # Cache-Tag / Surrogate-Key values
    # Parsed once when stored, so a hit is arithmetic rather than date parsing:
    date: float | None = None  # the Date field
    age_value: int = 0  # the Age field
    lifetime: float = 0.0  # freshness lifetime (RFC 9111 §4.2.1)
    directives: dict[str, str | None] = field(default_factory=dict)  # Cache-Control
    # The header block as it goes to a client (without Age and Cache-Status), encoded
    # once so a hit does not re-serialise the fields.
    head: bytes = b""
    reason_bytes: bytes = b""
    has_date: bool = False

    def __post_init__(self) -> None:
        if not self.head:
            self.head = b"".join(f"{k}: {v}\r\n".encode("latin-1", "replace")
                                 for k, v in self.headers)
        self.reason_bytes = self.reason.encode("latin-1", "replace")
        self.has_date = any(k.lower() == "date" for k, _ in self.headers)

    @property
    def size(self) -> int:
        return len(self.body) + 2 * len(self.head) + 256


SecondaryKey = Callable[[str], str]  # the response's Vary value -> the request's variant key


class CacheStore(Protocol):
    name: str
    shared: bool  # seen by other processes: fills are coordinated with lock()

    async def get(self, primary: str, secondary: SecondaryKey) -> Entry | None:
        """The entry for this request's variant of `primary`, or None."""
        ...

    async def put(self, primary: str, secondary: str, entry: Entry, ttl: float) -> None:
        """Store atomically; `ttl` is how long the entry is of any use (freshness
        plus the stale windows); a shared store may drop it after that."""
        ...

    async def purge(self, primary: str) -> int: ...

    async def purge_prefix(self, prefix: str) -> int: ...

    async def purge_tag(self, tag: str) -> int: ...

    async def lock(self, primary: str, ttl: float) -> str | None:
        """A fill lock's token when taken, None when another process holds it."""
        ...

    async def unlock(self, primary: str, token: str) -> None: ...

    async def wait_fill(self, primary: str, timeout: float) -> bool:
        """Wait until the lock holder filled or gave up (True), or `timeout`."""
        ...

    async def aclose(self) -> None: ...


class MemoryStore:
    """Per worker; entries least recently used go first once `max_bytes` is reached.
    Fill coordination is the plugin's in-worker coalescing, so lock() always wins."""

    name = "memory"
    shared = False

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._entries: OrderedDict[tuple[str, str], Entry] = OrderedDict()
        self._vary: dict[str, str] = {}
        self._variants: dict[str, int] = {}  # primary -> entries stored under it
        self._tags: dict[str, set[str]] = {}

    def vary_of(self, primary: str) -> str | None:
        return self._vary.get(primary)

    def entry_at(self, primary: str, secondary: str) -> Entry | None:
        key = (primary, secondary)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def get_now(self, primary: str, secondary: SecondaryKey) -> Entry | None:
        """get() without a coroutine: the hit path calls it directly."""
        vary = self._vary.get(primary)
        if vary is None:
            return None
        key = (primary, secondary(vary))
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    async def get(self, primary: str, secondary: SecondaryKey) -> Entry | None:
        return self.get_now(primary, secondary)

    async def put(self, primary: str, secondary: str, entry: Entry, ttl: float) -> None:
        self.put_now(primary, secondary, entry)

    def has(self, key: tuple[str, str]) -> bool:
        return key in self._entries

    def put_now(self, primary: str, secondary: str, entry: Entry) -> None:
        if entry.size > self.max_bytes:
            return
        key = (primary, secondary)
        self._drop(key)
        self._vary[primary] = entry.vary
        self._variants[primary] = self._variants.get(primary, 0) + 1
        self._entries[key] = entry
        self.used += entry.size
        for tag in entry.tags:
            self._tags.setdefault(tag, set()).add(primary)
        while self.used > self.max_bytes:
            evicted_key, _ = next(iter(self._entries.items()))
            self._drop(evicted_key)

    def _drop(self, key: tuple[str, str]) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.used -= old.size
            left = self._variants.pop(key[0]) - 1
            if left:
                self._variants[key[0]] = left
            else:
                self._vary.pop(key[0], None)

    async def purge(self, primary: str) -> int:
        doomed = [k for k in self._entries if k[0] == primary]
        for key in doomed:
            self._drop(key)
        return len(doomed)

    async def purge_prefix(self, prefix: str) -> int:
        primaries = {k[0] for k in self._entries if k[0].startswith(prefix)}
        return sum([await self.purge(p) for p in primaries])

    async def purge_tag(self, tag: str) -> int:
        return sum([await self.purge(p) for p in self._tags.pop(tag, ())])

    async def lock(self, primary: str, ttl: float) -> str | None:
        return "local"

    async def unlock(self, primary: str, token: str) -> None:
        return None

    async def wait_fill(self, primary: str, timeout: float) -> bool:
        return True

    async def aclose(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._entries)
