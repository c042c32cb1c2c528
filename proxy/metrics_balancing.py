"""Metrics of the balancing features beyond a strategy's pick: shadow strategies,
sticky sessions and fleet-wide in-flight counts. Counted in plain integers on the
objects that do the work (proxy/balancer.py, proxy/sticky.py, proxy/fleet.py) and
moved here at each metrics flush, like the rest of proxy/metrics.py."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["BalancingMetrics"]


class BalancingMetrics:
    def __init__(self, registry: CollectorRegistry | None,
                 backend_label: Callable[[str], str]) -> None:
        r = registry
        self._backend_label = backend_label
        self.shadow_picks = Counter(
            "bascule_shadow_picks_total", "Backends the upstream's shadow_strategy would "
            "have picked (the load each would have had).", ["upstream", "backend"],
            registry=r)
        self.shadow_disagreements = Counter(
            "bascule_shadow_disagreements_total", "Picks where the shadow_strategy chose "
            "another backend than the real strategy (or none).", ["upstream"], registry=r)
        self.sticky = Counter(
            "bascule_sticky_sessions_total", "Sticky-session decisions: hit (the cookie's "
            "backend served), repin (its backend was gone, down or unknown: a new cookie), "
            "new (no cookie).", ["upstream", "result"], registry=r)
        self.fleet_shared = Gauge(
            "bascule_fleet_counts_shared", "1 while picks use the fleet's in-flight counts "
            "from Redis (shared = \"redis\"), 0 while Redis fails and local counts are used.",
            ["upstream"], multiprocess_mode="livemin", registry=r)

    def flush(self, upstreams: Iterable[Any]) -> None:
        """Move what each upstream counted since the last flush (proxy/runtime.py
        Upstream) into the metrics."""
        for upstream in upstreams:
            name = upstream.name
            balancer = upstream.balancer
            if balancer.shadow is not None:
                picks, balancer.shadow_picks = balancer.shadow_picks, {}
                for backend_id, count in picks.items():
                    self.shadow_picks.labels(name, self._backend_label(backend_id)).inc(count)
                disagreements, balancer.shadow_disagreements = balancer.shadow_disagreements, 0
                self.shadow_disagreements.labels(name).inc(disagreements)
            sticky = upstream.sticky
            if sticky is not None:
                for result, count in sticky.counts.items():
                    if count:
                        self.sticky.labels(name, result).inc(count)
                        sticky.counts[result] = 0
            fleet = upstream.fleet
            if fleet is not None:
                self.fleet_shared.labels(name).set(1 if fleet.shared_now else 0)
