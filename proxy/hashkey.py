"""Where a request's hash key comes from (`hash_on`), parsed once at config time and
applied once per request, so strategies never parse HTTP.

`client_ip`, `header:NAME`, `cookie:NAME`, `query:NAME` or `path` (the path without
the query). An absent header, cookie or parameter gives no key (None), and the
strategy's fallback decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = ["HashKeySource", "parse_hash_on"]

Kind = Literal["client_ip", "header", "cookie", "query", "path"]


@dataclass(frozen=True)
class HashKeySource:
    kind: Kind
    name: str = ""

    def extract(self, headers: Mapping[str, str], target: str, peer: str) -> str | None:
        kind = self.kind
        if kind == "client_ip":
            return peer or None
        if kind == "header":
            return headers.get(self.name)
        if kind == "path":
            return target.partition("?")[0]
        if kind == "cookie":
            cookie = headers.get("Cookie")
            if cookie is None:
                return None
            prefix = self.name + "="
            for part in cookie.split(";"):
                part = part.strip()
                if part.startswith(prefix):
                    return part[len(prefix):]
            return None
        query = target.partition("?")[2]
        if not query:
            return None
        prefix = self.name + "="
        for part in query.split("&"):
            if part.startswith(prefix):
                return part[len(prefix):]
            if part == self.name:
                return ""
        return None

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind


def parse_hash_on(spec: object) -> HashKeySource:
    """Raises ValueError("hash_on: ...") for a bad spec (a config error's key path)."""
    if not isinstance(spec, str):
        raise ValueError(f"hash_on: must be a string, got {spec!r}")
    kind, sep, name = spec.partition(":")
    if kind in ("client_ip", "path") and not sep:
        return HashKeySource(kind)  # type: ignore[arg-type]
    if kind in ("header", "cookie", "query") and sep and name.strip():
        return HashKeySource(kind, name.strip())  # type: ignore[arg-type]
    raise ValueError(
        f'hash_on: must be "client_ip", "path", "header:NAME", "cookie:NAME" or '
        f'"query:NAME", got {spec!r}')
