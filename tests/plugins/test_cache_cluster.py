"""The Redis store on a real three-node Redis Cluster (`cluster = true`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.helpers import edge_url, eventually
from tests.plugins.test_cache_redis import (
    Fleet,
    _hit,
    admin_post,
    backend,  # noqa: F401 -- a fixture
    get,
    hits,
    running_fleet,
)
from tests.redis_servers import RedisCluster


@pytest.fixture
async def fleet(redis_cluster: RedisCluster, backend: int) -> AsyncIterator[Fleet]:  # noqa: F811
    async with running_fleet(redis_cluster.url, backend, redis="cluster = true") as fleet:
        yield fleet


async def test_cluster_shares_fills_and_coalesces(fleet: Fleet,
                                                  redis_cluster: RedisCluster) -> None:
    await get(fleet.a, "/page", Host="k.example")
    await eventually(lambda: _hit(fleet.b, "/page", "k.example"))
    assert hits["/page"] == 1

    # An entry's keys share one slot (hash tag), so its writes stay atomic.
    key = fleet.store(fleet.a)._key(fleet.cache(fleet.a).primary_key("k.example", "/page"))
    node = redis_cluster.nodes[0]
    assert node.cli("cluster", "keyslot", key) == node.cli("cluster", "keyslot", key + ":lock")

    async with aiohttp.ClientSession() as session:
        async def one(i: int) -> str:
            edge = fleet.a if i % 2 else fleet.b
            async with session.get(edge_url(edge) + "/slow",
                                   headers={"Host": "k.example"}) as resp:
                return await resp.text()

        assert await asyncio.gather(*(one(i) for i in range(20))) == ["slow 1"] * 20
    assert hits["/slow"] == 1


async def test_cluster_purge(fleet: Fleet) -> None:
    for path in ("/tagged/x", "/docs/1", "/docs/2"):
        await get(fleet.a, path, Host="kp.example")
        await eventually(lambda path=path: _hit(fleet.b, path, "kp.example"))
    assert (await admin_post(fleet.a, "prefix=kp.example/docs"))[1]["purged"] == {"cache": 2}
    assert (await admin_post(fleet.a, "tag=red"))[1]["purged"] == {"cache": 1}
    assert not await _hit(fleet.b, "/docs/1", "kp.example")
    assert not await _hit(fleet.b, "/tagged/x", "kp.example")
