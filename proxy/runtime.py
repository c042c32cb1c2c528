"""What a worker serves: one Runtime (routes, upstreams with their balancers and
connection pools, plugin chains) and its Upstreams. A leaf module: the engine
(`forward.py`, `websocket.py`, `server.py`) imports these without pulling in
assembly (`app.py`: config to Runtime, discovery, loading); assembly sits above."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.balancer import Balancer
from proxy.config import Config, ServerConfig, TimeoutsConfig, UpstreamConfig
from proxy.fleet import FleetCounts
from proxy.hashkey import HashKeySource, parse_hash_on
from proxy.headers import HeaderPolicy, IPNetwork
from proxy.health import HealthMonitor
from proxy.models import Backend
from proxy.plugin import Handler, Plugin, PluginContext, PluginSeams
from proxy.retry import RetryRules
from proxy.routing import RouteTable
from proxy.upstream.connection import ResponseLimits
from proxy.upstream.pool import BackendPool

__all__ = ["Discovery", "Runtime", "Upstream", "sweep_forever"]

log = logging.getLogger("bascule")


class Discovery(Protocol):
    """What a Runtime needs of its service discovery (proxy/discovery/manager.py)."""

    registered_id: str | None

    async def start(self, metrics: Any, *, link: Any, register: bool,
                    admin_address: tuple[str, int], public_port: int) -> list[str]: ...

    async def stop(self) -> None: ...

    def describe(self, upstream: str) -> dict[str, Any] | None: ...

    def unavailable_reason(self, upstream: str) -> str | None: ...


class Upstream:
    """One upstream as the forwarder sees it."""

    def __init__(self, name: str, config: UpstreamConfig, balancer: Balancer,
                 tls: ssl.SSLContext | None = None) -> None:
        self.name = name
        # HTTPS to backends: the upstream's context (`tls`), made at config time; a
        # Consul instance tagged proto=https without one gets a verifying default.
        self.tls = tls
        self._default_tls: ssl.SSLContext | None = None
        self.config = config
        self.balancer = balancer
        self.timeouts: TimeoutsConfig = config.timeouts
        self.retry = config.retry
        self.max_attempts = config.retry.attempts
        self.retry_on = frozenset(c for c in config.retry.retry_on if isinstance(c, str))
        self.retry_statuses = config.retry.retry_statuses()
        self.retry_rules = RetryRules(config.retry.attempts, self.retry_on,
                                      config.retry.budget_percent,
                                      config.retry.min_retry_concurrency)
        self.retries_active = 0  # retries in flight, for the retry budget
        self.max_inflight = config.max_inflight
        self.max_inflight_per_backend = config.max_inflight_per_backend
        self.pools: dict[str, BackendPool] = {}
        self.response_limits = ResponseLimits(config.max_response_header_size,
                                              config.max_response_headers)
        self.health = HealthMonitor(name, config, balancer)
        self.sticky = balancer.sticky  # pins by cookie (proxy/sticky.py), or None
        self.fleet: FleetCounts | None = None  # shared = "redis" (proxy/fleet.py)
        # The request's hash key comes from the upstream's config (`hash_on` in
        # strategy_options, client_ip by default), computed once per request by the
        # forwarder; strategies that hash read RequestContext.hash_key.
        # A shadow strategy hashes the same key: the real strategy's hash_on, else its own.
        self.hash_on: HashKeySource = parse_hash_on(
            config.strategy_options.get("hash_on")
            or config.shadow_strategy_options.get("hash_on", "client_ip"))

    def pool_for(self, backend: Backend) -> BackendPool:
        pool = self.pools.get(backend.id)
        if pool is None:
            pool = self.pools[backend.id] = BackendPool(
                backend.host, backend.port,
                max_idle=self.config.pool_size,
                idle_timeout=self.config.idle_timeout,
                connect_timeout=self.timeouts.connect,
                limits=self.response_limits,
                tls=self.tls_for(backend),
                server_name=self.config.tls.server_name if self.config.tls else None,
            )
        return pool

    def tls_for(self, backend: Backend) -> ssl.SSLContext | None:
        if not backend.tls:
            return None
        if self.tls is not None:
            return self.tls
        if self._default_tls is None:
            self._default_tls = ssl.create_default_context()
            self._default_tls.set_alpn_protocols(["http/1.1"])
        return self._default_tls

    def drop_moved_pools(self) -> None:
        """After a discovery update: an instance id now at another address (a
        re-registration with a new port) must not be served by connections to the old
        one. Here, once per update, rather than checked on every request."""
        for backend in self.balancer.backends:
            pool = self.pools.get(backend.id)
            if pool is not None and ((pool.host, pool.port) != (backend.host, backend.port)
                                     or (pool.tls is not None) != backend.tls):
                del self.pools[backend.id]
                pool.close()

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    def __repr__(self) -> str:
        return f"Upstream({self.name!r}, {self.balancer!r})"


@dataclass
class Runtime:
    config: Config
    server: ServerConfig
    routes: RouteTable
    upstreams: dict[str, Upstream]
    trusted: tuple[IPNetwork, ...]
    discovery: Discovery | None = None
    chains: dict[str, tuple[Plugin, ...]] = field(default_factory=dict)  # route -> plugins
    # route -> its chain composed around the forwarder's terminal step (once, when
    # the runtime starts serving)
    handlers: dict[str, Handler] = field(default_factory=dict)
    plugins: dict[str, Plugin] = field(default_factory=dict)  # every built plugin, by name
    seams: PluginSeams = field(default_factory=PluginSeams)  # the plugins by capability
    # route -> the outermost plugin's (quick_answer, quick_fetch or None), plugin.py
    quick: dict[str, Any] = field(default_factory=dict)
    file: str = ""
    config_hash: str = ""
    loaded_at: float = 0.0
    header_policy: HeaderPolicy = field(default_factory=HeaderPolicy)
    certificates: Any = None  # proxy.tls.server.CertificateSet with [server.tls]
    https_port: int | None = None  # redirect_http: plain requests get 308 to this port
    ws_session: Any = None  # aiohttp.ClientSession, made on the first WebSocket
    loop: Any = None  # the worker's event loop, set when serving starts
    active: int = 0  # requests being handled on this runtime (a reload waits for 0)

    def unavailable_reason(self, upstream: str) -> str | None:
        return self.discovery.unavailable_reason(upstream) if self.discovery else None

    async def start_plugins(self, metrics: Any) -> None:
        context = PluginContext(redis=self.config.redis, metrics=metrics)
        for plugin in self.seams.starting.values():
            await plugin.start(context)
        for upstream in self.upstreams.values():
            if upstream.fleet is not None:
                upstream.fleet.start()

    async def aclose(self) -> None:
        for name, plugin in self.seams.closing.items():
            try:
                await plugin.aclose()
            except Exception:  # one plugin's failure must not stop the others closing
                log.exception("plugin %s failed to close", name)
        for upstream in self.upstreams.values():
            await upstream.health.stop()
            if upstream.fleet is not None:
                await upstream.fleet.close()
        if self.discovery is not None:
            await self.discovery.stop()
        self.close()
        if self.ws_session is not None:
            await self.ws_session.close()

    def live_backends(self) -> dict[str, set[str]]:
        return {name: {b.id for b in up.balancer.backends}
                for name, up in self.upstreams.items()}

    def backend_gauges(self) -> list[tuple[str, str, int, bool]]:
        return [(name, b.id, b.inflight, b.healthy)
                for name, up in self.upstreams.items() for b in up.balancer.backends]

    def status(self) -> dict[str, Any]:
        """The /status document: what this worker runs and each backend's state."""
        return {
            "config": {"file": self.file, "hash": self.config_hash,
                       "loaded_at": self.loaded_at},
            "routes": [
                {"name": r.name, "host": r.host, "path_prefix": r.path_prefix,
                 "upstream": r.upstream, "strip_prefix": r.strip_prefix,
                 "split": r.split.describe() if r.split else None,
                 "pass_host": r.pass_host, "websocket": r.websocket}
                for r in self.routes.routes
            ],
            "upstreams": {
                name: {
                    "strategy": up.config.strategy,
                    "discovery": (self.discovery and self.discovery.describe(name)) or {
                        "source": "static", "stale": False, "version": up.balancer.version},
                    "inflight": up.balancer.inflight,
                    "panic": up.balancer.panic,
                    "shadow_strategy": up.config.shadow_strategy,
                    "sticky": up.config.sticky.cookie if up.config.sticky else None,
                    "fleet": up.fleet.describe() if up.fleet else None,
                    "backends": [
                        {"id": b.id, "address": b.address, "weight": b.weight,
                         "healthy": b.healthy, "inflight": b.inflight,
                         "fleet_inflight": b.fleet_inflight,
                         "source": "consul" if up.config.consul else "static",
                         "drained": b.drained, "ramp": round(b.ramp, 3),
                         "health": up.health.describe(b)}
                        for b in up.balancer.backends
                    ],
                }
                for name, up in self.upstreams.items()
            },
        }

    def sweep_idle(self, now: float) -> None:
        for upstream in self.upstreams.values():
            for pool in upstream.pools.values():
                pool.sweep(now)

    def close(self) -> None:
        for upstream in self.upstreams.values():
            upstream.close()



async def sweep_forever(get_runtime: Any, interval: float = 5.0) -> None:
    """Close idle upstream connections past their idle timeout."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        get_runtime().sweep_idle(loop.time())
