"""Least connections: the backend with the fewest in-flight requests relative to its
weight (nginx `least_conn`, Envoy `LEAST_REQUEST`).

Without `choices` every healthy backend is scanned (O(n) per pick; exact); ties are
broken by starting each scan one place further round, so no backend is favoured for
its position. With `choices = N` (N >= 2), N distinct backends are sampled and the
best taken — the power of N choices (Mitzenmacher 2001; Envoy's default of 2), O(N)
per pick whatever the set size. update() is O(n).

`shared = "redis"`: the in-flight counts are the fleet's — this worker's live ones
plus every other worker's and instance's as Redis last said (`shared_interval`,
250 ms by default; proxy/fleet.py). Without it `fleet_inflight` stays 0.
"""

from __future__ import annotations

import random as _random
from collections.abc import Sequence
from typing import Any

from proxy.errors import NoBackendError
from proxy.models import Backend
from proxy.strategy import RequestContext
from strategies._common import (
    SHARED_OPTIONS,
    check_shared_options,
    int_option,
    reject_unknown_options,
)

__all__ = ["LeastConnections"]


class LeastConnections:
    def __init__(self, options: dict[str, Any], *, rng: Any = None) -> None:
        reject_unknown_options(options, {"choices", *SHARED_OPTIONS})
        self.choices = int_option(options, "choices", None, minimum=2)
        check_shared_options(options)
        self._rng = rng or _random.Random()
        self._backends: list[Backend] = []
        self._start = 0

    def update(self, backends: Sequence[Backend]) -> None:
        self._backends = list(backends)

    def pick(self, ctx: RequestContext) -> Backend:
        if self.choices is not None and len(self._backends) > self.choices:
            best = self._sample(ctx.exclude)
        else:
            best = self._scan(ctx.exclude)
        if best is None and ctx.exclude:
            best = self._scan(frozenset())
        if best is None:
            raise NoBackendError("no healthy backend")
        return best

    def _scan(self, exclude: frozenset[str]) -> Backend | None:
        backends = self._backends
        count = len(backends)
        if not count:
            return None
        start = self._start = (self._start + 1) % count
        best: Backend | None = None
        best_inflight, best_weight = 0, 0.0
        for i in range(count):
            backend = backends[(start + i) % count]
            if not backend.healthy or backend.id in exclude:
                continue
            # inflight/weight < best_inflight/best_weight, without division
            weight = backend.weight * backend.ramp
            load = backend.inflight + backend.fleet_inflight
            if best is None or load * best_weight < best_inflight * weight:
                best, best_inflight, best_weight = backend, load, weight
        return best

    def _sample(self, exclude: frozenset[str]) -> Backend | None:
        backends = self._backends
        best: Backend | None = None
        best_inflight, best_weight = 0, 0.0
        tries = 0
        found = 0
        # Sampling with a bounded number of draws; falls back to a scan when most
        # backends are unhealthy or excluded.
        while found < self.choices and tries < 4 * self.choices:  # type: ignore[operator]
            tries += 1
            backend = backends[int(self._rng.random() * len(backends))]
            if not backend.healthy or backend.id in exclude or backend is best:
                continue
            found += 1
            weight = backend.weight * backend.ramp
            load = backend.inflight + backend.fleet_inflight
            if best is None or load * best_weight < best_inflight * weight:
                best, best_inflight, best_weight = backend, load, weight
        return best if best is not None else self._scan(exclude)

    def __repr__(self) -> str:
        return f"LeastConnections(choices={self.choices}, {self._backends!r})"
