"""The cache with the Redis store: two Bascule runtimes (as two instances would) share
one real redis-server started on a free port; fault tests kill it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from plugins.cache.near import NearCache
from plugins.cache.plugin import Cache
from plugins.cache.redis_store import RedisStore
from proxy.server import Edge
from tests.helpers import edge_url, eventually, port_of, start_backend, start_proxy_with_admin
from tests.redis_servers import RedisServer

hits: collections.Counter[str] = collections.Counter()


async def origin(request: web.BaseRequest) -> web.StreamResponse:
    path = request.path
    hits[path] += 1
    n = hits[path]
    if path == "/slow":
        await asyncio.sleep(0.3)
        return web.Response(text=f"slow {n}", headers={"Cache-Control": "max-age=60"})
    if path == "/swr":
        await asyncio.sleep(0.1)
        return web.Response(text=f"swr {n}", headers={
            "Cache-Control": "max-age=3, stale-while-revalidate=60"})
    if path.startswith("/tagged"):
        return web.Response(text=f"tagged {n}", headers={
            "Cache-Control": "max-age=60", "Cache-Tag": "red, blue", "Surrogate-Key": "green"})
    if path == "/stream":
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=60"})
        await resp.prepare(request)
        for _ in range(20):
            await resp.write(b"s" * 10_000)
        return resp
    if path == "/vary":
        return web.Response(text=f"lang={request.headers.get('Accept-Language')} {n}",
                            headers={"Cache-Control": "max-age=60", "Vary": "Accept-Language"})
    return web.Response(text=f"{path} {n}", headers={"Cache-Control": "max-age=60"})


@dataclass
class Fleet:
    a: Edge
    b: Edge
    prefix: str

    def cache(self, edge: Edge) -> Cache:
        plugin = edge.forwarder.runtime.plugins["cache"]
        assert isinstance(plugin, Cache)
        return plugin

    def store(self, edge: Edge) -> RedisStore:
        store = self.cache(edge).store
        if isinstance(store, NearCache):
            return store.remote
        assert isinstance(store, RedisStore)
        return store


@contextlib.asynccontextmanager
async def running_fleet(redis_url: str, backend_port: int, *,
                        cache: str = 'near_cache_size = "0"', redis: str = "",
                        timeout: str = "1s") -> AsyncIterator[Fleet]:
    """Two edges sharing one Redis; the near cache is off unless `cache` turns it on,
    so that every lookup below reads Redis."""
    prefix = f"t{os.urandom(4).hex()}:"
    body = f"""
[cache]
store = "redis"
lock_timeout = "5s"
{cache}

[redis]
url = "{redis_url}"
key_prefix = "{prefix}"
timeout = "{timeout}"
{redis}

[[routes]]
upstream = "app"
cache = true

[upstreams.app]
backends = ["127.0.0.1:{backend_port}"]
"""
    fleet = Fleet(await start_proxy_with_admin(body), await start_proxy_with_admin(body),
                  prefix)
    try:
        yield fleet
    finally:
        await fleet.a.drain(1.0)
        await fleet.b.drain(1.0)


@pytest.fixture
async def backend() -> AsyncIterator[int]:
    hits.clear()
    _, listener = await start_backend(origin)
    yield port_of(listener)
    listener.close()


@pytest.fixture
async def fleet(redis_server: RedisServer, backend: int) -> AsyncIterator[Fleet]:
    async with running_fleet(redis_server.url, backend) as fleet:
        yield fleet


async def get(edge: Edge, path: str, **headers: str) -> tuple[int, str, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.get(
            edge_url(edge) + path, headers=headers) as resp:
        return resp.status, await resp.text(), dict(resp.headers)


async def test_a_fill_by_one_instance_is_a_hit_on_the_other(fleet: Fleet) -> None:
    # Both edges see the same Host only if the client sends it: use one name.
    status, body, headers = await get(fleet.a, "/page", Host="shop.example")
    assert (status, body, headers["Cache-Status"]) == (200, "/page 1",
                                                      "bascule; fwd=miss; stored")

    async def on_b() -> bool:
        _, _, h = await get(fleet.b, "/page", Host="shop.example")
        return h["Cache-Status"] == "bascule; hit"

    await eventually(on_b)  # the write is off the first client's path: poll for it
    status, body, headers = await get(fleet.b, "/page", Host="shop.example")
    assert (status, body) == (200, "/page 1") and "Age" in headers
    assert hits["/page"] == 1


async def test_vary_variants_are_shared(fleet: Fleet) -> None:
    await get(fleet.a, "/vary", Host="v.example", **{"Accept-Language": "fr"})
    await get(fleet.a, "/vary", Host="v.example", **{"Accept-Language": "de"})

    async def both_stored() -> bool:
        _, fr, h1 = await get(fleet.b, "/vary", Host="v.example", **{"Accept-Language": "FR"})
        _, de, h2 = await get(fleet.b, "/vary", Host="v.example", **{"Accept-Language": "de"})
        return h1["Cache-Status"] == h2["Cache-Status"] == "bascule; hit" and (
            fr.startswith("lang=fr") and de.startswith("lang=de"))

    await eventually(both_stored)
    assert hits["/vary"] == 2


async def test_fifty_concurrent_cold_requests_over_two_instances_reach_the_backend_once(
        fleet: Fleet) -> None:
    async with aiohttp.ClientSession() as session:
        async def one(i: int) -> tuple[int, str]:
            edge = fleet.a if i % 2 else fleet.b
            async with session.get(edge_url(edge) + "/slow",
                                   headers={"Host": "cold.example"}) as resp:
                return resp.status, await resp.text()

        results = await asyncio.gather(*(one(i) for i in range(50)))
    assert results == [(200, "slow 1")] * 50
    assert hits["/slow"] == 1


async def test_streamed_fill_is_shared_once_complete(fleet: Fleet) -> None:
    status, body, headers = await get(fleet.a, "/stream", Host="s.example")
    assert status == 200 and len(body) == 200_000
    assert headers["Cache-Status"] == "bascule; fwd=miss; stored"

    async def hit_on_b() -> bool:
        _, b, h = await get(fleet.b, "/stream", Host="s.example")
        return h["Cache-Status"] == "bascule; hit" and b == body

    await eventually(hit_on_b)
    assert hits["/stream"] == 1


async def test_a_dead_holders_lock_expires_and_a_waiter_takes_over(
        fleet: Fleet, redis_server: RedisServer) -> None:
    cache = fleet.cache(fleet.a)
    primary = cache.primary_key("orphan.example", "/slow")
    key = fleet.store(fleet.a)._key(primary)
    # An instance took the lock and died: nothing will publish or unlock.
    redis_server.cli("set", key + ":lock", "dead-holder", "px", "700")
    status, body, headers = await get(fleet.a, "/slow", Host="orphan.example")
    assert (status, body) == (200, "slow 1")
    assert headers["Cache-Status"] == "bascule; fwd=miss; stored"
    assert hits["/slow"] == 1
    assert redis_server.cli("get", key + ":lock").strip() != "dead-holder"


async def test_stale_while_revalidate_refreshes_once_across_the_fleet(fleet: Fleet) -> None:
    await get(fleet.a, "/swr", Host="swr.example")
    await eventually(lambda: _hit(fleet.b, "/swr"))
    assert hits["/swr"] == 1

    async def stale() -> bool:
        _, _, h = await get(fleet.a, "/swr", Host="swr.example")
        return "stale-while-revalidate" in h["Cache-Status"]

    await eventually(stale, timeout=10)  # max-age=3: stale within three seconds
    # Many stale requests on both instances: answered at once from the entry...
    answers = await asyncio.gather(*(get(e, "/swr", Host="swr.example")
                                     for e in (fleet.a, fleet.b) * 10))
    assert all(status == 200 and body.startswith("swr ") for status, body, _ in answers)

    # ...and the origin is asked again exactly once, by one instance.
    async def refreshed() -> bool:
        _, body, h = await get(fleet.b, "/swr", Host="swr.example")
        return body == "swr 2" and h["Cache-Status"] == "bascule; hit"

    await eventually(refreshed)
    assert hits["/swr"] == 2


async def _hit(edge: Edge, path: str, host: str = "swr.example") -> bool:
    _, _, h = await get(edge, path, Host=host)
    return h["Cache-Status"].startswith("bascule; hit")


async def admin_post(edge: Edge, query: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{edge.admin_port}/cache/purge?{query}") as resp:
        return resp.status, await resp.json(content_type=None)


async def test_purge_by_url_prefix_and_tag_reaches_every_instance(fleet: Fleet) -> None:
    for path in ("/tagged/1", "/tagged/2", "/docs/a", "/docs/b", "/other"):
        await get(fleet.a, path, Host="p.example")
        await eventually(lambda path=path: _hit(fleet.b, path, "p.example"))
    status, result = await admin_post(fleet.b, "url=http://p.example/other")
    assert status == 200 and result["purged"] == {"cache": 1}
    assert not await _hit(fleet.a, "/other", "p.example")

    status, result = await admin_post(fleet.b, "prefix=p.example/docs/")
    assert status == 200 and result["purged"] == {"cache": 2}
    assert not await _hit(fleet.a, "/docs/a", "p.example")
    assert not await _hit(fleet.a, "/docs/b", "p.example")

    status, result = await admin_post(fleet.a, "tag=green")  # a Surrogate-Key
    assert status == 200 and result["purged"] == {"cache": 2}
    assert not await _hit(fleet.b, "/tagged/1", "p.example")
    _, _, headers = await get(fleet.b, "/tagged/2", Host="p.example")
    assert "Cache-Tag" not in headers and "Surrogate-Key" not in headers  # ours, not theirs

    status, _ = await admin_post(fleet.a, "nothing=1")
    assert status == 400


async def test_corrupt_entry_is_a_miss_not_an_error(fleet: Fleet,
                                                    redis_server: RedisServer) -> None:
    await get(fleet.a, "/page", Host="c.example")
    await eventually(lambda: _hit(fleet.b, "/page", "c.example"))
    key = fleet.store(fleet.a)._key(fleet.cache(fleet.a).primary_key("c.example", "/page"))
    redis_server.cli("hset", key, "e:", "garbage that is no entry")
    status, body, headers = await get(fleet.b, "/page", Host="c.example")
    assert (status, body) == (200, "/page 2")
    assert headers["Cache-Status"] == "bascule; fwd=miss; stored"  # and written anew
    await eventually(lambda: _hit(fleet.a, "/page", "c.example"))


async def test_redis_down_fails_open_then_comes_back(
        redis_server: RedisServer, backend: int) -> None:
    async with running_fleet(redis_server.url, backend,
                             redis='breaker_cooldown = "300ms"', timeout="200ms") as fleet:
        await get(fleet.a, "/page", Host="d.example")
        await eventually(lambda: _hit(fleet.a, "/page", "d.example"))
        redis_server.kill()
        answers = [await get(fleet.a, "/page", Host="d.example") for _ in range(6)]
        assert [a[0] for a in answers] == [200] * 6  # served by the backend, no 5xx
        assert all(a[2]["Cache-Status"].startswith("bascule; fwd=miss") for a in answers)
        assert fleet.store(fleet.a).breaker.is_open
        errors = fleet.a.metrics  # counted for bascule_cache_store_errors_total
        errors.flush()
        assert errors.cache_store_errors.labels("redis")._value.get() >= 3

        redis_server.start()  # same port, empty: the breaker lets a trial through
        await eventually(lambda: _hit(fleet.a, "/page", "d.example"), timeout=10)
        assert not fleet.store(fleet.a).breaker.is_open


async def test_a_redis_that_hangs_does_not_hang_requests(
        redis_server: RedisServer, backend: int) -> None:
    async with running_fleet(redis_server.url, backend, timeout="100ms") as fleet:
        await get(fleet.a, "/page", Host="h.example")
        assert redis_server.proc is not None
        redis_server.proc.send_signal(19)  # SIGSTOP: connections open, no answers
        try:
            answers = await asyncio.wait_for(asyncio.gather(
                *(get(fleet.a, f"/hang{i}", Host="h.example") for i in range(5))), 10)
        finally:
            redis_server.proc.send_signal(18)  # SIGCONT
        assert [a[0] for a in answers] == [200] * 5


async def test_lookups_are_counted_by_result(fleet: Fleet) -> None:
    await get(fleet.a, "/page", Host="m.example")
    await eventually(lambda: _hit(fleet.a, "/page", "m.example"))
    fleet.a.metrics.flush()
    text = fleet.a.metrics.exposition().decode()
    assert 'bascule_cache_lookups_total{result="miss",route="routes[0]"} 1.0' in text
    assert 'bascule_cache_lookups_total{result="hit",route="routes[0]"}' in text


async def test_waiters_are_woken_by_the_fill_notice(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, prefix="notice:", timeout=1.0)
    try:
        key = store._key("n.example/x")
        # A holder that keeps its lock: only the published notice can end the wait.
        redis_server.cli("set", key + ":lock", "holder", "px", "20000")
        waiting = asyncio.ensure_future(store.wait_fill("n.example/x", timeout=15))
        await eventually(lambda: _true(redis_server.cli("pubsub", "numpat").strip() == "1"))
        redis_server.cli("publish", key + ":filled", "1")
        assert await asyncio.wait_for(waiting, 10) is True
    finally:
        await store.aclose()


async def _true(value: bool) -> bool:
    return value


async def test_near_cache_serves_hot_keys_and_drops_purged_ones(
        redis_server: RedisServer, backend: int) -> None:
    # near_cache_ttl of an hour: only a purge notice can drop the copy
    async with running_fleet(redis_server.url, backend,
                             cache='near_cache_ttl = "1h"') as fleet:
        await get(fleet.a, "/page", Host="n.example")
        await eventually(lambda: _hit(fleet.b, "/page", "n.example"))
        redis_server.cli("flushall")  # Redis forgets; b's near copy still answers
        assert await _hit(fleet.b, "/page", "n.example")
        status, result = await admin_post(fleet.a, "url=n.example/page")
        assert status == 200 and result["purged"] == {"cache": 0}  # Redis had nothing

        async def dropped_on_b() -> bool:  # the purge notice reached b's near cache
            _, _, h = await get(fleet.b, "/page", Host="n.example")
            return h["Cache-Status"].startswith("bascule; fwd=miss")

        await eventually(dropped_on_b)


async def test_unsafe_method_on_one_instance_invalidates_for_all(fleet: Fleet) -> None:
    await get(fleet.a, "/page", Host="u.example")
    await eventually(lambda: _hit(fleet.b, "/page", "u.example"))
    async with aiohttp.ClientSession() as session, session.post(
            edge_url(fleet.a) + "/page", headers={"Host": "u.example"}) as resp:
        assert resp.status == 200
    assert not await _hit(fleet.b, "/page", "u.example")


async def test_a_server_that_is_not_redis_fails_open(backend: int) -> None:
    # The "Redis" is an HTTP server: every reply is garbage to a Redis client.
    async with running_fleet(f"redis://127.0.0.1:{backend}/0", backend,
                             timeout="200ms") as fleet:
        answers = [await get(fleet.a, "/page", Host="g.example") for _ in range(5)]
        assert [a[0] for a in answers] == [200] * 5
        assert all(a[2]["Cache-Status"].startswith("bascule; fwd=miss") for a in answers)
