"""Smooth weighted round robin, the algorithm of nginx's upstream module
(ngx_http_upstream_round_robin.c): every pick adds each backend's weight to its
current score, takes the highest, and subtracts the total weight from the winner.
Weights 5,1,1 give a a b a c a a: interleaved, never bursts.

Cost: pick O(n) over healthy backends (n is small for static sets); update O(n).
"""

from __future__ import annotations

import random as _random
from collections.abc import Sequence
from typing import Any

from proxy.errors import NoBackendError
from proxy.models import Backend
from proxy.strategy import RequestContext
from strategies._common import reject_unknown_options

__all__ = ["RoundRobin"]


class RoundRobin:
    def __init__(self, options: dict[str, Any], *, rng: Any = None) -> None:
        reject_unknown_options(options, set())
        self._backends: list[Backend] = []
        self._current: dict[str, int] = {}
        self._rng = rng or _random.Random()

    def update(self, backends: Sequence[Backend]) -> None:
        self._backends = list(backends)
        # Keep scores of surviving backends so an update does not restart the cycle.
        self._current = {b.id: self._current.get(b.id, 0) for b in self._backends}

    def pick(self, ctx: RequestContext) -> Backend:
        best = self._choose(ctx.exclude)
        if best is None and ctx.exclude:
            best = self._choose(frozenset())
        if best is None:
            raise NoBackendError("no healthy backend")
        return best

    def _choose(self, exclude: frozenset[str]) -> Backend | None:
        current = self._current
        total = 0
        best: Backend | None = None
        best_score = 0
        for backend in self._backends:
            if not backend.healthy or backend.id in exclude:
                continue
            score = current[backend.id] + backend.weight
            current[backend.id] = score
            total += backend.weight
            if best is None or score > best_score:
                best, best_score = backend, score
        if best is not None:
            current[best.id] -= total
        return best

    def __repr__(self) -> str:
        return f"RoundRobin({self._backends!r})"
