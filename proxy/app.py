"""Assembles one Runtime (routes, upstreams with balancers and connection pools)
from a validated Config. Building has no side effects beyond objects, so a config
can be fully checked (`bascule check`) by building it."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from proxy.balancer import Balancer
from proxy.config import Config, ServerConfig, TimeoutsConfig, UpstreamConfig
from proxy.discovery.manager import ConsulDiscovery
from proxy.errors import ConfigError, ConfigProblem
from proxy.hashkey import HashKeySource
from proxy.headers import HeaderPolicy, IPNetwork
from proxy.health import HealthMonitor
from proxy.loader import PLUGIN_GROUP, STRATEGY_GROUP, load
from proxy.models import Backend, BackendSet
from proxy.plugin import Handler, Plugin, PluginContext, PluginSeams, quick_answers
from proxy.routing import Route, RouteTable
from proxy.strategy import Strategy
from proxy.upstream.connection import ResponseLimits
from proxy.upstream.pool import BackendPool

__all__ = ["Runtime", "Upstream", "build_runtime", "build_strategy"]

log = logging.getLogger("bascule")


class Upstream:
    """One upstream as the forwarder sees it."""

    def __init__(self, name: str, config: UpstreamConfig, balancer: Balancer) -> None:
        self.name = name
        self.config = config
        self.balancer = balancer
        self.timeouts: TimeoutsConfig = config.timeouts
        self.retry = config.retry
        self.max_attempts = config.retry.attempts
        self.retry_on = frozenset(c for c in config.retry.retry_on if isinstance(c, str))
        self.retry_statuses = config.retry.retry_statuses()
        self.retries_active = 0  # retries in flight, for the retry budget
        self.max_inflight = config.max_inflight
        self.max_inflight_per_backend = config.max_inflight_per_backend
        self.pools: dict[str, BackendPool] = {}
        self.response_limits = ResponseLimits(config.max_response_header_size,
                                              config.max_response_headers)
        self.health = HealthMonitor(name, config, balancer)
        # A strategy that hashes requests names its key source (`hash_on`).
        self.hash_on: HashKeySource | None = getattr(balancer.strategy, "hash_on", None)

    def pool_for(self, backend: Backend) -> BackendPool:
        pool = self.pools.get(backend.id)
        if pool is None:
            pool = self.pools[backend.id] = BackendPool(
                backend.host, backend.port,
                max_idle=self.config.pool_size,
                idle_timeout=self.config.idle_timeout,
                connect_timeout=self.timeouts.connect,
                limits=self.response_limits,
            )
        return pool

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
    discovery: ConsulDiscovery | None = None
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
    ws_session: Any = None  # aiohttp.ClientSession, made on the first WebSocket
    loop: Any = None  # the worker's event loop, set when serving starts
    active: int = 0  # requests being handled on this runtime (a reload waits for 0)

    def unavailable_reason(self, upstream: str) -> str | None:
        return self.discovery.unavailable_reason(upstream) if self.discovery else None

    async def start_plugins(self, metrics: Any) -> None:
        context = PluginContext(redis=self.config.redis, metrics=metrics)
        for plugin in self.seams.starting.values():
            await plugin.start(context)

    async def aclose(self) -> None:
        for name, plugin in self.seams.closing.items():
            try:
                await plugin.aclose()
            except Exception:  # one plugin's failure must not stop the others closing
                log.exception("plugin %s failed to close", name)
        for upstream in self.upstreams.values():
            await upstream.health.stop()
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
                    "backends": [
                        {"id": b.id, "address": b.address, "weight": b.weight,
                         "healthy": b.healthy, "inflight": b.inflight,
                         "source": "consul" if up.config.consul else "static",
                         "ramp": round(b.ramp, 3), "health": up.health.describe(b)}
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


def build_strategy(name: str, options: dict[str, Any], file: str, path: str) -> Strategy:
    try:
        factory = load(STRATEGY_GROUP, name)
    except ValueError as exc:
        raise ConfigError([ConfigProblem(file, f"{path}.strategy", str(exc))]) from None
    try:
        strategy = factory(dict(options))
    except ValueError as exc:
        # Strategies name the option first ("vnodes: must be >= 1").
        message = str(exc)
        option, sep, rest = message.partition(": ")
        key = f"{path}.strategy_options.{option}" if sep and " " not in option else (
            f"{path}.strategy_options")
        raise ConfigError([ConfigProblem(file, key, rest if sep and " " not in option
                                         else message)]) from None
    except TypeError as exc:
        raise ConfigError([ConfigProblem(
            file, f"{path}.strategy", f"{name!r} is not a usable strategy: {exc}")]) from None
    if not isinstance(strategy, Strategy):
        raise ConfigError([ConfigProblem(
            file, f"{path}.strategy", f"{name!r} has no pick()/update() methods")])
    return strategy


def build_plugins(config: Config, file: str) -> dict[str, Plugin]:
    """Every [[plugins]] entry built from its options, by name."""
    problems: list[ConfigProblem] = []
    built: dict[str, Plugin] = {}
    for i, spec in enumerate(config.plugins):
        # An entry written as a table of its own ([cache]) is reported there.
        use_path = spec.key_path or f"plugins[{i}].use"
        options_path = spec.key_path or f"plugins[{i}].options"
        try:
            factory = load(PLUGIN_GROUP, spec.use)
        except ValueError as exc:
            problems.append(ConfigProblem(file, use_path, str(exc)))
            continue
        try:
            plugin = factory(dict(spec.options))
        except ValueError as exc:
            option, sep, rest = str(exc).partition(": ")
            if sep and " " not in option:
                problems.append(ConfigProblem(file, f"{options_path}.{option}", rest))
            else:
                problems.append(ConfigProblem(file, options_path, str(exc)))
            continue
        if not callable(plugin):
            problems.append(ConfigProblem(file, use_path,
                                          f"{spec.use!r} did not build a callable plugin"))
            continue
        built[spec.name] = plugin
    if problems:
        raise ConfigError(problems)
    return built


def build_runtime(config: Config, file: str) -> Runtime:
    problems: list[ConfigProblem] = []
    upstreams: dict[str, Upstream] = {}
    for name, up in config.upstreams.items():
        try:
            strategy = build_strategy(up.strategy, up.strategy_options, file,
                                      f"upstreams.{name}")
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        balancer = Balancer(name, strategy)
        # Consul upstreams start empty (503 with a reason) until the first answer.
        backends = tuple(
            Backend(entry.address, *entry.host_port, weight=entry.weight)
            for entry in up.backends or ()
        )
        balancer.update(BackendSet(version=1 if up.backends else 0, backends=backends))
        upstreams[name] = Upstream(name, up, balancer)
    if problems:
        raise ConfigError(problems)
    routes = RouteTable([
        Route(
            name=r.name or f"routes[{i}]", upstream=r.upstream, host=r.host,
            path_prefix=r.path_prefix, strip_prefix=r.strip_prefix,
            pass_host=r.pass_host, websocket=r.websocket, access_log=r.access_log,
            plugins=tuple(r.plugins), normalise_path=r.normalise_path,
            buffer_requests=r.buffer_requests,
        )
        for i, r in enumerate(config.routes)
    ])
    built = build_plugins(config, file)
    chains = {route.name: tuple(built[p] for p in dict.fromkeys(route.plugins))
              for route in routes.routes if route.plugins}
    discovery = (ConsulDiscovery(config, upstreams)
                 if any(u.config.consul for u in upstreams.values()) or (
                     config.consul.self_register is not None) else None)
    return Runtime(
        config=config, server=config.server, routes=routes, upstreams=upstreams,
        discovery=discovery, chains=chains, plugins=built,
        seams=PluginSeams.of(built),
        quick={name: quick for name, chain in chains.items()
               if (quick := quick_answers(chain)) is not None},
        trusted=config.server.trusted_networks(), file=file,
        config_hash=hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16],
        loaded_at=time.time(),
        header_policy=HeaderPolicy(forwarded=config.server.forwarded,
                                   x_real_ip=config.server.x_real_ip,
                                   underscores=config.server.underscores_in_headers),
    )


async def sweep_forever(get_runtime: Any, interval: float = 5.0) -> None:
    """Close idle upstream connections past their idle timeout."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        get_runtime().sweep_idle(loop.time())
