"""Sticky sessions (`upstreams.<name>.sticky`): a cookie pins a client to a backend.

The cookie's value is an HMAC-SHA256 of the backend's identity (its id: the
address of a static backend, the service id of a Consul instance), keyed with the
configured secret and cut to 128 bits, base64url: opaque (no address in it), stable
(the same secret gives the same value in every worker and every instance, and across
restarts), and unforgeable (a client cannot make the value of a backend it was
never sent to). Values are computed when the backend set changes, never per request.

Per request: a known value whose backend is healthy, present and not already tried
by this request is used whatever the strategy (HAProxy's `cookie`, Traefik's
`sticky`); otherwise the strategy picks and the answer sets the cookie anew. Counted
as hit (pin kept), repin (a cookie that named a backend gone, down, drained or
unknown: forged or from another secret) or new (no cookie).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

from proxy.config import StickyConfig
from proxy.models import Backend
from proxy.strategy import RequestContext

__all__ = ["StickySessions"]


class StickySessions:
    def __init__(self, config: StickyConfig) -> None:
        if config.secret_file is not None:
            with open(config.secret_file, "rb") as fh:
                secret = fh.read().strip()
            if len(secret) < 16:
                raise ValueError(f"secret_file: {config.secret_file!r} holds fewer than "
                                 "16 bytes")
        else:
            secret = (config.secret or "").encode()
        self._secret = secret
        self.cookie = config.cookie
        self._prefix = config.cookie + "="
        self.by_token: dict[str, Backend] = {}
        self.token_of: dict[str, str] = {}  # backend id -> cookie value
        self.counts = {"hit": 0, "repin": 0, "new": 0}  # since the last metrics flush
        attributes = f"; Path={config.path}"
        if config.domain:
            attributes += f"; Domain={config.domain}"
        if config.max_age is not None:
            attributes += f"; Max-Age={int(config.max_age)}"
        attributes += f"; SameSite={config.same_site}"
        if config.http_only:
            attributes += "; HttpOnly"
        # SameSite=None is refused by browsers without Secure (RFC 6265bis §5.4.7)
        secure_always = config.secure is True or config.same_site == "None"
        self._plain = attributes + ("; Secure" if secure_always else "")
        self._over_tls = attributes + ("; Secure" if config.secure is not False else "")

    def token(self, backend_id: str) -> str:
        digest = hmac.new(self._secret, b"bascule-sticky\x00" + backend_id.encode(),
                          hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def update(self, backends: Sequence[Backend]) -> None:
        token_of = {b.id: self.token_of.get(b.id) or self.token(b.id) for b in backends}
        self.token_of = token_of
        self.by_token = {token_of[b.id]: b for b in backends}

    def requested(self, cookie_header: str | None) -> str | None:
        """The pin the request carries (the cookie's value), if any."""
        if not cookie_header or self._prefix not in cookie_header:
            return None
        for part in cookie_header.split(";"):
            part = part.strip()
            if part.startswith(self._prefix):
                return part[len(self._prefix):]
        return None

    def pin(self, ctx: RequestContext, cookie_header: str | None) -> str | None:
        """Point the request's context at the backend its cookie names (if any is
        known) for the balancer; the cookie's value, to compare with the answer's."""
        requested = self.requested(cookie_header)
        if requested is not None:
            ctx.pinned = self.by_token.get(requested)
        return requested

    def answered(self, requested: str | None, backend: Backend, tls: bool) -> bytes:
        """After the exchange: the Set-Cookie line to add (empty when the pin stands),
        and the count."""
        token = self.token_of.get(backend.id) or self.token(backend.id)
        if requested == token:
            self.counts["hit"] += 1
            return b""
        self.counts["repin" if requested is not None else "new"] += 1
        attributes = self._over_tls if tls else self._plain
        return f"Set-Cookie: {self.cookie}={token}{attributes}\r\n".encode("ascii")
