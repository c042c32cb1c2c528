"""TLS with several workers, for real (`bascule run`): a session ticket issued by one
worker resumes on the others, because the supervisor made the front context (and
its ticket keys) before forking."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.helpers import free_port, poll, port_of, start_backend, wait_port
from tests.tls.pki import Pki

pytestmark = pytest.mark.slow


def fetch(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None
          ) -> tuple[bool, ssl.SSLSession | None, int]:
    """One request on a new connection: (resumed?, the session to reuse, the server
    worker's pid as the backend saw it... here: the local port for spreading)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="one.test", session=session) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: one.test\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:100]
        return tls.session_reused, tls.session, tls.getsockname()[1]


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
async def test_sessions_resume_across_workers(tmp_path: Path, procs: list[Any],
                                              version: str) -> None:
    pki = Pki(tmp_path)
    cert, key = pki.issue("one.test")

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(text="ok")

    server, listener = await start_backend(handler)
    tls_port = free_port()
    config = tmp_path / "bascule.toml"
    config.write_text(f"""
[server]
listen = ["127.0.0.1:{free_port()}"]
workers = 2
access_log = "off"
[server.tls]
listen = ["127.0.0.1:{tls_port}"]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
[admin]
listen = "127.0.0.1:{free_port()}"
[[routes]]
upstream = "app"
[upstreams.app]
backends = ["127.0.0.1:{port_of(listener)}"]
""")
    log = tmp_path / "bascule.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(config)],
                                stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    procs.append(proc)
    try:
        await asyncio.to_thread(wait_port, tls_port, 30)
        assert await asyncio.to_thread(
            poll, lambda: log.read_text().count("(TLS)\n") >= 2, 30), log.read_text()
        context = pki.client_context()
        context.minimum_version = context.maximum_version = getattr(
            ssl.TLSVersion, version.replace(".", "_"))
        resumed, session, _ = await asyncio.to_thread(fetch, tls_port, context, None)
        assert not resumed and session is not None
        results = [await asyncio.to_thread(fetch, tls_port, context, session)
                   for _ in range(12)]
        # Twelve new connections land on both workers (SO_REUSEPORT hashes each
        # one); every one resumed the first worker's session.
        assert all(reused for reused, _, _ in results), results
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
        listener.close()
        await server.shutdown(0.1)
