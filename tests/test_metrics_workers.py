"""Metrics with several worker processes: any worker's /metrics sums them all, a
restarted worker does not lose or double counts, and a new run starts from zero."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import (
    children_of,
    free_port,
    poll,
    port_of,
    run_bascule,
    start_backend,
    wait_port,
)


def requests_total(text: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "bascule_requests_total")


def inflight_total(text: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "bascule_backend_inflight")




async def send_fresh_connections(port: int, count: int) -> None:
    """`count` requests, each on a new connection, so SO_REUSEPORT spreads them over
    the workers."""
    for _ in range(count):
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{port}/") as resp:
            assert resp.status == 200


async def worker_pids(admin: int, want: int, timeout: float = 15.0) -> set[int]:
    """Worker pids seen answering /status on fresh connections, until `want` were
    seen (workers that are still starting up join the port a little later)."""
    pids: set[int] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(pids) < want and loop.time() < deadline:
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{admin}/status") as resp:
            pids.add((await resp.json())["pid"])
        await asyncio.sleep(0.01)
    return pids


async def scrape_until(admin: int, want: float, timeout: float = 10.0) -> str:
    text = ""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{admin}/metrics") as resp:
            text = await resp.text()
        if requests_total(text) == want:
            return text
        await asyncio.sleep(0.2)  # workers flush their counts every second
    raise AssertionError(f"requests_total never reached {want}: {requests_total(text)}")


async def test_two_workers_one_sum(tmp_path: Path, procs: list[subprocess.Popen[bytes]]
                                   ) -> None:
    async def ok(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(text="ok")

    _, listener = await start_backend(ok)
    port, admin = free_port(), free_port()
    conf = tmp_path / "b.toml"
    conf.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\nworkers = 2\n'
                    f'access_log = "off"\n[admin]\nlisten = "127.0.0.1:{admin}"\n'
                    f'[[routes]]\nupstream = "app"\n'
                    f'[upstreams.app]\nbackends = ["127.0.0.1:{port_of(listener)}"]\n')
    proc = run_bascule(conf)
    procs.append(proc)
    await asyncio.to_thread(wait_port, port)
    await asyncio.to_thread(wait_port, admin)
    assert await asyncio.to_thread(poll, lambda: len(children_of(proc.pid)) == 2, 10)
    assert len(await worker_pids(admin, 2)) == 2  # both workers answer the admin port

    await send_fresh_connections(port, 40)
    text = await scrape_until(admin, 40)
    assert inflight_total(text) == 0

    # A worker killed outright: its counts stay (totals never go backwards), its
    # live gauges go, and the replacement's counts add on.
    victim = children_of(proc.pid)[0]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:  # the dead worker reaped (its socket gone) and a new one up
        kids = children_of(proc.pid)
        return len(kids) == 2 and victim not in kids

    assert await asyncio.to_thread(poll, replaced, 10)
    await asyncio.to_thread(wait_port, port)
    await send_fresh_connections(port, 10)
    await scrape_until(admin, 50)

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 15) == 0

    # A new run starts from zero: nothing from the previous run's files.
    proc = run_bascule(conf)
    procs.append(proc)
    await asyncio.to_thread(wait_port, port)
    await asyncio.to_thread(wait_port, admin)
    await send_fresh_connections(port, 3)
    await scrape_until(admin, 3)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 15) == 0
    listener.close()
