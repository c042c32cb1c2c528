"""`headers`: rules in both directions with variables, the security preset over plain
HTTP and TLS, and the values and names refused by `bascule check`."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import build_runtime
from proxy.config import parse_config
from proxy.server import Edge
from tests.helpers import free_port, port_of, start_backend
from tests.tls.pki import Pki


@pytest.fixture
async def backend() -> AsyncIterator[int]:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        body = json.dumps({k: request.headers.getall(k) for k in request.headers})
        return web.Response(text=body, content_type="application/json",
                            headers={"Server": "app/1.0", "X-Powered-By": "php",
                                     "X-Frame-Options": "DENY"})

    server, listener = await start_backend(handler)
    yield port_of(listener)
    listener.close()
    await server.shutdown(0.1)


def config(backend: int, options: str, tls: str = "") -> str:
    return f"""
[server]
listen = ["127.0.0.1:{free_port()}"]
access_log = "off"
trusted_proxies = ["127.0.0.1/32"]
{tls}
[[plugins]]
name = "shape"
use = "headers"
[plugins.options]
{options}
[[routes]]
name = "web"
upstream = "app"
plugins = ["shape"]
[upstreams.app]
backends = ["127.0.0.1:{backend}"]
"""


async def start(text: str) -> Edge:
    edge = Edge(build_runtime(parse_config(tomllib.loads(text), "<test>"), "<test>"))
    await edge.start(admin=False)
    return edge


RULES = '''
request_remove = ["X-Debug"]
request_set.X-Client = "${client}"
request_set.X-Route = "${route}/${upstream}"
request_set.X-Id = "${request_id}"
request_add = { "X-Tag" = "bascule" }
response_remove = ["Server", "X-Powered-By"]
response_set = { "Cache-Control" = "no-store" }
response_add = { "X-Served-By" = "${scheme}://${host}" }
security = true
'''


async def test_rules_apply_both_ways_with_variables(backend: int) -> None:
    edge = await start(config(backend, RULES))
    try:
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{edge.ports[0]}/", headers={
                    "X-Debug": "1", "X-Client": "forged", "X-Tag": "client",
                    "X-Forwarded-For": "198.51.100.7", "Host": "site.test"}) as resp:
            seen: dict[str, Any] = await resp.json()
            headers = resp.headers
        assert "X-Debug" not in seen
        assert seen["X-Client"] == ["198.51.100.7"]  # via the trusted proxy, not forged
        assert seen["X-Route"] == ["web/app"]
        assert seen["X-Id"][0] == seen["X-Request-ID"][0] != ""  # the forwarded id
        assert seen["X-Tag"] == ["client", "bascule"]
        assert "Server" not in headers and "X-Powered-By" not in headers
        assert headers["Cache-Control"] == "no-store"
        assert headers["X-Served-By"] == "http://site.test"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "strict-origin-when-cross-origin"
        assert headers["X-Frame-Options"] == "DENY"  # the backend's own value stays
        assert "Strict-Transport-Security" not in headers  # not over plain HTTP
    finally:
        await edge.drain(1.0)


async def test_the_security_preset_pins_hsts_over_tls_only(backend: int,
                                                           tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    cert, key = pki.issue("site.test")
    tls = (f'[server.tls]\nlisten = ["127.0.0.1:{free_port()}"]\n'
           f'certificates = [{{ cert = "{cert}", key = "{key}" }}]\n')
    edge = await start(config(backend, 'security = true\nframe_ancestors = "\'self\'"', tls))
    try:
        connector = aiohttp.TCPConnector(ssl=pki.client_context())
        async with aiohttp.ClientSession(connector=connector) as session, session.get(
                f"https://127.0.0.1:{edge.tls_ports[0]}/", server_hostname="site.test",
                headers={"Host": "site.test"}) as resp:
            headers = resp.headers
        assert headers["Strict-Transport-Security"] == "max-age=63072000; includeSubDomains"
        assert headers["Content-Security-Policy"] == "frame-ancestors 'self'"
    finally:
        await edge.drain(1.0)


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "check", str(path)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("options", "message"), [
    ('response_set = { "X-A" = "a\\r\\nSet-Cookie: x=1" }',
     "response_set: the value of X-A contains CR, LF or NUL"),
    ('request_set = { "X-A" = "nul\\u0000" }', "contains CR, LF or NUL"),
    ('request_set = { "Content-Length" = "5" }', "Content-Length is hop-by-hop or framing"),
    ('response_remove = ["Connection"]', "Connection is hop-by-hop or framing"),
    ('request_add = { "Transfer-Encoding" = "chunked" }', "Transfer-Encoding is hop-by-hop"),
    ('request_set = { "Bad Name" = "x" }', "'Bad Name' is not a header field name"),
    ('request_set = { "X-A" = "${secret}" }', "unknown variable ${secret} in X-A"),
    ('security = "yes"', "security: must be true or false"),
])
def test_values_and_names_are_refused_at_load(tmp_path: Path, options: str,
                                              message: str) -> None:
    path = tmp_path / "b.toml"
    path.write_text(config(1, options))
    result = check(path)
    assert result.returncode == 2
    assert "plugins[0].options." in result.stdout and message in result.stdout, \
        result.stdout
