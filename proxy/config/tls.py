"""`[server.tls]` (terminating HTTPS for clients) and `upstreams.<name>.tls` (HTTPS to
backends). The files named here are read and checked when the runtime is built
(proxy/tls/), so `bascule check` and a reload report a bad certificate by file."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, field_validator, model_validator

from proxy.config.types import Duration, Strict, parse_hostport

__all__ = ["MOZILLA_INTERMEDIATE", "CertificateEntry", "ServerTlsConfig", "UpstreamTlsConfig"]

# Mozilla's "intermediate" configuration, TLS 1.2 cipher suites (guidelines v5.7,
# https://ssl-config.mozilla.org/guidelines/5.7.json). TLS 1.3 suites are OpenSSL's
# defaults, which are Mozilla's too.
MOZILLA_INTERMEDIATE = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)


def _existing(value: str | None) -> str | None:
    if value and not os.path.isfile(value):
        raise ValueError(f"file not found: {value!r}")
    return value or None


class CertificateEntry(Strict):
    """One certificate chain and its key. The names it serves are the certificate's
    own (subjectAltName DNS names, exact or wildcard), not a list typed here."""

    cert: str
    key: str
    password_file: str | None = None  # for an encrypted key

    @field_validator("cert", "key", "password_file")
    @classmethod
    def _files(cls, value: str | None) -> str | None:
        return _existing(value)


class ServerTlsConfig(Strict):
    # TLS listeners, beside the plain ones in server.listen.
    listen: list[str] = Field(min_length=1)
    # The first is the default: for clients without SNI or with an unknown name.
    certificates: list[CertificateEntry] = Field(min_length=1)
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    ciphers: str = MOZILLA_INTERMEDIATE  # TLS 1.2 suites (OpenSSL cipher list)
    handshake_timeout: Duration = 10.0
    # Plain listeners answer 308 to the same URL on the first TLS listener.
    redirect_http: bool = False
    # Strict-Transport-Security on answers over TLS, e.g. "max-age=63072000".
    hsts: str | None = None
    # Re-read the certificate files when they change (polled every second).
    watch_files: bool = True

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_hostport(item, default_host="0.0.0.0")
        return value


class UpstreamTlsConfig(Strict):
    """HTTPS to an upstream's backends (and its health checks)."""

    verify: bool = True
    ca_file: str | None = None  # default: the system's trusted CAs
    server_name: str | None = None  # SNI and the name checked; default: backend host
    cert: str | None = None  # a client certificate, for backends that require one
    key: str | None = None
    password_file: str | None = None

    @field_validator("ca_file", "cert", "key", "password_file")
    @classmethod
    def _files(cls, value: str | None) -> str | None:
        return _existing(value)

    @model_validator(mode="after")
    def _pair(self) -> UpstreamTlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together (a client certificate needs both)")
        return self
