"""Reading a certificate and its key, and saying clearly what is wrong with them:
unreadable, not a certificate, key does not match, encrypted without a passphrase,
expired, not yet valid. Every problem names the file (and the config key)."""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from proxy.config import CertificateEntry

__all__ = ["CertificateError", "LoadedCertificate", "load_certificate", "read_password"]


class CertificateError(ValueError):
    """What is wrong, naming the file."""


@dataclass(frozen=True)
class LoadedCertificate:
    """A certificate's context (its chain and key loaded) and what /status and the
    metrics show of it."""

    context: ssl.SSLContext
    names: tuple[str, ...]  # DNS subjectAltNames (or the CN when there are none)
    not_before: float
    not_after: float
    cert_file: str
    digest: str  # of the certificate and key files: a reload sees a renewal by it

    @property
    def label(self) -> str:
        """The metric label: the first name (bounded: one per configured certificate)."""
        return self.names[0] if self.names else self.cert_file


def read_password(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as fh:
            return fh.read().strip()
    except OSError as exc:
        raise CertificateError(f"{path}: unreadable: {exc.strerror or exc}") from None


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(name.lower() for name in names)


def load_certificate(entry: CertificateEntry, context: ssl.SSLContext,
                     now: float | None = None) -> LoadedCertificate:
    """Load `entry` into `context` (made by the caller with the listener's settings)
    and check it. Raises CertificateError."""
    try:
        with open(entry.cert, "rb") as fh:
            pem = fh.read()
    except OSError as exc:
        raise CertificateError(f"{entry.cert}: unreadable: {exc.strerror or exc}") from None
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise CertificateError(f"{entry.cert}: not a PEM certificate") from None
    password = read_password(entry.password_file)

    def no_password() -> bytes:
        # Never OpenSSL's own prompt: it would wait on a terminal.
        raise CertificateError(f"{entry.key}: the key is encrypted; give password_file")

    try:
        context.load_cert_chain(entry.cert, entry.key,
                                password=password if password is not None else no_password)
    except ssl.SSLError as exc:
        reason = str(exc.reason or exc)
        if "KEY_VALUES_MISMATCH" in reason or "key values mismatch" in str(exc):
            raise CertificateError(
                f"{entry.key}: the key does not match the certificate {entry.cert}") from None
        if "BAD_DECRYPT" in reason or "bad decrypt" in str(exc):
            raise CertificateError(f"{entry.key}: cannot decrypt the key (wrong or missing "
                                   "password_file)") from None
        raise CertificateError(f"{entry.key}: cannot load the key: {reason}") from None
    except OSError as exc:
        raise CertificateError(f"{entry.key}: unreadable: {exc.strerror or exc}") from None
    not_before = cert.not_valid_before_utc.timestamp()
    not_after = cert.not_valid_after_utc.timestamp()
    now = dt.datetime.now(dt.UTC).timestamp() if now is None else now
    if now > not_after:
        raise CertificateError(f"{entry.cert}: expired on "
                               f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if now < not_before:
        raise CertificateError(f"{entry.cert}: not valid before "
                               f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    try:
        with open(entry.key, "rb") as fh:
            key_bytes = fh.read()
    except OSError as exc:
        raise CertificateError(f"{entry.key}: unreadable: {exc.strerror or exc}") from None
    digest = hashlib.sha256(pem + b"\0" + key_bytes).hexdigest()
    return LoadedCertificate(context, _names(cert), not_before, not_after, entry.cert,
                             digest)
