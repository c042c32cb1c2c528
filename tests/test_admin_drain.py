"""Draining a backend through the admin API: no new requests, in-flight ones finish,
shown in /status, kept across a reload, undone by /backends/enable."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.app import build_runtime
from proxy.config import load_config
from proxy.server import Edge
from tests.helpers import eventually, free_port, port_of, start_backend


async def named_backends(count: int, release: asyncio.Event | None = None
                         ) -> tuple[list[int], list[Any]]:
    ports: list[int] = []
    servers: list[Any] = []
    for index in range(count):
        async def handler(request: web.BaseRequest, index: int = index) -> web.Response:
            if request.path == "/slow" and release is not None:
                await release.wait()
            return web.Response(text=f"b{index}")
        _server, listener = await start_backend(handler)
        servers.append(listener)
        ports.append(port_of(listener))
    return ports, servers


def config(port: int, admin: int, backends: list[int]) -> str:
    quoted = ", ".join(f'"127.0.0.1:{p}"' for p in backends)
    return (f'[server]\nlisten = ["127.0.0.1:{port}"]\naccess_log = "off"\n'
            f'[admin]\nlisten = "127.0.0.1:{admin}"\n'
            '[[routes]]\nupstream = "app"\n'
            f'[upstreams.app]\nbackends = [{quoted}]\n')


async def status_backends(session: aiohttp.ClientSession, admin: int) -> dict[str, Any]:
    async with session.get(f"http://127.0.0.1:{admin}/status") as resp:
        document = await resp.json()
    return {b["id"]: b for b in document["upstreams"]["app"]["backends"]}


async def hits(session: aiohttp.ClientSession, port: int, n: int) -> collections.Counter[str]:
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        async with session.get(f"http://127.0.0.1:{port}/") as resp:
            seen[await resp.text() if resp.status == 200 else str(resp.status)] += 1
    return seen


async def test_drain_stops_new_requests_lets_inflight_finish_and_survives_reload(
        tmp_path: Path) -> None:
    release = asyncio.Event()
    ports, servers = await named_backends(2, release)
    port, admin = free_port(), free_port()
    path = tmp_path / "b.toml"
    path.write_text(config(port, admin, ports))
    edge = Edge(build_runtime(load_config(path), str(path)))
    await edge.start()
    drained_id = f"127.0.0.1:{ports[0]}"
    base = f"http://127.0.0.1:{admin}"
    try:
        async with aiohttp.ClientSession() as session:
            # a slow request on each backend, in flight while the drain happens
            slow = [asyncio.ensure_future(session.get(f"http://127.0.0.1:{port}/slow"))
                    for _ in range(2)]
            await eventually(_inflight(edge, 2))
            async with session.post(f"{base}/backends/drain",
                                    params={"upstream": "app", "backend": drained_id}) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["drained"] is True

            async def shown_drained() -> bool:
                return bool((await status_backends(session, admin))[drained_id]["drained"])
            await eventually(shown_drained)
            assert (await hits(session, port, 20)) == {"b1": 20}
            release.set()
            answers = [await (await r).text() for r in slow]  # both finish, drained or not
            assert sorted(answers) == ["b0", "b1"]

            # a reload that keeps the backend keeps the drain
            path.write_text(config(port, admin, ports) + "retry.attempts = 2\n")
            async with session.post(f"{base}/reload") as resp:
                assert (await resp.json())["changed"] is True
            assert (await status_backends(session, admin))[drained_id]["drained"] is True
            assert (await hits(session, port, 10)) == {"b1": 10}

            async with session.post(f"{base}/backends/enable",
                                    params={"upstream": "app", "backend": drained_id}) as resp:
                assert resp.status == 200

            async def back() -> bool:
                return "b0" in await hits(session, port, 4)
            await eventually(back)
    finally:
        await edge.drain(1.0)
        for listener in servers:
            listener.close()


def _inflight(edge: Edge, count: int) -> Any:
    async def check() -> bool:
        return bool(edge.runtime.upstreams["app"].balancer.inflight == count)
    return check


async def test_every_backend_drained_answers_503_not_a_drained_backend(tmp_path: Path) -> None:
    ports, servers = await named_backends(2)
    port, admin = free_port(), free_port()
    path = tmp_path / "b.toml"
    # panic mode would otherwise spread over unhealthy backends: drained ones stay out
    path.write_text(config(port, admin, ports) + "panic_threshold = 50\n")
    edge = Edge(build_runtime(load_config(path), str(path)))
    await edge.start()
    try:
        async with aiohttp.ClientSession() as session:
            for p in ports:
                async with session.post(f"http://127.0.0.1:{admin}/backends/drain", params={
                        "upstream": "app", "backend": f"127.0.0.1:{p}"}) as resp:
                    assert resp.status == 200

            async def all_drained() -> bool:
                return all(b["drained"] for b in (await status_backends(session, admin)).values())
            await eventually(all_drained)
            assert (await hits(session, port, 5)) == {"503": 5}
    finally:
        await edge.drain(1.0)
        for listener in servers:
            listener.close()


async def test_drain_refuses_unknown_names_and_get(tmp_path: Path) -> None:
    ports, servers = await named_backends(1)
    port, admin = free_port(), free_port()
    path = tmp_path / "b.toml"
    path.write_text(config(port, admin, ports))
    edge = Edge(build_runtime(load_config(path), str(path)))
    await edge.start()
    base = f"http://127.0.0.1:{admin}/backends/drain"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(base, params={"upstream": "nope", "backend": "x"}) as resp:
                assert resp.status == 404
            async with session.post(base, params={"upstream": "app", "backend": "x"}) as resp:
                assert resp.status == 404
                assert "no backend 'x'" in (await resp.json())["error"]
            async with session.get(base) as resp:
                assert resp.status == 405
    finally:
        await edge.drain(1.0)
        for listener in servers:
            listener.close()
