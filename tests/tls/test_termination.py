"""Terminating HTTPS with a private CA (trustme): SNI selection, defaults a reviewer
signs, certificates swapped on reload and on file change while connections stay
open, bad certificates refused by `bascule check` and by reload, X-Forwarded-Proto,
the 308 to HTTPS and HSTS, handshake metrics; checked by curl and openssl too."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import ssl
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
from tests.helpers import eventually, free_port, port_of, start_backend
from tests.tls.pki import Pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
async def backend() -> AsyncIterator[dict[str, Any]]:
    """Echoes what it was sent; /slow streams for a while."""
    seen: dict[str, Any] = {}

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        seen["headers"] = dict(request.headers)
        if request.path == "/slow":
            response = web.StreamResponse()
            await response.prepare(request)
            for _ in range(10):
                await response.write(b"x" * 100)
                await asyncio.sleep(0.1)
            await response.write_eof()
            return response
        return web.Response(text="hello")

    server, listener = await start_backend(handler)
    seen["port"] = port_of(listener)
    yield seen
    listener.close()
    await server.shutdown(0.1)


def tls_config(tmp_path: Path, backend_port: int, certificates: list[tuple[Path, Path]],
               extra: str = "") -> Path:
    entries = ", ".join(f'{{ cert = "{c}", key = "{k}" }}' for c, k in certificates)
    path = tmp_path / "bascule.toml"
    path.write_text(f"""
[server]
listen = ["127.0.0.1:{free_port()}"]
access_log = "off"
[server.tls]
listen = ["127.0.0.1:{free_port()}"]
certificates = [{entries}]
{extra}
[admin]
listen = "127.0.0.1:{free_port()}"
[[routes]]
upstream = "app"
[upstreams.app]
backends = ["127.0.0.1:{backend_port}"]
""")
    return path


async def start_edge(path: Path) -> Edge:
    config = parse_config(tomllib.loads(path.read_text()), str(path))
    edge = Edge(build_runtime(config, str(path)))
    await edge.start(admin=True)
    return edge


async def served_certificate(port: int, context: ssl.SSLContext,
                             server_name: str | None) -> dict[str, Any]:
    """The certificate the listener shows for `server_name` (None: no SNI)."""
    context.check_hostname = False
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=server_name or "")
    cert = writer.get_extra_info("peercert")
    writer.close()
    return cert  # type: ignore[no-any-return]


def names_of(cert: dict[str, Any]) -> list[str]:
    return [value for kind, value in cert["subjectAltName"] if kind == "DNS"]


async def https_get(edge: Edge, pki: Pki, path: str = "/", host: str = "one.test"
                    ) -> tuple[int, dict[str, str], str]:
    connector = aiohttp.TCPConnector(ssl=pki.client_context())
    async with aiohttp.ClientSession(connector=connector) as session, session.get(
            f"https://127.0.0.1:{edge.tls_ports[0]}{path}", server_hostname=host,
            headers={"Host": host}) as resp:
        return resp.status, dict(resp.headers), await resp.text()


async def admin(edge: Edge, method: str, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(
            method, f"http://127.0.0.1:{edge.admin_port}{path}") as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if "json" in resp.content_type else text


async def test_sni_picks_exact_then_wildcard_else_the_first(
        tmp_path: Path, pki: Pki, backend: dict[str, Any]) -> None:
    default = pki.issue("default.test")
    one = pki.issue("one.test", "www.one.test")
    wild = pki.issue("*.wild.test")
    edge = await start_edge(tls_config(tmp_path, backend["port"], [default, one, wild]))
    try:
        port, context = edge.tls_ports[0], pki.client_context()
        assert names_of(await served_certificate(port, context, "one.test")) == \
            ["one.test", "www.one.test"]
        assert names_of(await served_certificate(port, context, "WWW.One.Test")) == \
            ["one.test", "www.one.test"]
        assert names_of(await served_certificate(port, context, "a.wild.test")) == \
            ["*.wild.test"]
        # A wildcard is one label: neither the bare name nor two labels.
        assert names_of(await served_certificate(port, context, "wild.test")) == \
            ["default.test"]
        assert names_of(await served_certificate(port, context, "a.b.wild.test")) == \
            ["default.test"]
        assert names_of(await served_certificate(port, context, "unknown.test")) == \
            ["default.test"]
        assert names_of(await served_certificate(port, context, None)) == ["default.test"]
        # And a verifying client gets through with the name checked.
        status, _, body = await https_get(edge, pki, host="www.one.test")
        assert (status, body) == (200, "hello")
        assert backend["headers"]["X-Forwarded-Proto"] == "https"
        _, doc = await admin(edge, "GET", "/status")
        assert [c["names"] for c in doc["tls"]] == [
            ["default.test"], ["one.test", "www.one.test"], ["*.wild.test"]]
    finally:
        await edge.drain(1.0)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_old_protocols_and_plain_http_are_refused_and_counted(
        tmp_path: Path, pki: Pki, backend: dict[str, Any]) -> None:
    edge = await start_edge(tls_config(tmp_path, backend["port"], [pki.issue("one.test")]))
    try:
        port = edge.tls_ports[0]
        old_versions = [getattr(ssl.TLSVersion, name) for name in ("TLSv1", "TLSv1_1")]
        for version in old_versions:
            context = pki.client_context()
            context.set_ciphers("ALL:@SECLEVEL=0")  # let the client offer them at all
            context.minimum_version = context.maximum_version = version
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await served_certificate(port, context, "one.test")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: one.test\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no answer
        writer.close()
        modern = pki.client_context()
        modern.maximum_version = ssl.TLSVersion.TLSv1_2
        assert names_of(await served_certificate(port, modern, "one.test")) == ["one.test"]
        edge.metrics.flush()
        text = edge.metrics.exposition().decode()
        assert 'bascule_tls_handshake_failures_total{reason="protocol_version"} 2.0' in text
        assert 'bascule_tls_handshake_failures_total{reason="plain_http"} 1.0' in text
        assert 'bascule_tls_handshakes_total{version="TLSv1.2"} 1.0' in text
        assert 'bascule_tls_certificate_expiry_timestamp_seconds{name="one.test"}' in text
    finally:
        await edge.drain(1.0)


async def test_a_renewed_certificate_is_served_after_reload_while_an_old_connection_finishes(
        tmp_path: Path, pki: Pki, backend: dict[str, Any]) -> None:
    cert, key = pki.issue("one.test", stem="live")
    path = tls_config(tmp_path, backend["port"], [(cert, key)], "watch_files = false")
    edge = await start_edge(path)
    try:
        before = await served_certificate(edge.tls_ports[0], pki.client_context(), "one.test")
        connector = aiohttp.TCPConnector(ssl=pki.client_context())
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.get(f"https://127.0.0.1:{edge.tls_ports[0]}/slow",
                                   server_hostname="one.test") as resp:
                first = await resp.content.read(100)  # the long answer has begun
                renewed_cert, renewed_key = pki.issue("one.test", stem="renewed")
                shutil.copy(renewed_cert, cert)
                shutil.copy(renewed_key, key)
                status, result = await admin(edge, "POST", "/reload")
                rest = await resp.content.read()
            assert status == 200 and result["result"] == "success"
            assert resp.status == 200 and len(first + rest) == 1000  # not cut
        after = await served_certificate(edge.tls_ports[0], pki.client_context(), "one.test")
        assert after["serialNumber"] != before["serialNumber"]
    finally:
        await edge.drain(1.0)


async def test_changed_files_are_picked_up_without_a_reload(
        tmp_path: Path, pki: Pki, backend: dict[str, Any]) -> None:
    cert, key = pki.issue("one.test", stem="live")
    edge = await start_edge(tls_config(tmp_path, backend["port"], [(cert, key)]))
    try:
        before = await served_certificate(edge.tls_ports[0], pki.client_context(), "one.test")
        renewed_cert, renewed_key = pki.issue("one.test", stem="renewed")
        shutil.copy(renewed_key, key)
        shutil.copy(renewed_cert, cert)

        async def renewed() -> bool:
            now = await served_certificate(edge.tls_ports[0], pki.client_context(),
                                           "one.test")
            return bool(now["serialNumber"] != before["serialNumber"])

        await eventually(renewed, timeout=10)
    finally:
        await edge.drain(1.0)


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "check", str(path)],
                          capture_output=True, text=True, timeout=60)


async def test_bad_certificates_are_refused_by_check_and_by_reload(
        tmp_path: Path, pki: Pki, backend: dict[str, Any]) -> None:
    good = pki.issue("one.test", stem="good")
    other = pki.issue("two.test", stem="other")
    now = dt.datetime.now(dt.UTC)
    expired = pki.issue("old.test", stem="expired", not_before=now - dt.timedelta(days=30),
                        not_after=now - dt.timedelta(days=1))
    future = pki.issue("new.test", stem="future", not_before=now + dt.timedelta(days=2),
                       not_after=now + dt.timedelta(days=90))
    cases = [
        ((good[0], other[1]), f"{other[1]}: the key does not match the certificate {good[0]}"),
        (expired, f"{expired[0]}: expired on"),
        (future, f"{future[0]}: not valid before"),
        ((good[1], good[1]), f"{good[1]}: not a PEM certificate"),
    ]
    for pair, message in cases:
        result = check(tls_config(tmp_path, backend["port"], [pair]))
        assert result.returncode == 2
        assert "server.tls.certificates[0]" in result.stdout and message in result.stdout, \
            result.stdout
    # An encrypted key: refused without its password, served with it.
    locked = pki.issue("one.test", stem="locked", password=b"s3cret")
    result = check(tls_config(tmp_path, backend["port"], [locked]))
    assert "the key is encrypted; give password_file" in result.stdout
    (tmp_path / "pass").write_text("s3cret\n")
    path = tmp_path / "locked.toml"
    path.write_text(tls_config(tmp_path, backend["port"], [locked]).read_text().replace(
        f'key = "{locked[1]}" }}', f'key = "{locked[1]}", password_file = "{tmp_path}/pass" }}'))
    assert check(path).returncode == 0

    # Reload with a mismatched pair: an error, and the running certificate stays.
    live = tls_config(tmp_path, backend["port"], [good], "watch_files = false")
    edge = await start_edge(live)
    try:
        live.write_text(live.read_text().replace(f'key = "{good[1]}"', f'key = "{other[1]}"'))
        status, result = await admin(edge, "POST", "/reload")
        assert status == 400 and "the key does not match" in result["error"]
        assert names_of(await served_certificate(edge.tls_ports[0], pki.client_context(),
                                                 "one.test")) == ["one.test"]
    finally:
        await edge.drain(1.0)


async def test_plain_http_redirects_to_https_and_tls_answers_carry_hsts(
        tmp_path: Path, pki: Pki, backend: dict[str, Any]) -> None:
    edge = await start_edge(tls_config(
        tmp_path, backend["port"], [pki.issue("one.test")],
        'redirect_http = true\nhsts = "max-age=63072000; includeSubDomains"'))
    try:
        async with aiohttp.ClientSession() as session, session.post(
                f"http://127.0.0.1:{edge.ports[0]}/a/b?x=1&y=2", data=b"body",
                headers={"Host": "one.test:8080"}, allow_redirects=False) as resp:
            assert resp.status == 308
            assert resp.headers["Location"] == \
                f"https://one.test:{edge.tls_ports[0]}/a/b?x=1&y=2"
            assert "Strict-Transport-Security" not in resp.headers  # never over plain
        status, headers, _ = await https_get(edge, pki)
        assert status == 200
        assert headers["Strict-Transport-Security"] == "max-age=63072000; includeSubDomains"
    finally:
        await edge.drain(1.0)


async def test_curl_and_openssl_agree(tmp_path: Path, pki: Pki,
                                      backend: dict[str, Any]) -> None:
    assert shutil.which("curl") and shutil.which("openssl"), \
        "curl and openssl missing: `make test` installs them"
    edge = await start_edge(tls_config(tmp_path, backend["port"], [pki.issue("one.test")]))
    try:
        port = edge.tls_ports[0]
        curl = await asyncio.to_thread(subprocess.run, [
            "curl", "-sS", "--cacert", str(pki.ca_file), "--resolve",
            f"one.test:{port}:127.0.0.1", f"https://one.test:{port}/", "-w",
            " %{http_version} %{ssl_verify_result}"], capture_output=True, text=True,
            timeout=30)
        assert curl.stdout == "hello 1.1 0", curl.stderr
        s_client = await asyncio.to_thread(subprocess.run, [
            "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername",
            "one.test", "-CAfile", str(pki.ca_file), "-alpn", "h2,http/1.1",
            "-verify_return_error"], input="", capture_output=True, text=True,
            timeout=30)
        out = s_client.stdout + s_client.stderr
        assert "Verify return code: 0 (ok)" in out and "ALPN protocol: http/1.1" in out, out
        assert "New, TLSv1.3, Cipher is TLS_AES_256_GCM_SHA384" in out, out
        for old in ("-tls1", "-tls1_1"):
            refused = await asyncio.to_thread(subprocess.run, [
                "openssl", "s_client", "-connect", f"127.0.0.1:{port}", old, "-cipher",
                "ALL:@SECLEVEL=0"], input="", capture_output=True, text=True, timeout=30)
            assert refused.returncode != 0
    finally:
        await edge.drain(1.0)

