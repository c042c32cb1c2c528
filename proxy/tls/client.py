"""HTTPS to backends (`upstreams.<name>.tls`): verification on by default against
the system's CAs or `ca_file`, SNI and the hostname check against `server_name`
(default: the backend's host), an optional client certificate (mTLS), TLS 1.2 at
least, ALPN `http/1.1`. Turning verification off is allowed and logged as a warning
at every start and reload (by the caller, which knows the upstream)."""

from __future__ import annotations

import ssl

from proxy.config import UpstreamTlsConfig
from proxy.tls.certs import CertificateError, read_password

__all__ = ["client_context", "verify_failure"]


def client_context(cfg: UpstreamTlsConfig) -> ssl.SSLContext:
    """Raises CertificateError for a client certificate that cannot be used."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if not cfg.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cfg.cert and cfg.key:
        password = read_password(cfg.password_file)

        def no_password() -> bytes:
            raise CertificateError(f"{cfg.key}: the key is encrypted; give password_file")

        try:
            context.load_cert_chain(cfg.cert, cfg.key, password=password
                                    if password is not None else no_password)
        except ssl.SSLError as exc:
            raise CertificateError(f"{cfg.key}: cannot be used with {cfg.cert}: "
                                   f"{exc.reason or exc}") from None
    return context


def verify_failure(exc: BaseException) -> str | None:
    """A clear line for a backend certificate that failed verification, or None."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    return None
