from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.redis_servers import RedisCluster, RedisServer


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; any still running at the end are killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of the test's own on a free port (kill() and start() again)."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A three-node Redis Cluster on loopback ports, shared by the session's tests
    (each test uses its own key prefix)."""
    cluster = RedisCluster().start()
    yield cluster
    cluster.stop()
