"""The plugin contract (DESIGN.md §2): an ordered chain over Bascule's own request and
response types. A plugin is built once from its TOML options and then called per
request as `await plugin(request, call_next)`; it may change the request, answer by
itself, or change what `call_next` returned. `ProxyResponse.body` is either bytes or
an async iterator of chunks that nothing has written yet: only the server writes to
the client, so a plugin can wrap or tee the stream (a cache storing while serving),
and every plugin is testable without sockets.

Routes without plugins never build these objects: they keep the direct path.

What a plugin may do beyond `__call__` is declared here as small Protocols, detected
once when the runtime is built (`PluginSeams.of`), never probed per request; the
engine names no plugin:

- `StartsWithRuntime.start(context)`: called in the worker once its event loop runs,
  before the plugin serves a request (open connections there). For a reload it runs
  while preparing; if it raises, the reload fails and nothing changes.
- `ClosesWithRuntime.aclose()`: called when its runtime retires after a reload, at
  shutdown, or when a prepared runtime is discarded.
- `CarriesOverReload.adopt(previous)`: at a reload's commit, the plugin of the same
  name in the old runtime is handed over (a memory cache keeps its entries).
- `AnswersEarly.quick_answer(method, host, target, headers, route)`: for the
  outermost plugin of a route, a synchronous answer (`QuickAnswer`: status, reason
  bytes, header block bytes, body, has Date) or None, before any of the chain's
  objects exist. Only ever asked for GET and HEAD requests without a body (RFC 9111
  §4: an unsafe method must reach the origin). A cache answers fresh hits this way.
- `FetchesEarly.quick_fetch(..., memo)`: the same, awaited when quick_answer had
  none; what it puts in `memo` reaches the chain as `ProxyRequest.extra` (a cache
  passes on what it read from Redis, so a miss costs one read, not two).
- `ReadsFiles.source_digest()`: a digest of the files the plugin read when built
  (an htpasswd file): part of the config's identity, so a reload after editing only
  that file is a change, not "unchanged".
- `Purgeable.purge(url=, prefix=, tag=)` for `POST /cache/purge` on the admin
  listener, and `purge_is_local()`: True when the plugin's state lives in each worker
  (the purge is then broadcast to every worker).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from multidict import CIMultiDict, getversion

__all__ = [
    "AnswersEarly",
    "CarriesOverReload",
    "ClosesWithRuntime",
    "FetchesEarly",
    "Handler",
    "Plugin",
    "PluginContext",
    "PluginFactory",
    "PluginSeams",
    "ProxyRequest",
    "ProxyResponse",
    "Purgeable",
    "QuickAnswer",
    "ReadsFiles",
    "StartsWithRuntime",
    "quick_answers",
    "refuse_unknown_options",
]

# (status, reason, header block, body, has Date): an answer given before the chain
QuickAnswer = tuple[int, bytes, bytes, bytes, bool]


@dataclass
class ProxyRequest:
    method: str
    target: str  # the raw request-target: path and query, byte-exact
    headers: CIMultiDict[str]  # the client's header fields; changes are sent upstream
    # The client's address: the TCP peer, or what a trusted proxy's X-Forwarded-For
    # names (proxy/client_address.py); never a value an untrusted client chose.
    client: str
    route: str  # the route's name
    upstream: str  # the upstream's name
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. what quick_fetch looked up
    # The engine's own state for this request (for the chain's terminal step): not
    # for plugins to read or change.
    engine: Any = field(default=None, repr=False, compare=False)
    scheme: str = "http"  # "https" when the client came over a TLS listener
    request_id: str = ""  # X-Request-Id as forwarded (server.request_id)
    # The request's body when the engine read it whole before the chain (the route's
    # `buffer_requests`, or no body: b""); None when it streams to the backend and a
    # plugin cannot see it. Read-only: the engine sends what it read.
    whole_body: bytes | None = None


@dataclass
class ProxyResponse:
    status: int
    headers: CIMultiDict[str]  # end-to-end fields only (hop-by-hop already removed)
    body: bytes | AsyncIterator[bytes] = b""
    reason: str = ""
    # Content-Length of a streamed body when known (None: chunked or until close)
    length: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # for plugins to talk to each other
    # The engine's: (multidict version of `headers`, their head block) when it made
    # `headers` from a backend's head; the block is reused while nothing changed them.
    ready_block: tuple[int, bytes] | None = field(default=None, repr=False, compare=False)

    async def aclose(self) -> None:
        """Release what an unconsumed streamed body holds (its backend connection)."""
        close = getattr(self.body, "aclose", None)
        if close is not None:
            await close()


Handler = Callable[[ProxyRequest], Awaitable[ProxyResponse]]


def headers_version(headers: CIMultiDict[str]) -> int:
    """multidict's version of a header dict: it moves on every change, and a new dict
    has a new one, so the engine sees whether a plugin touched the fields with one
    comparison."""
    return getversion(headers)  # type: ignore[arg-type]  # typed for MultiDict[object]


def refuse_unknown_options(options: dict[str, Any], known: set[str]) -> None:
    """For a plugin's constructor: a misspelt option is an error naming it (and the
    ones that exist), reported by `bascule check` at `plugins[N].options.NAME`."""
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown option "
                         f"({', '.join(sorted(known))})")


@dataclass
class PluginContext:
    """What a plugin gets at start(): shared settings and the worker's metrics."""

    redis: Any  # proxy.config.RedisConfig: the [redis] table
    metrics: Any  # proxy.metrics.Metrics


class Plugin(Protocol):
    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse: ...


class PluginFactory(Protocol):
    """A plugin class (or function) built from its `options` table; raises
    ValueError("option: message") for a bad option (reported with its key path)."""

    def __call__(self, options: dict[str, Any]) -> Plugin: ...


@runtime_checkable
class StartsWithRuntime(Protocol):
    async def start(self, context: PluginContext) -> None: ...


@runtime_checkable
class ClosesWithRuntime(Protocol):
    async def aclose(self) -> None: ...


@runtime_checkable
class CarriesOverReload(Protocol):
    def adopt(self, previous: object) -> None: ...


@runtime_checkable
class AnswersEarly(Protocol):
    def quick_answer(self, method: str, host: str, target: str, headers: Any,
                     route: str) -> QuickAnswer | None: ...


@runtime_checkable
class FetchesEarly(Protocol):
    async def quick_fetch(self, method: str, host: str, target: str, headers: Any,
                          route: str, memo: dict[str, Any]) -> QuickAnswer | None: ...


@runtime_checkable
class ReadsFiles(Protocol):
    def source_digest(self) -> str: ...


@runtime_checkable
class Purgeable(Protocol):
    async def purge(self, *, url: str | None = None, prefix: str | None = None,
                    tag: str | None = None) -> int: ...

    def purge_is_local(self) -> bool: ...


@runtime_checkable
class DeclaresOptions(Protocol):
    """A plugin class naming the option keys it accepts, so that `bascule schema` can
    flag a typo'd key in an editor (proxy/config/schema.py); values stay the
    plugin's to check."""

    option_names: frozenset[str]


@runtime_checkable
class Reports(Protocol):
    """A plugin with state worth showing an operator (the dashboard, /status):
    JSON-able and cheap to make; e.g. a store's kind and whether its breaker is open."""

    def status(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class PluginSeams:
    """A runtime's built plugins by what each declared, found once when the runtime
    is built: the engine calls these, never probing attributes."""

    starting: dict[str, StartsWithRuntime] = field(default_factory=dict)
    closing: dict[str, ClosesWithRuntime] = field(default_factory=dict)
    adopting: dict[str, CarriesOverReload] = field(default_factory=dict)
    purgeable: dict[str, Purgeable] = field(default_factory=dict)
    reporting: dict[str, Reports] = field(default_factory=dict)

    @classmethod
    def of(cls, plugins: dict[str, Any]) -> PluginSeams:
        return cls(
            starting={n: p for n, p in plugins.items() if isinstance(p, StartsWithRuntime)},
            closing={n: p for n, p in plugins.items() if isinstance(p, ClosesWithRuntime)},
            adopting={n: p for n, p in plugins.items() if isinstance(p, CarriesOverReload)},
            purgeable={n: p for n, p in plugins.items() if isinstance(p, Purgeable)},
            reporting={n: p for n, p in plugins.items() if isinstance(p, Reports)},
        )

    @property
    def any_local_purge(self) -> bool:
        return any(p.purge_is_local() for p in self.purgeable.values())


def quick_answers(chain: tuple[Any, ...]) -> tuple[Any, Any] | None:
    """(quick_answer, quick_fetch or None) of a chain's outermost plugin, if it
    answers early (found once per route at build time)."""
    first = chain[0] if chain else None
    if not isinstance(first, AnswersEarly):
        return None
    return first.quick_answer, first.quick_fetch if isinstance(first, FetchesEarly) else None
