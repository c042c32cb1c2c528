"""The plugin contract (DESIGN.md §2): an ordered chain over Bascule's own request and
response types. A plugin is built once from its TOML options and then called per
request as `await plugin(request, call_next)`; it may change the request, answer by
itself, or change what `call_next` returned. `ProxyResponse.body` is either bytes or
an async iterator of chunks that nothing has written yet: only the server writes to
the client, so a plugin can wrap or tee the stream (a cache storing while serving),
and every plugin is testable without sockets.

Routes without plugins never build these objects: they keep the direct path.

Quick answers: the outermost plugin of a route may define a synchronous
`quick_answer(method, host, target, headers, route)` returning (status, reason bytes,
header block bytes, body, has Date) or None. It runs before any of the chain's objects
exist, for requests without a body; a cache answers fresh hits from memory this way.
It may also define `async quick_fetch(method, host, target, headers, route, memo)`,
awaited when quick_answer had none, with the same result; what it puts in `memo`
reaches the chain as `ProxyRequest.extra` (a cache passes on what it read from Redis,
so a miss costs one read, not two).

Lifecycle: a plugin may define `async start(context)` (called in the worker once its
event loop runs, before the plugin serves a request: open connections there) and
`async aclose()` (called when its runtime retires after a reload, or at shutdown).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from multidict import CIMultiDict

__all__ = ["Handler", "Plugin", "PluginContext", "PluginFactory", "ProxyRequest",
           "ProxyResponse"]


@dataclass
class ProxyRequest:
    method: str
    target: str  # the raw request-target: path and query, byte-exact
    headers: CIMultiDict[str]  # the client's header fields; changes are sent upstream
    client: str  # the client's address
    route: str  # the route's name
    upstream: str  # the upstream's name
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. what quick_fetch looked up


@dataclass
class ProxyResponse:
    status: int
    headers: CIMultiDict[str]  # end-to-end fields only (hop-by-hop already removed)
    body: bytes | AsyncIterator[bytes] = b""
    reason: str = ""
    # Content-Length of a streamed body when known (None: chunked or until close)
    length: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # for plugins to talk to each other

    async def aclose(self) -> None:
        """Release what an unconsumed streamed body holds (its backend connection)."""
        close = getattr(self.body, "aclose", None)
        if close is not None:
            await close()


Handler = Callable[[ProxyRequest], Awaitable[ProxyResponse]]


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
