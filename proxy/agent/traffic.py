"""Traffic over the last minute for the dashboard: request and error rates and
p50/p99 latency per backend and per route, and the cache hit ratio.

Read from the Prometheus metrics every worker already writes (no second count on
the request path): the agent samples the summed metrics every couple of seconds, only
while a dashboard is asking, and answers with the differences between its newest
sample and the oldest one within the window. Quantiles are estimated from the
histogram buckets the way PromQL's histogram_quantile() does: linear within the
bucket the rank falls in (https://prometheus.io/docs/prometheus/latest/querying/functions/#histogram_quantile).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Snapshot", "TrafficSampler", "TrafficWindow", "quantile"]

log = logging.getLogger("bascule.agent")

SAMPLE_INTERVAL = 1.0  # seconds between samples while a dashboard asks
IDLE_AFTER = 120.0  # sampling stops this long after the last ask

Collect = Callable[[], Iterable[Any]]  # prometheus_client Metric families

# What counts as a backend's error: a failed connect, a timeout, a refused answer or
# a 5xx from the backend.
_BACKEND_ERRORS = {
    "bascule_backend_connect_errors", "bascule_backend_timeouts",
    "bascule_backend_invalid_responses", "bascule_backend_server_errors",
}


@dataclass
class Series:
    """One backend's or route's cumulative counts at a sample."""

    count: float = 0.0
    errors: float = 0.0
    inflight: float = 0.0  # a gauge (every worker's sum): the newest sample's
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count


@dataclass
class Snapshot:
    at: float
    backends: dict[tuple[str, str], Series] = field(default_factory=dict)
    routes: dict[tuple[str, str], Series] = field(default_factory=dict)
    cache: dict[str, float] = field(default_factory=dict)  # lookup result -> count

    @classmethod
    def of(cls, families: Iterable[Any], at: float) -> Snapshot:
        snap = cls(at)
        for family in families:
            name = family.name
            for sample in family.samples:
                labels, value = sample.labels, sample.value
                if name == "bascule_upstream_request_duration_seconds":
                    series = snap.backends.setdefault(
                        (labels["upstream"], labels["backend"]), Series())
                    _histogram(series, sample.name, labels, value)
                elif name in _BACKEND_ERRORS and sample.name.endswith("_total"):
                    snap.backends.setdefault((labels["upstream"], labels["backend"]),
                                             Series()).errors += value
                elif name == "bascule_backend_inflight":
                    snap.backends.setdefault((labels["upstream"], labels["backend"]),
                                             Series()).inflight += value
                elif name == "bascule_request_duration_seconds":
                    series = snap.routes.setdefault((labels["route"], labels["upstream"]),
                                                    Series())
                    _histogram(series, sample.name, labels, value)
                elif name == "bascule_requests" and sample.name.endswith("_total"):
                    if labels.get("code") == "5xx":
                        snap.routes.setdefault((labels["route"], labels["upstream"]),
                                               Series()).errors += value
                elif name == "bascule_cache_lookups" and sample.name.endswith("_total"):
                    result = labels["result"]
                    snap.cache[result] = snap.cache.get(result, 0.0) + value
        return snap


def _histogram(series: Series, sample_name: str, labels: dict[str, str],
               value: float) -> None:
    if sample_name.endswith("_bucket"):
        le = float(labels["le"])
        series.buckets[le] = series.buckets.get(le, 0.0) + value
    elif sample_name.endswith("_count"):
        series.count += value


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """histogram_quantile over cumulative `buckets` (upper bound -> count)."""
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # the highest finite bound, as PromQL answers
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _delta(new: Series, old: Series | None) -> Series:
    if old is None:
        return new
    if new.count < old.count:  # the counters restarted (a new run): take the new ones
        return new
    return Series(new.count - old.count, max(0.0, new.errors - old.errors), new.inflight,
                  {le: n - old.buckets.get(le, 0.0) for le, n in new.buckets.items()})


def _rates(series: Series, seconds: float) -> dict[str, Any]:
    p50, p99 = quantile(0.5, series.buckets), quantile(0.99, series.buckets)
    return {"rps": round(series.count / seconds, 3),
            "errors_per_s": round(series.errors / seconds, 3),
            "error_ratio": round(series.errors / series.count, 4) if series.count else 0.0,
            "p50_ms": None if p50 is None else round(p50 * 1000, 2),
            "p99_ms": None if p99 is None else round(p99 * 1000, 2),
            "inflight": int(series.inflight)}


class TrafficWindow:
    def __init__(self, collect: Collect, span: float = 60.0) -> None:
        self.collect = collect
        self.span = span
        self.samples: deque[Snapshot] = deque()

    def sample(self, now: float | None = None) -> None:
        """Read the metrics once (file reads in multiprocess mode: call it off the
        event loop)."""
        now = time.time() if now is None else now
        self.samples.append(Snapshot.of(self.collect(), now))
        while len(self.samples) > 2 and self.samples[1].at <= now - self.span:
            self.samples.popleft()

    def summary(self) -> dict[str, Any]:
        if len(self.samples) < 2:
            return {"window_s": 0.0, "backends": {}, "routes": {}, "cache": None}
        old, new = self.samples[0], self.samples[-1]
        seconds = max(new.at - old.at, 1e-3)
        backends: dict[str, dict[str, Any]] = {}
        for (upstream, backend), series in new.backends.items():
            delta = _delta(series, old.backends.get((upstream, backend)))
            backends.setdefault(upstream, {})[backend] = _rates(delta, seconds)
        routes: dict[str, dict[str, Any]] = {}
        for (route, upstream), series in new.routes.items():
            delta = _delta(series, old.routes.get((route, upstream)))
            routes.setdefault(route, {})[upstream] = _rates(delta, seconds)
        lookups = {result: n - old.cache.get(result, 0.0) for result, n in new.cache.items()}
        total = sum(lookups.values())
        cache = None if not new.cache else {
            "lookups_per_s": round(total / seconds, 3),
            "hit_ratio": round(lookups.get("hit", 0.0) / total, 4) if total else None,
            "by_result": {k: round(v / seconds, 3) for k, v in sorted(lookups.items())}}
        return {"window_s": round(seconds, 1), "backends": backends, "routes": routes,
                "cache": cache}


class TrafficSampler:
    """Samples a TrafficWindow while someone asks for it, and stops when nobody has
    for IDLE_AFTER seconds (a closed dashboard costs nothing)."""

    def __init__(self, collect: Collect) -> None:
        self.window = TrafficWindow(collect)
        self._task: asyncio.Task[None] | None = None
        self._asked = 0.0

    def ask(self) -> dict[str, Any]:
        self._asked = time.monotonic()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self.window.summary()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while time.monotonic() - self._asked < IDLE_AFTER:
                # reading every worker's metric files: off this loop
                await loop.run_in_executor(None, self.window.sample)
                await asyncio.sleep(SAMPLE_INTERVAL)
        except Exception:
            log.exception("sampling the metrics for the dashboard failed")
        self.window.samples.clear()  # a later ask starts a fresh window

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
