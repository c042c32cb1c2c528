"""Terminating HTTPS: the listener's TLS settings, the certificate chosen by SNI,
certificates swapped without dropping a connection, and the handshake with its
metrics.

Defaults a reviewer signs: TLS 1.2 and 1.3 only; Mozilla's "intermediate" cipher
suites for 1.2 (OpenSSL's 1.3 suites, which are Mozilla's); no compression; no
renegotiation; ALPN `http/1.1`.

**Selection.** Each certificate serves the DNS names in its own subjectAltName (the
CN when there is none): an exact name first, then a wildcard (`*.example.com` is one
label: `a.example.com`, not `example.com` nor `a.b.example.com`, RFC 6125 §6.4.3).
A client without SNI, or asking for a name no certificate has, gets the first.
The choice happens in the front context's SNI callback, which points the connection
at the chosen certificate's context: a reload or a renewed file swaps the set the
callback reads, so new handshakes use the new certificates while open connections
keep theirs.

**Session resumption across workers.** Python's `ssl` cannot set session-ticket keys
(no SSL_CTX_set_tlsext_ticket_key_cb), and its session-ID cache lives in one
process. But OpenSSL draws a context's ticket keys when the context is made, and
encrypts tickets with the keys of the context a connection started on (the front
one, whatever the SNI callback switches to). So the supervisor makes the front
context before forking: every worker inherits the same keys, and a ticket issued by
one worker resumes on another (TLS 1.3, and TLS 1.2 tickets). What it does not
allow: rotating those keys without a restart, sharing them between Bascule
instances, or resuming by session ID across workers.

**The handshake** is awaited per accepted socket (`loop.connect_accepted_socket`),
so that a failure is seen and counted by reason (a bounded set) before the HTTP
protocol exists; `handshake_timeout` bounds a client that stalls it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any

from proxy.config import ServerTlsConfig
from proxy.errors import ConfigError, ConfigProblem
from proxy.tls.certs import (
    CertificateError,
    LoadedCertificate,
    load_certificate,
    read_password,
)

__all__ = [
    "FAILURE_REASONS",
    "CertificateSet",
    "Terminator",
    "TlsListener",
    "build_certificates",
    "certificate_stamps",
    "failure_reason",
    "front_context",
    "hsts_fields",
    "log_tls_warnings",
]

log = logging.getLogger("bascule.tls")

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}

# OpenSSL reason codes -> the bounded `reason` label of handshake failures.
_REASONS = {
    "UNSUPPORTED_PROTOCOL": "protocol_version", "VERSION_TOO_LOW": "protocol_version",
    "NO_PROTOCOLS_AVAILABLE": "protocol_version", "WRONG_VERSION_NUMBER": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "NO_SHARED_CIPHER": "no_shared_cipher", "NO_CIPHERS_AVAILABLE": "no_shared_cipher",
    "NO_SUITABLE_SIGNATURE_ALGORITHM": "no_shared_cipher",
    "TLSV1_ALERT_UNKNOWN_CA": "client_rejected_certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "client_rejected_certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "client_rejected_certificate",
    "TLSV1_ALERT_DECRYPT_ERROR": "client_rejected_certificate",
    "HTTP_REQUEST": "plain_http", "HTTPS_PROXY_REQUEST": "plain_http",
    "NO_APPLICATION_PROTOCOL": "alpn",
}
FAILURE_REASONS = frozenset(_REASONS.values()) | {"timeout", "reset", "other"}


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return _REASONS.get(str(exc.reason), "other")
    if isinstance(exc, (TimeoutError, ConnectionAbortedError)):
        return "timeout"
    if isinstance(exc, (ConnectionError, EOFError)):
        return "reset"
    return "other"


def _context(cfg: ServerTlsConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    apply_settings(context, cfg)
    return context


def apply_settings(context: ssl.SSLContext, cfg: ServerTlsConfig) -> None:
    """Versions, ciphers and options: on a new context, or in place on the front one
    at a reload (new connections get them). ssl.SSLError for a bad cipher list."""
    context.minimum_version = _VERSIONS[cfg.min_version]
    context.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    context.set_ciphers(cfg.ciphers)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])


class CertificateSet:
    """Certificates by the names they serve; the first is the default."""

    def __init__(self, certificates: list[LoadedCertificate]) -> None:
        self.all = tuple(certificates)
        self.default = certificates[0]
        self._exact: dict[str, LoadedCertificate] = {}
        self._wildcard: dict[str, LoadedCertificate] = {}
        for cert in certificates:
            for name in cert.names:
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], cert)
                else:
                    self._exact.setdefault(name, cert)

    def select(self, server_name: str | None) -> LoadedCertificate:
        if server_name:
            name = server_name.lower().rstrip(".")
            found = self._exact.get(name)
            if found is not None:
                return found
            _, dot, parent = name.partition(".")
            if dot and parent:
                found = self._wildcard.get(parent)
                if found is not None:
                    return found
        return self.default

    def describe(self) -> list[dict[str, Any]]:
        return [{"names": list(c.names), "file": c.cert_file, "not_after": c.not_after,
                 "default": c is self.default} for c in self.all]

    @property
    def digest(self) -> str:
        return ",".join(c.digest for c in self.all)

    def expiry(self) -> list[tuple[str, float]]:
        return [(c.label, c.not_after) for c in self.all]


def build_certificates(cfg: ServerTlsConfig, file: str) -> CertificateSet:
    """Every certificate of `[server.tls]` loaded and checked; ConfigError naming
    each file and what is wrong with it."""
    problems: list[ConfigProblem] = []
    loaded: list[LoadedCertificate] = []
    try:
        _context(cfg)
    except ssl.SSLError as exc:
        raise ConfigError([ConfigProblem(file, "server.tls.ciphers",
                                         f"OpenSSL accepts none of them ({exc.reason})")]) \
            from None
    for i, entry in enumerate(cfg.certificates):
        try:
            loaded.append(load_certificate(entry, _context(cfg)))
        except CertificateError as exc:
            problems.append(ConfigProblem(file, f"server.tls.certificates[{i}]", str(exc)))
    if problems:
        raise ConfigError(problems)
    return CertificateSet(loaded)


def front_context(cfg: ServerTlsConfig, certificates: CertificateSet) -> ssl.SSLContext:
    """The context every TLS listener accepts with (see "Session resumption"). It
    carries the default certificate's chain only as a fallback."""
    context = _context(cfg)
    context.load_cert_chain(certificates.default.cert_file, cfg.certificates[0].key,
                            password=read_password(cfg.certificates[0].password_file))
    return context


class Terminator:
    """One worker's TLS: the front context, the current certificates, the choice."""

    def __init__(self, front: ssl.SSLContext, certificates: CertificateSet,
                 cfg: ServerTlsConfig) -> None:
        self.front = front
        self.certificates = certificates
        self.cfg = cfg
        front.sni_callback = self._select

    def _select(self, connection: ssl.SSLObject, server_name: str | None,
                _context: ssl.SSLContext) -> None:
        connection.context = self.certificates.select(server_name).context

    def swap(self, certificates: CertificateSet, cfg: ServerTlsConfig) -> None:
        """New certificates (and versions, ciphers) for handshakes from now on."""
        # The front context's own certificate is never served: the SNI callback
        # runs for every ClientHello, with None when the client sent no name.
        if cfg.min_version != self.cfg.min_version or cfg.ciphers != self.cfg.ciphers:
            apply_settings(self.front, cfg)
        self.certificates = certificates
        self.cfg = cfg


class TlsListener:
    """One TLS listening socket: accepts, shakes hands (`connect_accepted_socket`,
    the loop's own TLS path, uvloop's included), counts each result by reason, and
    hands a connection to the HTTP protocol `make_protocol()` makes only once its
    handshake is done. (Not `start_tls` after a plain accept: uvloop starts reading
    a new transport right after connection_made, whatever the protocol asked, so
    the ClientHello could reach the plain protocol and be lost.)"""

    def __init__(self, sock: socket.socket, make_protocol: Callable[[], asyncio.Protocol],
                 terminator: Terminator, on_result: Callable[[str, str], None]) -> None:
        self.sock = sock
        self.make_protocol = make_protocol
        self.terminator = terminator
        self.on_result = on_result  # ("ok", version) or ("failed", reason)
        self.pending: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def start(self) -> None:
        self.sock.setblocking(False)
        self._task = asyncio.get_running_loop().create_task(self._accept_forever())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in self.pending:
            task.cancel()
        self.sock.close()

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as exc:  # EMFILE and the like: the backlog holds them
                log.warning("TLS listener: accept failed: %s", exc.strerror or exc)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._handshake(conn))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    async def _handshake(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.connect_accepted_socket(
                self.make_protocol, conn, ssl=self.terminator.front,
                ssl_handshake_timeout=self.terminator.cfg.handshake_timeout)
        except asyncio.CancelledError:
            conn.close()
            raise
        except (ssl.SSLError, OSError, TimeoutError, EOFError) as exc:
            self.on_result("failed", failure_reason(exc))
            conn.close()
            return
        ssl_object = transport.get_extra_info("ssl_object")
        self.on_result("ok", str(ssl_object.version() if ssl_object else "unknown"))


def hsts_fields(cfg: ServerTlsConfig) -> bytes:
    """The Strict-Transport-Security line added to every answer over TLS."""
    return (b"Strict-Transport-Security: " + cfg.hsts.encode("latin-1") + b"\r\n"
            if cfg.hsts else b"")


def certificate_stamps(cfg: ServerTlsConfig) -> list[tuple[int, int, int] | None]:
    """What tells that a certificate or key file changed (mtime, size, inode)."""
    stamps: list[tuple[int, int, int] | None] = []
    for entry in cfg.certificates:
        for path in (entry.cert, entry.key):
            try:
                st = os.stat(path)
            except OSError:
                stamps.append(None)
                continue
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return stamps


def log_tls_warnings(runtime: Any) -> None:
    """Said at every start and reload: an upstream that does not verify its backends."""
    for name, upstream in runtime.upstreams.items():
        tls = upstream.config.tls
        if tls is not None and not tls.verify:
            log.warning("upstream %s: TLS verification of its backends is OFF "
                        "(upstreams.%s.tls.verify = false): anyone on the path can "
                        "impersonate them", name, name)
