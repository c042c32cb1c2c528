"""`compress`: the negotiation table (q-values, `*`, identity;q=0), what is left
alone (HEAD, 304, 206/ranges, already encoded, small, no-transform, other types),
the fields it changes, streaming through a real edge, and the cache storing one
compressed variant per coding."""

from __future__ import annotations

import gzip
import tomllib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import brotli
import pytest
import zstandard
from aiohttp import web
from multidict import CIMultiDict

from plugins.compress.negotiate import negotiate
from proxy.app import build_runtime
from proxy.config import parse_config
from proxy.server import Edge
from tests.helpers import free_port, port_of, start_backend

OFFERED = ("zstd", "br", "gzip")


@pytest.mark.parametrize(("header", "expected"), [
    (None, None),                                  # no field: nothing
    ("", None),                                    # empty: identity only
    ("gzip", "gzip"),
    ("gzip, br", "br"),                            # equal q: the server's order
    ("gzip, br, zstd", "zstd"),
    ("br;q=0.5, gzip", "gzip"),                    # q-values decide first
    ("br;q=0.5, gzip;q=0.4", "br"),
    ("*", "zstd"),
    ("*;q=0.1, gzip;q=0.2", "gzip"),
    ("gzip;q=0, *", "zstd"),
    ("zstd;q=0, br;q=0, *;q=0.5", "gzip"),
    ("identity;q=0", None),                        # nothing offered is acceptable
    ("deflate, compress", None),
    ("GZIP;Q=0.8", "gzip"),                        # case-insensitive
    ("br;q=abc, gzip", "gzip"),                    # a bad q counts as 0
    ("br;q=1.5, gzip", "gzip"),                    # out of range: 0
])
def test_negotiation(header: str | None, expected: str | None) -> None:
    assert negotiate(header, OFFERED) == expected


JSON = b'{"items": [' + b",".join(b'{"id": %d, "name": "item %d"}' % (i, i)
                                  for i in range(2000)) + b"]}"


@pytest.fixture
async def backend() -> AsyncIterator[dict[str, Any]]:
    seen: dict[str, Any] = {"hits": 0}

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        seen["hits"] += 1
        path = request.path
        if path == "/stream":
            response = web.StreamResponse(headers={"Content-Type": "text/plain"})
            await response.prepare(request)
            for _ in range(50):
                await response.write(b"line of text that compresses well\n" * 100)
            await response.write_eof()
            return response
        headers = {"Content-Type": "application/json", "ETag": '"v1"',
                   "Cache-Control": "max-age=60"}
        status = 200
        body = JSON
        if path == "/small":
            body = b'{"a": 1}'
        elif path == "/encoded":
            headers["Content-Encoding"] = "gzip"
            body = gzip.compress(JSON)
        elif path == "/no-transform":
            headers["Cache-Control"] = "no-transform"
        elif path == "/image":
            headers["Content-Type"] = "image/png"
        elif path == "/range":
            status = 206
            headers["Content-Range"] = f"bytes 0-99/{len(JSON)}"
            body = JSON[:100]
        elif path == "/not-modified":
            return web.Response(status=304, headers={"ETag": '"v1"'})
        return web.Response(status=status, body=body, headers=headers)

    server, listener = await start_backend(handler)
    seen["port"] = port_of(listener)
    yield seen
    listener.close()
    await server.shutdown(0.1)


async def edge_with(port: int, plugins: str = '["compress"]') -> Edge:
    text = f"""
[server]
listen = ["127.0.0.1:{free_port()}"]
access_log = "off"
[[plugins]]
name = "compress"
use = "compress"
[[plugins]]
name = "cache"
use = "cache"
[[routes]]
upstream = "app"
plugins = {plugins}
[upstreams.app]
backends = ["127.0.0.1:{port}"]
"""
    edge = Edge(build_runtime(parse_config(tomllib.loads(text), "<test>"), "<test>"))
    await edge.start(admin=False)
    return edge


async def fetch(edge: Edge, path: str, accept: str | None, method: str = "GET"
                ) -> tuple[int, CIMultiDict[str], bytes]:
    headers = {"Accept-Encoding": accept} if accept is not None else {}
    async with aiohttp.ClientSession(auto_decompress=False) as session, session.request(
            method, f"http://127.0.0.1:{edge.ports[0]}{path}",
            headers={**headers, "Connection": "close"}
            if accept is not None else {"Accept-Encoding": ""}) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


DECODE = {"gzip": gzip.decompress, "br": brotli.decompress,
          "zstd": lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b)}


@pytest.mark.parametrize("coding", ["zstd", "br", "gzip"])
async def test_each_coding_round_trips_and_the_fields_say_so(
        backend: dict[str, Any], coding: str) -> None:
    edge = await edge_with(backend["port"])
    try:
        status, headers, body = await fetch(edge, "/json", coding)
        assert status == 200 and headers["Content-Encoding"] == coding
        assert DECODE[coding](body) == JSON and len(body) < len(JSON) / 4
        # The backend's length is gone: the compressed one (the body arrived whole).
        assert headers.get("Content-Length") == str(len(body))
        assert headers["Vary"] == "Accept-Encoding"
        assert headers["ETag"] == 'W/"v1"'  # weakened: different bytes
    finally:
        await edge.drain(1.0)


@pytest.mark.parametrize(("path", "method", "accept"), [
    ("/json", "HEAD", "gzip"), ("/not-modified", "GET", "gzip"),
    ("/range", "GET", "gzip"), ("/encoded", "GET", "br"), ("/small", "GET", "gzip"),
    ("/no-transform", "GET", "gzip"), ("/image", "GET", "gzip"),
    ("/json", "GET", "identity"), ("/json", "GET", "gzip;q=0"),
])
async def test_left_alone(backend: dict[str, Any], path: str, method: str,
                          accept: str) -> None:
    edge = await edge_with(backend["port"])
    try:
        _, headers, body = await fetch(edge, path, accept, method)
        assert headers.get("Content-Encoding") in (None, "gzip" if path == "/encoded"
                                                   else None)
        if path == "/encoded":
            assert gzip.decompress(body) == JSON  # passed on as the backend sent it
        if path == "/json" and method == "GET":
            assert body == JSON and headers.get("Vary") == "Accept-Encoding"
    finally:
        await edge.drain(1.0)


async def test_a_streamed_body_is_compressed_as_it_streams(backend: dict[str, Any]) -> None:
    edge = await edge_with(backend["port"])
    try:
        _, headers, body = await fetch(edge, "/stream", "gzip")
        assert headers["Content-Encoding"] == "gzip"
        assert "Content-Length" not in headers  # streamed: chunked to the client
        assert gzip.decompress(body) == b"line of text that compresses well\n" * 5000
    finally:
        await edge.drain(1.0)


async def test_behind_the_cache_one_variant_per_coding_compressed_once(
        backend: dict[str, Any]) -> None:
    edge = await edge_with(backend["port"], '["cache", "compress"]')
    try:
        for coding in ("br", "br", "gzip", "gzip", "br"):
            _, headers, body = await fetch(edge, "/json", coding)
            assert headers["Content-Encoding"] == coding
            assert DECODE[coding](body) == JSON
        assert backend["hits"] == 2  # one fill per coding; the rest are hits
        _, headers, _ = await fetch(edge, "/json", "br")
        assert headers.get("Cache-Status", "").startswith("bascule; hit")
    finally:
        await edge.drain(1.0)


def test_options_are_checked() -> None:
    from plugins.compress.plugin import Compress

    with pytest.raises(ValueError, match="encodings: must be a list of"):
        Compress({"encodings": ["deflate"]})
    with pytest.raises(ValueError, match="gzip_level: must be an integer from 1 to 9"):
        Compress({"gzip_level": 12})


@pytest.mark.slow
async def test_100_mib_compressed_as_it_streams_with_flat_memory(tmp_path: Any) -> None:
    import asyncio
    import signal
    import zlib

    from tests.helpers import children_of, poll, run_bascule, wait_port
    from tests.test_streaming import RssSampler

    block = (b"2026-12-02 07:00:00 INFO request served in 12 ms for /api/items\n" * 4096)
    blocks = 100 * 1024**2 // len(block)

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.content_length = blocks * len(block) if request.path != "/warmup" else 2048
        await resp.prepare(request)
        if request.path == "/warmup":
            await resp.write(b"x" * 2048)
            return resp
        for _ in range(blocks):
            await resp.write(block)
        return resp

    _, listener = await start_backend(handler)
    port = free_port()
    conf = tmp_path / "b.toml"
    conf.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\naccess_log = "off"\n'
                    f'[admin]\nlisten = "127.0.0.1:{free_port()}"\n'
                    '[[plugins]]\nname = "compress"\nuse = "compress"\n'
                    '[[routes]]\nupstream = "app"\nplugins = ["compress"]\n'
                    f'[upstreams.app]\nbackends = ["127.0.0.1:{port_of(listener)}"]\n')
    proc = run_bascule(conf)
    try:
        await asyncio.to_thread(wait_port, port)
        assert await asyncio.to_thread(poll, lambda: len(children_of(proc.pid)) == 1, 10)
        worker = children_of(proc.pid)[0]
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as client:
            async with client.get(f"http://127.0.0.1:{port}/warmup",
                                  headers={"Accept-Encoding": "gzip"}) as resp:
                await resp.read()
            sampler = RssSampler(worker)
            inflate = zlib.decompressobj(31)
            size = wire = 0
            async with client.get(f"http://127.0.0.1:{port}/big",
                                  headers={"Accept-Encoding": "gzip"}) as resp:
                assert resp.headers["Content-Encoding"] == "gzip"
                async for chunk in resp.content.iter_any():
                    wire += len(chunk)
                    size += len(inflate.decompress(chunk))
            growth = sampler.stop()
        assert size == blocks * len(block)  # every byte, decompressed
        assert wire < size / 20  # really compressed
        assert growth < 50 * 1024**2, f"RSS grew {growth >> 20} MiB"
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
        listener.close()
