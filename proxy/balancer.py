"""An upstream's balancer: the current backend snapshot, its strategy, and the lease
that counts in-flight requests on each backend.

Shadow mode (`shadow_strategy`): a second strategy gets the same updates and, on
every lease, picks too with the same context, before the lease changes any count;
its choice is only counted (per backend, and whether it differs from the real one),
never used. Its own state (a round-robin position, latency averages fed by the same
observations) is its own: the real pick cannot see it. The cost is one more pick()."""

from __future__ import annotations

from collections.abc import Sequence

from proxy.errors import NoBackendError
from proxy.models import Backend, BackendSet
from proxy.sticky import StickySessions
from proxy.strategy import ObservingStrategy, RequestContext, Strategy

__all__ = ["Balancer"]


class Balancer:
    def __init__(self, name: str, strategy: Strategy, shadow: Strategy | None = None,
                 sticky: StickySessions | None = None) -> None:
        self.name = name
        self.sticky = sticky
        self.strategy = strategy
        self.shadow = shadow
        # counted since the last metrics flush: backend id -> shadow picks
        self.shadow_picks: dict[str, int] = {}
        self.shadow_disagreements = 0
        self._shadow_observer = shadow if isinstance(shadow, ObservingStrategy) else None
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
        if self.sticky is not None:
            self.sticky.update(merged)
        if self.shadow is not None:
            self.shadow.update(merged)
        self.backends = tuple(merged)
        self.version = backend_set.version

    def lease(self, ctx: RequestContext) -> Backend:
        ctx.upstream_inflight = self.inflight
        pinned = ctx.pinned
        if pinned is not None and pinned.healthy and pinned.id not in ctx.exclude:
            backend = pinned
        else:
            backend = self._panic_pick(ctx) if self.panic else self.strategy.pick(ctx)
        if self.shadow is not None:
            self._shadow_pick(ctx, backend)
        backend.inflight += 1
        self.inflight += 1
        return backend

    def release(self, backend: Backend, latency_s: float = 0.0, ok: bool = True) -> None:
        backend.inflight -= 1
        self.inflight -= 1
        if self._observer is not None:
            self._observer.observe(backend, latency_s, ok)
        if self._shadow_observer is not None:
            self._shadow_observer.observe(backend, latency_s, ok)

    def _shadow_pick(self, ctx: RequestContext, chosen: Backend) -> None:
        assert self.shadow is not None
        try:
            shadow = self.shadow.pick(ctx)
        except NoBackendError:
            self.shadow_disagreements += 1
            return
        picks = self.shadow_picks
        picks[shadow.id] = picks.get(shadow.id, 0) + 1
        if shadow is not chosen:
            self.shadow_disagreements += 1

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
