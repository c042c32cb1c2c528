"""Streaming compressors for zstd, br and gzip, one interface: `compress(chunk)` returns
what is ready, `finish()` the rest.

Libraries: `zlib` (the standard library) for gzip; `brotli` (Google's own binding,
the reference implementation) for br; `zstandard` (the maintained binding of
Facebook's libzstd, streaming through `compressobj`) for zstd. All three release the
GIL and work chunk by chunk, so a response is never held whole.
"""

from __future__ import annotations

import zlib
from typing import Protocol

import brotli  # type: ignore[import-untyped]
import zstandard

__all__ = ["LEVELS", "Compressor", "new_compressor"]

# Fast levels: compression runs on the request path (nginx's default gzip level is 1).
LEVELS = {"zstd": 3, "br": 4, "gzip": 4}


class Compressor(Protocol):
    def compress(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class _Gzip:
    def __init__(self, level: int) -> None:
        self._z = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: gzip container

    def compress(self, chunk: bytes) -> bytes:
        return self._z.compress(chunk)

    def finish(self) -> bytes:
        return self._z.flush()


class _Brotli:
    def __init__(self, level: int) -> None:
        self._b = brotli.Compressor(quality=level)

    def compress(self, chunk: bytes) -> bytes:
        return bytes(self._b.process(chunk))

    def finish(self) -> bytes:
        return bytes(self._b.finish())


class _Zstd:
    def __init__(self, level: int) -> None:
        self._z = zstandard.ZstdCompressor(level=level).compressobj()

    def compress(self, chunk: bytes) -> bytes:
        return self._z.compress(chunk)

    def finish(self) -> bytes:
        return self._z.flush()


def new_compressor(coding: str, level: int) -> Compressor:
    if coding == "gzip":
        return _Gzip(level)
    if coding == "br":
        return _Brotli(level)
    return _Zstd(level)
