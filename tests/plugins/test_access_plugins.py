"""`ip_filter` and `basic_auth` end to end: a real edge and backend; addresses
spoofed by an untrusted peer and named by a trusted proxy; htpasswd files refused by
`bascule check`; a reload that reads an edited file."""

from __future__ import annotations

import base64
import ipaddress
import json
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
from aiohttp import web

from proxy.app import build_runtime
from proxy.client_address import client_address
from proxy.config import parse_config
from proxy.headers import IPNetwork
from proxy.server import Edge
from tests.helpers import free_port, port_of, start_backend

TRUSTED: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"),
                                  ipaddress.ip_network("10.0.0.0/8"))


@pytest.mark.parametrize(("peer", "xff", "expected"), [
    ("203.0.113.9", ["1.2.3.4"], "203.0.113.9"),          # untrusted peer: XFF ignored
    ("127.0.0.1", [], "127.0.0.1"),                        # trusted, nothing named
    ("127.0.0.1", ["198.51.100.7"], "198.51.100.7"),      # a trusted proxy names it
    ("127.0.0.1", ["1.1.1.1, 198.51.100.7, 10.0.0.5"], "198.51.100.7"),  # skip our hops
    ("127.0.0.1", ["1.1.1.1", "198.51.100.7"], "198.51.100.7"),  # several fields
    ("127.0.0.1", ["10.0.0.9, 10.0.0.5"], "10.0.0.9"),    # all trusted: the leftmost
    ("127.0.0.1", ["garbage, 198.51.100.7"], "198.51.100.7"),  # stops at junk
    ("127.0.0.1", ["198.51.100.7, not-an-ip"], "127.0.0.1"),
    ("127.0.0.1", ["[2001:db8::1]:4711"], "2001:db8::1"),
    ("127.0.0.1", ["198.51.100.7:4711"], "198.51.100.7"),
])
def test_the_client_address_believes_trusted_proxies_only(
        peer: str, xff: list[str], expected: str) -> None:
    from multidict import CIMultiDict

    headers: CIMultiDict[str] = CIMultiDict()
    for value in xff:
        headers.add("X-Forwarded-For", value)
    assert client_address(peer, headers, TRUSTED) == expected


@pytest.fixture
async def backend() -> AsyncIterator[int]:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.json_response({"authorization": request.headers.get("Authorization"),
                                  "user": request.headers.get("X-Auth-User")})

    server, listener = await start_backend(handler)
    yield port_of(listener)
    listener.close()
    await server.shutdown(0.1)


def config_text(backend: int, plugins: str, route_plugins: list[str],
                server: str = "") -> str:
    return f"""
[server]
listen = ["127.0.0.1:{free_port()}"]
access_log = "off"
{server}
[admin]
listen = "127.0.0.1:{free_port()}"
{plugins}
[[routes]]
upstream = "app"
plugins = {json.dumps(route_plugins)}
[upstreams.app]
backends = ["127.0.0.1:{backend}"]
"""


async def start(path: Path) -> Edge:
    config = parse_config(tomllib.loads(path.read_text()), str(path))
    edge = Edge(build_runtime(config, str(path)))
    await edge.start(admin=True)
    return edge


async def get(edge: Edge, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{edge.ports[0]}/", headers=headers or {}) as resp:
        text = await resp.text()
        body = json.loads(text) if resp.content_type == "application/json" else text
        return resp.status, body if resp.status != 401 else (body, dict(resp.headers))


async def test_ip_filter_allows_denies_and_believes_only_trusted_proxies(
        tmp_path: Path, backend: int) -> None:
    plugins = """
[[plugins]]
name = "only_office"
use = "ip_filter"
[plugins.options]
allow = ["198.51.100.0/24", "2001:db8::/32", "127.0.0.1/32"]
deny = ["198.51.100.66/32"]
"""
    path = tmp_path / "b.toml"
    # 127.0.0.1 (the test client) is not a trusted proxy: its X-Forwarded-For is ignored.
    path.write_text(config_text(backend, plugins, ["only_office"]))
    edge = await start(path)
    try:
        assert (await get(edge))[0] == 200  # 127.0.0.1 is allowed
        assert (await get(edge, {"X-Forwarded-For": "192.0.2.1"}))[0] == 200  # ignored
    finally:
        await edge.drain(1.0)
    # Now a trusted proxy (us) names clients, and the filter applies to them.
    path.write_text(config_text(backend, plugins.replace(', "127.0.0.1/32"', ""),
                                ["only_office"], 'trusted_proxies = ["127.0.0.1/32"]'))
    edge = await start(path)
    try:
        assert (await get(edge, {"X-Forwarded-For": "198.51.100.7"}))[0] == 200
        assert (await get(edge, {"X-Forwarded-For": "2001:db8::42"}))[0] == 200
        assert await get(edge, {"X-Forwarded-For": "198.51.100.66"}) == (403, "forbidden\n")
        assert (await get(edge, {"X-Forwarded-For": "192.0.2.1"}))[0] == 403
        # A client's own entry to the left of the proxy's cannot smuggle it in.
        assert (await get(edge, {"X-Forwarded-For": "198.51.100.7, 192.0.2.1"}))[0] == 403
        assert (await get(edge))[0] == 403  # the proxy itself is not on the list
    finally:
        await edge.drain(1.0)


def htpasswd(path: Path, users: dict[str, str], rounds: int = 4) -> Path:
    path.write_text("".join(
        f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds)).decode()}\n"
        for user, pw in users.items()))
    return path


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def test_basic_auth_checks_strips_and_names_the_user(tmp_path: Path,
                                                          backend: int) -> None:
    users = htpasswd(tmp_path / "users", {"ana": "s3cret", "bo": "pässwörd"})
    plugins = f"""
[[plugins]]
name = "staff"
use = "basic_auth"
options = {{ htpasswd = "{users}", realm = "staff area", user_header = "X-Auth-User" }}
"""
    path = tmp_path / "b.toml"
    path.write_text(config_text(backend, plugins, ["staff"]))
    edge = await start(path)
    try:
        status, (body, headers) = await get(edge)
        assert status == 401 and body == "authentication required\n"
        assert headers["WWW-Authenticate"] == 'Basic realm="staff area", charset="UTF-8"'
        for wrong in (basic("ana", "nope"), basic("nobody", "s3cret"),
                      {"Authorization": "Basic !!!"}, {"Authorization": "Bearer x"}):
            assert (await get(edge, wrong))[0] == 401
        for _ in range(2):  # the second time from the verified-credential cache
            status, seen = await get(edge, {**basic("ana", "s3cret"),
                                            "X-Auth-User": "admin"})  # a forged name
            assert status == 200
            assert seen == {"authorization": None, "user": "ana"}
        assert (await get(edge, basic("bo", "pässwörd")))[1]["user"] == "bo"

        # The file edited alone: a reload reads it (and says it changed).
        htpasswd(users, {"ana": "n3w"})
        async with aiohttp.ClientSession() as session, session.post(
                f"http://127.0.0.1:{edge.admin_port}/reload") as resp:
            result = await resp.json()
        assert result["result"] == "success" and result["changed"] is True
        assert (await get(edge, basic("ana", "s3cret")))[0] == 401
        assert (await get(edge, basic("ana", "n3w")))[0] == 200
        assert (await get(edge, basic("bo", "pässwörd")))[0] == 401
    finally:
        await edge.drain(1.0)


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "check", str(path)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("content", "message"), [
    ("ana\n", "line 1: not \"user:hash\""),
    ("ana:$2y$10$short\n", "line 1: malformed bcrypt hash"),
    ("ana:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n", "{SHA} is a weak hash"),
    ("ana:$apr1$abc$def\n", "MD5 ($apr1$) entries are not accepted"),
    ("ana:plain\n", "crypt or plain text entries are not accepted"),
    ("# only a comment\n", "no users"),
])
def test_a_bad_htpasswd_file_is_refused_by_check(tmp_path: Path, content: str,
                                                 message: str) -> None:
    users = tmp_path / "users"
    users.write_text(content)
    path = tmp_path / "b.toml"
    path.write_text(config_text(1, f"""
[[plugins]]
name = "staff"
use = "basic_auth"
options = {{ htpasswd = "{users}" }}
""", ["staff"]))
    result = check(path)
    assert result.returncode == 2
    assert "plugins[0].options.htpasswd" in result.stdout and message in result.stdout, \
        result.stdout


def test_weak_sha_entries_only_when_allowed(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("ana:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")  # "password"
    path = tmp_path / "b.toml"
    path.write_text(config_text(1, f"""
[[plugins]]
name = "staff"
use = "basic_auth"
options = {{ htpasswd = "{users}", allow_weak_hashes = true }}
""", ["staff"]))
    assert check(path).returncode == 0


def test_ip_filter_options_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text(config_text(1, """
[[plugins]]
name = "f"
use = "ip_filter"
options = { allow = ["10.0.0.0/33"] }
""", ["f"]))
    result = check(path)
    assert "plugins[0].options.allow: '10.0.0.0/33' is not an IP address or network" in \
        result.stdout, result.stdout


def test_a_misspelt_option_is_named(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text(config_text(1, """
[[plugins]]
name = "f"
use = "ip_filter"
options = { alow = ["10.0.0.0/8"] }
""", ["f"]))
    result = check(path)
    assert "plugins[0].options.alow: unknown option (allow, deny, message)" in \
        result.stdout, result.stdout
