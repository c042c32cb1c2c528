"""Range requests answered from a complete stored response (RFC 9110 §14): one
byte range gives a 206 with Content-Range, an unsatisfiable one a 416; several ranges,
a syntax the cache does not handle, or an If-Range that does not match give None —
the full 200, which §14.2 allows a server to send instead."""

from __future__ import annotations

from dataclasses import dataclass

from plugins.cache.store import Entry

__all__ = ["RangeAnswer", "answer_range"]


@dataclass(frozen=True)
class RangeAnswer:
    status: int  # 206 or 416
    start: int = 0
    end: int = 0  # inclusive


def _field(entry: Entry, name: str) -> str | None:
    for key, value in entry.headers:
        if key.lower() == name:
            return value
    return None


def _if_range_matches(if_range: str, entry: Entry) -> bool:
    """§13.1.5: a strong ETag compared strongly, or the exact Last-Modified date."""
    if_range = if_range.strip()
    if if_range.startswith('"') or if_range.startswith("W/"):
        etag = _field(entry, "etag")
        return (etag is not None and not if_range.startswith("W/")
                and not etag.startswith("W/") and etag.strip() == if_range)
    return if_range == (_field(entry, "last-modified") or "").strip()


def answer_range(range_header: str, if_range: str | None, entry: Entry) -> RangeAnswer | None:
    if if_range is not None and not _if_range_matches(if_range, entry):
        return None
    unit, _, spec = range_header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    size = len(entry.body)
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "" or int(last) == 0:
            return None if last == "" else RangeAnswer(416)
        start, end = max(0, size - int(last)), size - 1
    else:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        if last and int(last) < start:
            return None  # invalid: ignore the header
    if start >= size:
        return RangeAnswer(416)
    return RangeAnswer(206, start, end)
