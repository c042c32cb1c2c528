"""The request side of the security model, end to end with raw sockets: route
bypasses, absolute-form Host, HTTP/0.9, client-asserted forwarding fields, head
limits, and the admin token."""

from __future__ import annotations

import asyncio
import json
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.app import build_runtime
from proxy.config import parse_config
from proxy.server import Edge
from tests.helpers import (
    free_port,
    port_of,
    proxy_config,
    raw_request,
    start_backend,
    start_proxy,
    start_proxy_with_admin,
)


class Recorder:
    """Backends that answer with their name and what they received, as JSON."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.listeners: list[asyncio.Server] = []

    async def start(self, name: str, cache_control: str = "") -> int:
        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            body = await request.read()
            headers = dict(request.headers)
            self.seen.append((name, request.raw_path, headers))
            extra = {"Cache-Control": cache_control} if cache_control else {}
            return web.json_response({"backend": name, "path": request.raw_path,
                                      "headers": headers, "body": len(body)}, headers=extra)

        _, listener = await start_backend(handler)
        self.listeners.append(listener)
        return port_of(listener)

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    r = Recorder()
    yield r
    r.close()


def body_of(raw: bytes) -> dict[str, object]:
    return json.loads(raw.partition(b"\r\n\r\n")[2]) if raw.startswith(b"HTTP/1.1 200") else {}


@pytest.fixture
async def routed(recorder: Recorder) -> AsyncIterator[Edge]:
    """/admin goes to the private backend; everything else to the public one."""
    private, public = await recorder.start("private"), await recorder.start("public")
    edge = await start_proxy(f"""
[server]
listen = ["127.0.0.1:{free_port()}"]
access_log = "off"

[[routes]]
host = "admin.internal"
upstream = "private"

[[routes]]
path_prefix = "/admin"
upstream = "private"

[[routes]]
upstream = "public"

[upstreams.private]
backends = ["127.0.0.1:{private}"]

[upstreams.public]
backends = ["127.0.0.1:{public}"]
""")
    yield edge
    await edge.drain(1.0)


def get(target: str, host: str = "t", extra: str = "", version: str = "HTTP/1.1") -> bytes:
    return (f"GET {target} {version}\r\nHost: {host}\r\n{extra}"
            "Connection: close\r\n\r\n").encode()


@pytest.mark.parametrize("target", [
    "/admin/x", "/%61dmin/x", "/public/../admin/x", "/./admin/x", "/%2e/admin/x",
    "/admin;a=b/x", "/public/%2E%2E/admin/x",
])
async def test_spellings_of_a_protected_prefix_reach_its_route(
        routed: Edge, recorder: Recorder, target: str) -> None:
    raw = await raw_request(routed.ports[0], get(target))
    assert body_of(raw)["backend"] == "private", raw[:200]
    assert body_of(raw)["path"] == target  # the client's bytes are forwarded


@pytest.mark.parametrize("target", [
    "//admin/x", "/public/..%2fadmin/x", "/public/..;/admin/x", "/public\\..\\admin/x",
    "/admin/..%2Fpublic",
])
async def test_ambiguous_spellings_are_refused(routed: Edge, recorder: Recorder,
                                               target: str) -> None:
    raw = await raw_request(routed.ports[0], get(target))
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n"), raw[:200]
    assert raw.endswith(b"ambiguous request path\n")
    assert recorder.seen == []


async def app_edge(recorder: Recorder, route: str = "", server: str = "") -> Edge:
    """One route to one recording backend named app."""
    port = await recorder.start("app")
    return await start_proxy(proxy_config(
        {"app": [f"127.0.0.1:{port}"]}, server=server,
        routes=f'[[routes]]\nupstream = "app"\n{route}'))


@pytest.mark.parametrize(("route", "target", "forwarded"), [
    ('path_prefix = "/api"\nstrip_prefix = true\nnormalise_path = true',
     "/api/v1/./x/../%7euser?q=/../a", "/v1/~user?q=/../a"),
    # a prefix cannot be stripped from bytes that do not spell it: the normal form goes
    ('path_prefix = "/api"\nstrip_prefix = true', "/%61pi/v1", "/v1"),
    ('path_prefix = "/api"\nstrip_prefix = true', "/api/./v1", "/./v1"),
])
async def test_forwarded_target(recorder: Recorder, route: str, target: str,
                                forwarded: str) -> None:
    edge = await app_edge(recorder, route)
    try:
        raw = await raw_request(edge.ports[0], get(target))
        assert body_of(raw)["path"] == forwarded
    finally:
        await edge.drain(1.0)


async def test_absolute_form_authority_replaces_host(routed: Edge, recorder: Recorder) -> None:
    raw = await raw_request(routed.ports[0], get("http://public.example/secret",
                                                 host="admin.internal"))
    body = body_of(raw)
    assert body["backend"] == "public"
    headers = body["headers"]
    assert isinstance(headers, dict)
    assert headers["Host"] == "public.example"
    assert headers["X-Forwarded-Host"] == "public.example"


async def test_http09_is_refused(routed: Edge, recorder: Recorder) -> None:
    raw = await raw_request(routed.ports[0], b"GET /\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n"), raw[:100]
    assert recorder.seen == []


SPOOFED = ("X-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6;proto=https\r\n"
           "X-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\nX-Forwarded-Prefix: /evil\r\n"
           "X-Forwarded-Scheme: https\r\nX-Forwarded-Port: 443\r\nTrue-Client-IP: 6.6.6.6\r\n"
           "X_Forwarded_For: 6.6.6.6\r\nX-Forwarded-For: 6.6.6.6\r\nX-Keep: yes\r\n")
SPOOFED_NAMES = {"X-Real-IP", "Forwarded", "X-Original-URL", "X-Rewrite-URL",
                 "X-Forwarded-Prefix", "X-Forwarded-Scheme", "X-Forwarded-Port",
                 "True-Client-IP", "X_Forwarded_For"}


async def test_client_asserted_fields_are_stripped(routed: Edge, recorder: Recorder) -> None:
    raw = await raw_request(routed.ports[0], get("/", extra=SPOOFED))
    headers = body_of(raw)["headers"]
    assert isinstance(headers, dict)
    assert SPOOFED_NAMES.isdisjoint(headers), headers
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert headers["X-Keep"] == "yes"


async def test_trusted_peer_keeps_them_and_forwarded_is_added(recorder: Recorder) -> None:
    edge = await app_edge(recorder, server='trusted_proxies = ["127.0.0.1/32"]\n'
                          "forwarded = true\nx_real_ip = true")
    try:
        raw = await raw_request(edge.ports[0], get("/", host="a.test", extra=SPOOFED))
        headers = body_of(raw)["headers"]
        assert isinstance(headers, dict)
        assert headers["X-Original-URL"] == "/admin"  # a trusted proxy's claim stands
        assert headers["X-Forwarded-For"] == "6.6.6.6, 127.0.0.1"
        assert headers["Forwarded"] == "for=6.6.6.6;proto=https, for=127.0.0.1;host=a.test;" \
                                       "proto=http"
        assert headers["X-Real-IP"] == "6.6.6.6"
        assert "X_Forwarded_For" not in headers  # underscores: dropped even when trusted
        raw = await raw_request(edge.ports[0], get("/", host="[::1]:8080"))
        headers = body_of(raw)["headers"]
        assert isinstance(headers, dict)
        assert headers["Forwarded"] == 'for=127.0.0.1;host="[::1]:8080";proto=http'
        assert headers["X-Real-IP"] == "127.0.0.1"
    finally:
        await edge.drain(1.0)


async def test_unkeyed_fields_cannot_poison_the_cache(recorder: Recorder) -> None:
    """A backend that builds its body from X-Original-URL: with the field stripped,
    what one client sends cannot reach the entry the next client is served."""
    port = await recorder.start("app", cache_control="max-age=60")
    edge = await start_proxy_with_admin(f"""
[cache]
memory_max_size = "1MiB"

[[routes]]
upstream = "app"
cache = true

[upstreams.app]
backends = ["127.0.0.1:{port}"]
""")
    try:
        raw = await raw_request(edge.ports[0], get("/page", extra="X-Original-URL: /evil\r\n"))
        assert b"/evil" not in raw
        raw = await raw_request(edge.ports[0], get("/page"))
        assert b"Cache-Status: bascule; hit" in raw and b"/evil" not in raw
    finally:
        await edge.drain(1.0)


@pytest.mark.parametrize(("request_bytes", "status"), [
    (get("/" + "a" * 9000), b"414 URI Too Long"),
    (get("/", extra="X-Big: " + "a" * 9000 + "\r\n"), b"431 Request Header Fields Too Large"),
    (get("/", extra="".join(f"X-F{i}: {'a' * 6000}\r\n" for i in range(6))),
     b"431 Request Header Fields Too Large"),
    (get("/", extra="".join(f"X-F{i}: 1\r\n" for i in range(101))),
     b"431 Request Header Fields Too Large"),
])
async def test_head_limits(routed: Edge, recorder: Recorder, request_bytes: bytes,
                           status: bytes) -> None:
    raw = await raw_request(routed.ports[0], request_bytes)
    assert raw.startswith(b"HTTP/1.1 " + status + b"\r\n"), raw[:100]
    assert b"aaaa" not in raw  # never echoed
    assert recorder.seen == []


async def test_admin_token_off_loopback(tmp_path: Path, recorder: Recorder) -> None:
    """An admin listener on 0.0.0.0 (not loopback): /status and /metrics need the
    token like the mutating endpoints; the scheme is case-insensitive."""
    port = await recorder.start("app")
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    config = parse_config(tomllib.loads(f"""
[server]
listen = ["127.0.0.1:{free_port()}"]
access_log = "off"

[admin]
listen = "0.0.0.0:{free_port()}"
token_file = "{token}"

[[routes]]
upstream = "app"

[upstreams.app]
backends = ["127.0.0.1:{port}"]
"""), "<test>")
    edge = Edge(build_runtime(config, "<test>"))
    await edge.start(admin=True)
    try:
        base = f"http://127.0.0.1:{edge.admin_port}"
        async with aiohttp.ClientSession() as session:
            for path in ("/status", "/metrics"):
                async with session.get(base + path) as resp:
                    assert resp.status == 401
                async with session.get(base + path,
                                       headers={"Authorization": "Bearer wrong"}) as resp:
                    assert resp.status == 401
                async with session.get(base + path,
                                       headers={"Authorization": "bearer s3cret"}) as resp:
                    assert resp.status == 200
            async with session.get(base + "/healthz") as resp:
                assert resp.status == 200  # liveness stays open for load balancers
    finally:
        await edge.drain(1.0)
