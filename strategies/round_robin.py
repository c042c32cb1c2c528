"""Smooth weighted round robin, the algorithm of nginx's upstream module
(ngx_http_upstream_round_robin.c): every pick adds each backend's weight to its
current score, takes the highest, and subtracts the total weight from the winner.
Weights 5,1,1 give a a b a c a a: interleaved, never bursts.

Cost: for up to 64 backends nginx's algorithm runs as is (pick O(n), update O(n)).
Larger sets use a schedule precomputed by update() — earliest-deadline-first over
the weights, where a backend of weight w is due at (k + 1/2)/w for its k-th turn,
which interleaves just as smoothly — so pick is O(1) (update O(W log n) for total
weight W after dividing by the weights' gcd, capped at 2^20 entries).
"""

from __future__ import annotations

import heapq
import math
import random as _random
from collections.abc import Sequence
from functools import reduce
from typing import Any

from proxy.errors import NoBackendError
from proxy.models import Backend
from proxy.strategy import RequestContext
from strategies._common import reject_unknown_options

__all__ = ["RoundRobin", "smooth_schedule"]

_LIVE_LIMIT = 64
_SCHEDULE_CAP = 1 << 20


def smooth_schedule(weights: Sequence[int]) -> list[int]:
    """Indexes in earliest-deadline-first order, one period long."""
    divisor = reduce(math.gcd, weights)
    reduced = [w // divisor for w in weights]
    total = sum(reduced)
    if total > _SCHEDULE_CAP:  # keep proportions, bound the memory
        scale = _SCHEDULE_CAP / total
        reduced = [max(1, int(w * scale)) for w in reduced]
        total = sum(reduced)
    heap = [(0.5 / w, i, 0) for i, w in enumerate(reduced)]
    heapq.heapify(heap)
    order: list[int] = []
    for _ in range(total):
        _, i, k = heapq.heappop(heap)
        order.append(i)
        heapq.heappush(heap, ((k + 1.5) / reduced[i], i, k + 1))
    return order


class RoundRobin:
    def __init__(self, options: dict[str, Any], *, rng: Any = None) -> None:
        reject_unknown_options(options, set())
        self._backends: list[Backend] = []
        self._current: dict[str, float] = {}
        self._schedule: list[int] = []
        self._position = 0
        self._rng = rng or _random.Random()

    def update(self, backends: Sequence[Backend]) -> None:
        self._backends = list(backends)
        # Keep scores of surviving backends so an update does not restart the cycle.
        self._current = {b.id: self._current.get(b.id, 0) for b in self._backends}
        if len(self._backends) > _LIVE_LIMIT:
            self._schedule = smooth_schedule([b.weight for b in self._backends])
            self._position %= len(self._schedule)
        else:
            self._schedule = []

    def pick(self, ctx: RequestContext) -> Backend:
        if self._schedule:
            best = self._next_scheduled(ctx.exclude)
        else:
            best = self._choose(ctx.exclude)
            if best is None and ctx.exclude:
                best = self._choose(frozenset())
        if best is None:
            raise NoBackendError("no healthy backend")
        return best

    def _next_scheduled(self, exclude: frozenset[str]) -> Backend | None:
        schedule, backends = self._schedule, self._backends
        size = len(schedule)
        for _ in range(min(size, 2 * len(backends))):
            backend = backends[schedule[self._position]]
            self._position = (self._position + 1) % size
            if backend.healthy and backend.id not in exclude:
                return backend
        healthy = [b for b in backends if b.healthy]
        allowed = [b for b in healthy if b.id not in exclude] or healthy
        return allowed[int(self._rng.random() * len(allowed))] if allowed else None

    def _choose(self, exclude: frozenset[str]) -> Backend | None:
        current = self._current
        total = 0.0
        best: Backend | None = None
        best_score = 0.0
        for backend in self._backends:
            if not backend.healthy or backend.id in exclude:
                continue
            # ramp < 1 while a (re)admitted backend warms up (slow start)
            weight = backend.weight if backend.ramp == 1.0 else backend.weight * backend.ramp
            score = current[backend.id] + weight
            current[backend.id] = score
            total += weight
            if best is None or score > best_score:
                best, best_score = backend, score
        if best is not None:
            current[best.id] -= total
        return best

    def __repr__(self) -> str:
        return f"RoundRobin({self._backends!r})"
