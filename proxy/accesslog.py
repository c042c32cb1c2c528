"""Access logs: one line per request, JSON (default) or the combined log format, to
stdout, stderr or a file.

The request path only appends a tuple to a deque; a writer thread formats and writes
in batches, so a slow disk or a full pipe never blocks the event loop. If the writer
falls more than `max_pending` lines behind, new lines are dropped and counted rather
than letting memory grow.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from typing import IO, Any, NamedTuple

__all__ = ["AccessLog", "AccessRecord"]


class AccessRecord(NamedTuple):
    time: float
    client: str
    method: str
    host: str
    path: str
    version: str
    status: int
    bytes_out: int
    duration: float
    upstream: str
    backend: str
    cache: str
    request_id: bytes
    referer: str
    user_agent: str


class AccessLog:
    def __init__(self, target: str, fmt: str = "json", *, max_pending: int = 100_000,
                 interval: float = 0.2) -> None:
        self.enabled = target != "off"
        self.format = fmt
        self.dropped = 0
        self._max_pending = max_pending
        self._interval = interval
        self._pending: deque[AccessRecord] = deque()
        self._stop = threading.Event()
        self._stream: IO[str] | None = None
        self._owns_stream = False
        self._thread: threading.Thread | None = None
        if not self.enabled:
            return
        if target == "stdout":
            self._stream = sys.stdout
        elif target == "stderr":
            self._stream = sys.stderr
        else:
            self._stream = open(target, "a", encoding="utf-8", buffering=1 << 16)  # noqa: SIM115
            self._owns_stream = True
        self._thread = threading.Thread(target=self._run, name="bascule-access-log",
                                        daemon=True)
        self._thread.start()

    def log(self, record: AccessRecord) -> None:
        if len(self._pending) >= self._max_pending:
            self.dropped += 1
            return
        self._pending.append(record)

    def format_line(self, r: AccessRecord) -> str:
        if self.format == "combined":
            stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(r.time))
            size = str(r.bytes_out) if r.bytes_out else "-"
            return (f'{r.client} - - [{stamp}] "{r.method} {r.path} HTTP/{r.version}" '
                    f'{r.status} {size} "{_quote(r.referer)}" "{_quote(r.user_agent)}"')
        fields: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(r.time))
            + f".{int(r.time * 1000) % 1000:03d}Z",
            "client": r.client, "method": r.method, "host": r.host, "path": r.path,
            "status": r.status, "bytes": r.bytes_out, "duration": round(r.duration, 6),
            "upstream": r.upstream, "backend": r.backend, "cache": r.cache,
            "request_id": r.request_id.decode("latin-1"),
        }
        return json.dumps(fields, separators=(",", ":"), ensure_ascii=False)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._drain()
        self._drain()

    def _drain(self) -> None:
        pending = self._pending
        if not pending or self._stream is None:
            return
        lines = []
        while pending:
            lines.append(self.format_line(pending.popleft()))
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            self.dropped += len(lines)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(5)
            self._thread = None
        if self._owns_stream and self._stream is not None:
            self._stream.close()
            self._stream = None


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"') if value else "-"
