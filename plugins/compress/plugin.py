"""The `compress` plugin.

A response is compressed when all of these hold: the client accepts one of the
offered codings (negotiate.py), the method is not HEAD, the status is 200, 201, 202
or 203 (no 204, no 206 partial content, no 304), the backend did not encode it
(no Content-Encoding other than identity), it is not a range (no Content-Range),
Cache-Control has no `no-transform`, its media type is in `types` (a `text/*`
entry covers every text type), and its length is unknown or at least `min_size`.

Then the body is compressed chunk by chunk as it streams (never whole), and the
fields say so: `Content-Encoding`, `Vary: Accept-Encoding` added (unless `Vary: *`),
`Content-Length` dropped (the body is chunked to the client), and a strong `ETag`
weakened (`W/"…"`: the bytes differ from the identity representation's; RFC 9110
§8.8.1). Behind the cache (`plugins = ["cache", "compress"]`) the cache stores the
compressed response under its Vary key, so a hit is never compressed again.

Options: `encodings` (offered, in order of preference; default zstd, br, gzip),
`types`, `min_size` (default 1KiB), and `gzip_level`, `brotli_quality`,
`zstd_level` (fast defaults: 4, 4, 3).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from multidict import CIMultiDict

from plugins.compress.codecs import LEVELS, Compressor, new_compressor
from plugins.compress.negotiate import negotiate
from proxy.plugin import Handler, ProxyRequest, ProxyResponse, refuse_unknown_options
from proxy.units import parse_size

__all__ = ["Compress"]

_OPTIONS = {"encodings", "types", "min_size", "gzip_level", "brotli_quality",
            "zstd_level"}
_CODINGS = ("zstd", "br", "gzip")
_TYPES = ["text/*", "application/json", "application/javascript", "application/xml",
          "application/xhtml+xml", "application/rss+xml", "application/atom+xml",
          "application/ld+json", "application/manifest+json", "application/wasm",
          "image/svg+xml", "font/ttf", "font/otf"]
_STATUSES = frozenset({200, 201, 202, 203})


def _level(options: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{key}: must be an integer from {low} to {high}")
    return value


class Compress:
    def __init__(self, options: dict[str, Any]) -> None:
        refuse_unknown_options(options, _OPTIONS)
        encodings = options.get("encodings", list(_CODINGS))
        if not isinstance(encodings, list) or not encodings or any(
                e not in _CODINGS for e in encodings) or len(set(encodings)) != len(encodings):
            raise ValueError(f"encodings: must be a list of {', '.join(_CODINGS)}, "
                             "in order of preference")
        self.encodings = tuple(encodings)
        types = options.get("types", _TYPES)
        if not isinstance(types, list) or not all(isinstance(t, str) and "/" in t
                                                  for t in types):
            raise ValueError('types: must be a list of media types like "text/*"')
        self.exact = frozenset(t.lower() for t in types if not t.endswith("/*"))
        self.prefixes = tuple(t.lower()[:-1] for t in types if t.endswith("/*"))
        try:
            self.min_size = parse_size(options.get("min_size", "1KiB"))
        except ValueError as exc:
            raise ValueError(f"min_size: {exc}") from None
        self.levels = {"gzip": _level(options, "gzip_level", LEVELS["gzip"], 1, 9),
                       "br": _level(options, "brotli_quality", LEVELS["br"], 0, 11),
                       "zstd": _level(options, "zstd_level", LEVELS["zstd"], 1, 19)}

    def _compressible_type(self, content_type: str) -> bool:
        media = content_type.partition(";")[0].strip().lower()
        return media in self.exact or media.startswith(self.prefixes)

    def eligible(self, method: str, response: ProxyResponse) -> bool:
        headers = response.headers
        if method == "HEAD" or response.status not in _STATUSES:
            return False
        encoding = headers.get("Content-Encoding", "").strip().lower()
        if encoding and encoding != "identity":
            return False
        if "Content-Range" in headers:
            return False
        if any("no-transform" in v.lower() for v in headers.getall("Cache-Control", [])):
            return False
        if not self._compressible_type(headers.get("Content-Type", "")):
            return False
        body = response.body
        size = len(body) if isinstance(body, bytes) else response.length
        return size is None or size >= self.min_size

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        coding = negotiate(request.headers.get("Accept-Encoding"), self.encodings)
        response = await call_next(request)
        if coding is None:
            if self._varies(response):
                _add_vary(response.headers)  # a cache must not give identity to all
            return response
        if not self.eligible(request.method, response):
            if self._varies(response):
                _add_vary(response.headers)
            return response
        compressor = new_compressor(coding, self.levels[coding])
        headers = response.headers
        headers.popall("Content-Length", None)
        headers.popall("Content-Encoding", None)
        headers["Content-Encoding"] = coding
        _add_vary(headers)
        etag = headers.get("ETag")
        if etag is not None and not etag.startswith("W/"):
            headers["ETag"] = "W/" + etag
        body = response.body
        if isinstance(body, bytes):
            response.body = compressor.compress(body) + compressor.finish()
            response.length = len(response.body)
        else:
            response.body = _stream(body, compressor)
            response.length = None
        return response

    def _varies(self, response: ProxyResponse) -> bool:
        """Would this response have been compressed for another client? Then its
        identity form varies on Accept-Encoding too."""
        return response.status in _STATUSES and self._compressible_type(
            response.headers.get("Content-Type", "")) and not response.headers.get(
            "Content-Encoding")


def _add_vary(headers: CIMultiDict[str]) -> None:
    values = [v.strip() for line in headers.getall("Vary", []) for v in line.split(",")]
    if "*" in values or any(v.lower() == "accept-encoding" for v in values):
        return
    headers.add("Vary", "Accept-Encoding")


async def _stream(body: AsyncIterator[bytes], compressor: Compressor) -> AsyncIterator[bytes]:
    try:
        async for chunk in body:
            out = compressor.compress(chunk)
            if out:
                yield out
        tail = compressor.finish()
        if tail:
            yield tail
    finally:
        close = getattr(body, "aclose", None)
        if close is not None:
            await close()
