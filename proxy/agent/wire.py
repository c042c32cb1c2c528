"""The messages between workers and the agent, and their framing.

A message is a JSON array whose first item names it. On the Unix socket each is
framed by a 4-byte big-endian length. A stream socket rather than datagrams: it keeps
order, pushes back when a reader is slow, and either side learns at once (EOF) that
the other died. JSON rather than pickle: a worker never runs code sent to it.

Worker → agent:
  ["watch", [[key, spec], ...]]           subscribe to Consul watches
  ["unwatch", [key, ...]]
  ["health", sub, {check, tls}, [[id, host, port, up, tls], ...]]  active checks
  ["unhealth", sub]
  ["outliers", okey, outlier]             subscribe to an upstream's ejections
  ["unoutliers", okey]
  ["outlier", okey, id, backends]         this worker's failure streak hit the limit
Agent → worker:
  ["backends", key, version, [[id, host, port, weight, tls], ...], error]
  ["stale", key, error]                   the last known good set keeps serving
  ["fresh", source]                       the agent answered again (metrics' age)
  ["health", sub, id, up, reason]         active check state
  ["eject", okey, id, seconds, ejections]
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
from typing import Any

__all__ = ["MAX_FRAME", "Message", "encode", "read_message", "spec_key"]

Message = list[Any]
MAX_FRAME = 64 * 1024 * 1024  # a snapshot of thousands of backends fits many times
_LENGTH = struct.Struct(">I")


def spec_key(spec: Any) -> str:
    """A stable name for a spec: every worker computes the same one."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def encode(message: Message) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return _LENGTH.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> Message | None:
    """The next message, or None at EOF. ValueError for a broken frame."""
    try:
        head = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ValueError("connection closed inside a frame") from None
        return None
    (length,) = _LENGTH.unpack(head)
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes is over the {MAX_FRAME} limit")
    body = await reader.readexactly(length)
    message = json.loads(body)
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        raise ValueError("a message is a JSON array that starts with its name")
    return message
