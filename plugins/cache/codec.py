"""An Entry as one byte string, so a shared store writes metadata and body together
(one value, atomic) and a reader either gets a whole entry or a CorruptEntry.

Layout: b"BCE1", a 4-byte big-endian length of the JSON metadata, the metadata,
then the body bytes as they were received.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from plugins.cache.store import Entry

__all__ = ["CorruptEntry", "decode", "encode"]

_MAGIC = b"BCE1"
_LENGTH = struct.Struct(">I")


class CorruptEntry(ValueError):
    """Bytes that are not an entry this version wrote (garbage, truncation, or an
    older format): the caller treats it as a miss."""


def encode(entry: Entry) -> bytes:
    meta = json.dumps({
        "s": entry.status, "r": entry.reason, "h": entry.headers,
        "q": entry.request_time, "t": entry.response_time, "v": entry.vary,
        "g": list(entry.tags), "d": entry.date, "a": entry.age_value,
        "l": entry.lifetime, "c": entry.directives, "n": len(entry.body),
    }, separators=(",", ":")).encode()
    return b"".join((_MAGIC, _LENGTH.pack(len(meta)), meta, entry.body))


def decode(data: bytes) -> Entry:
    if not isinstance(data, bytes) or data[:4] != _MAGIC or len(data) < 8:
        raise CorruptEntry("not a cache entry")
    (size,) = _LENGTH.unpack_from(data, 4)
    try:
        meta: dict[str, Any] = json.loads(data[8:8 + size])
        body = data[8 + size:]
        if len(body) != meta["n"]:
            raise CorruptEntry(f"body is {len(body)} bytes, expected {meta['n']}")
        return Entry(
            status=int(meta["s"]), reason=str(meta["r"]),
            headers=[(str(k), str(v)) for k, v in meta["h"]], body=body,
            request_time=float(meta["q"]), response_time=float(meta["t"]),
            vary=str(meta["v"]), tags=tuple(str(t) for t in meta["g"]),
            date=None if meta["d"] is None else float(meta["d"]),
            age_value=int(meta["a"]), lifetime=float(meta["l"]),
            directives={str(k): None if v is None else str(v) for k, v in meta["c"].items()},
        )
    except CorruptEntry:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptEntry(f"bad metadata: {exc}") from None
