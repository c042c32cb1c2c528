"""The cache plugin with the memory store, end to end through the proxy."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from email.utils import formatdate

import aiohttp
import pytest
from aiohttp import web

from proxy.server import Edge
from tests.helpers import (
    edge_url,
    port_of,
    proxy_config,
    raw_request,
    start_backend,
    start_proxy,
)

hits: collections.Counter[str] = collections.Counter()
conditionals: list[str] = []


async def origin(request: web.BaseRequest) -> web.StreamResponse:
    hits[request.path] += 1
    path = request.path
    if request.method == "POST":
        return web.Response(status=201, text="created")
    if request.method == "DELETE":
        return web.Response(status=204)
    if path == "/fresh":
        return web.Response(text=f"fresh {hits[path]}",
                            headers={"Cache-Control": "max-age=60", "ETag": '"f1"'})
    if path == "/etag":
        if request.headers.get("If-None-Match") == '"v1"':
            conditionals.append("304")
            return web.Response(status=304, headers={"ETag": '"v1"', "Cache-Control":
                                                     "max-age=0", "X-Refreshed": "yes"})
        return web.Response(text="etag body", headers={"ETag": '"v1"',
                                                       "Cache-Control": "max-age=0"})
    if path == "/cookie":
        return web.Response(text="c", headers={"Cache-Control": "max-age=60",
                                               "Set-Cookie": "a=1"})
    if path == "/private":
        return web.Response(text="p", headers={"Cache-Control": "private, max-age=60"})
    if path == "/nottl":
        return web.Response(text="n")
    if path == "/vary":
        return web.Response(text=f"lang={request.headers.get('Accept-Language')}",
                            headers={"Cache-Control": "max-age=60", "Vary": "Accept-Language"})
    if path == "/slow":
        await asyncio.sleep(0.2)
        return web.Response(text="slow", headers={"Cache-Control": "max-age=60"})
    if path == "/stream":
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=60"})
        await resp.prepare(request)
        for _ in range(10):
            await resp.write(b"x" * 10_000)
        return resp
    if path == "/flaky":
        if hits[path] > 1:
            return web.Response(status=503, text="down")
        return web.Response(text="good", headers={"Cache-Control": "max-age=0",
                                                  "Date": formatdate(usegmt=True)})
    return web.Response(status=404)


@pytest.fixture
async def edge() -> AsyncIterator[Edge]:
    hits.clear()
    conditionals.clear()
    _, listener = await start_backend(origin)
    routes = """
[[plugins]]
name = "cache"
use = "cache"
options = { max_object_size = "50KiB", stale_if_error = "1m" }

[[routes]]
upstream = "app"
plugins = ["cache"]
"""
    edge = await start_proxy(proxy_config({"app": [f"127.0.0.1:{port_of(listener)}"]},
                                          routes=routes))
    yield edge
    await edge.drain(1.0)
    listener.close()


async def get(edge: Edge, path: str, method: str = "GET", **headers: str
              ) -> tuple[int, str, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.request(
            method, edge_url(edge) + path, headers=headers) as resp:
        return resp.status, await resp.text(), dict(resp.headers)


async def test_fresh_hit_with_age_and_cache_status(edge: Edge) -> None:
    s1, b1, h1 = await get(edge, "/fresh")
    s2, b2, h2 = await get(edge, "/fresh")
    assert (s1, b1, s2, b2) == (200, "fresh 1", 200, "fresh 1")
    assert h1["Cache-Status"] == "bascule; fwd=miss; stored"
    assert h2["Cache-Status"] == "bascule; hit" and "Age" in h2
    assert hits["/fresh"] == 1
    status, _, _ = await get(edge, "/fresh", method="HEAD")  # HEAD from the GET entry
    assert status == 200 and hits["/fresh"] == 1
    status, _, _ = await get(edge, "/fresh", **{"If-None-Match": '"f1"'})
    assert status == 304 and hits["/fresh"] == 1
    await get(edge, "/fresh", **{"Cache-Control": "no-cache"})
    assert hits["/fresh"] == 2  # the request's no-cache went to the origin


@pytest.mark.parametrize(("path", "detail"), [
    ("/cookie", "set-cookie"), ("/private", "private"), ("/nottl", "no-freshness"),
])
async def test_not_stored_with_reason(edge: Edge, path: str, detail: str) -> None:
    _, _, headers = await get(edge, path)
    await get(edge, path)
    assert hits[path] == 2
    assert headers["Cache-Status"] == f"bascule; fwd=miss; detail={detail}"


async def test_streamed_body_over_max_object_size_is_not_kept(edge: Edge) -> None:
    # chunked, 100 kB > 50 KiB: only known once streamed, so it passes through unstored
    status, body, _ = await get(edge, "/stream")
    assert status == 200 and len(body) == 100_000
    await get(edge, "/stream")
    assert hits["/stream"] == 2


async def test_revalidation_with_304_refreshes(edge: Edge) -> None:
    await get(edge, "/etag")
    status, body, headers = await get(edge, "/etag")
    assert (status, body) == (200, "etag body")
    assert conditionals == ["304"]
    assert headers["Cache-Status"] == "bascule; fwd=stale; fwd-status=304"
    assert headers["X-Refreshed"] == "yes"


async def test_vary_keeps_variants_apart(edge: Edge) -> None:
    assert (await get(edge, "/vary", **{"Accept-Language": "en"}))[1] == "lang=en"
    assert (await get(edge, "/vary", **{"Accept-Language": "fr"}))[1] == "lang=fr"
    assert (await get(edge, "/vary", **{"Accept-Language": " EN "}))[1] == "lang=en"
    assert hits["/vary"] == 2


async def test_concurrent_misses_are_coalesced(edge: Edge) -> None:
    results = await asyncio.gather(*(get(edge, "/slow") for _ in range(20)))
    assert {r[1] for r in results} == {"slow"}
    assert hits["/slow"] == 1


async def test_stale_if_error_and_invalidation(edge: Edge) -> None:
    assert (await get(edge, "/flaky"))[1] == "good"
    status, body, headers = await get(edge, "/flaky")  # stale; origin now 503
    assert (status, body) == (200, "good")
    assert headers["Cache-Status"].endswith("detail=stale-if-error")
    await get(edge, "/fresh")
    status, _, _ = await get(edge, "/fresh", method="POST")
    assert status == 201
    await get(edge, "/fresh")
    # GET (stored), POST (origin), GET again: the POST invalidated the stored /fresh
    assert hits["/fresh"] == 3


@pytest.mark.parametrize("method", ["DELETE", "OPTIONS"])
async def test_a_bodiless_unsafe_request_reaches_the_origin(edge: Edge, method: str) -> None:
    """Only GET and HEAD may be answered from the cache (RFC 9111 §4); a bodiless
    DELETE used to be served the stored GET response as a hit."""
    await get(edge, "/fresh")
    # raw, so that no Content-Length is sent (aiohttp's client adds one)
    host = f"127.0.0.1:{edge.ports[0]}"  # the stored entry's key, as aiohttp sent it
    raw = await raw_request(edge.ports[0], f"{method} /fresh HTTP/1.1\r\nHost: {host}\r\n"
                            "Connection: close\r\n\r\n".encode())
    assert b"Cache-Status: bascule; hit" not in raw
    assert hits["/fresh"] == 2  # the origin saw it
    if method == "DELETE":
        assert raw.startswith(b"HTTP/1.1 204 ")
        await get(edge, "/fresh")
        assert hits["/fresh"] == 3  # and it invalidated the stored entry (§4.4)


async def test_only_if_cached_miss_is_504(edge: Edge) -> None:
    status, _, headers = await get(edge, "/never", **{"Cache-Control": "only-if-cached"})
    assert status == 504 and hits["/never"] == 0
    assert headers["Cache-Status"].endswith("detail=only-if-cached")
