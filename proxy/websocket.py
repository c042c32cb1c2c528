"""WebSocket tunnelling on routes with `websocket = true`.

The backend handshake happens first (so a backend's refusal reaches the client as
its own status), then the client's handshake is accepted with the subprotocol the
backend chose, and messages are relayed both ways until either side closes. This
is not the hot path, so aiohttp's own WebSocket client and server are used.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from proxy.errors import NoBackendError, UpstreamBusy, UpstreamConnectError
from proxy.headers import HOP_BY_HOP, build_request_head, is_trusted
from proxy.metrics import Metrics
from proxy.response import plain_answer
from proxy.routing import Route, strip_path_prefix
from proxy.runtime import Runtime, Upstream
from proxy.strategy import RequestContext

__all__ = ["WebSocketRequest", "tunnel_websocket"]

log = logging.getLogger("bascule.websocket")

# Handshake fields aiohttp's client generates itself (RFC 6455 §4.1).
_HANDSHAKE = frozenset({
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
    "sec-websocket-protocol", "sec-websocket-accept",
}) | {h.decode() for h in HOP_BY_HOP} | {"host", "content-length"}


def _session(runtime: Runtime) -> aiohttp.ClientSession:
    if runtime.ws_session is None or runtime.ws_session.closed:
        runtime.ws_session = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False, trust_env=False,
        )
    session: aiohttp.ClientSession = runtime.ws_session
    return session


class WebSocketRequest:
    """What the forwarder decided for an upgrade: the same target, Host authority,
    client address and hash key as any request on the route."""

    __slots__ = ("authority", "hash_key", "headers", "outcome", "peer", "target")

    def __init__(self, target: str, authority: bytes, peer: str, hash_key: str | None,
                 outcome: Any, headers: Any = None) -> None:
        self.headers = headers  # raw (name, value) pairs when plugins changed them
        self.target = target
        self.authority = authority
        self.peer = peer
        self.hash_key = hash_key
        self.outcome = outcome  # forward.Outcome: the backend, for the access log


async def tunnel_websocket(
    request: web.BaseRequest, route: Route, upstream: Upstream, runtime: Runtime,
    ws: WebSocketRequest, metrics: Metrics,
) -> web.StreamResponse:
    """Upgrades take the same lease as other requests: the upstream's max_inflight,
    the strategy's pick with the request's hash key (so consistent_hash keeps a user
    on one backend), connect failures counted, fed to passive health and tried on
    another backend, and the backend held in-flight for the tunnel's life."""
    if upstream.max_inflight and upstream.balancer.inflight >= upstream.max_inflight:
        return plain_answer(UpstreamBusy.status, UpstreamBusy.public_message)
    target = ws.target
    if route.strip_prefix and route.path_prefix != "/":
        target = strip_path_prefix(target, route.path_prefix)
    peer = ws.peer
    block, client_host, _ = build_request_head(
        ws.headers if ws.headers is not None else request.raw_headers, peer=peer,
        trusted_peer=is_trusted(peer, runtime.trusted), authority=ws.authority,
        policy=runtime.header_policy)
    headers: dict[str, str] = {}
    for line in block.split(b"\r\n"):
        name, sep, value = line.partition(b": ")
        if sep and name.decode("latin-1").lower() not in _HANDSHAKE:
            headers[name.decode("latin-1")] = value.decode("latin-1")
    protocols = [p.strip() for p in
                 request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    ctx = RequestContext(ws.hash_key)
    balancer = upstream.balancer
    loop = asyncio.get_running_loop()
    for _attempt in range(upstream.max_attempts):
        try:
            backend = balancer.lease(ctx)
        except NoBackendError:
            return plain_answer(NoBackendError.status, NoBackendError.public_message)
        started = loop.time()
        headers["Host"] = (client_host.decode("latin-1") if route.pass_host and client_host
                           else backend.address)
        try:
            async with asyncio.timeout(upstream.timeouts.connect
                                       + upstream.timeouts.response_header):
                backend_ws = await _session(runtime).ws_connect(
                    f"http://{backend.address}{target}", headers=headers,
                    protocols=protocols, autoclose=False, autoping=False, max_msg_size=0,
                    compress=0,
                )
        except aiohttp.WSServerHandshakeError as exc:
            upstream.health.record(backend, failed=exc.status >= 500)
            balancer.release(backend, loop.time() - started, exc.status < 500)
            ws.outcome.backend = backend.id
            return plain_answer(exc.status if exc.status >= 400 else 502,
                                "backend refused the WebSocket handshake")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("upstream %s websocket to %s: %s", upstream.name, backend.id, exc)
            metrics.backend(upstream.name, backend.id).connect_errors += 1
            upstream.health.record(backend, failed=True)
            balancer.release(backend, loop.time() - started, False)
            ctx.exclude = ctx.exclude | {backend.id}
            if len(ctx.exclude) >= len(balancer.backends):
                break
            continue
        latency = loop.time() - started
        upstream.health.record(backend, failed=False)
        if metrics.enabled:
            metrics.backend(upstream.name, backend.id).latency.observe(latency)
        ws.outcome.backend = backend.id
        try:
            client_ws = web.WebSocketResponse(
                protocols=[backend_ws.protocol] if backend_ws.protocol else (),
                autoclose=False, autoping=False, max_msg_size=0,
            )
            await client_ws.prepare(request)
            await _relay(client_ws, backend_ws)
            return client_ws
        finally:
            # in flight for the tunnel's life; the handshake is its latency
            balancer.release(backend, latency, True)
    return plain_answer(UpstreamConnectError.status, UpstreamConnectError.public_message)


async def _relay(client: web.WebSocketResponse,
                 backend: aiohttp.ClientWebSocketResponse) -> None:
    async def pump(src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                   dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
        async for msg in src:
            if msg.type == WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            elif msg.type == WSMsgType.PING:
                await dst.ping(msg.data)
            elif msg.type == WSMsgType.PONG:
                await dst.pong(msg.data)
            elif msg.type == WSMsgType.CLOSE:
                await dst.close(code=msg.data or 1000, message=(msg.extra or "").encode())
                return
            else:
                break
        await dst.close()

    tasks = [asyncio.ensure_future(pump(client, backend)),
             asyncio.ensure_future(pump(backend, client))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await backend.close()
        await client.close()
