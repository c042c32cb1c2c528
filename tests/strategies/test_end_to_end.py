"""Strategies through the real proxy: slow-backend avoidance, hashing by header,
and a third-party strategy loaded by dotted path."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tests.helpers import (
    dead_port,
    edge_url,
    port_of,
    proxy_config,
    start_backend,
    start_proxy,
)


async def timed_backend(delay: float, name: str) -> tuple[int, asyncio.AbstractServer]:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        await asyncio.sleep(delay)
        return web.Response(text=name)

    _, listener = await start_backend(handler)
    return port_of(listener), listener


@pytest.fixture
async def three_backends() -> AsyncIterator[list[int]]:
    started = [await timed_backend(0.2, "slow"), await timed_backend(0.005, "fast1"),
               await timed_backend(0.005, "fast2")]
    yield [port for port, _ in started]
    for _, listener in started:
        listener.close()


async def run_clients(url: str, clients: int, per_client: int) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    async with aiohttp.ClientSession() as session:
        async def client() -> None:
            for _ in range(per_client):
                async with session.get(url) as resp:
                    assert resp.status == 200
                    counts[await resp.text()] += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return counts


@pytest.mark.parametrize("strategy", ["least_connections", "p2c_ewma"])
async def test_slow_backend_gets_well_under_a_third(
        strategy: str, three_backends: list[int]) -> None:
    edge = await start_proxy(proxy_config(
        {"app": [f"127.0.0.1:{p}" for p in three_backends]},
        upstream_extra=f'strategy = "{strategy}"'))
    try:
        counts = await run_clients(edge_url(edge) + "/", clients=30, per_client=20)
    finally:
        await edge.drain(1.0)
    share = counts["slow"] / sum(counts.values())
    print(f"{strategy}: slow backend share {share:.1%} of {sum(counts.values())} requests")
    assert share < 0.15


async def test_round_robin_control_gives_the_slow_backend_a_third(
        three_backends: list[int]) -> None:
    edge = await start_proxy(proxy_config({"app": [f"127.0.0.1:{p}" for p in three_backends]}))
    try:
        counts = await run_clients(edge_url(edge) + "/", clients=30, per_client=4)
    finally:
        await edge.drain(1.0)
    assert abs(counts["slow"] / sum(counts.values()) - 1 / 3) < 0.05


async def test_consistent_hash_by_header_is_sticky(three_backends: list[int]) -> None:
    edge = await start_proxy(proxy_config(
        {"app": [f"127.0.0.1:{p}" for p in three_backends]},
        upstream_extra='strategy = "consistent_hash"\n'
                       'strategy_options = { hash_on = "header:X-User", fallback = "random" }'))
    try:
        # 60 users, each asking three times in a row, all users at once: with 20 a
        # backend missed every user about once in a thousand runs ((2/3)**20 * 3).
        seen: dict[str, set[str]] = collections.defaultdict(set)
        async with aiohttp.ClientSession() as session:
            async def user(name: str) -> None:
                for _ in range(3):
                    async with session.get(edge_url(edge) + "/",
                                           headers={"X-User": name}) as resp:
                        seen[name].add(await resp.text())

            await asyncio.gather(*(user(f"u{n}") for n in range(60)))
        assert all(len(backends) == 1 for backends in seen.values())
        assert len(set().union(*seen.values())) == 3  # users spread over all three
    finally:
        await edge.drain(1.0)


async def test_third_party_strategy_by_dotted_path() -> None:
    async def named(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(text=str(request.transport.get_extra_info("sockname")[1]))  # type: ignore[union-attr]

    listeners = [(await start_backend(named))[1] for _ in range(2)]
    primary, standby = (port_of(li) for li in listeners)
    dead = dead_port()
    edge = await start_proxy(proxy_config(
        {"app": [f"127.0.0.1:{dead}", f"127.0.0.1:{primary}", f"127.0.0.1:{standby}"]},
        upstream_extra='strategy = "tests.example_strategy.first_healthy:FirstHealthy"'))
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                # the first backend refuses; the retry excludes it, so "first healthy
                # not yet tried" is the primary every time
                async with session.get(edge_url(edge) + "/") as resp:
                    assert await resp.text() == str(primary)
    finally:
        await edge.drain(1.0)
        for listener in listeners:
            listener.close()
