"""`bascule demo`: three small local backends that answer with their own name (like
Traefik's whoami) and Bascule balancing across them, in one command."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import tomllib

from aiohttp import web

from proxy.config import parse_config
from proxy.workers import run_supervisor

__all__ = ["DEMO_CONFIG", "run_demo", "serve_whoami"]

log = logging.getLogger("bascule.demo")

DEMO_PORTS = (9001, 9002, 9003)
DEMO_CONFIG = """
[server]
listen = ["127.0.0.1:8080"]
workers = 1

[admin]
listen = "127.0.0.1:9901"

[[routes]]
path_prefix = "/"
upstream = "demo"

[upstreams.demo]
strategy = "round_robin"
backends = ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]
"""


async def serve_whoami(ports: tuple[int, ...], host: str = "127.0.0.1") -> None:
    async def whoami(request: web.BaseRequest) -> web.Response:
        name = f"backend-{request.transport.get_extra_info('sockname')[1]}"  # type: ignore[union-attr]
        lines = [f"Hostname: {name}", f"{request.method} {request.raw_path} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in request.headers.items()]
        return web.Response(text="\n".join(lines) + "\n", headers={"X-Backend": name})

    servers = []
    for port in ports:
        servers.append(await asyncio.get_running_loop().create_server(
            web.Server(whoami, access_log=None), host, port))
    log.info("demo backends on %s", ", ".join(f"{host}:{p}" for p in ports))
    await asyncio.Event().wait()


def run_demo() -> int:
    config = parse_config(tomllib.loads(DEMO_CONFIG), "<demo>")
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            asyncio.run(serve_whoami(DEMO_PORTS))
        finally:
            os._exit(0)
    print("Bascule demo: http://127.0.0.1:8080/ balances over three backends "
          f"({', '.join(f'127.0.0.1:{p}' for p in DEMO_PORTS)}); try:\n"
          "  for i in 1 2 3 4; do curl -s http://127.0.0.1:8080/ | head -1; done\n"
          "Ctrl-C stops it.", flush=True)
    try:
        return run_supervisor(config, "<demo>")
    finally:
        # Ctrl-C reaches the whole process group: the backends may be gone already.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
