"""The admin listener's endpoints (never on a public listener): GET /healthz,
/metrics, /status; POST /reload, /cache/purge, /backends/drain and /backends/enable.

Off loopback, the mutating endpoints need the bearer token of `admin.token_file`
(refused without one), and so do /status and /metrics when a token is set and
`admin.protect_reads` is on. The scheme is matched case-insensitively (RFC 9110
§11.1) and the token compared in constant time. /healthz stays open for load
balancers.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import signal
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy import __version__
from proxy.agent.link import Link
from proxy.config import AdminConfig, parse_hostport
from proxy.dashboard.assets import SECURITY_HEADERS, asset_response
from proxy.dashboard.state import dashboard_state
from proxy.metrics import Metrics
from proxy.purge import PurgeBroadcast, PurgeSpec, apply_purge
from proxy.reload import Reloader
from proxy.runtime import Runtime

__all__ = ["AdminApi", "AdminHost"]

log = logging.getLogger("bascule.admin")


class AdminHost(Protocol):
    """What the admin endpoints read of the worker they belong to (server.Edge)."""

    @property
    def runtime(self) -> Runtime: ...  # the one being served

    reloader: Reloader
    metrics: Metrics
    purges: PurgeBroadcast
    supervised: bool
    draining: bool
    link: Link  # to the agent, which keeps the operator's drains for every worker
    worker_id: int
    started_at: float

    def tls_status(self) -> list[dict[str, Any]] | None: ...  # served certificates


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AdminApi:
    def __init__(self, host: AdminHost, config: AdminConfig) -> None:
        self.host = host
        self.admin_is_loopback = _is_loopback(
            parse_hostport(config.listen, default_host="0.0.0.0")[0])
        self.admin_token: str | None = None
        if config.token_file:
            with open(config.token_file, encoding="utf-8") as fh:
                self.admin_token = fh.read().strip() or None

    def _refuse_mutation(self, request: web.BaseRequest) -> web.Response | None:
        """The answer to a mutating endpoint's request when it must not go ahead
        (not a POST, or not allowed), else None."""
        if request.method != "POST":
            return web.Response(status=405, text="method not allowed\n",
                                headers={"Allow": "POST"})
        return self._may_mutate(request)

    def _may_mutate(self, request: web.BaseRequest) -> web.Response | None:
        """Mutating endpoints need the bearer token unless the listener is loopback."""
        if self.admin_is_loopback:
            return None
        if self.admin_token is None:
            return web.Response(status=403, text="set admin.token_file to use this "
                                "endpoint on a non-loopback admin listener\n")
        return self._check_token(request)

    def _may_read(self, request: web.BaseRequest) -> web.Response | None:
        """/status and /metrics off loopback: the token too, when one is set and
        admin.protect_reads is on (a listener without a token stays readable, as
        Prometheus scrapers expect, but cannot mutate)."""
        if (self.admin_is_loopback or self.admin_token is None
                or not self.host.runtime.config.admin.protect_reads):
            return None
        return self._check_token(request)

    def _check_token(self, request: web.BaseRequest) -> web.Response | None:
        # RFC 9110 §11.1: the scheme is case-insensitive; the token is compared in
        # constant time so its bytes cannot be found by timing.
        scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
        expected = self.admin_token or ""
        if scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode(), expected.encode()):
            return None
        return web.Response(status=401, text="bearer token required\n",
                            headers={"WWW-Authenticate": "Bearer"})

    def _refuse_cross_site(self, request: web.BaseRequest) -> web.Response | None:
        """What a browser can be made to send: refused when another site asks
        (Fetch Metadata's Sec-Fetch-Site, or an Origin other than this one; OWASP's
        CSRF cheat sheet), and, on a loopback listener, when the Host is not a
        loopback name (a DNS-rebinding page would otherwise be same-origin)."""
        host = request.headers.get("Host", "")
        if self.admin_is_loopback and host:
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if not _is_loopback(name.strip("[]")):
                return web.Response(status=403, text="this admin listener answers "
                                    "loopback host names only\n")
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            return web.Response(status=403, text="cross-site request refused\n")
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{host}":
            return web.Response(status=403, text="cross-origin request refused\n")
        return None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path == "/healthz":
            if request.method not in ("GET", "HEAD"):
                return web.Response(status=405, text="method not allowed\n",
                                    headers={"Allow": "GET, HEAD"})
            if self.host.draining:
                return web.Response(status=503, text="draining\n")
            return web.Response(text="ok\n")
        refusal = self._refuse_cross_site(request)
        if refusal is not None:
            return refusal
        if path == "/cache/purge":
            return await self._purge(request)
        if path in ("/backends/drain", "/backends/enable"):
            return self._drain(request, drained=path == "/backends/drain")
        if path == "/reload":
            refusal = self._refuse_mutation(request)
            if refusal is not None:
                return refusal
            result = await self.host.reloader.reload()
            if result.changed and self.host.supervised:
                # Every worker reloads: the supervisor passes SIGHUP on to all of
                # them (this one finds its config current and does nothing more).
                os.kill(os.getppid(), signal.SIGHUP)
            return web.json_response(result.as_dict(), status=result.status)
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="method not allowed\n",
                                headers={"Allow": "GET, HEAD"})
        asset = asset_response(request)
        if asset is not None:  # the dashboard's page: no data in it, the token not needed
            return asset
        if path in ("/metrics", "/status", "/dashboard/state"):
            refusal = self._may_read(request)
            if refusal is not None:
                return refusal
        if path == "/metrics":
            if not self.host.metrics.enabled:
                return web.Response(status=404, text="metrics are disabled\n")
            self.host.metrics.flush()
            # Reading every worker's files is file I/O: off the event loop.
            body = await asyncio.get_running_loop().run_in_executor(
                None, self.host.metrics.exposition)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
        if path == "/status":
            document = self.host.runtime.status()
            document.update({
                "version": __version__, "worker": self.host.worker_id, "pid": os.getpid(),
                "draining": self.host.draining, "started_at": self.host.started_at,
                "reload": self.host.reloader.last.as_dict() if self.host.reloader.last else None,
                "tls": self.host.tls_status(),
            })
            return web.json_response(document)
        if path == "/dashboard/state":
            return web.json_response(await dashboard_state(self.host),
                                     headers=SECURITY_HEADERS)
        return web.Response(status=404, text="not found\n")

    def _drain(self, request: web.BaseRequest, *, drained: bool) -> web.Response:
        """Drain (no new requests; in-flight ones finish) or re-enable one backend in
        every worker. Kept across reloads, forgotten at a restart: see
        proxy/agent/drains.py."""
        refusal = self._refuse_mutation(request)
        if refusal is not None:
            return refusal
        upstream_name = request.query.get("upstream", "")
        backend_id = request.query.get("backend", "")
        upstream = self.host.runtime.upstreams.get(upstream_name)
        if upstream is None:
            return web.json_response({"error": f"no upstream {upstream_name!r}"}, status=404)
        if not any(b.id == backend_id for b in upstream.balancer.backends):
            return web.json_response(
                {"error": f"upstream {upstream_name!r} has no backend {backend_id!r}"},
                status=404)
        self.host.link.drain(upstream_name, backend_id, drained)
        log.warning("admin: backend %s of upstream %s %s", backend_id, upstream_name,
                    "drained" if drained else "re-enabled")
        return web.json_response({
            "upstream": upstream_name, "backend": backend_id, "drained": drained,
            "lasts": "across reloads, until Bascule restarts"})

    async def _purge(self, request: web.BaseRequest) -> web.Response:
        refusal = self._refuse_mutation(request)
        if refusal is not None:
            return refusal
        try:
            spec = PurgeSpec.from_query(request.query)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        seams = self.host.runtime.seams
        try:
            removed = await apply_purge(seams.purgeable, spec)
        except Exception as exc:  # the store is down: say so, do not pretend
            log.warning("cache purge failed: %r", exc)
            return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=503)
        local = seams.any_local_purge
        if local and self.host.supervised and self.host.purges.enabled:
            self.host.purges.send(spec)
        return web.json_response({"purged": removed, "broadcast": local and self.host.supervised})

