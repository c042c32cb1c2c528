"""An upstream's balancer: the current backend snapshot, its strategy, and the lease
that counts in-flight requests on each backend."""

from __future__ import annotations

from collections.abc import Sequence

from proxy.models import Backend, BackendSet
from proxy.strategy import ObservingStrategy, RequestContext, Strategy

__all__ = ["Balancer"]


class Balancer:
    def __init__(self, name: str, strategy: Strategy) -> None:
        self.name = name
        self.strategy = strategy
        self.backends: tuple[Backend, ...] = ()
        self.version = 0
        self.inflight = 0
        self.panic = False  # set by the health monitor: too few healthy backends
        self._panic_next = 0
        self._observer = strategy if isinstance(strategy, ObservingStrategy) else None

    def update(self, backend_set: BackendSet) -> None:
        """Swap in a new snapshot. Backends whose identity is unchanged keep their
        Backend object, so in-flight counts and health survive the update."""
        current = {b.identity: b for b in self.backends}
        merged: list[Backend] = [current.get(b.identity, b) for b in backend_set.backends]
        self.strategy.update(merged)
        self.backends = tuple(merged)
        self.version = backend_set.version

    def lease(self, ctx: RequestContext) -> Backend:
        ctx.upstream_inflight = self.inflight
        backend = self._panic_pick(ctx) if self.panic else self.strategy.pick(ctx)
        backend.inflight += 1
        self.inflight += 1
        return backend

    def release(self, backend: Backend, latency_s: float = 0.0, ok: bool = True) -> None:
        backend.inflight -= 1
        self.inflight -= 1
        if self._observer is not None:
            self._observer.observe(backend, latency_s, ok)

    def _panic_pick(self, ctx: RequestContext) -> Backend:
        """Panic mode: round robin over every backend, healthy or not (excluding the
        ones this request already tried when others remain), but never a drained one:
        an operator's drain is not a health verdict to second-guess."""
        backends = self.backends
        if not backends:
            return self.strategy.pick(ctx)
        for _ in range(len(backends)):
            self._panic_next = (self._panic_next + 1) % len(backends)
            backend = backends[self._panic_next]
            if backend.id not in ctx.exclude and not backend.drained:
                return backend
        backend = backends[self._panic_next]
        return backend if not backend.drained else self.strategy.pick(ctx)

    def __repr__(self) -> str:
        inner: Sequence[Backend] = self.backends
        return f"Balancer({self.name!r}, {type(self.strategy).__name__}, {list(inner)!r})"
