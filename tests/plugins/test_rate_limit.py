"""`rate_limit`: GCRA decisions, the memory store end to end, a limit shared by
three Bascule instances through a real Redis, and Redis killed or frozen (SIGSTOP)
with fail-open and fail-closed: nothing hangs."""

from __future__ import annotations

import asyncio
import os
import signal
import tomllib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from plugins.rate_limit.gcra import MemoryStore, Policy, decide
from proxy.app import build_runtime
from proxy.config import parse_config
from proxy.server import Edge
from tests.helpers import free_port, port_of, start_backend
from tests.redis_servers import RedisServer

SECOND = 1_000_000


def test_gcra_lets_the_burst_through_then_one_per_interval() -> None:
    policy = Policy(limit=2, period_us=SECOND, burst=2)  # T = 0.5 s, tau = 1 s
    tat = None
    passed = []
    for _ in range(4):
        decision, new = decide(tat, 0, policy)
        passed.append(decision.allowed)
        tat = new if new is not None else tat
    assert passed == [True, True, True, False]  # burst + 1 at rest
    refused, _ = decide(tat, 0, policy)
    assert refused.retry_after_us == 500_000
    later, _ = decide(tat, 500_000, policy)
    assert later.allowed  # one interval later, one more
    store = MemoryStore()
    first = store.decide("k", 0, policy)
    assert first.remaining(policy) == 2 and first.reset_us() == 500_000


@pytest.fixture
async def backend() -> AsyncIterator[int]:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(text="ok")

    server, listener = await start_backend(handler)
    yield port_of(listener)
    listener.close()
    await server.shutdown(0.1)


async def edge_with(backend: int, options: str, redis_url: str = "") -> Edge:
    text = f"""
[server]
listen = ["127.0.0.1:{free_port()}"]
access_log = "off"
[admin]
listen = "127.0.0.1:{free_port()}"
[redis]
url = "{redis_url or 'redis://127.0.0.1:1/0'}"
timeout = "50ms"
[[plugins]]
name = "limit"
use = "rate_limit"
options = {{ {options} }}
[[routes]]
name = "api"
upstream = "app"
plugins = ["limit"]
[upstreams.app]
backends = ["127.0.0.1:{backend}"]
"""
    edge = Edge(build_runtime(parse_config(tomllib.loads(text), "<test>"), "<test>"))
    await edge.start(admin=True)
    return edge


async def get(edge: Edge, headers: dict[str, str] | None = None
              ) -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{edge.ports[0]}/", headers=headers or {}) as resp:
        await resp.read()
        return resp.status, dict(resp.headers)


def decisions(edge: Edge) -> dict[str, float]:
    edge.metrics.flush()
    found = {}
    for line in edge.metrics.exposition().decode().splitlines():
        if line.startswith("bascule_rate_limit_decisions_total{"):
            labels, value = line.rsplit(" ", 1)
            found[labels.split('result="')[1].split('"')[0]] = float(value)
    return found


async def test_memory_store_limits_answers_429_and_describes_the_policy(
        backend: int) -> None:
    edge = await edge_with(backend, 'limit = 2, period = "10s", burst = 1, '
                                    'key = ["header:X-Api-Key"], name = "api"')
    try:
        first = await get(edge, {"X-Api-Key": "a"})
        assert first[0] == 200
        assert first[1]["RateLimit-Policy"] == '"api";q=2;w=10'
        assert first[1]["RateLimit"] == '"api";r=1;t=5'
        assert (await get(edge, {"X-Api-Key": "a"}))[0] == 200
        status, headers = await get(edge, {"X-Api-Key": "a"})
        assert status == 429 and headers["Retry-After"] == "5"
        assert headers["RateLimit"].startswith('"api";r=0;')
        assert (await get(edge, {"X-Api-Key": "b"}))[0] == 200  # its own bucket
        for _ in range(4):  # no key part: not limited by this plugin
            assert (await get(edge))[0] == 200
        assert decisions(edge) == {"allowed": 3.0, "limited": 1.0, "unkeyed": 4.0}
    finally:
        await edge.drain(1.0)


async def test_dry_run_counts_but_refuses_nothing(backend: int) -> None:
    edge = await edge_with(backend, 'limit = 1, period = "10s", dry_run = true')
    try:
        assert [(await get(edge))[0] for _ in range(3)] == [200, 200, 200]
        assert decisions(edge) == {"allowed": 1.0, "dry_run_limited": 2.0}
    finally:
        await edge.drain(1.0)


async def test_three_instances_share_one_limit_through_redis(
        backend: int, redis_server: RedisServer) -> None:
    options = 'limit = 5, period = "60s", burst = 4, store = "redis"'
    fleet = [await edge_with(backend, options, redis_server.url) for _ in range(3)]
    try:
        answers = await asyncio.gather(*(get(fleet[i % 3]) for i in range(30)))
        allowed = sum(1 for status, _ in answers if status == 200)
        # burst + 1 at rest, and one more each 12 s: the fleet lets through 5.
        assert allowed == 5, [s for s, _ in answers]
        assert all(status == 429 for status, _ in answers if status != 200)
        keys = redis_server.cli("--scan", "--pattern", "bascule:rl:*").split()
        assert len(keys) == 1 and "127.0.0.1" not in keys[0]  # hashed, one per key
        ttl = int(redis_server.cli("pttl", keys[0]))
        assert 0 < ttl <= 60_000  # expires with its debt: nothing accumulates
    finally:
        for edge in fleet:
            await edge.drain(1.0)


@pytest.mark.parametrize(("policy", "expected"), [("allow", 200), ("refuse", 503)])
async def test_redis_killed_or_frozen_fails_as_configured_and_never_hangs(
        backend: int, redis_server: RedisServer, policy: str, expected: int) -> None:
    edge = await edge_with(backend, f'limit = 1000, store = "redis", '
                                    f'on_store_error = "{policy}"', redis_server.url)
    try:
        assert (await get(edge))[0] == 200
        assert redis_server.proc is not None
        os.kill(redis_server.proc.pid, signal.SIGSTOP)  # frozen: connections hang
        try:
            for _ in range(5):  # each bounded by the 50 ms deadline, then the breaker
                status, _ = await asyncio.wait_for(get(edge), 5)
                assert status == expected
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        redis_server.kill()  # gone
        for _ in range(5):
            status, _ = await asyncio.wait_for(get(edge), 5)
            assert status == expected
        result = "store_error_allowed" if policy == "allow" else "store_error_refused"
        assert decisions(edge)[result] >= 10
    finally:
        await edge.drain(1.0)
