"""`rewrite` and `redirect`: tables of rules, what reaches the backend and what the
client is told, patterns RE2 refuses at load, and a pathological path against a
pattern that makes a backtracking engine take exponential time."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from plugins.redirect import Redirect
from plugins.rewrite import Rewrite
from proxy.app import build_runtime
from proxy.config import parse_config
from proxy.plugin import ProxyRequest
from proxy.server import Edge
from tests.helpers import free_port, port_of, start_backend


def request(target: str, host: str = "site.test", scheme: str = "http") -> ProxyRequest:
    return ProxyRequest("GET", target, CIMultiDict({"Host": host}), "127.0.0.1", "r", "u",
                        scheme=scheme)


REWRITE = Rewrite({
    "path": [{"match": "^/api/v1/(.*)$", "replace": "/v1/$1"},
             {"match": "^/u/(?P<user>[^/]+)/(.*)$", "replace": "/users/${user}/$2"},
             {"match": "^/cost$", "replace": "/price$$"}],
    "query_set": {"src": "edge"}, "query_remove": ["debug"],
})


@pytest.mark.parametrize(("target", "expected"), [
    ("/api/v1/items?id=3", "/v1/items?id=3&src=edge"),
    ("/api/v1/items?debug=1&id=3&debug", "/v1/items?id=3&src=edge"),
    ("/u/ana/photos/1", "/users/ana/photos/1?src=edge"),
    ("/cost", "/price$?src=edge"),
    ("/other?src=client", "/other?src=edge"),  # set replaces the client's value
    ("/api/v1/%2e%2e/x", "/v1/%2e%2e/x?src=edge"),  # bytes kept as received
])
def test_rewrite_table(target: str, expected: str) -> None:
    assert REWRITE.rewrite_target(target) == expected


REDIRECT = Redirect({"rules": [
    {"match": "^/old/(.*)$", "to": "/new/$1", "status": 301},
    {"match": "^/docs/(.*)$", "to": "https://docs.example.com/$1", "status": 308,
     "keep_query": False},
    {"match": "^/search$", "to": "/find?from=search"},
]})


@pytest.mark.parametrize(("target", "expected"), [
    ("/old/a/b?x=1", (301, "/new/a/b?x=1")),
    ("/docs/guide?x=1", (308, "https://docs.example.com/guide")),
    ("/search?q=z", (302, "/find?from=search&q=z")),
    ("/elsewhere", None),
])
def test_redirect_table(target: str, expected: tuple[int, str] | None) -> None:
    assert REDIRECT.location(request(target)) == expected


def test_https_redirect_keeps_the_target_and_only_for_plain_requests() -> None:
    https = Redirect({"https": True})
    assert https.location(request("/a?b=1", host="site.test:8080")) == \
        (308, "https://site.test/a?b=1")
    assert https.location(request("/a", host="[2001:db8::1]:8080")) == \
        (308, "https://[2001:db8::1]/a")
    assert https.location(request("/a", scheme="https")) is None
    assert Redirect({"https": True, "https_port": 8443}).location(request("/")) == \
        (308, "https://site.test:8443/")


@pytest.mark.parametrize(("options", "message"), [
    ({"path": [{"match": "(a)\\1", "replace": "/x"}]}, "is not a pattern RE2 accepts"),
    ({"path": [{"match": "(?=a)", "replace": "/x"}]}, "is not a pattern RE2 accepts"),
    ({"path": [{"match": "^/(a)$", "replace": "/$2"}]}, "$2 but the pattern has only 1"),
    ({"path": [{"match": "^/(a)$", "replace": "/x y"}]}, "whitespace or control"),
    ({"path": [{"match": "^/(a)$", "replace": "/${nope}"}]}, "no group named 'nope'"),
    ({"host": "a b"}, "host: must be a host name"),
    ({}, "give path rules, host, query_set or query_remove"),
])
def test_rewrite_refusals(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("$", r"\$").replace("(", r"\(")):
        Rewrite(options)


def test_redirect_refusals() -> None:
    with pytest.raises(ValueError, match="status: must be one of"):
        Redirect({"rules": [{"match": "^/", "to": "/x", "status": 200}]})
    with pytest.raises(ValueError, match="rules: give rules, or https = true"):
        Redirect({})


async def test_a_pathological_path_is_matched_in_linear_time() -> None:
    # ^(a+)+$ against "aaaa…!" takes exponential time in a backtracking engine:
    # Python's re does not finish at 40 characters. RE2 is linear: 100 000 here, done
    # at once (the bound only detects a hang; it is not a speed measure).
    evil = Rewrite({"path": [{"match": "^/(a+)+$", "replace": "/x"}]})
    path = "/" + "a" * 100_000 + "!"
    result = await asyncio.wait_for(asyncio.to_thread(evil.rewrite_target, path), 30)
    assert result == path  # no match: unchanged


@pytest.fixture
async def backend() -> AsyncIterator[int]:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.json_response({"target": request.raw_path,
                                  "host": request.headers.get("Host")})

    server, listener = await start_backend(handler)
    yield port_of(listener)
    listener.close()
    await server.shutdown(0.1)


async def test_both_end_to_end(backend: int) -> None:
    text = f"""
[server]
listen = ["127.0.0.1:{free_port()}"]
access_log = "off"
[[plugins]]
name = "moved"
use = "redirect"
options = {{ rules = [{{ match = "^/old/(.*)$", to = "/new/$1", status = 301 }}] }}
[[plugins]]
name = "v1"
use = "rewrite"
options = {{ path = [{{ match = "^/api/v1/(.*)$", replace = "/v1/$1" }}], host = "internal.test" }}
[[routes]]
upstream = "app"
plugins = ["moved", "v1"]
[upstreams.app]
backends = ["127.0.0.1:{backend}"]
"""
    edge = Edge(build_runtime(parse_config(tomllib.loads(text), "<test>"), "<test>"))
    await edge.start(admin=False)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{edge.ports[0]}/api/v1/items?x=1",
                                   headers={"Host": "site.test"}) as resp:
                assert await resp.json() == {"target": "/v1/items?x=1",
                                             "host": "internal.test"}
            async with session.get(f"http://127.0.0.1:{edge.ports[0]}/old/page",
                                   allow_redirects=False) as resp:
                assert resp.status == 301 and resp.headers["Location"] == "/new/page"
            # The loop stays responsive while a pathological path is matched.
            evil = "/old" + "/a" * 2000
            async with session.get(f"http://127.0.0.1:{edge.ports[0]}{evil}",
                                   allow_redirects=False) as resp:
                assert resp.status == 301
    finally:
        await edge.drain(1.0)


def test_check_names_the_option(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text(f"""
[server]
listen = ["127.0.0.1:{free_port()}"]
[[plugins]]
name = "v1"
use = "rewrite"
options = {{ path = [{{ match = "(?<=x)y", replace = "/z" }}] }}
[[routes]]
upstream = "app"
plugins = ["v1"]
[upstreams.app]
backends = ["127.0.0.1:1"]
""")
    result = subprocess.run([sys.executable, "-m", "proxy", "check", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "plugins[0].options.path[0].match:" in result.stdout, result.stdout
    assert "not linear-time" in result.stdout and "re2.cc" not in result.stderr
