"""The load-balancing strategy contract.

A strategy has a cold path, `update()`, called whenever the backend set or health
changes (build rings and tables there), and a hot path, `pick()`, called once per
attempt: synchronous, no I/O, O(1) or O(log n). In-flight counts live on
`Backend.inflight` and are maintained by the balancer's lease, never by strategies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from proxy.models import Backend

__all__ = ["ObservingStrategy", "RequestContext", "Strategy", "StrategyFactory"]


class RequestContext:
    """What a strategy may know about a request: the hash key (computed once per
    request from the upstream's `hash_on` — `strategy_options.hash_on`, the client
    address by default — or None when the request lacks it), the ids of backends already
    tried by earlier attempts, which `pick()` must avoid when it can, and the
    upstream's total in-flight count. A strategy never sees `pinned`: the balancer
    deals with it."""

    __slots__ = ("exclude", "hash_key", "pinned", "upstream_inflight")

    def __init__(self, hash_key: str | None = None, exclude: frozenset[str] = frozenset()):
        self.hash_key = hash_key
        self.exclude = exclude
        # requests in flight on the whole upstream, set by the balancer before pick()
        # (bounded-load hashing needs the mean without scanning every backend)
        self.upstream_inflight = 0
        # the backend a sticky-session cookie names (proxy/sticky.py): the balancer
        # takes it, when healthy and not excluded, without asking the strategy
        self.pinned: Backend | None = None


@runtime_checkable
class Strategy(Protocol):
    def update(self, backends: Sequence[Backend]) -> None: ...

    def pick(self, ctx: RequestContext) -> Backend:
        """Return a healthy backend not in ctx.exclude (or, if every healthy one is
        excluded, any healthy one); raise NoBackendError when there is none."""
        ...


@runtime_checkable
class ObservingStrategy(Strategy, Protocol):
    def observe(self, backend: Backend, latency_s: float, ok: bool) -> None: ...


class StrategyFactory(Protocol):
    """A strategy class: built from its `strategy_options` (raise ValueError with a
    message naming the option for a bad one) and an injected random source."""

    def __call__(self, options: dict[str, Any], *, rng: Any = ...) -> Strategy: ...
