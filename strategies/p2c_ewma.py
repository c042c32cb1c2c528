"""Latency-aware power of two choices with peak-EWMA, as in Finagle's and Linkerd's
balancers: each backend's cost is its exponentially weighted moving average response
time (jumping straight up to any slower sample — the "peak" — and decaying with time
constant `decay`) times (in-flight + 1), divided by weight. Two distinct backends are
sampled and the cheaper one taken. A backend that is slow but not failing sheds load
before its queue builds, which least-connections only notices once requests pile up.

Failures (`ok=False`) count as a `failure_penalty` sample so an erroring backend that
answers fast is not preferred. New backends start at the mean of the known ones.

Cost: pick O(1) (two draws); observe O(1); update O(n).
"""

from __future__ import annotations

import math
import random as _random
import time
from collections.abc import Callable, Sequence
from typing import Any

from proxy.errors import NoBackendError
from proxy.models import Backend
from proxy.strategy import RequestContext
from proxy.units import parse_duration
from strategies._common import SHARED_OPTIONS, check_shared_options, reject_unknown_options

__all__ = ["P2CEwma"]


class P2CEwma:
    def __init__(self, options: dict[str, Any], *, rng: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        reject_unknown_options(options, {"decay", "default_rtt", "failure_penalty",
                                         *SHARED_OPTIONS})
        check_shared_options(options)
        self.decay = _duration(options, "decay", "10s")
        self.default_rtt = _duration(options, "default_rtt", "5ms")
        self.failure_penalty = _duration(options, "failure_penalty", "1s")
        self._rng = rng or _random.Random()
        self._clock = clock
        self._backends: list[Backend] = []
        self._ewma: dict[str, list[float]] = {}  # id -> [ewma seconds, last update]

    def update(self, backends: Sequence[Backend]) -> None:
        known = [s[0] for b in backends if (s := self._ewma.get(b.id))]
        start = sum(known) / len(known) if known else self.default_rtt
        now = self._clock()
        # Unchanged backends keep their history; departed ones are forgotten.
        self._ewma = {b.id: self._ewma.get(b.id) or [start, now] for b in backends}
        self._backends = list(backends)

    def observe(self, backend: Backend, latency_s: float, ok: bool) -> None:
        state = self._ewma.get(backend.id)
        if state is None:
            return
        sample = latency_s if ok else max(latency_s, self.failure_penalty)
        now = self._clock()
        if sample > state[0]:
            state[0] = sample
        else:
            weight = math.exp(-(now - state[1]) / self.decay)
            state[0] = state[0] * weight + sample * (1.0 - weight)
        state[1] = now

    def cost(self, backend: Backend) -> float:
        state = self._ewma.get(backend.id)
        latency = state[0] if state else self.default_rtt
        load = backend.inflight + backend.fleet_inflight  # fleet: shared = "redis"
        return latency * (load + 1) / (backend.weight * backend.ramp)

    def pick(self, ctx: RequestContext) -> Backend:
        backends = self._backends
        count = len(backends)
        if count > 1:
            rng = self._rng.random
            i = int(rng() * count)
            j = int(rng() * (count - 1))
            j += j >= i  # two distinct draws
            a, b = backends[i], backends[j]
            exclude = ctx.exclude
            if (a.healthy and b.healthy and a.id not in exclude
                    and b.id not in exclude):
                return a if self.cost(a) <= self.cost(b) else b
        candidates = [b for b in backends if b.healthy and b.id not in ctx.exclude]
        if not candidates:
            candidates = [b for b in backends if b.healthy]
        if not candidates:
            raise NoBackendError("no healthy backend")
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(candidates, 2)
        return a if self.cost(a) <= self.cost(b) else b

    def __repr__(self) -> str:
        costs = {b.id: round(self._ewma[b.id][0] * 1000, 2) for b in self._backends}
        return f"P2CEwma(ewma_ms={costs})"


def _duration(options: dict[str, Any], name: str, default: str) -> float:
    try:
        value = parse_duration(options.get(name, default))
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    if value <= 0:
        raise ValueError(f"{name}: must be > 0")
    return value
