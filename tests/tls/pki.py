"""A private CA for TLS tests (trustme), writing certificates and keys to files as
an operator would have them."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import trustme
from cryptography.hazmat.primitives import serialization


class Pki:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = trustme.CA()
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self._count = 0

    def issue(self, *names: str, stem: str = "", password: bytes | None = None,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None
              ) -> tuple[Path, Path]:
        """(cert chain file, key file) for `names`; the key encrypted with
        `password` when given."""
        self._count += 1
        stem = stem or f"cert{self._count}"
        kw = {}
        if not_before is not None:
            kw["not_before"] = not_before
        if not_after is not None:
            kw["not_after"] = not_after
        issued = self.ca.issue_cert(*names, **kw)
        cert, key = self.dir / f"{stem}.pem", self.dir / f"{stem}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        if password is None:
            issued.private_key_pem.write_to_path(str(key))
        else:
            private = serialization.load_pem_private_key(issued.private_key_pem.bytes(), None)
            key.write_bytes(private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(password)))
        return cert, key

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return context

    def server_context(self, *names: str, require_client_cert: bool = False
                       ) -> ssl.SSLContext:
        """For an HTTPS backend."""
        cert, key = self.issue(*names)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(str(self.ca_file))
        return context
