"""Prometheus metrics: cheap to record on the hot path, correct across workers.

Recording is a few integer updates in per-worker accumulators (no lock, no mmap write,
no label lookup in prometheus-client); `flush()` moves the accumulated deltas into
prometheus-client metrics once a second and before every scrape this worker answers.
With several workers, prometheus-client's multiprocess mode (one mmap file per metric
kind and process, in a directory the supervisor makes fresh for each run) lets any
worker's `/metrics` sum them all: counters and histograms add up, gauges use the
`multiprocess_mode` that fits (live sums for in-flight counts, live max for states).

Label values come only from config (route and upstream names) and discovery
(backend ids), never from requests. Backend series are capped per family
(`[admin] max_backend_series`, overflow into backend="other") and series for
backends that left discovery are dropped from the exposition.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import generate_latest

from proxy import __version__
from proxy.metrics_balancing import BalancingMetrics
from proxy.metrics_local import (
    DURATION_BUCKETS,
    METHODS,
    OTHER,
    BackendStats,
    FilteredRegistry,
    LocalCounts,
    RouteStats,
    flush_histogram,
    multiprocess_dir_is_set,
    multiprocess_families,
    multiprocess_registry,
    status_class,
)

__all__ = ["DURATION_BUCKETS", "METHODS", "Metrics", "multiprocess_dir_is_set",
           "multiprocess_families", "status_class"]

class Metrics:
    def __init__(self, *, multiprocess: bool, max_backend_series: int = 1000,
                 enabled: bool = True) -> None:
        self.enabled = enabled
        self.multiprocess = multiprocess
        self.max_backend_series = max_backend_series
        if multiprocess:
            # Chosen per process after fork: the class records this worker's pid.
            values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
            registry: CollectorRegistry | None = None
        else:
            registry = CollectorRegistry(auto_describe=True)
        self.registry = registry
        self._routes: dict[tuple[str, str], RouteStats] = {}
        self._backends: dict[tuple[str, str], BackendStats] = {}
        self._backend_ids: set[str] = set()
        self._retries: dict[str, int] = {}
        self._budget_exhausted: dict[str, int] = {}
        self._cache_lookups: dict[tuple[str, str], int] = {}
        self._cache_store_errors: dict[str, int] = {}
        self._flush_hooks: list[Callable[[], None]] = []
        # (upstream, source) -> [updates, errors, last success time, stale]
        self._discovery: dict[tuple[str, str], list[float]] = {}
        self._gauges_from: Callable[[], Iterable[tuple[str, str, int, bool]]] = lambda: ()
        self._live: Callable[[], dict[str, set[str]]] = dict
        self.open_connections = 0
        self._tls_ok, self._tls_failed = LocalCounts(), LocalCounts()  # version / reason
        self._rate_limits, self._mirrors = LocalCounts(), LocalCounts()  # route, result

        r = registry
        self.requests_total = Counter(
            "bascule_requests_total", "Requests answered, by route, upstream, method and "
            "status class.", ["route", "upstream", "method", "code"], registry=r)
        self.request_duration = Histogram(
            "bascule_request_duration_seconds", "Time from request head to the end of the "
            "response.", ["route", "upstream"], buckets=DURATION_BUCKETS, registry=r)
        self.request_bytes = Counter(
            "bascule_request_bytes_total", "Request body bytes received.", ["route"],
            registry=r)
        self.response_bytes = Counter(
            "bascule_response_bytes_total", "Response body bytes sent.", ["route"],
            registry=r)
        self.upstream_duration = Histogram(
            "bascule_upstream_request_duration_seconds", "Time a backend took for an "
            "exchange, connect to end of response.", ["upstream", "backend"],
            buckets=DURATION_BUCKETS, registry=r)
        self.server_errors = Counter(
            "bascule_backend_server_errors_total", "Responses with a 5xx status from the "
            "backend.", ["upstream", "backend"], registry=r)
        self.connect_errors = Counter(
            "bascule_backend_connect_errors_total", "Failed connects to a backend.",
            ["upstream", "backend"], registry=r)
        self.timeouts = Counter(
            "bascule_backend_timeouts_total", "Exchanges with a backend that timed out.",
            ["upstream", "backend"], registry=r)
        self.invalid_responses = Counter(
            "bascule_backend_invalid_responses_total", "Responses refused (502) as "
            "malformed or over the upstream's response head limits.",
            ["upstream", "backend"], registry=r)
        self.connections_shed = Counter(
            "bascule_connections_shed_total", "Client connections closed at "
            "server.max_connections: an idle one evicted for a new one, or the new one "
            "refused when none was idle.", ["action"], registry=r)
        self.retries = Counter(
            "bascule_retries_total", "Requests sent again to another backend or "
            "connection.", ["upstream"], registry=r)
        self.retry_budget_exhausted = Counter(
            "bascule_retry_budget_exhausted_total", "Retries not made because the retry "
            "budget was used up.", ["upstream"], registry=r)
        self.state_changes = Counter(
            "bascule_backend_state_changes_total", "Backends going up or down (health "
            "checks, outlier ejection).", ["upstream", "backend", "state"], registry=r)
        self.backend_up = Gauge(
            "bascule_backend_up", "1 when the backend is considered healthy.",
            ["upstream", "backend"], multiprocess_mode="livemax", registry=r)
        self.backend_inflight = Gauge(
            "bascule_backend_inflight", "Requests in flight to the backend.",
            ["upstream", "backend"], multiprocess_mode="livesum", registry=r)
        self.open_connections_gauge = Gauge(
            "bascule_open_connections", "Open client connections.",
            multiprocess_mode="livesum", registry=r)
        self.rate_limit_decisions = Counter(
            "bascule_rate_limit_decisions_total", "Rate limit decisions by route and "
            "result (allowed, limited, dry_run_limited, unkeyed, store_error_allowed, "
            "store_error_refused).", ["route", "result"], registry=r)
        self.mirror_requests = Counter(
            "bascule_mirror_requests_total", "Request copies by the mirror plugin: sent, "
            "failed, dropped_busy, dropped_body.", ["route", "result"], registry=r)
        self.tls_handshakes = Counter(
            "bascule_tls_handshakes_total", "TLS handshakes completed on TLS listeners.",
            ["version"], registry=r)
        self.tls_failures = Counter(
            "bascule_tls_handshake_failures_total", "TLS handshakes that failed, by "
            "reason (protocol_version, no_shared_cipher, client_rejected_certificate, "
            "plain_http, alpn, timeout, reset, other).", ["reason"], registry=r)
        self.certificate_expiry = Gauge(
            "bascule_tls_certificate_expiry_timestamp_seconds", "When a served "
            "certificate expires (Unix time), by its first name.", ["name"],
            multiprocess_mode="livemax", registry=r)
        self.cache_lookups = Counter(
            "bascule_cache_lookups_total", "Cache lookups by result.", ["route", "result"],
            registry=r)
        self.cache_store_errors = Counter(
            "bascule_cache_store_errors_total", "Cache store operations that failed.",
            ["store"], registry=r)
        self.discovery_updates = Counter(
            "bascule_discovery_updates_total", "Backend sets published by discovery.",
            ["upstream", "source"], registry=r)
        self.discovery_errors = Counter(
            "bascule_discovery_errors_total", "Failed discovery queries.",
            ["upstream", "source"], registry=r)
        self.discovery_age = Gauge(
            "bascule_discovery_last_success_age_seconds", "Seconds since discovery last "
            "answered successfully.", ["upstream", "source"], multiprocess_mode="livemax",
            registry=r)
        self.discovery_stale = Gauge(
            "bascule_discovery_stale", "1 while the upstream serves its last known good "
            "backend set because discovery is failing.", ["upstream", "source"],
            multiprocess_mode="livemax", registry=r)
        self.config_reloads = Counter(
            "bascule_config_reloads_total", "Config reloads by result.", ["result"],
            registry=r)
        self.config_info = Gauge(
            "bascule_config_info", "The loaded config's hash (value 1).", ["hash"],
            multiprocess_mode="livemax", registry=r)
        self.config_loaded = Gauge(
            "bascule_config_loaded_timestamp_seconds", "When the running config was "
            "loaded.", multiprocess_mode="livemax", registry=r)
        self.build_info = Gauge(
            "bascule_build_info", "Bascule's version (value 1).",
            ["version", "python", "aiohttp"], multiprocess_mode="livemax", registry=r)
        self.balancing = BalancingMetrics(r, self._backend_label)  # shadow, sticky, fleet
        self.build_info.labels(__version__, platform.python_version(),
                               aiohttp.__version__).set(1)
        for result in ("success", "error"):
            self.config_reloads.labels(result)

    # -- wiring ---------------------------------------------------------------------

    def watch(self, live: Callable[[], dict[str, set[str]]],
              gauges: Callable[[], Iterable[tuple[str, str, int, bool]]]) -> None:
        """`live`: upstream -> current backend ids; `gauges`: (upstream, backend id,
        in-flight, healthy) for every current backend. Read at each flush."""
        self._live = live
        self._gauges_from = gauges

    def config_loaded_now(self, config_hash: str) -> None:
        self.config_info.labels(config_hash).set(1)
        self.config_loaded.set(time.time())

    # -- hot path: plain integer updates ---------------------------------------------

    def record_request(self, route: str, upstream: str, method: str, status: int,
                       duration: float, bytes_in: int, bytes_out: int) -> None:
        stats = self._routes.get((route, upstream))
        if stats is None:
            stats = self._routes[(route, upstream)] = RouteStats()
        key = (method if method in METHODS else OTHER, status_class(status))
        requests = stats.requests
        requests[key] = requests.get(key, 0) + 1
        stats.duration.observe(duration)
        stats.bytes_in += bytes_in
        stats.bytes_out += bytes_out

    def backend(self, upstream: str, backend_id: str) -> BackendStats:
        stats = self._backends.get((upstream, backend_id))
        if stats is None:
            if (backend_id not in self._backend_ids
                    and len(self._backend_ids) >= self.max_backend_series):
                backend_id = OTHER  # cardinality cap: a huge catalog cannot explode
            else:
                self._backend_ids.add(backend_id)
            stats = self._backends.get((upstream, backend_id))
            if stats is None:
                stats = self._backends[(upstream, backend_id)] = BackendStats()
        return stats

    def record_reload(self, ok: bool) -> None:
        self.config_reloads.labels("success" if ok else "error").inc()

    def record_state_change(self, upstream: str, backend: str, state: str,
                            reason: str = "") -> None:
        self.state_changes.labels(upstream, self._backend_label(backend), state).inc()

    def _backend_label(self, backend_id: str) -> str:
        if backend_id in self._backend_ids or len(self._backend_ids) < self.max_backend_series:
            self._backend_ids.add(backend_id)
            return backend_id
        return OTHER

    def record_shed(self, action: str) -> None:
        if self.enabled:
            self.connections_shed.labels(action).inc()

    def record_budget_exhausted(self, upstream: str) -> None:
        self._budget_exhausted[upstream] = self._budget_exhausted.get(upstream, 0) + 1

    def record_cache_lookup(self, route: str, result: str, count: int = 1) -> None:
        key = (route, result)
        self._cache_lookups[key] = self._cache_lookups.get(key, 0) + count

    def on_flush(self, hook: Callable[[], None]) -> None:
        """`hook` runs at each flush, before the accumulators are read: for counts a
        plugin keeps itself on its hot path."""
        self._flush_hooks.append(hook)

    def off_flush(self, hook: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._flush_hooks.remove(hook)

    def record_cache_store_error(self, store: str) -> None:
        self._cache_store_errors[store] = self._cache_store_errors.get(store, 0) + 1

    def record_retry(self, upstream: str) -> None:
        self._retries[upstream] = self._retries.get(upstream, 0) + 1

    def record_discovery(self, upstream: str, source: str, ok: bool,
                         changed: bool = True) -> None:
        """A discovery answer (`ok`; `changed` when it published a new set) or a
        failed query."""
        state = self._discovery.setdefault((upstream, source), [0, 0, 0.0, 0])
        if ok:
            state[0] += 1 if changed else 0
            state[2] = time.time()
            state[3] = 0
        else:
            state[1] += 1
            state[3] = 1

    def record_rate_limit(self, route: str, result: str) -> None:
        self._rate_limits.add(route, result)

    def record_mirror(self, route: str, result: str) -> None:
        self._mirrors.add(route, result)

    def record_tls(self, kind: str, label: str) -> None:
        """A handshake: ("ok", version) or ("failed", reason), both bounded."""
        if kind == "ok":
            self._tls_ok.add(label if label in ("TLSv1.2", "TLSv1.3") else OTHER)
        else:
            self._tls_failed.add(label)

    def set_certificate_expiry(self, expiry: list[tuple[str, float]]) -> None:
        if not self.enabled:
            return
        names = {name for name, _ in expiry}
        for labels in list(self.certificate_expiry._metrics):
            if labels[0] not in names:
                self.certificate_expiry.remove(*labels)
        for name, not_after in expiry:
            self.certificate_expiry.labels(name).set(not_after)

    # -- flush: deltas into prometheus-client ----------------------------------------

    def flush(self) -> None:
        if not self.enabled:
            return
        for hook in self._flush_hooks:
            hook()
        routes, self._routes = self._routes, {}
        for (route, upstream), stats in routes.items():
            for (method, code), count in stats.requests.items():
                self.requests_total.labels(route, upstream, method, code).inc(count)
            flush_histogram(self.request_duration.labels(route, upstream), stats.duration)
            if stats.bytes_in:
                self.request_bytes.labels(route).inc(stats.bytes_in)
            if stats.bytes_out:
                self.response_bytes.labels(route).inc(stats.bytes_out)
        backends, self._backends = self._backends, {}
        for (upstream, backend_id), bstats in backends.items():
            if any(bstats.latency.counts):
                flush_histogram(self.upstream_duration.labels(upstream, backend_id),
                                 bstats.latency)
            if bstats.server_errors:
                self.server_errors.labels(upstream, backend_id).inc(bstats.server_errors)
            if bstats.connect_errors:
                self.connect_errors.labels(upstream, backend_id).inc(bstats.connect_errors)
            if bstats.timeouts:
                self.timeouts.labels(upstream, backend_id).inc(bstats.timeouts)
            if bstats.invalid_responses:
                self.invalid_responses.labels(upstream, backend_id).inc(
                    bstats.invalid_responses)
        retries, self._retries = self._retries, {}
        for upstream, count in retries.items():
            self.retries.labels(upstream).inc(count)
        lookups, self._cache_lookups = self._cache_lookups, {}
        for (route, result), count in lookups.items():
            self.cache_lookups.labels(route, result).inc(count)
        store_errors, self._cache_store_errors = self._cache_store_errors, {}
        for store, count in store_errors.items():
            self.cache_store_errors.labels(store).inc(count)
        exhausted, self._budget_exhausted = self._budget_exhausted, {}
        for upstream, count in exhausted.items():
            self.retry_budget_exhausted.labels(upstream).inc(count)
        now = time.time()
        for (upstream, source), state in self._discovery.items():
            if state[0]:
                self.discovery_updates.labels(upstream, source).inc(state[0])
            if state[1]:
                self.discovery_errors.labels(upstream, source).inc(state[1])
            state[0] = state[1] = 0
            if state[2]:
                self.discovery_age.labels(upstream, source).set(now - state[2])
            self.discovery_stale.labels(upstream, source).set(state[3])
        self._rate_limits.flush(self.rate_limit_decisions)
        self._mirrors.flush(self.mirror_requests)
        self._tls_ok.flush(self.tls_handshakes)
        self._tls_failed.flush(self.tls_failures)
        self._flush_gauges()
        self.open_connections_gauge.set(self.open_connections)

    def _flush_gauges(self) -> None:
        seen: set[tuple[str, str]] = set()
        inflight: dict[tuple[str, str], int] = {}
        up: dict[tuple[str, str], bool] = {}
        for upstream, backend_id, count, healthy in self._gauges_from():
            if backend_id not in self._backend_ids:
                if len(self._backend_ids) >= self.max_backend_series:
                    backend_id = OTHER
                else:
                    self._backend_ids.add(backend_id)
            key = (upstream, backend_id)
            seen.add(key)
            inflight[key] = inflight.get(key, 0) + count
            up[key] = up.get(key, False) or healthy
        for key, count in inflight.items():
            self.backend_inflight.labels(*key).set(count)
            self.backend_up.labels(*key).set(1 if up[key] else 0)
        # Forget departed backends in this process (the exposition filter hides
        # their series in the other workers' files).
        live_ids = {b for _, b in seen}
        self._backend_ids &= live_ids | {OTHER}
        for metric in (self.backend_inflight, self.backend_up, self.upstream_duration,
                       self.server_errors, self.connect_errors, self.timeouts,
                       self.invalid_responses, self.state_changes):
            for labels in list(metric._metrics):
                if labels[:2] not in seen and labels[1] != OTHER:
                    metric.remove(*labels)

    # -- exposition -----------------------------------------------------------------

    def _source(self) -> Any:
        return multiprocess_registry() if self.multiprocess else self.registry

    def families(self) -> Iterable[Any]:
        """Every family as last flushed (all workers'); may run in a thread."""
        return self._source().collect()  # type: ignore[no-any-return]

    def exposition(self) -> bytes:
        """The text exposition. Call flush() first, on the event loop; this part only
        reads (the worker files in multiprocess mode) and may run in a thread."""
        return generate_latest(FilteredRegistry(self._source(), self._live))
