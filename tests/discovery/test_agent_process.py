"""One discovery agent per Bascule, for real: `bascule run` with several workers,
the Consul emulator counting connections per client and refusing past a limit like
the agent, real backends. The agent's and the workers' logs are read from a file."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.consul_emulator import ConsulEmulator
from tests.helpers import (
    GetLoad,
    children_of,
    eventually,
    free_port,
    poll,
    port_of,
    start_backend,
    wait_port,
)

pytestmark = pytest.mark.slow


class Bascule:
    """`bascule run` on a config, its output in a file."""

    def __init__(self, tmp_path: Path, body: str, procs: list[Any]) -> None:
        self.port = free_port()
        self.admin = free_port()
        self.config = tmp_path / "bascule.toml"
        self.config.write_text(f'[server]\nlisten = ["127.0.0.1:{self.port}"]\n{body}'
                               f'\n[admin]\nlisten = "127.0.0.1:{self.admin}"\n')
        self.log = tmp_path / "bascule.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "-c", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        procs.append(self.proc)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self, pattern: str) -> list[tuple[float, int, str]]:
        """(time, pid, line) of the log lines matching `pattern`."""
        found = []
        for line in self.text().splitlines():
            match = re.match(r"(\S+ \S+) \S+ \[(\d+)\] (.*)", line)
            if match and re.search(pattern, match.group(3)):
                stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
                found.append((stamp.timestamp(), int(match.group(2)), match.group(3)))
        return found

    def workers(self) -> list[int]:
        return children_of(self.proc.pid)

    def agent(self) -> list[int]:
        return children_of(self.proc.pid, name="bascule-agent")

    async def ready(self, workers: int) -> None:
        await asyncio.to_thread(wait_port, self.port, 30)
        assert await asyncio.to_thread(
            poll, lambda: len(self.lines(r"worker \d+ serving")) >= workers, 60), self.text()

    async def get(self, host: str = "") -> tuple[int, str]:
        """A GET on a new connection: SO_REUSEPORT spreads those over the workers."""
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session, session.get(
                f"http://127.0.0.1:{self.port}/",
                headers={"Host": host} if host else {}) as resp:
            return resp.status, await resp.text()

    async def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(self.proc.wait, 30)


def consul_table(consul: ConsulEmulator, extra: str = "") -> str:
    return (f'[consul]\naddress = "{consul.address}"\nwait = "60s"\n'
            f'startup_wait = "20s"\n{extra}\n')


async def test_four_workers_and_300_services_stay_within_the_budget(
        tmp_path: Path, procs: list[Any], consul: ConsulEmulator,
        backends: dict[str, int]) -> None:
    consul.max_conns_per_client = 40  # stricter than Consul's 200: anything over 32 shows
    services = [f"s{i}" for i in range(300)]
    for i, service in enumerate(services):
        await consul.add(service, f"{service}-1", backends["abc"[i % 3]])
    for i in range(300):  # a catalog bigger than what is watched
        await consul.add(f"other{i}", f"other{i}-1", backends["a"])
    body = "workers = 4\n" + consul_table(consul) + "".join(
        f'[[routes]]\nhost = "{s}.test"\nupstream = "{s}"\n'
        f'[upstreams.{s}]\nconsul = {{ service = "{s}" }}\n' for s in services)
    bascule = Bascule(tmp_path, body, procs)
    try:
        await bascule.ready(4)
        answers = await asyncio.gather(*(bascule.get(f"{s}.test") for s in services))
        assert answers == [(200, "abc"[i % 3]) for i in range(300)]
        assert consul.peak_connections["127.0.0.1"] <= 32  # consul.max_connections
        assert consul.refused == 0
        reads = [p for p, _, _ in consul.requests if p.startswith("/v1/health/service/")]
        assert len(reads) < 2 * 300  # read once for all four workers, not four times

        # A change reaches every worker: s7's only instance fails its check.
        await consul.set_status("s7-1", "critical")

        async def gone_everywhere() -> bool:
            codes = await asyncio.gather(*(bascule.get("s7.test") for _ in range(12)))
            return all(code == 503 for code, _ in codes)

        await eventually(gone_everywhere, timeout=10)
        assert "last known good" not in bascule.text()  # never stale
        assert consul.peak_connections["127.0.0.1"] <= 32
    finally:
        await bascule.stop()
    assert bascule.proc.returncode == 0


async def test_a_restarted_worker_gets_the_snapshot_from_the_agent_at_once(
        tmp_path: Path, procs: list[Any], consul: ConsulEmulator,
        backends: dict[str, int]) -> None:
    await consul.add("web", "web-1", backends["a"])
    body = ("workers = 2\n" + consul_table(consul) +
            '[[routes]]\nupstream = "web"\n[upstreams.web]\nconsul = { service = "web" }\n')
    bascule = Bascule(tmp_path, body, procs)
    try:
        await bascule.ready(2)
        asked = len(consul.requests)
        victim = bascule.workers()[0]
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            workers = bascule.workers()
            return len(workers) == 2 and victim not in workers and len(
                bascule.lines(r"worker \d+ serving")) >= 3

        assert await asyncio.to_thread(poll, replaced, 30), bascule.text()
        [new] = [w for w in bascule.workers() if w not in (victim,)
                 and any(pid == w for _, pid, _ in bascule.lines(r"worker \d+ serving"))][:1]
        assert [line for _, pid, line in bascule.lines("Consul reports 1 instance")
                if pid == new], "the new worker did not get the snapshot"
        assert len(consul.requests) == asked  # from the agent, not from Consul
        for _ in range(6):
            assert await bascule.get() == (200, "a")
    finally:
        await bascule.stop()


async def test_the_agent_killed_is_replaced_without_a_client_error(
        tmp_path: Path, procs: list[Any], consul: ConsulEmulator,
        backends: dict[str, int]) -> None:
    await consul.add("web", "web-1", backends["a"])
    body = ("workers = 2\n" + consul_table(consul) +
            '[[routes]]\nupstream = "web"\n[upstreams.web]\nconsul = { service = "web" }\n')
    bascule = Bascule(tmp_path, body, procs)
    try:
        await bascule.ready(2)
        [agent] = bascule.agent()
        async with GetLoad(f"http://127.0.0.1:{bascule.port}/", clients=4) as load:
            await load.more(50)
            os.kill(agent, signal.SIGKILL)
            assert await asyncio.to_thread(
                poll, lambda: bascule.agent() not in ([], [agent]), 10), bascule.text()
            # Both workers find the new agent, which takes over the watch: a new
            # instance is served.
            assert await asyncio.to_thread(
                poll, lambda: len(bascule.lines("discovery agent connected again")) >= 2,
                10), bascule.text()
            await consul.add("web", "web-2", backends["b"])
            load.seen.clear()
            await load.answered("b", 5)
            await load.more(50)
        assert load.errors == []
    finally:
        await bascule.stop()


class CountedHealth:
    """A backend that notes when each health probe arrives."""

    def __init__(self) -> None:
        self.probes: list[float] = []
        self.healthy = True
        self.listener: Any = None
        self.server: Any = None

    async def handler(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/health":
            self.probes.append(time.monotonic())
            return web.Response(status=200 if self.healthy else 500)
        return web.Response(text="ok")

    async def __aenter__(self) -> CountedHealth:
        self.server, self.listener = await start_backend(self.handler)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.listener.close()
        await self.server.shutdown(0.1)


async def test_four_workers_one_probe_per_interval_and_one_verdict(
        tmp_path: Path, procs: list[Any]) -> None:
    interval = 0.4
    async with CountedHealth() as backend:
        address = f"127.0.0.1:{port_of(backend.listener)}"
        body = (f'workers = 4\n[[routes]]\nupstream = "app"\n[upstreams.app]\n'
                f'backends = ["{address}", "127.0.0.1:{free_port()}"]\n'
                f'[upstreams.app.health]\npath = "/health"\ninterval = "{interval}s"\n'
                f'jitter = "0ms"\nfall = 2\nrise = 1\n')
        bascule = Bascule(tmp_path, body, procs)
        try:
            await bascule.ready(4)
            assert await asyncio.to_thread(poll, lambda: len(backend.probes) >= 8, 20)
            probes = backend.probes[-7:]
            gaps = [b - a for a, b in itertools.pairwise(probes)]
            # Four probers would put four probes in every interval; one puts one.
            assert min(gaps) > interval / 2, gaps
            backend.healthy = False
            assert await asyncio.to_thread(
                poll, lambda: len(bascule.lines(f"backend {address} is down")) >= 5, 20), \
                bascule.text()
            downs = bascule.lines(f"upstream app backend {address} is down")
            assert len({pid for _, pid, _ in downs}) == 4  # every worker
            stamps = [t for t, _, _ in downs]
            assert max(stamps) - min(stamps) <= interval  # from one probe's verdict
            assert all("health check answered 500 (2 times)" in line for _, _, line in downs)
        finally:
            await bascule.stop()


async def test_an_ejection_decided_once_holds_in_every_worker(
        tmp_path: Path, procs: list[Any]) -> None:
    async def good(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(text="good")

    async def bad(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(status=500, text="bad")

    good_server, good_listener = await start_backend(good)
    bad_server, bad_listener = await start_backend(bad)
    bad_address = f"127.0.0.1:{port_of(bad_listener)}"
    body = (f'workers = 4\n[[routes]]\nupstream = "app"\n[upstreams.app]\n'
            f'backends = ["127.0.0.1:{port_of(good_listener)}", "{bad_address}"]\n'
            'retry = { attempts = 1 }\n'
            'outlier = { consecutive_failures = 3, base_ejection_time = "60s" }\n')
    bascule = Bascule(tmp_path, body, procs)
    try:
        await bascule.ready(4)
        pattern = f"upstream app backend {bad_address} is down: ejected for 60s"
        for _ in range(200):  # until one worker's streak of three
            await bascule.get()
            if bascule.lines(pattern):
                break
        assert await asyncio.to_thread(
            poll, lambda: len({pid for _, pid, _ in bascule.lines(pattern)}) == 4, 10), \
            bascule.text()
        answers = await asyncio.gather(*(bascule.get() for _ in range(16)))
        assert answers == [(200, "good")] * 16  # every worker, even one that saw no streak
        per_worker = [pid for _, pid, _ in bascule.lines(pattern)]
        assert sorted(set(per_worker)) == sorted(per_worker)  # once each: decided once
    finally:
        await bascule.stop()
        for server, listener in ((good_server, good_listener), (bad_server, bad_listener)):
            listener.close()
            await server.shutdown(0.1)
