"""Assembles one Runtime (proxy/runtime.py: routes, upstreams with balancers and
connection pools, plugin chains) from a validated Config. Building has no side
effects beyond objects, so a config can be fully checked (`bascule check`) by
building it."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from proxy.balancer import Balancer
from proxy.config import Config, parse_hostport
from proxy.discovery.manager import ConsulDiscovery
from proxy.errors import ConfigError, ConfigProblem
from proxy.fleet import FleetCounts
from proxy.headers import HeaderPolicy
from proxy.loader import PLUGIN_GROUP, STRATEGY_GROUP, load
from proxy.models import Backend, BackendSet
from proxy.plugin import Plugin, PluginSeams, ReadsFiles, quick_answers
from proxy.routing import Route, RouteTable
from proxy.runtime import Runtime, Upstream
from proxy.split import TrafficSplit
from proxy.sticky import StickySessions
from proxy.strategy import Strategy
from proxy.tls.certs import CertificateError
from proxy.tls.client import client_context
from proxy.tls.server import build_certificates
from proxy.units import parse_duration

__all__ = ["build_plugins", "build_runtime", "build_strategy"]

log = logging.getLogger("bascule")


def build_strategy(name: str, options: dict[str, Any], file: str, path: str,
                   field: str = "strategy") -> Strategy:
    """`field`: the key that names it (`strategy`, or `shadow_strategy`), for errors."""
    try:
        factory = load(STRATEGY_GROUP, name)
    except ValueError as exc:
        raise ConfigError([ConfigProblem(file, f"{path}.{field}", str(exc))]) from None
    try:
        strategy = factory(dict(options))
    except ValueError as exc:
        # Strategies name the option first ("vnodes: must be >= 1").
        message = str(exc)
        option, sep, rest = message.partition(": ")
        key = f"{path}.{field}_options.{option}" if sep and " " not in option else (
            f"{path}.{field}_options")
        raise ConfigError([ConfigProblem(file, key, rest if sep and " " not in option
                                         else message)]) from None
    except TypeError as exc:
        raise ConfigError([ConfigProblem(
            file, f"{path}.{field}", f"{name!r} is not a usable strategy: {exc}")]) from None
    if not isinstance(strategy, Strategy):
        raise ConfigError([ConfigProblem(
            file, f"{path}.{field}", f"{name!r} has no pick()/update() methods")])
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
            shadow = None if up.shadow_strategy is None else build_strategy(
                up.shadow_strategy, up.shadow_strategy_options, file, f"upstreams.{name}",
                "shadow_strategy")
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        try:
            sticky = StickySessions(up.sticky) if up.sticky is not None else None
        except (OSError, ValueError) as exc:
            problems.append(ConfigProblem(file, f"upstreams.{name}.sticky", str(exc)))
            continue
        balancer = Balancer(name, strategy, shadow, sticky)
        # Consul upstreams start empty (503 with a reason) until the first answer.
        backends = tuple(
            Backend(entry.address, *entry.host_port, weight=entry.weight,
                    tls=up.tls is not None)
            for entry in up.backends or ()
        )
        balancer.update(BackendSet(version=1 if up.backends else 0, backends=backends))
        tls = None
        if up.tls is not None:
            try:
                tls = client_context(up.tls)
            except CertificateError as exc:
                problems.append(ConfigProblem(file, f"upstreams.{name}.tls", str(exc)))
                continue
        try:
            upstreams[name] = upstream = Upstream(name, up, balancer, tls)
        except ValueError as exc:  # hash_on: the engine reads it, whatever the strategy
            problems.append(ConfigProblem(file, f"upstreams.{name}.strategy_options.hash_on",
                                          str(exc).removeprefix("hash_on: ")))
            continue
        if up.strategy_options.get("shared") == "redis":  # the strategy checked the options
            upstream.fleet = FleetCounts(name, balancer, config.redis, parse_duration(
                up.strategy_options.get("shared_interval", "250ms")))
    if problems:
        raise ConfigError(problems)
    routes = RouteTable([
        Route(
            name=r.name or f"routes[{i}]", upstream=r.upstream_names[0], host=r.host,
            path_prefix=r.path_prefix, strip_prefix=r.strip_prefix,
            pass_host=r.pass_host, websocket=r.websocket, access_log=r.access_log,
            plugins=tuple(r.plugins), normalise_path=r.normalise_path,
            buffer_requests=r.buffer_requests,
            split=TrafficSplit(r) if r.upstreams else None,
        )
        for i, r in enumerate(config.routes)
    ])
    built = build_plugins(config, file)
    chains = {route.name: tuple(built[p] for p in dict.fromkeys(route.plugins))
              for route in routes.routes if route.plugins}
    certificates = None
    if config.server.tls is not None:
        certificates = build_certificates(config.server.tls, file)
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
        # The certificates' contents count: a renewal in place is a change to reload.
        config_hash=hashlib.sha256(config.model_dump_json().encode() + (
            certificates.digest.encode() if certificates else b"") + "".join(
            p.source_digest() for p in built.values() if isinstance(p, ReadsFiles)
        ).encode()).hexdigest()[:16],
        loaded_at=time.time(),
        certificates=certificates,
        https_port=parse_hostport(config.server.tls.listen[0], default_host="0.0.0.0")[1]
        if config.server.tls is not None and config.server.tls.redirect_http else None,
        header_policy=HeaderPolicy(forwarded=config.server.forwarded,
                                   x_real_ip=config.server.x_real_ip,
                                   underscores=config.server.underscores_in_headers),
    )


