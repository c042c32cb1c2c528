"""Passive outlier ejection decided once for every worker (Envoy's outlier
detection, combined across processes).

Each worker counts a backend's consecutive failures (5xx answers, connect failures)
on its own: the hot path never waits for another process. When a worker's streak
reaches `consecutive_failures` it reports the backend here. The first report ejects
it — for `base_ejection_time` times its number of ejections, capped at
`max_ejection_time` — unless that would eject more than `max_ejection_percent` of
the upstream's backends (at least one may always be ejected); reports about a
backend already ejected are ignored. The ejection is sent to every worker, so it
starts once and holds everywhere; a worker that connects later is told of the
ejections still running."""

from __future__ import annotations

import math
import time

from proxy.config import OutlierConfig

__all__ = ["Ejection", "OutlierGroup"]

Ejection = tuple[str, float, int]  # backend id, seconds left, ejections so far


class OutlierGroup:
    """The ejections of one upstream (one outlier config)."""

    def __init__(self, config: OutlierConfig) -> None:
        self.config = config
        self.until: dict[str, float] = {}
        self.ejections: dict[str, int] = {}

    def report(self, backend: str, backends: int, now: float | None = None
               ) -> Ejection | None:
        """A worker saw `consecutive_failures` in a row from `backend`, one of
        `backends`; the ejection to apply everywhere, or None."""
        now = time.monotonic() if now is None else now
        if self.until.get(backend, 0.0) > now:
            return None
        ejected = sum(1 for until in self.until.values() if until > now)
        allowed = max(1, math.floor(backends * self.config.max_ejection_percent / 100))
        if ejected >= allowed:
            return None
        count = self.ejections.get(backend, 0) + 1
        self.ejections[backend] = count
        duration = min(self.config.max_ejection_time,
                       self.config.base_ejection_time * count)
        self.until[backend] = now + duration
        return backend, duration, count

    def active(self, now: float | None = None) -> list[Ejection]:
        now = time.monotonic() if now is None else now
        return [(b, until - now, self.ejections[b]) for b, until in self.until.items()
                if until > now]
