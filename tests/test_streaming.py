"""1 GiB through Bascule each way, hashed at both ends, while the worker's RSS is
sampled: bodies must stream, never be buffered whole."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.helpers import (
    children_of,
    free_port,
    poll,
    port_of,
    run_bascule,
    start_backend,
    wait_port,
)

GIB = 1024**3
BLOCK = bytes(range(256)) * 1024  # 256 KiB pattern


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = rss_bytes(pid)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.baseline


async def source() -> AsyncIterator[bytes]:
    for _ in range(GIB // len(BLOCK)):
        yield BLOCK


@pytest.mark.slow
async def test_one_gib_each_way_streams_with_bounded_memory(tmp_path: Path) -> None:
    expected = hashlib.sha256()
    for _ in range(GIB // len(BLOCK)):
        expected.update(BLOCK)
    uploads: list[tuple[int, str]] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "POST":
            digest, size = hashlib.sha256(), 0
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                size += len(chunk)
            uploads.append((size, digest.hexdigest()))
            return web.Response(text="stored")
        resp = web.StreamResponse()
        resp.content_length = GIB
        await resp.prepare(request)
        async for block in source():
            await resp.write(block)
        return resp

    _, listener = await start_backend(handler)
    port = free_port()
    conf = tmp_path / "b.toml"
    conf.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\nmax_body_size = "2GiB"\n'
                    f'[admin]\nlisten = "127.0.0.1:{free_port()}"\n'
                    f'[[routes]]\nupstream = "app"\n'
                    f'[upstreams.app]\nbackends = ["127.0.0.1:{port_of(listener)}"]\n')
    proc = run_bascule(conf)
    try:
        await asyncio.to_thread(wait_port, port)
        assert await asyncio.to_thread(poll, lambda: len(children_of(proc.pid)) == 1, 10)
        worker = children_of(proc.pid)[0]
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as client:
            async with client.get(f"http://127.0.0.1:{port}/warmup") as resp:
                await resp.content.readexactly(1024)
            sampler = RssSampler(worker)
            async with client.get(f"http://127.0.0.1:{port}/download") as resp:
                assert resp.headers["Content-Length"] == str(GIB)
                digest, size = hashlib.sha256(), 0
                async for chunk in resp.content.iter_any():
                    digest.update(chunk)
                    size += len(chunk)
            download_growth = sampler.stop()
            assert size == GIB and digest.hexdigest() == expected.hexdigest()

            sampler = RssSampler(worker)
            async with client.post(f"http://127.0.0.1:{port}/upload", data=source()) as resp:
                assert await resp.text() == "stored"
            upload_growth = sampler.stop()
            assert uploads == [(GIB, expected.hexdigest())]
        print(f"worker RSS growth: download {download_growth >> 20} MiB, "
              f"upload {upload_growth >> 20} MiB")
        assert download_growth < 50 * 1024**2, f"RSS grew {download_growth >> 20} MiB"
        assert upload_growth < 50 * 1024**2, f"RSS grew {upload_growth >> 20} MiB"
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
        listener.close()
