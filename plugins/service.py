"""Another HTTP service a plugin talks to (forward_auth's authentication service,
mirror's canary): its URL checked at load, and a pool of Bascule's own HTTP/1.1
client connections to it, made once the loop runs."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from proxy.upstream.heads import ResponseLimits
from proxy.upstream.pool import BackendPool

__all__ = ["ServiceUrl"]


@dataclass(frozen=True)
class ServiceUrl:
    scheme: str
    host: str
    port: int
    authority: str  # for a Host field
    path: str  # path and query, "/" at least

    @classmethod
    def parse(cls, option: str, url: object, example: str) -> ServiceUrl:
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f'{option}: must be an http:// or https:// URL like "{example}"')
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ValueError(f"{option}: the port is not a number") from None
        return cls(parts.scheme, parts.hostname, port, parts.netloc.rpartition("@")[2],
                   (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))

    def pool(self, *, max_idle: int, connect_timeout: float,
             tls: ssl.SSLContext | None) -> BackendPool:
        return BackendPool(self.host, self.port, max_idle=max_idle, idle_timeout=15.0,
                           connect_timeout=connect_timeout, limits=ResponseLimits(),
                           tls=tls, server_name=self.host)
