"""The same discovery behaviour against a real Consul agent (`consul agent -dev`),
when CONSUL_HTTP_ADDR points at one; skipped otherwise (Consul cannot be installed
on the project's machines, so CI runs the emulator tests instead)."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tests.helpers import port_of, start_backend, start_proxy_with_admin

ADDRESS = os.environ.get("CONSUL_HTTP_ADDR", "")
pytestmark = pytest.mark.skipif(not ADDRESS, reason="set CONSUL_HTTP_ADDR to a Consul agent")
BASE = ADDRESS if "://" in ADDRESS else f"http://{ADDRESS}"
TOKEN = {"X-Consul-Token": os.environ["CONSUL_HTTP_TOKEN"]} \
    if os.environ.get("CONSUL_HTTP_TOKEN") else {}


@pytest.fixture
async def service() -> AsyncIterator[tuple[str, list[str]]]:
    name = f"bascule-test-{uuid.uuid4().hex[:8]}"
    registered: list[str] = []
    yield name, registered
    async with aiohttp.ClientSession(headers=TOKEN) as session:
        for service_id in registered:
            await session.put(f"{BASE}/v1/agent/service/deregister/{service_id}")


async def register(name: str, service_id: str, port: int, registered: list[str]) -> None:
    async with aiohttp.ClientSession(headers=TOKEN) as session, session.put(
            f"{BASE}/v1/agent/service/register",
            json={"Name": name, "ID": service_id, "Port": port, "Address": "127.0.0.1"}) as r:
        assert r.status == 200, await r.text()
    registered.append(service_id)


async def test_instances_are_discovered_and_served(service: tuple[str, list[str]]) -> None:
    name, registered = service

    async def hello(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(text="hello")

    _, listener = await start_backend(hello)
    edge = await start_proxy_with_admin(f"""
[consul]
address = "{BASE}"
wait = "5s"
[[routes]]
upstream = "web"
[upstreams.web]
consul = {{ service = "{name}" }}
""")
    try:
        await register(name, f"{name}-1", port_of(listener), registered)
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                async with session.get(f"http://127.0.0.1:{edge.ports[0]}/") as resp:
                    if resp.status == 200:
                        assert await resp.text() == "hello"
                        break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the registered instance was never served")
            async with session.get(f"http://127.0.0.1:{edge.admin_port}/status") as resp:
                upstream = json.loads(await resp.read())["upstreams"]["web"]
        assert upstream["discovery"]["source"] == "consul"
        assert upstream["discovery"]["stale"] is False
    finally:
        await edge.drain(1.0)
        listener.close()
