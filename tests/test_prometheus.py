"""A real Prometheus server scrapes Bascule's admin listener; its query API must
report what the test sent."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.helpers import (
    edge_url,
    free_port,
    port_of,
    start_backend,
    start_proxy_with_admin,
    wait_port,
)


async def query(session: aiohttp.ClientSession, port: int, promql: str) -> float | None:
    async with session.get(f"http://127.0.0.1:{port}/api/v1/query",
                           params={"query": promql}) as resp:
        if resp.status == 503:
            return None  # Prometheus is still starting up
        data = await resp.json()
    result = data["data"]["result"]
    return float(result[0]["value"][1]) if result else None


@pytest.mark.slow
async def test_prometheus_scrapes_what_was_sent(tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus missing: `make test` installs Debian's prometheus package"

    async def ok(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(text="ok")

    _, listener = await start_backend(ok)
    edge = await start_proxy_with_admin(
        f'[[routes]]\nupstream = "app"\n[upstreams.app]\n'
        f'backends = ["127.0.0.1:{port_of(listener)}"]\n')
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: bascule
    static_configs:
      - targets: ["127.0.0.1:{edge.admin_port}"]
""")
    proc = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        await asyncio.to_thread(wait_port, prom_port, 60.0)
        sent = 120
        async with aiohttp.ClientSession() as session:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            # Wait for the first scrape, so the series exists before traffic starts.
            while await query(session, prom_port, "up{job='bascule'}") != 1.0:
                assert loop.time() < deadline, "Prometheus never scraped Bascule"
                await asyncio.sleep(0.5)
            started = loop.time()
            for _ in range(sent):  # ~40 requests a second for three seconds
                async with session.get(edge_url(edge) + "/") as resp:
                    assert resp.status == 200
                await asyncio.sleep(0.025)
            elapsed = loop.time() - started
            scraped = None
            while scraped != sent:
                assert loop.time() < deadline, f"scraped total stuck at {scraped}"
                await asyncio.sleep(0.5)
                scraped = await query(session, prom_port, "sum(bascule_requests_total)")
            # The rate Prometheus computes over the traffic window is the rate sent.
            window = int(elapsed) + 3
            increase = await query(
                session, prom_port,
                f"sum(increase(bascule_requests_total[{window}s]))")
        assert scraped == sent
        assert increase is not None and 0.7 * sent <= increase <= 1.3 * sent
    finally:
        proc.terminate()
        proc.wait(15)
        await edge.drain(1.0)
        listener.close()
