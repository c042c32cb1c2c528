"""The cache switched on with `[cache]` + route `cache = true` (memory store):
stale-while-revalidate, ranges from a stored entry, purge, config errors, reload."""

from __future__ import annotations

import asyncio
import collections
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.app import build_runtime
from proxy.config import parse_config
from proxy.errors import ConfigError
from proxy.server import Edge
from tests.helpers import (
    edge_url,
    eventually,
    free_port,
    port_of,
    run_bascule,
    start_backend,
    start_proxy_with_admin,
    wait_port,
)

hits: collections.Counter[str] = collections.Counter()
BODY = bytes(range(256)) * 40  # 10240 bytes
generation = [1]


async def origin(request: web.BaseRequest) -> web.StreamResponse:
    path = request.path
    hits[path] += 1
    if path == "/swr":
        await asyncio.sleep(0.05)
        return web.Response(text=f"swr {hits[path]}",
                            headers={"Cache-Control": "max-age=2, stale-while-revalidate=60"})
    if path == "/bytes":
        return web.Response(body=BODY, headers={"Cache-Control": "max-age=60",
                                                "ETag": '"b1"'})
    if path == "/sie":
        if hits[path] > 1:
            return web.Response(status=500, text="broken")
        return web.Response(text="ok", headers={"Cache-Control": "max-age=0, stale-if-error=60"})
    return web.Response(text=f"{path} gen {generation[0]}",
                        headers={"Cache-Control": "max-age=60", "Cache-Tag": "t1"})


@pytest.fixture
async def backend() -> AsyncIterator[int]:
    hits.clear()
    generation[0] = 1
    _, listener = await start_backend(origin)
    yield port_of(listener)
    listener.close()


def cached_config(backend: int, cache: str = "") -> str:
    return f"""
[cache]
memory_max_size = "4MiB"
{cache}

[[routes]]
upstream = "app"
cache = true

[upstreams.app]
backends = ["127.0.0.1:{backend}"]
"""


@pytest.fixture
async def edge(backend: int) -> AsyncIterator[Edge]:
    edge = await start_proxy_with_admin(cached_config(backend))
    yield edge
    await edge.drain(1.0)


async def get(edge: Edge, path: str, **headers: str) -> tuple[int, bytes, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.get(
            edge_url(edge) + path, headers=headers) as resp:
        return resp.status, await resp.read(), dict(resp.headers)


async def test_route_switch_turns_the_cache_on(edge: Edge) -> None:
    _, _, first = await get(edge, "/a")
    _, _, second = await get(edge, "/a")
    assert first["Cache-Status"] == "bascule; fwd=miss; stored"
    assert second["Cache-Status"] == "bascule; hit"
    assert hits["/a"] == 1


async def test_stale_while_revalidate_answers_at_once_and_refreshes_once(edge: Edge) -> None:
    await get(edge, "/swr")

    async def stale() -> bool:
        _, _, h = await get(edge, "/swr")
        return h["Cache-Status"] == "bascule; hit; detail=stale-while-revalidate"

    await eventually(stale, timeout=10)
    answers = await asyncio.gather(*(get(edge, "/swr") for _ in range(10)))
    assert all(a[0] == 200 for a in answers)

    async def refreshed() -> bool:
        _, body, h = await get(edge, "/swr")
        return body == b"swr 2" and h["Cache-Status"] == "bascule; hit"

    await eventually(refreshed)
    assert hits["/swr"] == 2  # one background refresh for all the stale answers


async def test_ranges_are_served_from_a_stored_entry(edge: Edge) -> None:
    status, _, headers = await get(edge, "/bytes", Range="bytes=0-9")
    assert status == 200 and headers["Cache-Status"] == "bascule; fwd=miss; detail=range"
    await get(edge, "/bytes")  # a full GET fills the entry
    status, body, headers = await get(edge, "/bytes", Range="bytes=100-199")
    assert (status, body) == (206, BODY[100:200])
    assert headers["Content-Range"] == f"bytes 100-199/{len(BODY)}"
    assert (await get(edge, "/bytes", Range="bytes=-10"))[1] == BODY[-10:]
    status, _, headers = await get(edge, "/bytes", Range="bytes=999999-")
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(BODY)}"
    status, body, _ = await get(edge, "/bytes", Range="bytes=0-1", **{"If-Range": '"other"'})
    assert (status, body) == (200, BODY)  # If-Range does not match: the whole entry
    status, body, _ = await get(edge, "/bytes", Range="bytes=0-1", **{"If-Range": '"b1"'})
    assert (status, body) == (206, BODY[:2])
    assert hits["/bytes"] == 2


async def test_stale_if_error_from_the_origins_directive(edge: Edge) -> None:
    assert (await get(edge, "/sie"))[1] == b"ok"
    status, body, headers = await get(edge, "/sie")
    assert (status, body) == (200, b"ok")
    assert headers["Cache-Status"] == "bascule; hit; detail=stale-if-error"


async def test_purge_memory_store(edge: Edge) -> None:
    for path in ("/p/1", "/p/2", "/q"):
        await get(edge, path)
    async with aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{edge.admin_port}/cache/purge"
        async with session.post(base, params={"url": f"127.0.0.1:{edge.ports[0]}/q"}) as r:
            assert (r.status, (await r.json())["purged"]) == (200, {"cache": 1})
        async with session.post(base, params={"prefix": f"127.0.0.1:{edge.ports[0]}/p/"}) as r:
            assert (await r.json())["purged"] == {"cache": 2}
        async with session.get(base) as r:
            assert r.status == 405
    for path in ("/p/1", "/q"):
        assert (await get(edge, path))[2]["Cache-Status"] == "bascule; fwd=miss; stored"


async def test_reload_keeps_the_memory_cache(backend: int, tmp_path: Path) -> None:
    path = tmp_path / "bascule.toml"
    admin = free_port()
    head = f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\naccess_log = "off"\n' \
           f'[admin]\nlisten = "127.0.0.1:{admin}"\n'
    path.write_text(head + cached_config(backend))
    config = parse_config(tomllib.loads(path.read_text()), str(path))
    edge = Edge(build_runtime(config, str(path)))
    await edge.start(admin=True)
    try:
        await get(edge, "/kept")
        path.write_text(head + cached_config(backend).replace(
            '[[routes]]', '[[routes]]\nname = "renamed"'))
        result = await edge.reloader.reload()
        assert result.ok and result.changed
        assert (await get(edge, "/kept"))[2]["Cache-Status"] == "bascule; hit"
        assert hits["/kept"] == 1
    finally:
        await edge.drain(1.0)


@pytest.mark.parametrize(("table", "key", "message"), [
    ('[cache]\nstore = "disk"', "cache.store", 'must be "memory" or "redis"'),
    ("[cache]\nttl = 5", "cache.ttl", "unknown option"),
    ('[redis]\nurl = "http://x"', "redis.url", "must be a redis://"),
    ('[redis]\nkey_prefix = "a{b}"', "redis.key_prefix", "hash tags"),
])
def test_config_errors_name_the_key(table: str, key: str, message: str) -> None:
    text = f'{table}\n[[routes]]\nupstream = "app"\ncache = true\n' \
           '[upstreams.app]\nbackends = ["127.0.0.1:1"]\n'
    with pytest.raises(ConfigError) as caught:
        build_runtime(parse_config(tomllib.loads(text), "x.toml"), "x.toml")  # as `check` does
    problems = [str(p) for p in caught.value.problems]
    assert any(p.startswith(f"x.toml: {key}: ") and message in p for p in problems), problems


@pytest.mark.slow
async def test_purge_reaches_every_worker(backend: int, tmp_path: Path,
                                          procs: list[object]) -> None:
    """Memory stores are per worker: a purge on one worker's admin listener is
    broadcast to the others (or a worker would serve the old generation)."""
    port, admin = free_port(), free_port()
    path = tmp_path / "bascule.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\nworkers = 2\n'
                    f'access_log = "off"\n[admin]\nlisten = "127.0.0.1:{admin}"\n'
                    + cached_config(backend))
    proc = run_bascule(path)
    procs.append(proc)  # type: ignore[arg-type]
    wait_port(port)
    wait_port(admin)


    async def bodies() -> set[bytes]:
        seen = set()
        for _ in range(30):  # new connections: SO_REUSEPORT spreads them
            async with aiohttp.ClientSession() as session, session.get(
                    f"http://127.0.0.1:{port}/g") as resp:
                seen.add(await resp.read())
        return seen

    async def both_workers_filled() -> bool:  # one fill per worker (the second may
        return await bodies() == {b"/g gen 1"} and hits["/g"] == 2  # start late)

    await eventually(both_workers_filled, timeout=20)
    generation[0] = 2
    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{admin}/cache/purge", params={"tag": "t1"}) as resp:
        assert resp.status == 200 and (await resp.json())["broadcast"] is True

    async def all_new() -> bool:
        return await bodies() == {b"/g gen 2"}

    await eventually(all_new, timeout=10)
