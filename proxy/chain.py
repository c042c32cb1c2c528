"""A route's plugin chain as one handler, composed once when its runtime starts
serving, and what the chain's terminal step needs of each request (ChainCall)."""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict

from proxy.errors import PluginError
from proxy.exchange import Outcome
from proxy.plugin import Handler, Plugin, ProxyRequest, ProxyResponse
from proxy.routing import Route
from proxy.runtime import Runtime, Upstream
from proxy.websocket import WebSocketRequest

__all__ = ["ChainCall", "check_method_change", "compose_chain"]


_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                   "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def check_method_change(original: str, method: str) -> None:
    """A plugin may change the method, to a valid token (RFC 9110 §9.1), but not to
    or from HEAD: the client's response framing depends on it."""
    if not method or not all(c in _TCHAR for c in method):
        raise PluginError(f"a plugin set an invalid method {method!r}")
    if (method == "HEAD") != (original == "HEAD"):
        raise PluginError(f"a plugin changed the method {original} to {method}: "
                          "not to or from HEAD")


def compose_chain(chain: tuple[Plugin, ...], terminal: Handler) -> Handler:
    """One handler for a route: its plugins, outermost first, around `terminal`."""
    handler = terminal
    for plugin in reversed(chain):
        handler = _step(plugin, handler)
    return handler


def _step(plugin: Plugin, call_next: Handler) -> Handler:
    async def step(request: ProxyRequest) -> ProxyResponse:
        return await plugin(request, call_next)
    return step


class ChainCall:
    """What the chain's terminal step needs of one request beyond the ProxyRequest
    the plugins see and may change."""

    __slots__ = ("body", "body_done", "chunked", "client_host", "continue_sent", "framing",
                 "has_body", "hash_key", "head_rest", "headers", "headers_version",
                 "outcome", "peer",
                 "request", "request_id", "request_line", "route", "runtime", "target",
                 "upstream", "websocket")

    def __init__(self, request: web.BaseRequest, route: Route, upstream: Upstream,
                 runtime: Runtime, outcome: Outcome, target: str, request_line: bytes,
                 head_rest: bytes, client_host: bytes, headers: CIMultiDict[str],
                 framing: bytes, request_id: bytes, peer: str, has_body: bool,
                 chunked: bool, hash_key: str | None, body: list[bytes] | None,
                 body_done: bool, continue_sent: bool,
                 websocket: WebSocketRequest | None = None) -> None:
        self.request = request
        self.route = route
        self.upstream = upstream
        self.runtime = runtime
        self.outcome = outcome
        self.target = target
        self.request_line = request_line
        self.head_rest = head_rest
        self.client_host = client_host
        self.headers = headers  # as the chain was given them (changes are detected)
        # multidict's version of the ProxyRequest's copy when the chain began: any
        # change (or a replaced dict) moves it, so "unchanged" costs one comparison.
        self.headers_version: int | None = None
        self.framing = framing
        self.request_id = request_id
        self.peer = peer
        self.has_body = has_body
        self.chunked = chunked
        self.hash_key = hash_key
        self.body = body
        self.body_done = body_done
        self.continue_sent = continue_sent
        self.websocket = websocket  # an upgrade: the terminal step tunnels it


