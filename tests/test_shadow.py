"""Strategy shadow mode: the shadow strategy's picks, counted in the metrics, are
exactly the picks that strategy makes when it runs for real on the same request
sequence, its disagreements are counted right, and the real picks do not change."""

from __future__ import annotations

import collections
import re
import tomllib
from typing import Any

import aiohttp

from proxy.app import build_runtime
from proxy.balancer import Balancer
from proxy.config import parse_config
from proxy.models import Backend, BackendSet
from proxy.server import Edge
from proxy.strategy import RequestContext
from strategies.p2c_ewma import P2CEwma
from strategies.round_robin import RoundRobin
from tests.helpers import free_port, port_of, start_backend


async def named(name: str) -> Any:
    from aiohttp import web

    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response(text=name)
    _server, listener = await start_backend(handler)
    return listener


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_shadow_picks_match_the_strategy_run_for_real() -> None:
    listeners = [await named(f"b{i}") for i in range(4)]
    ids = [f"127.0.0.1:{port_of(x)}" for x in listeners]
    addresses = ", ".join(f'"{i}"' for i in ids)
    port, admin = free_port(), free_port()
    text = f"""
[server]
listen = ["127.0.0.1:{port}"]
access_log = "off"
[admin]
listen = "127.0.0.1:{admin}"
[[routes]]
path_prefix = "/live/"
upstream = "live"
[[routes]]
path_prefix = "/real/"
upstream = "real"
[upstreams.live]
backends = [{addresses}]
strategy = "round_robin"
shadow_strategy = "consistent_hash"
shadow_strategy_options = {{ hash_on = "header:X-Key" }}
[upstreams.real]
backends = [{addresses}]
strategy = "consistent_hash"
strategy_options = {{ hash_on = "header:X-Key" }}
"""
    edge = Edge(build_runtime(parse_config(tomllib.loads(text), "<t>"), "<t>"))
    await edge.start()
    live: list[str] = []
    real: list[str] = []
    try:
        async with aiohttp.ClientSession() as session:
            for i in range(400):
                key = {"X-Key": f"user-{i * 7919 % 1000}"}
                for path, out in (("/live/", live), ("/real/", real)):
                    async with session.get(f"http://127.0.0.1:{port}{path}",
                                           headers=key) as resp:
                        out.append(await resp.text())
            async with session.get(f"http://127.0.0.1:{admin}/metrics") as resp:
                exposition = await resp.text()
    finally:
        await edge.drain(1.0)
        for listener in listeners:
            listener.close()
    # the real picks of "live" stayed round robin: the shadow changed nothing
    assert collections.Counter(live) == {f"b{i}": 100 for i in range(4)}
    # the shadow's picks per backend are consistent_hash's real picks
    by_body = collections.Counter(real)
    for i, backend in enumerate(ids):
        assert metric(exposition, "bascule_shadow_picks_total", upstream="live",
                      backend=backend) == by_body[f"b{i}"]
    disagreements = sum(1 for a, b in zip(live, real, strict=True) if a != b)
    assert metric(exposition, "bascule_shadow_disagreements_total",
                  upstream="live") == disagreements > 0
    assert metric(exposition, "bascule_shadow_picks_total", upstream="real") == 0


def test_a_shadow_learns_from_the_same_observations_without_touching_the_real_pick() -> None:
    backends = tuple(Backend(f"b{i}", "127.0.0.1", 9000 + i) for i in range(3))
    shadow = P2CEwma({})
    balancer = Balancer("u", RoundRobin({}), shadow)
    balancer.update(BackendSet(1, backends))
    real = []
    for _ in range(30):
        backend = balancer.lease(RequestContext())
        real.append(backend.id)
        balancer.release(backend, 0.5 if backend.id == "b0" else 0.001)  # b0 is slow
    assert collections.Counter(real) == {"b0": 10, "b1": 10, "b2": 10}  # plain round robin
    assert all(b.inflight == 0 for b in backends)  # only real leases counted
    # the shadow saw b0's latencies and now avoids it
    assert shadow.cost(backends[0]) > 10 * shadow.cost(backends[1])
    assert sum(balancer.shadow_picks.values()) == 30
