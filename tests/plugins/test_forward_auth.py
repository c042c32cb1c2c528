"""`forward_auth` against a real authentication service: 2xx lets through with the
named headers copied (a client's own values removed), other answers go back as they
are (a redirect to a login page, a 403 with its body), a dead service is 503 and a
slow one 504 — never let through — and the service is asked over kept-alive
connections."""

from __future__ import annotations

import asyncio
import json
import tomllib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import build_runtime
from proxy.config import parse_config
from proxy.server import Edge
from tests.helpers import dead_port, free_port, port_of, start_backend


class AuthService:
    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.delay = 0.0
        self.port = 0
        self.server: Any = None
        self.listener: Any = None
        self.connections: set[Any] = set()

    async def handler(self, request: web.BaseRequest) -> web.StreamResponse:
        self.seen.append(dict(request.headers))
        self.connections.add(request.transport)
        if self.delay:
            await asyncio.sleep(self.delay)
        auth = request.headers.get("Authorization", "")
        if auth == "Bearer good":
            return web.Response(text="ok", headers={"X-Auth-User": "ana",
                                                    "X-Other": "not copied"})
        if auth == "Bearer forbidden":
            return web.Response(status=403, text="not for you",
                                headers={"X-Reason": "policy"})
        return web.Response(status=302, text="login first",
                            headers={"Location": "https://login.example/?next=/x"})

    async def __aenter__(self) -> AuthService:
        self.server, self.listener = await start_backend(self.handler)
        self.port = port_of(self.listener)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.listener.close()
        await self.server.shutdown(0.1)


@pytest.fixture
async def backend() -> AsyncIterator[int]:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.json_response({"user": request.headers.getall("X-Auth-User", []),
                                  "other": request.headers.get("X-Other"),
                                  "body": (await request.read()).decode()})

    server, listener = await start_backend(handler)
    yield port_of(listener)
    listener.close()
    await server.shutdown(0.1)


async def edge_with(backend: int, auth_port: int, timeout: str = "2s") -> Edge:
    text = f"""
[server]
listen = ["127.0.0.1:{free_port()}"]
access_log = "off"
[[plugins]]
name = "sso"
use = "forward_auth"
[plugins.options]
url = "http://127.0.0.1:{auth_port}/verify"
timeout = "{timeout}"
response_headers = ["X-Auth-User"]
[[routes]]
upstream = "app"
plugins = ["sso"]
[upstreams.app]
backends = ["127.0.0.1:{backend}"]
"""
    edge = Edge(build_runtime(parse_config(tomllib.loads(text), "<test>"), "<test>"))
    await edge.start(admin=False)
    return edge


async def call(edge: Edge, headers: dict[str, str], data: bytes = b""
               ) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{edge.ports[0]}/x?y=1", headers=headers, data=data,
            allow_redirects=False) as resp:
        return resp.status, dict(resp.headers), await resp.text()


async def test_a_2xx_lets_through_with_the_named_headers(backend: int) -> None:
    async with AuthService() as auth:
        edge = await edge_with(backend, auth.port)
        try:
            for _ in range(3):
                status, _, text = await call(edge, {"Authorization": "Bearer good",
                                                    "X-Auth-User": "admin"}, b"payload")
                assert status == 200
                assert json.loads(text) == {"user": ["ana"], "other": None,
                                            "body": "payload"}
            asked = auth.seen[-1]
            assert asked["X-Forwarded-Method"] == "POST"
            assert asked["X-Forwarded-Uri"] == "/x?y=1"
            assert asked["X-Forwarded-Proto"] == "http"
            assert asked["X-Forwarded-For"] == "127.0.0.1"
            assert asked["Authorization"] == "Bearer good"
            assert "Content-Length" not in asked  # the body is not sent to the service
            assert len(auth.connections) == 1  # asked over one kept-alive connection
        finally:
            await edge.drain(1.0)


async def test_other_answers_go_back_as_they_are(backend: int) -> None:
    async with AuthService() as auth:
        edge = await edge_with(backend, auth.port)
        try:
            status, headers, text = await call(edge, {})
            assert (status, text) == (302, "login first")
            assert headers["Location"] == "https://login.example/?next=/x"
            status, headers, text = await call(edge, {"Authorization": "Bearer forbidden"})
            assert (status, text, headers["X-Reason"]) == (403, "not for you", "policy")
        finally:
            await edge.drain(1.0)


async def test_a_dead_or_slow_service_never_lets_through(backend: int) -> None:
    edge = await edge_with(backend, dead_port())
    try:
        status, _, text = await call(edge, {"Authorization": "Bearer good"})
        assert (status, text) == (503, "authentication service unavailable\n")
    finally:
        await edge.drain(1.0)
    async with AuthService() as auth:
        auth.delay = 2.0
        edge = await edge_with(backend, auth.port, timeout="200ms")
        try:
            status, _, text = await asyncio.wait_for(
                call(edge, {"Authorization": "Bearer good"}), 5)
            assert (status, text) == (504, "authentication service timed out\n")
        finally:
            await edge.drain(1.0)


def test_the_url_is_checked() -> None:
    from plugins.forward_auth import ForwardAuth

    with pytest.raises(ValueError, match="url: must be an http"):
        ForwardAuth({"url": "ftp://x"})
    with pytest.raises(ValueError, match="timeout:"):
        ForwardAuth({"url": "http://x", "timeout": 3})
