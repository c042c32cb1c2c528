"""Hot reload as prepare → commit: new config in, bad config changes nothing, nothing
in flight fails, every worker follows."""

from __future__ import annotations

import asyncio
import collections
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import build_runtime
from proxy.config import load_config
from proxy.server import Edge
from tests.example_plugins import FailingStart
from tests.helpers import (
    GetLoad,
    children_of,
    dead_port,
    eventually,
    free_port,
    poll,
    port_of,
    run_bascule,
    start_backend,
    wait_port,
)


def config_text(port: int, admin: int, backends: list[int], extra: str = "",
                admin_extra: str = "", admin_host: str = "127.0.0.1") -> str:
    listed = ", ".join(f'"127.0.0.1:{b}"' for b in backends)
    return (f'[server]\nlisten = ["127.0.0.1:{port}"]\naccess_log = "off"\n{extra}\n'
            f'[admin]\nlisten = "{admin_host}:{admin}"\n{admin_extra}\n'
            f'[[routes]]\nupstream = "app"\n[upstreams.app]\nbackends = [{listed}]\n')


async def named(name: str, delay: float = 0.0) -> tuple[int, Any]:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        if delay:
            await asyncio.sleep(delay)
        return web.Response(text=f"{name}:{len(body)}")

    _, listener = await start_backend(handler)
    return port_of(listener), listener


@pytest.fixture
async def three() -> AsyncIterator[dict[str, int]]:
    started = {n: await named(n) for n in ("a", "b", "c")}
    yield {n: p for n, (p, _) in started.items()}
    for _, listener in started.values():
        listener.close()


async def start_edge(path: Path) -> Edge:
    edge = Edge(build_runtime(load_config(path), str(path)))
    await edge.start()
    return edge


async def edge_on(tmp_path: Path, backends: list[int]) -> tuple[Path, int, int, Edge]:
    """An edge on a config file of its own: (file, port, admin port, edge)."""
    path = tmp_path / "b.toml"
    port, admin = free_port(), free_port()
    path.write_text(config_text(port, admin, backends))
    return path, port, admin, await start_edge(path)


async def post_reload(edge: Edge, headers: dict[str, str] | None = None
                      ) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{edge.admin_port}/reload", headers=headers or {}) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text.startswith("{") else {"text": text}


async def assert_reload_error_reported(admin: int, cause: str) -> None:
    """A failed reload shows in /status (with its cause) and in the reload metric."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{admin}/status") as resp:
            reload = json.loads(await resp.read())["reload"]
        async with session.get(f"http://127.0.0.1:{admin}/metrics") as resp:
            metrics = await resp.text()
    assert reload["result"] == "error" and cause in reload["error"]
    assert 'bascule_config_reloads_total{result="error"} 1.0' in metrics


async def bodies(edge: Edge, count: int) -> collections.Counter[str]:
    seen: collections.Counter[str] = collections.Counter()
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            async with session.get(f"http://127.0.0.1:{edge.ports[0]}/") as resp:
                assert resp.status == 200
                seen[(await resp.text()).split(":")[0]] += 1
    return seen


async def test_reload_applies_new_backends_and_keeps_state(tmp_path: Path,
                                                           three: dict[str, int]) -> None:
    path, port, admin, edge = await edge_on(tmp_path, [three["a"]])
    try:
        assert await bodies(edge, 2) == {"a": 2}
        old_backend = edge.forwarder.runtime.upstreams["app"].balancer.backends[0]
        old_pool = edge.forwarder.runtime.upstreams["app"].pools[old_backend.id]
        path.write_text(config_text(port, admin, [three["a"], three["b"]]))
        status, result = await post_reload(edge)
        assert status == 200 and result["result"] == "success" and result["changed"]
        upstream = edge.forwarder.runtime.upstreams["app"]
        assert upstream.balancer.backends[0] is old_backend  # stats and health carried
        assert upstream.pools[old_backend.id] is old_pool      # warm connections kept
        assert await bodies(edge, 4) == {"a": 2, "b": 2}
        status, result = await post_reload(edge)  # same file: nothing to do
        assert status == 200 and result["changed"] is False
    finally:
        await edge.drain(1.0)


async def test_broken_file_changes_nothing(tmp_path: Path, three: dict[str, int]) -> None:
    path, port, admin, edge = await edge_on(tmp_path, [three["a"]])
    try:
        before = edge.forwarder.runtime
        path.write_text(config_text(port, admin, [three["b"]]).replace(
            "[upstreams.app]", "[upstreams.app]\nstrategy = \"nope\""))
        status, result = await post_reload(edge)
        assert status == 400 and result["result"] == "error"
        assert f"{path}: upstreams.app.strategy: unknown strategy 'nope'" in result["error"]
        assert edge.forwarder.runtime is before
        assert await bodies(edge, 2) == {"a": 2}
        await assert_reload_error_reported(admin, "unknown strategy")
    finally:
        await edge.drain(1.0)


async def test_reload_under_load_fails_nothing(tmp_path: Path, three: dict[str, int]) -> None:
    slow_port, slow = await named("slow", delay=0.3)
    path = tmp_path / "b.toml"
    port, admin = free_port(), free_port()
    path.write_text(config_text(port, admin, [three["a"], slow_port]))
    edge = await start_edge(path)
    load = GetLoad(f"http://127.0.0.1:{port}/", clients=4, key=lambda t: t.split(":")[0])

    async def poster() -> None:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(5):
                yield b"x" * 4096
                await asyncio.sleep(0.02)

        async with aiohttp.ClientSession() as session:
            while not load.stop.is_set():
                async with session.post(f"http://127.0.0.1:{port}/", data=body()) as resp:
                    text = await resp.text()
                    if resp.status != 200 or not text.endswith(":20480"):
                        load.errors.append(f"POST {resp.status} {text}")

    posters: list[asyncio.Future[None]] = []
    try:
        async with load:
            posters = [asyncio.ensure_future(poster()) for _ in range(2)]
            for backends in ([three["b"], slow_port], [three["c"]], [three["a"], three["c"]],
                             [three["c"]]):
                await load.more(10)  # traffic on the current config first
                path.write_text(config_text(port, admin, backends))
                status, result = await post_reload(edge)
                assert status == 200 and result["changed"], result

            async def retired() -> bool:
                # requests begun before the last commit finish: old runtimes retire
                return not edge.reloader._retiring

            await eventually(retired)
            load.seen.clear()
            await load.answered("c", 20)
    finally:
        await asyncio.gather(*posters)  # they stop with the load
        await edge.drain(2.0)
        slow.close()
    assert load.errors == []
    assert set(load.seen) == {"c"}  # only the last config's backend


async def test_admin_reload_needs_token_off_loopback(tmp_path: Path,
                                                     three: dict[str, int]) -> None:
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    path = tmp_path / "b.toml"
    port, admin = free_port(), free_port()
    path.write_text(config_text(port, admin, [three["a"]], admin_host="0.0.0.0",
                                admin_extra=f'token_file = "{token}"'))
    edge = await start_edge(path)
    try:
        status, _ = await post_reload(edge)
        assert status == 401
        status, _ = await post_reload(edge, {"Authorization": "Bearer wrong"})
        assert status == 401
        status, result = await post_reload(edge, {"Authorization": "Bearer t0ken"})
        assert status == 200 and result["result"] == "success"
    finally:
        await edge.drain(1.0)


async def test_watch_config_reloads_on_change(tmp_path: Path, three: dict[str, int]) -> None:
    path = tmp_path / "b.toml"
    port, admin = free_port(), free_port()
    path.write_text(config_text(port, admin, [three["a"]], extra="watch_config = true"))
    edge = await start_edge(path)
    try:
        path.write_text(config_text(port, admin, [three["b"]], extra="watch_config = true"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while (await bodies(edge, 1)) != {"b": 1}:
            assert loop.time() < deadline, "the changed file was not picked up"
            await asyncio.sleep(0.1)
    finally:
        await edge.drain(1.0)


async def status_hashes(admin: int, pids_wanted: int) -> dict[int, str]:
    """config hash per worker pid, asking /status on fresh connections."""
    hashes: dict[int, str] = {}
    for _ in range(200):
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{admin}/status") as resp:
            doc = json.loads(await resp.read())
        hashes[doc["pid"]] = doc["config"]["hash"]
        if len(hashes) >= pids_wanted:
            break
    return hashes


async def test_sighup_reloads_every_worker(tmp_path: Path, three: dict[str, int]) -> None:
    path = tmp_path / "b.toml"
    port, admin = free_port(), free_port()
    path.write_text(config_text(port, admin, [three["a"]], extra="workers = 2"))
    proc = run_bascule(path)
    try:
        await asyncio.to_thread(wait_port, port)
        await asyncio.to_thread(wait_port, admin)
        assert await asyncio.to_thread(poll, lambda: len(children_of(proc.pid)) == 2, 10)
        first = set((await status_hashes(admin, 2)).values())
        path.write_text(config_text(port, admin, [three["b"]], extra="workers = 2"))
        new_hash = build_runtime(load_config(path), str(path)).config_hash
        proc.send_signal(signal.SIGHUP)

        async def agreed(want: str) -> bool:
            hashes = await status_hashes(admin, 2)
            return len(hashes) == 2 and set(hashes.values()) == {want}

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not await agreed(new_hash):
            assert loop.time() < deadline, "workers did not all reload"
            await asyncio.sleep(0.1)
        assert first != {new_hash}
        # a broken file: every worker tries, fails, and keeps the config it has
        path.write_text("[server\n")
        proc.send_signal(signal.SIGHUP)

        async def both_refused() -> bool:
            docs: dict[int, Any] = {}
            for _ in range(200):
                async with aiohttp.ClientSession() as session, session.get(
                        f"http://127.0.0.1:{admin}/status") as resp:
                    doc = json.loads(await resp.read())
                docs[doc["pid"]] = doc
                if len(docs) == 2:
                    break
            return len(docs) == 2 and all(
                (d["reload"] or {}).get("result") == "error" and d["config"]["hash"] == new_hash
                for d in docs.values())

        deadline = loop.time() + 10
        while not await both_refused():
            assert loop.time() < deadline, "workers did not report the failed reload"
            await asyncio.sleep(0.1)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 15)
    assert proc.returncode == 0




async def test_a_plugin_that_fails_to_start_changes_nothing(
        tmp_path: Path, three: dict[str, int]) -> None:
    """Prepare → commit: a plugin whose start raises fails the reload before anything
    is taken from the running runtime (its warm pool stays), closes what was built,
    and is reported like a bad file (answer, /status, metric)."""
    FailingStart.closed = 0
    path, port, admin, edge = await edge_on(tmp_path, [three["a"]])
    try:
        before = edge.forwarder.runtime
        assert await bodies(edge, 2) == {"a": 2}
        pool = next(iter(before.upstreams["app"].pools.values()))
        assert pool.idle_count == 1  # warm
        path.write_text(config_text(port, admin, [three["a"], three["b"]]).replace(
            "[[routes]]", '[[plugins]]\nname = "auth"\nuse = "tests.example_plugins:FailingStart"'
            '\n[[routes]]\nplugins = ["auth"]'))
        status, result = await post_reload(edge)
        assert status == 500 and result["result"] == "error"
        assert result["error"] == "RuntimeError: cannot reach the auth server"
        assert FailingStart.closed == 1  # the prepared runtime was closed
        assert edge.forwarder.runtime is before
        assert before.upstreams["app"].pools and pool.idle_count == 1  # kept its pool
        assert await bodies(edge, 2) == {"a": 2}
        await assert_reload_error_reported(admin, "cannot reach the auth server")
    finally:
        await edge.drain(1.0)


async def test_a_consul_service_without_an_answer_fails_the_reload(
        tmp_path: Path, three: dict[str, int]) -> None:
    """The first Consul answer is part of prepare: a reload to a service Consul does
    not answer for (here: no agent at all) is refused instead of swapping in an
    upstream with no backends."""
    path, port, admin, edge = await edge_on(tmp_path, [three["a"]])
    try:
        before = edge.forwarder.runtime
        path.write_text(config_text(port, admin, [three["a"]]).replace(
            f'backends = ["127.0.0.1:{three["a"]}"]', 'consul = { service = "web" }')
            + f'[consul]\naddress = "http://127.0.0.1:{dead_port()}"\n'
              'startup_wait = "300ms"\n')
        status, result = await post_reload(edge)
        assert status == 500
        assert result["error"] == "consul: no answer for 'web' within 0.3s"
        assert edge.forwarder.runtime is before
        assert await bodies(edge, 2) == {"a": 2}
    finally:
        await edge.drain(1.0)
