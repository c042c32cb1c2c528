"""One worker's edge and lifecycle: the public listeners (plain, through
proxy/edge_protocol.py's protocol, and TLS, proxy/tls/), the admin listener, the
link to the discovery agent, and listen, serve, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import time
from typing import Any

from aiohttp import web

from proxy.accesslog import AccessLog
from proxy.admin import AdminApi
from proxy.agent.hub import Hub
from proxy.agent.link import AGENT_SOCKET_ENV, Link, LocalLink, SocketLink
from proxy.config import parse_hostport
from proxy.edge_protocol import BasculeServer, parser_limits
from proxy.errors import ConfigError
from proxy.forward import Forwarder
from proxy.listeners import claim_port, listen_socket
from proxy.metrics import Metrics, multiprocess_dir_is_set
from proxy.purge import PurgeBroadcast, apply_purge
from proxy.reload import Reloader
from proxy.runtime import Runtime, sweep_forever
from proxy.tls.server import (
    Terminator,
    TlsListener,
    build_certificates,
    certificate_stamps,
    front_context,
    hsts_fields,
    log_tls_warnings,
)

__all__ = ["ADMIN_BACKLOG", "PUBLIC_BACKLOG", "Edge", "serve_worker"]

PUBLIC_BACKLOG = 1024
ADMIN_BACKLOG = 128

log = logging.getLogger("bascule.server")

class Edge:
    """One worker's listeners: the public edge, the admin listener, and the
    background duties (idle-pool sweeping, metrics flushing)."""

    def __init__(self, runtime: Runtime, *, multiprocess_metrics: bool = False,
                 worker_id: int = 0, supervised: bool = False,
                 tls_front: ssl.SSLContext | None = None) -> None:
        self.worker_id = worker_id
        self.supervised = supervised
        self.reloader = Reloader(self)
        self.purges = PurgeBroadcast()
        cfg = runtime.server
        admin_cfg = runtime.config.admin
        self.metrics = Metrics(multiprocess=multiprocess_metrics,
                               max_backend_series=admin_cfg.max_backend_series,
                               enabled=admin_cfg.metrics)
        self.access_log = AccessLog(cfg.access_log, cfg.access_log_format)
        self.forwarder = Forwarder(runtime, self.metrics, self.access_log)
        self.draining = False
        self.started_at = time.time()
        self.server = BasculeServer(
            self.forwarder.handle,
            header_timeout=cfg.request_header_timeout,
            metrics=self.metrics,
            max_connections=cfg.max_connections,
            handler_cancellation=True,
            keepalive_timeout=cfg.keepalive_timeout,
            **parser_limits(cfg),
            access_log=None,
            auto_decompress=False,
            # After an early answer (413, 408) read what is left of the body only
            # briefly, so the client sees the response instead of a reset.
            lingering_time=2.0,
        )
        # TLS listeners: the front context comes from the supervisor (made before
        # forking, so workers share session-ticket keys; proxy/tls/server.py).
        self.terminator: Terminator | None = None
        tls_cfg = cfg.tls
        if tls_cfg is not None and runtime.certificates is not None:
            front = tls_front or front_context(tls_cfg, runtime.certificates)
            self.terminator = Terminator(front, runtime.certificates, tls_cfg)
            self.server.tls_response_fields = hsts_fields(tls_cfg)
        self.admin_api = AdminApi(self, runtime.config.admin)
        self.admin = web.Server(self.admin_api.handle, access_log=None)
        self.listeners: list[asyncio.Server] = []
        self.tls_listeners: list[TlsListener] = []
        self.admin_listener: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # The hub of discovery, health checks and ejections: the agent process's
        # when supervised (its socket in the environment), else one in this process.
        agent_path = os.environ.get(AGENT_SOCKET_ENV) if supervised else None
        self.link: Link = SocketLink(agent_path) if agent_path else LocalLink(
            Hub(self.metrics.families if self.metrics.enabled else None))

    async def start(self, *, admin: bool = True,
                    sockets: dict[str, socket.socket] | None = None) -> None:
        """Start serving. `sockets`: listening sockets by address, made by the
        supervisor before forking; without them (in-process use) each address is
        claimed here first, so that a port another process listens on is refused."""
        loop = asyncio.get_running_loop()
        runtime = self.forwarder.runtime
        runtime.loop = loop
        if isinstance(self.link, SocketLink):
            self.link.start()
        self.metrics.watch(lambda: self.forwarder.runtime.live_backends(),
                           lambda: self.forwarder.runtime.backend_gauges())
        self.metrics.config_loaded_now(runtime.config_hash)
        self.metrics.on_flush(lambda: self.metrics.balancing.flush(
            self.forwarder.runtime.upstreams.values()))
        for name, upstream in runtime.upstreams.items():
            if upstream.config.consul is None:
                self.metrics.record_discovery(name, "static", ok=True)
        self.start_health(runtime)
        await runtime.start_plugins(self.metrics)
        if runtime.discovery is not None:
            await runtime.discovery.start(self.metrics, register=self.worker_id <= 1,
                                          **self.discovery_args())
        if self.terminator is not None:
            self.metrics.set_certificate_expiry(self.terminator.certificates.expiry())
        if self.worker_id <= 1:
            log_tls_warnings(runtime)
        if sockets is None:
            addresses = [*runtime.server.all_listen(),
                         *([runtime.config.admin.listen] if admin else [])]
            claims = [claim_port(address) for address in addresses]
            try:
                sockets = {address: listen_socket(address) for address in addresses}
            finally:
                for claim in claims:
                    claim.close()  # the listeners themselves keep the port ours
        for address in runtime.server.listen:
            self.listeners.append(await loop.create_server(
                self.server, sock=sockets[address], backlog=PUBLIC_BACKLOG))
        if self.terminator is not None and runtime.server.tls is not None:
            for address in runtime.server.tls.listen:
                sock = sockets[address]
                sock.listen(PUBLIC_BACKLOG)
                listener = TlsListener(sock, self.server, self.terminator,
                                       self.metrics.record_tls)
                listener.start()
                self.tls_listeners.append(listener)
        if admin:
            self.admin_listener = await loop.create_server(
                self.admin, sock=sockets[runtime.config.admin.listen],
                backlog=ADMIN_BACKLOG)
        self._tasks = [
            loop.create_task(sweep_forever(lambda: self.forwarder.runtime)),
            loop.create_task(self._flush_metrics_forever()),
            loop.create_task(self.server.enforce_head_deadline()),
        ]
        if self.terminator is not None and self.terminator.cfg.watch_files:
            self._tasks.append(loop.create_task(self._watch_certificates()))
        if runtime.server.watch_config and runtime.file and os.path.exists(runtime.file):
            self._tasks.append(loop.create_task(
                self.reloader.watch_file(self.reloader.file_stamp())))

    @property
    def runtime(self) -> Runtime:
        """The runtime being served (one copy: the forwarder's, swapped by a reload)."""
        return self.forwarder.runtime

    def start_health(self, runtime: Runtime) -> None:
        loop = asyncio.get_running_loop()
        for upstream in runtime.upstreams.values():
            upstream.health.on_change = self.metrics.record_state_change
            upstream.health.start(loop, self.link)

    def discovery_args(self) -> dict[str, Any]:
        runtime = self.forwarder.runtime
        return {
            "link": self.link,
            "admin_address": parse_hostport(runtime.config.admin.listen,
                                            default_host="0.0.0.0"),
            "public_port": parse_hostport(runtime.server.listen[0],
                                          default_host="0.0.0.0")[1],
        }

    def commit(self, new: Runtime) -> None:
        """Swap in a prepared runtime: one assignment for the request path, plus the
        settings aiohttp reads when it accepts a new connection."""
        self.forwarder.runtime = new
        cfg = new.server
        self.server.header_timeout = cfg.request_header_timeout
        self.server.max_connections = cfg.max_connections
        self.server._kwargs.update(keepalive_timeout=cfg.keepalive_timeout,
                                   **parser_limits(cfg))
        self.metrics.config_loaded_now(new.config_hash)
        if self.terminator is not None and cfg.tls is not None and new.certificates:
            # New handshakes get the new certificates; open connections keep theirs.
            self.terminator.swap(new.certificates, cfg.tls)
            self.server.tls_response_fields = hsts_fields(cfg.tls)
            self.metrics.set_certificate_expiry(new.certificates.expiry())
        if self.worker_id <= 1:
            log_tls_warnings(new)

    async def _watch_certificates(self, interval: float = 1.0) -> None:
        """Re-read the certificate files when they change (a renewal by certbot or a
        secret mount), without a reload; a bad new pair is logged and changes
        nothing."""
        assert self.terminator is not None
        loop = asyncio.get_running_loop()
        stamps = certificate_stamps(self.terminator.cfg)
        while True:
            await asyncio.sleep(interval)
            terminator = self.terminator
            current = certificate_stamps(terminator.cfg)
            if current == stamps:
                continue
            stamps = current
            try:
                certificates = await loop.run_in_executor(
                    None, build_certificates, terminator.cfg, self.runtime.file)
            except ConfigError as exc:
                log.error("certificate files changed but cannot be used, still serving "
                          "the previous ones: %s", "; ".join(str(p) for p in exc.problems))
                continue
            terminator.swap(certificates, terminator.cfg)
            self.metrics.set_certificate_expiry(certificates.expiry())
            log.info("certificate files changed: %d certificate(s) reloaded",
                     len(certificates.all))


    @property
    def ports(self) -> list[int]:
        return [int(s.sockets[0].getsockname()[1]) for s in self.listeners]

    def tls_status(self) -> list[dict[str, Any]] | None:
        """The certificates served now, for /status (names, file, expiry)."""
        if self.terminator is None:
            return None
        return self.terminator.certificates.describe()

    @property
    def tls_ports(self) -> list[int]:
        return [listener.port for listener in self.tls_listeners]

    @property
    def admin_port(self) -> int:
        assert self.admin_listener is not None
        return int(self.admin_listener.sockets[0].getsockname()[1])

    async def _flush_metrics_forever(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            self.metrics.flush()

    def apply_broadcast_purges(self) -> None:
        """SIGUSR1: another worker purged its memory cache; do the same here."""
        for spec in self.purges.receive():
            asyncio.get_running_loop().create_task(
                apply_purge(self.forwarder.runtime.seams.purgeable, spec))

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let in-flight requests finish (up to timeout), close."""
        self.draining = True
        discovery = self.forwarder.runtime.discovery
        if discovery is not None:
            await discovery.stop()  # deregisters first, so Consul stops sending us traffic
        for listener in self.listeners:
            listener.close()
        for tls_listener in self.tls_listeners:
            tls_listener.close()
        # Idle keep-alive connections close now; busy ones after their response.
        self.server.pre_shutdown()
        await self.server.shutdown(timeout)
        for task in self._tasks:
            task.cancel()
        self.metrics.flush()
        if self.admin_listener is not None:
            self.admin_listener.close()
            await self.admin.shutdown(1.0)
        await self.forwarder.runtime.aclose()
        await self.link.close()
        self.access_log.close()


async def serve_worker(runtime: Runtime, worker_id: int,
                       stop_requested: list[int] | None = None,
                       sockets: dict[str, socket.socket] | None = None,
                       tls_front: ssl.SSLContext | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain in-flight requests (graceful_timeout).
    `stop_requested` holds signals that arrived before the loop's handlers existed."""
    loop = asyncio.get_running_loop()
    cfg = runtime.server
    edge = Edge(runtime, multiprocess_metrics=multiprocess_dir_is_set(), worker_id=worker_id,
                supervised=True, tls_front=tls_front)
    await edge.start(sockets=sockets)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if stop_requested:
        stop.set()
    loop.add_signal_handler(signal.SIGUSR1, edge.apply_broadcast_purges)
    loop.add_signal_handler(signal.SIGHUP,
                            lambda: loop.create_task(edge.reloader.reload()))
    log.info("worker %d serving on %s", worker_id, ", ".join(
        [*cfg.listen, *(f"{a} (TLS)" for a in (cfg.tls.listen if cfg.tls else []))]))
    await stop.wait()
    log.info("worker %d draining (up to %.1fs)", worker_id, cfg.graceful_timeout)
    await edge.drain(cfg.graceful_timeout)
    log.info("worker %d stopped", worker_id)
