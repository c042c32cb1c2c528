"""Weighted random: each pick chooses a backend with probability weight/total.

Cost: pick O(log n) (bisect over cumulative weights); update O(n).
"""

from __future__ import annotations

import bisect
import itertools
import random as _random
from collections.abc import Sequence
from typing import Any

from proxy.errors import NoBackendError
from proxy.models import Backend
from proxy.strategy import RequestContext
from strategies._common import reject_unknown_options

__all__ = ["WeightedRandom"]


class WeightedRandom:
    def __init__(self, options: dict[str, Any], *, rng: Any = None) -> None:
        reject_unknown_options(options, set())
        self._rng = rng or _random.Random()
        self._backends: list[Backend] = []
        self._cumulative: list[int] = []

    def update(self, backends: Sequence[Backend]) -> None:
        self._backends = list(backends)
        self._cumulative = list(itertools.accumulate(b.weight for b in self._backends))

    def pick(self, ctx: RequestContext) -> Backend:
        if self._cumulative:
            # Fast path: one draw; health or exclusion misses fall back to a filtered draw.
            point = self._rng.random() * self._cumulative[-1]
            backend = self._backends[bisect.bisect_right(self._cumulative, point)]
            if backend.healthy and backend.id not in ctx.exclude:
                return backend
        candidates = [b for b in self._backends if b.healthy and b.id not in ctx.exclude]
        if not candidates:
            candidates = [b for b in self._backends if b.healthy]
        if not candidates:
            raise NoBackendError("no healthy backend")
        return self._rng.choices(candidates, weights=[b.weight for b in candidates])[0]

    def __repr__(self) -> str:
        return f"WeightedRandom({self._backends!r})"
