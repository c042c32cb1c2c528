"""`forward_auth`: ask an authentication service about each request (Traefik's
ForwardAuth, nginx's `auth_request`).

For each request Bascule sends `GET <url>` to the service with the headers named in
`request_headers` (default: Authorization and Cookie) and X-Forwarded-Method,
X-Forwarded-Proto, X-Forwarded-Host, X-Forwarded-Uri and X-Forwarded-For describing
the original request (no body). Then:

- a 2xx lets the request through, with the headers named in `response_headers`
  copied from the service's answer onto the upstream request (the client's own
  values of those headers are removed first, so a client cannot assert them);
- any other answer is returned to the client as it is — status, headers, body (at
  most 64 KiB) — so the service's 401 challenges and its redirects to a login page
  work;
- a service that cannot be reached is `503`, one slower than `timeout` is `504`;
  neither ever lets the request through.

The service is asked over Bascule's own pooled HTTP/1.1 client (proxy/upstream/,
kept-alive connections, the same framing checks as forwarding); `https://` URLs are
verified against the system's CAs, or `ca_file`.

    [[plugins]]
    name = "sso"
    use = "forward_auth"
    options = { url = "http://auth.internal:4181/verify", response_headers = ["X-Auth-User"] }
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from multidict import CIMultiDict

from plugins.service import ServiceUrl
from proxy.plugin import Handler, PluginContext, ProxyRequest, ProxyResponse, refuse_unknown_options
from proxy.units import parse_duration
from proxy.upstream.pool import BackendPool
from proxy.upstream.subrequest import SubrequestError, fetch

__all__ = ["ForwardAuth"]

log = logging.getLogger("bascule.forward_auth")

_OPTIONS = {"url", "timeout", "request_headers", "response_headers", "ca_file",
            "pool_size"}
_MAX_BODY = 64 * 1024
# What the service's answer must not pass on to the client: framing is Bascule's.
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te",
        "trailer", "upgrade", "proxy-connection"}


def _names(options: dict[str, Any], key: str, default: list[str]) -> tuple[str, ...]:
    value = options.get(key, default)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{key}: must be a list of header names")
    return tuple(value)


def _token(value: str) -> bytes:
    """A header value for a request line, without CR/LF (never split a head)."""
    return value.replace("\r", " ").replace("\n", " ").encode("latin-1", "replace")


class ForwardAuth:
    def __init__(self, options: dict[str, Any]) -> None:
        refuse_unknown_options(options, _OPTIONS)
        self.url = ServiceUrl.parse("url", options.get("url"),
                                    "http://auth.internal:4181/verify")
        self.scheme, self.host, self.port = self.url.scheme, self.url.host, self.url.port
        self.path, self.authority = self.url.path, self.url.authority
        try:
            self.timeout = parse_duration(options.get("timeout", "2s"))
        except ValueError as exc:
            raise ValueError(f"timeout: {exc}") from None
        self.request_headers = _names(options, "request_headers", ["Authorization", "Cookie"])
        self.response_headers = _names(options, "response_headers", [])
        ca_file = options.get("ca_file")
        if ca_file is not None and not isinstance(ca_file, str):
            raise ValueError("ca_file: must be a file path")
        self.tls: ssl.SSLContext | None = None
        if self.scheme == "https":
            try:
                self.tls = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"ca_file: {exc}") from None
        pool_size = options.get("pool_size", 32)
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 0:
            raise ValueError("pool_size: must be an integer >= 0")
        self.pool_size = pool_size
        self.pool: BackendPool | None = None

    async def start(self, context: PluginContext) -> None:
        self.pool = self.url.pool(max_idle=self.pool_size, connect_timeout=self.timeout,
                                  tls=self.tls)

    async def aclose(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def _head(self, request: ProxyRequest) -> bytes:
        headers = request.headers
        lines = [b"GET " + self.path.encode("latin-1") + b" HTTP/1.1\r\n",
                 b"Host: " + self.authority.encode("idna") + b"\r\n",
                 b"X-Forwarded-Method: " + _token(request.method) + b"\r\n",
                 b"X-Forwarded-Proto: " + request.scheme.encode() + b"\r\n",
                 b"X-Forwarded-Host: " + _token(headers.get("Host", "")) + b"\r\n",
                 b"X-Forwarded-Uri: " + _token(request.target) + b"\r\n",
                 b"X-Forwarded-For: " + _token(request.client) + b"\r\n"]
        for name in self.request_headers:
            for value in headers.getall(name, []):
                lines.append(_token(name) + b": " + _token(value) + b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        assert self.pool is not None, "forward_auth used before start()"
        try:
            head, body = await fetch(self.pool, self._head(request), timeout=self.timeout,
                                     max_body=_MAX_BODY)
        except SubrequestError as exc:
            log.warning("forward_auth %s:%d: %s", self.host, self.port, exc)
            status, text = (504, b"authentication service timed out\n") if exc.timeout \
                else (503, b"authentication service unavailable\n")
            return ProxyResponse(status, CIMultiDict({"Content-Type": "text/plain"}), text,
                                 length=len(text))
        fields = head.fields.items()
        if 200 <= head.status < 300:
            for name in self.response_headers:
                request.headers.popall(name, None)
            wanted = {n.lower() for n in self.response_headers}
            for name, value in fields:
                if name.lower() in wanted:
                    request.headers.add(name, value)
            return await call_next(request)
        answer: CIMultiDict[str] = CIMultiDict(
            (name, value) for name, value in fields
            if name.lower() not in _HOP and name.lower() != "via")
        return ProxyResponse(head.status, answer, body, reason=head.reason.decode(
            "latin-1", "replace"), length=len(body))
