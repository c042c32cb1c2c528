"""Consul past the per-service budget: the catalog is watched through two blocking
queries and only what changed is read again (proxy/discovery/catalog.py); and a 429
from the agent is backed off. A real edge, real backends, the Consul emulator."""

from __future__ import annotations

import asyncio
import collections

import aiohttp

from proxy.agent.link import LocalLink
from proxy.server import Edge
from tests.consul_emulator import ConsulEmulator
from tests.helpers import eventually, start_proxy_with_admin

SERVICES = ("s1", "s2", "s3", "s4", "s5")


async def edge_for(consul: ConsulEmulator, services: tuple[str, ...],
                   max_connections: int) -> Edge:
    upstreams = "".join(
        f'[[routes]]\nhost = "{s}.test"\nupstream = "{s}"\n'
        f'[upstreams.{s}]\nconsul = {{ service = "{s}" }}\n' for s in services)
    return await start_proxy_with_admin(f"""
[consul]
address = "{consul.address}"
wait = "30s"
startup_wait = "5s"
max_connections = {max_connections}
{upstreams}""")


async def answer(edge: Edge, service: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{edge.ports[0]}/", headers={"Host": f"{service}.test"}) as resp:
        return resp.status, await resp.text()


def paths(consul: ConsulEmulator) -> collections.Counter[str]:
    return collections.Counter(path for path, _, _ in consul.requests)


async def test_many_services_are_watched_through_the_catalog_within_the_budget(
        consul: ConsulEmulator, backends: dict[str, int]) -> None:
    for i, service in enumerate(SERVICES):
        await consul.add(service, f"{service}-1", backends["abc"[i % 3]])
    edge = await edge_for(consul, SERVICES, max_connections=4)  # 5 > 4 // 2
    try:
        assert isinstance(edge.link, LocalLink)
        [source] = edge.link.hub.sources.values()
        assert source.mode == "catalog"
        for i, service in enumerate(SERVICES):
            assert await answer(edge, service) == (200, "abc"[i % 3])
        seen = paths(consul)
        # Every service read once; no blocking query per service.
        assert all(seen[f"/v1/health/service/{s}"] == 1 for s in SERVICES)
        assert consul.peak_connections["127.0.0.1"] <= 4

        # A check turning critical: only that service is read again.
        await consul.set_status("s2-1", "critical")

        async def s2_gone() -> bool:
            return (await answer(edge, "s2"))[0] == 503

        await eventually(s2_gone, timeout=5)
        seen = paths(consul)
        assert seen["/v1/health/service/s2"] == 2
        assert all(seen[f"/v1/health/service/{s}"] == 1 for s in SERVICES if s != "s2")

        # A new instance (a registration): served.
        await consul.add("s2", "s2-2", backends["c"])

        async def s2_back() -> bool:
            return await answer(edge, "s2") == (200, "c")

        await eventually(s2_back, timeout=5)

        # A port change alone moves no check: the catalog signal's index moving with
        # no visible difference reads every watched service again.
        await consul.set_port("s1-1", backends["b"])

        async def s1_moved() -> bool:
            return await answer(edge, "s1") == (200, "b")

        await eventually(s1_moved, timeout=10)
        assert consul.refused == 0
    finally:
        await edge.drain(1.0)


async def test_catalog_mode_keeps_serving_through_a_consul_outage(
        consul: ConsulEmulator, backends: dict[str, int]) -> None:
    for service in SERVICES:
        await consul.add(service, f"{service}-1", backends["a"])
    edge = await edge_for(consul, SERVICES, max_connections=4)
    try:
        assert await answer(edge, "s3") == (200, "a")
        port = consul.port
        await consul.stop()
        assert isinstance(edge.link, LocalLink)
        [source] = edge.link.hub.sources.values()

        async def stale() -> bool:
            status = edge.runtime.discovery.describe("s3")  # type: ignore[union-attr]
            return bool(status and status["stale"])

        await eventually(stale, timeout=10)
        assert await answer(edge, "s3") == (200, "a")  # last known good set
        consul.instances.clear()
        consul.by_service.clear()
        await consul.add("s3", "s3-1", backends["b"])  # changed while we were away
        await consul.start(port)

        async def current() -> bool:
            return await answer(edge, "s3") == (200, "b")

        await eventually(current, timeout=20)
        assert source.mode == "catalog"
    finally:
        await edge.drain(1.0)


async def test_a_429_from_the_agent_is_backed_off(consul: ConsulEmulator,
                                                 backends: dict[str, int]) -> None:
    consul.max_conns_per_client = 2  # a strict agent: three blocking queries won't fit
    for service in SERVICES[:3]:
        await consul.add(service, f"{service}-1", backends["a"])
    edge = await edge_for(consul, SERVICES[:3], max_connections=32)
    try:
        assert isinstance(edge.link, LocalLink)
        [source] = edge.link.hub.sources.values()

        async def throttled() -> bool:
            return source.client.throttled > 0

        await eventually(throttled, timeout=5)
        refused = consul.refused
        await asyncio.sleep(1.5)
        # Backed off (1 s and growing, with jitter), not retried in a loop.
        assert consul.refused - refused <= 3
        consul.max_conns_per_client = 200
        served = []
        for service in SERVICES[:3]:
            async def up(service: str = service) -> bool:
                return (await answer(edge, service))[0] == 200

            await eventually(up, timeout=15)
            served.append(service)
        assert served == list(SERVICES[:3])
    finally:
        await edge.drain(1.0)
