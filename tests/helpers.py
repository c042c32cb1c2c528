"""Test helpers: real servers on 127.0.0.1, an in-process Bascule edge, raw sockets."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.app import build_runtime
from proxy.config import parse_config
from proxy.server import Edge

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_backend(handler: Handler, port: int | None = None) -> tuple[web.Server, Any]:
    """A real aiohttp backend; returns (server, asyncio.Server)."""
    server = web.Server(handler, access_log=None)
    listener = await asyncio.get_running_loop().create_server(
        server, "127.0.0.1", port or 0)
    return server, listener


_HELD: list[socket.socket] = []


def dead_port() -> int:
    """A loopback port that refuses connections for the rest of the session: bound, so
    no backend started later can be given it, but never listening. (A port from
    free_port() is released at once and was seen handed to the next listener.)"""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD.append(sock)
    return int(sock.getsockname()[1])


def ports_free(*ports: int) -> bool:
    """Whether every one of these loopback ports can be bound now."""
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def port_of(listener: Any) -> int:
    return int(listener.sockets[0].getsockname()[1])


def proxy_config(upstreams: dict[str, list[str]] | None = None, *, routes: str = "",
                 server: str = "", upstream_extra: str = "") -> str:
    """A config TOML with one public listener and admin on free ports."""
    lines = [f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\naccess_log = "off"\n{server}',
             f'[admin]\nlisten = "127.0.0.1:{free_port()}"']
    lines.append(routes or '[[routes]]\nupstream = "app"')
    for name, backends in (upstreams or {}).items():
        quoted = ", ".join(f'"{b}"' for b in backends)
        lines.append(f"[upstreams.{name}]\nbackends = [{quoted}]\n{upstream_extra}")
    return "\n\n".join(lines) + "\n"


def app_config_file(path: Path, backend_ids: list[str], *, workers: int = 1,
                    upstream: str = "", tables: str = "") -> tuple[Path, int, int]:
    """A config file for a Bascule process: one route to upstream "app" over
    `backend_ids` (plus `upstream`'s keys), `tables` before it; free ports.
    Returns (path, public port, admin port)."""
    port, admin = free_port(), free_port()
    ids = ", ".join(f'"{i}"' for i in backend_ids)
    path.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\nworkers = {workers}\n'
                    f'access_log = "off"\n[admin]\nlisten = "127.0.0.1:{admin}"\n{tables}\n'
                    f'[[routes]]\nupstream = "app"\n[upstreams.app]\nbackends = [{ids}]\n'
                    f"{upstream}\n")
    return path, port, admin


async def start_proxy(toml_text: str) -> Edge:
    config = parse_config(tomllib.loads(toml_text), "<test>")
    edge = Edge(build_runtime(config, "<test>"))
    await edge.start(admin=False)
    return edge


async def start_proxy_with_admin(body: str, *, admin_table: bool = True) -> Edge:
    """An edge with its admin listener, from routes/upstreams TOML (and optionally
    an [admin] table of the caller's, which then must not set listen)."""
    admin_port = free_port()
    server = f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\naccess_log = "off"\n'
    if admin_table:
        text = server + f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n' + body
    else:
        text = server + body.replace("[admin]\n",
                                     f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n', 1)
    config = parse_config(tomllib.loads(text), "<test>")
    edge = Edge(build_runtime(config, "<test>"))
    await edge.start(admin=True)
    return edge


def edge_url(edge: Edge) -> str:
    return f"http://127.0.0.1:{edge.ports[0]}"


async def raw_request(port: int, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes and read until the server closes or read_timeout passes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        async with asyncio.timeout(read_timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    except TimeoutError:
        pass
    finally:
        writer.close()
    return b"".join(chunks)


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def run_bascule(config_path: Path, **kw: Any) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, **kw)


def children_of(pid: int, name: str | None = "bascule-worker") -> list[int]:
    """Child processes of `pid`; by default its workers (named by prctl in
    proxy/workers.py), `name=None` for all of them."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and name in (None, comm):
                out.append(int(entry))
    return out


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Await `check()` until it is true, failing the test after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


class GetLoad:
    """`clients` sessions GETting `url` in a loop while the block runs: answers other
    than 200 are kept in `errors`, answered bodies counted in `seen` by `key(text)`."""

    def __init__(self, url: str, clients: int, key: Callable[[str], str] = str) -> None:
        self.url = url
        self.clients = clients
        self.key = key
        self.errors: list[str] = []
        self.seen: collections.Counter[str] = collections.Counter()
        self.stop = asyncio.Event()
        self.total = 0  # requests answered since the start
        self._tasks: list[asyncio.Future[None]] = []

    async def _client(self) -> None:
        async with aiohttp.ClientSession() as session:
            while not self.stop.is_set():
                async with session.get(self.url) as resp:
                    text = await resp.text()
                    if resp.status != 200:
                        self.errors.append(f"GET {resp.status} {text}")
                    self.seen[self.key(text)] += 1
                    self.total += 1

    async def __aenter__(self) -> GetLoad:
        self._tasks = [asyncio.ensure_future(self._client()) for _ in range(self.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await asyncio.gather(*self._tasks)

    async def more(self, count: int) -> None:
        """Wait until `count` more requests have been answered."""
        target = self.total + count

        async def enough() -> bool:
            return self.total >= target

        await eventually(enough)

    async def answered(self, key: str, count: int = 1) -> None:
        """Wait until `key` has answered `count` requests since `seen` was cleared."""
        async def enough() -> bool:
            return self.seen[key] >= count

        await eventually(enough)


def poll(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class CountingBackend:
    """A threaded HTTP/1.1 backend on 127.0.0.1 counting hits per path."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.hits: collections.Counter[str] = collections.Counter()
        self.connections: set[socket.socket] = set()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                backend.connections.add(self.connection)

            def do_GET(self) -> None:
                backend.hits[self.path] += 1
                if delay and self.path != "/health":
                    time.sleep(delay)  # a slow backend (its own thread per connection)
                body = name.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                if self.path == "/cached":
                    self.send_header("Cache-Control", "max-age=300")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.id = f"127.0.0.1:{self.port}"
        self.name = name
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.alive = True

    def stop(self) -> None:
        if self.alive:
            self.alive = False
            self.server.shutdown()
            self.server.server_close()
            for connection in list(self.connections):  # kept-alive ones die too
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
