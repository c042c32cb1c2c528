"""Per-worker metric accumulators: what the hot path updates (plain integers and a
bucket array, no lock, no label lookup), moved into prometheus-client by
`Metrics.flush()` once a second; and the exposition filter that hides series of
backends no longer in discovery."""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["DURATION_BUCKETS", "METHODS", "OTHER", "BackendStats", "FilteredRegistry",
           "LocalCounts", "LocalHistogram", "RouteStats", "flush_histogram",
           "multiprocess_dir_is_set", "multiprocess_families", "multiprocess_registry",
           "status_class"]

# 1 ms to 30 s: what a proxy's requests take, from cache hits to long uploads.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS",
                     "CONNECT", "TRACE"})
_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
OTHER = "other"


def status_class(status: int) -> str:
    return _CLASSES[status // 100 - 1] if 100 <= status < 600 else OTHER


class LocalHistogram:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(DURATION_BUCKETS, value)] += 1
        self.total += value


class LocalCounts:
    """Counts by a tuple of label values, moved into a labelled Counter at flush: what
    a plugin or the TLS listener records per request costs one dict update."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[tuple[str, ...], int] = {}

    def add(self, *labels: str) -> None:
        self.counts[labels] = self.counts.get(labels, 0) + 1

    def flush(self, counter: Any) -> None:
        counts, self.counts = self.counts, {}
        for labels, count in counts.items():
            counter.labels(*labels).inc(count)


class RouteStats:
    __slots__ = ("bytes_in", "bytes_out", "duration", "requests")

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}  # (method, code class) -> count
        self.duration = LocalHistogram()
        self.bytes_in = 0
        self.bytes_out = 0


class BackendStats:
    __slots__ = ("connect_errors", "invalid_responses", "latency", "server_errors",
                 "timeouts")

    def __init__(self) -> None:
        self.latency = LocalHistogram()
        self.server_errors = 0
        self.connect_errors = 0
        self.timeouts = 0
        self.invalid_responses = 0


class FilteredRegistry:
    """What /metrics exposes: the source collectors minus series of backends that
    are no longer in discovery (multiprocess files cannot forget a label set)."""

    def __init__(self, source: Any, live: Callable[[], dict[str, set[str]]]) -> None:
        self._source = source
        self._live = live

    def collect(self) -> Iterator[Metric]:
        live = self._live()
        for family in self._source.collect():
            samples = family.samples
            if samples and "backend" in samples[0].labels:
                family.samples = [
                    s for s in samples
                    if s.labels.get("backend") == OTHER
                    or s.labels.get("backend") in live.get(s.labels.get("upstream", ""), ())
                ]
            yield family


def flush_histogram(child: Histogram, local: LocalHistogram) -> None:
    # prometheus-client has no bulk observe: add the accumulated per-bucket counts to
    # the child's bucket values (non-cumulative, as observe() keeps them) and its sum.
    buckets = child._buckets
    for i, count in enumerate(local.counts):
        if count:
            buckets[i].inc(count)
    child._sum.inc(local.total)


def multiprocess_registry() -> CollectorRegistry:
    """A registry reading every worker's multiprocess files when collected."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def multiprocess_families() -> Iterable[Any]:
    """Every worker's metrics summed, read from the multiprocess files (file I/O)."""
    return multiprocess_registry().collect()


def multiprocess_dir_is_set() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
