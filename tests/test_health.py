"""Health and resilience end to end: a backend dying under load, active checks,
ejection limits, panic mode, slow start."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web

from proxy.server import Edge
from tests.helpers import GetLoad, eventually, port_of, start_backend, start_proxy_with_admin


class Flaky:
    """A backend whose /health answer and whole life a test controls."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.health_status = 200
        self.fail_requests = False
        self.port = 0
        self.server: Any = None
        self.listener: Any = None

    async def handler(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/health":
            return web.Response(status=self.health_status, text="health")
        if self.fail_requests:
            return web.Response(status=500, text="broken")
        await asyncio.sleep(0.005)
        return web.Response(text=self.name)

    async def start(self) -> None:
        self.server, self.listener = await start_backend(self.handler, self.port or None)
        self.port = port_of(self.listener)

    async def kill(self) -> None:
        self.listener.close()
        await self.server.shutdown(0.1)  # existing connections are cut too


async def edge_over(backends: list[Flaky], upstream_extra: str) -> Edge:
    listed = ", ".join(f'"127.0.0.1:{b.port}"' for b in backends)
    return await start_proxy_with_admin(
        f'[[routes]]\nupstream = "app"\n[upstreams.app]\nbackends = [{listed}]\n'
        f"{upstream_extra}\n")


async def backend_states(edge: Edge) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{edge.admin_port}/status") as resp:
        doc = json.loads(await resp.read())["upstreams"]["app"]
    return {b["address"]: b for b in doc["backends"]} | {"_panic": doc["panic"]}


async def test_backend_killed_under_load_no_errors_ejected_then_readmitted() -> None:
    backends = [Flaky(n) for n in ("a", "b", "c")]
    for b in backends:
        await b.start()
    edge = await edge_over(backends, 'strategy = "round_robin"\nslow_start = "1s"\n'
                                     'outlier = { consecutive_failures = 3, '
                                     'base_ejection_time = "1s" }\n'
                                     'retry = { backoff_base = "1ms" }')
    victim = backends[0]
    key = f"127.0.0.1:{victim.port}"
    load = GetLoad(f"http://127.0.0.1:{edge.ports[0]}/", clients=20)
    try:
        async with load:
            await load.answered("a", 5)  # traffic flows through all three
            await victim.kill()

            async def ejected() -> bool:
                return not (await backend_states(edge))[key]["healthy"]

            await eventually(ejected)
            state = (await backend_states(edge))[key]
            assert state["health"]["ejections"] >= 1
            await victim.start()  # back on the same port

            async def readmitted() -> bool:
                return bool((await backend_states(edge))[key]["healthy"])

            await eventually(readmitted, timeout=15)
            ramp = (await backend_states(edge))[key]["ramp"]
            assert ramp < 1.0  # slow start: not yet at full weight
            load.seen.clear()
            await load.answered("a")
    finally:
        await edge.drain(1.0)
        for b in backends:
            b.listener.close()
    assert load.errors == []


async def _true(value: object) -> bool:
    return bool(value)


async def test_active_check_fall_and_rise() -> None:
    backends = [Flaky("a"), Flaky("b")]
    for b in backends:
        await b.start()
    edge = await edge_over(backends, '[upstreams.app.health]\npath = "/health"\n'
                                     'interval = "100ms"\ntimeout = "1s"\njitter = "10ms"\n'
                                     "fall = 3\nrise = 2\n")
    key = f"127.0.0.1:{backends[0].port}"
    try:
        backends[0].health_status = 500

        async def down() -> bool:
            return not (await backend_states(edge))[key]["healthy"]

        await eventually(down, timeout=5)
        state = (await backend_states(edge))[key]
        assert state["health"]["active"] == "fail"
        assert "health check answered 500 (3 times)" in state["health"]["reason"]
        async with aiohttp.ClientSession() as session:
            for _ in range(6):  # the failing one gets no traffic
                async with session.get(f"http://127.0.0.1:{edge.ports[0]}/") as resp:
                    assert await resp.text() == "b"
        backends[0].health_status = 200

        async def up() -> bool:
            return bool((await backend_states(edge))[key]["healthy"])

        await eventually(up, timeout=5)
    finally:
        await edge.drain(1.0)
        for b in backends:
            b.listener.close()


async def test_ejection_is_capped_and_panic_spreads_over_all() -> None:
    backends = [Flaky("a"), Flaky("b")]
    for b in backends:
        await b.start()
        b.fail_requests = True
    edge = await edge_over(backends, 'outlier = { consecutive_failures = 2, '
                                     'max_ejection_percent = 50, base_ejection_time = "30s" }\n'
                                     "panic_threshold = 60\nretry = { attempts = 1 }")
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(10):
                async with session.get(f"http://127.0.0.1:{edge.ports[0]}/") as resp:
                    assert resp.status == 500
            states = await backend_states(edge)
            healthy = [states[f"127.0.0.1:{b.port}"]["healthy"] for b in backends]
            assert sorted(healthy) == [False, True]  # 50%: only one of two ejected
            assert states["_panic"] is True          # 1 of 2 healthy < 60%
            for b in backends:
                b.fail_requests = False
            names = set()
            for _ in range(6):  # panic: both serve, the ejected one included
                async with session.get(f"http://127.0.0.1:{edge.ports[0]}/") as resp:
                    names.add(await resp.text())
            assert names == {"a", "b"}
    finally:
        await edge.drain(1.0)
        for b in backends:
            b.listener.close()
