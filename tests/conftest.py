from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.redis_servers import RedisCluster, RedisServer

# Every process the suite starts inherits this variable (subprocess copies the
# environment), so the session can find any that outlived it, re-parented or not.
_MARK = f"BASCULE_TEST_SESSION={uuid.uuid4().hex}"
os.environ["BASCULE_TEST_SESSION"] = _MARK.partition("=")[2]


def _survivors() -> list[tuple[int, str]]:
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if _MARK.encode() not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                "utf-8", "replace").strip()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            found.append((int(entry.name), cmdline))
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a process the suite started is still alive (and kill it):
    a stray worker keeps serving its port long after the run."""
    if not Path("/proc/self/environ").exists():
        return
    survivors = _survivors()
    if not survivors:
        return
    for pid, _ in survivors:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    lines = "\n".join(f"  pid {pid}: {cmd}" for pid, cmd in survivors)
    print(f"\nprocesses started by the suite outlived it (killed now):\n{lines}")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
