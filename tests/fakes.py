"""A fake transport for socket-free unit tests of protocols and writers."""

from __future__ import annotations

import asyncio
from typing import Any


class FakeTransport(asyncio.Transport):
    """Records what is written; reading can be paused; abort/close mark it closing
    and tell the protocol, as a real transport would (on the next loop turn)."""

    def __init__(self, protocol: asyncio.BaseProtocol | None = None,
                 peer: tuple[str, int] = ("127.0.0.1", 9)) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = bytearray()
        self.writes = 0
        self.reading = True
        self.aborted = False
        self._closing = False
        self._peer = peer

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data
        self.writes += 1

    def writelines(self, list_of_data: Any) -> None:
        self.written += b"".join(list_of_data)
        self.writes += 1

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self._closing

    def _lose(self) -> None:
        if not self._closing:
            self._closing = True
            if self.protocol is not None:
                self.protocol.connection_lost(None)

    def abort(self) -> None:
        self.aborted = True
        self._lose()

    def close(self) -> None:
        self._lose()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._peer if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (16384, 65536)

    def take(self) -> bytes:
        data = bytes(self.written)
        self.written.clear()
        return data
