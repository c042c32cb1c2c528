"""WebSocket tunnelling on routes with `websocket = true`.

The backend handshake happens first (so a backend's refusal reaches the client as
its own status), then the client's handshake is accepted with the subprotocol the
backend chose, and messages are relayed both ways until either side closes. This
is not the hot path, so aiohttp's own WebSocket client and server are used.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import WSMsgType, web

from proxy.app import Runtime, Upstream
from proxy.errors import NoBackendError, UpstreamConnectError
from proxy.headers import HOP_BY_HOP, build_request_head, is_trusted
from proxy.response import plain_answer
from proxy.routing import Route, strip_path_prefix
from proxy.strategy import RequestContext

__all__ = ["tunnel_websocket"]

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


async def tunnel_websocket(
    request: web.BaseRequest, route: Route, upstream: Upstream, runtime: Runtime,
    target: str, authority: bytes = b"",
) -> web.StreamResponse:
    """`target`: the request-target to forward (normalised if the route says so),
    `authority`: an absolute-form target's, which replaces Host."""
    ctx = RequestContext()
    try:
        backend = upstream.balancer.lease(ctx)
    except NoBackendError:
        return plain_answer(503, "no backend available")
    try:
        if route.strip_prefix and route.path_prefix != "/":
            target = strip_path_prefix(target, route.path_prefix)
        peer = request.remote or ""
        block, client_host, _ = build_request_head(
            request.raw_headers, peer=peer, trusted_peer=is_trusted(peer, runtime.trusted),
            authority=authority, policy=runtime.header_policy)
        headers: dict[str, str] = {}
        for line in block.split(b"\r\n"):
            name, sep, value = line.partition(b": ")
            if sep and name.decode("latin-1").lower() not in _HANDSHAKE:
                headers[name.decode("latin-1")] = value.decode("latin-1")
        host = client_host.decode("latin-1") if route.pass_host and client_host else (
            backend.address)
        headers["Host"] = host
        protocols = [p.strip() for p in
                     request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        url = f"http://{backend.address}{target}"
        try:
            async with asyncio.timeout(upstream.timeouts.connect
                                       + upstream.timeouts.response_header):
                backend_ws = await _session(runtime).ws_connect(
                    url, headers=headers, protocols=protocols, autoclose=False,
                    autoping=False, max_msg_size=0, compress=0,
                )
        except aiohttp.WSServerHandshakeError as exc:
            return plain_answer(exc.status if exc.status >= 400 else 502,
                                "backend refused the WebSocket handshake")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("upstream %s websocket to %s: %s", upstream.name, backend.id, exc)
            return plain_answer(UpstreamConnectError.status,
                                UpstreamConnectError.public_message)
        client_ws = web.WebSocketResponse(
            protocols=[backend_ws.protocol] if backend_ws.protocol else (),
            autoclose=False, autoping=False, max_msg_size=0,
        )
        await client_ws.prepare(request)
        await _relay(client_ws, backend_ws)
        return client_ws
    finally:
        upstream.balancer.release(backend)


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
