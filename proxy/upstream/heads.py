"""What an upstream connection hands the exchange: response heads (final and 1xx) and
the limits a response head must keep."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.headers import ResponseHeaderFilter

__all__ = ["InterimHead", "ResponseHead", "ResponseLimits"]


@dataclass(frozen=True, slots=True)
class ResponseLimits:
    """What one response's head may take: bytes of every head of the exchange
    together (interim 1xx heads included), and header fields per head."""

    max_head_size: int = 16 * 1024
    max_headers: int = 100


class ResponseHead:
    __slots__ = ("fields", "reason", "status")

    def __init__(self, status: int, reason: bytes, fields: ResponseHeaderFilter):
        self.status = status
        self.reason = reason
        self.fields = fields


class InterimHead:
    """A 1xx response head, with its end-to-end fields as ready-to-send lines."""

    __slots__ = ("block", "reason", "status")

    def __init__(self, status: int, reason: bytes, block: bytes):
        self.status = status
        self.reason = reason
        self.block = block

    def encode(self) -> bytes:
        return b"HTTP/1.1 %d %s\r\n%s\r\n" % (self.status, self.reason, self.block)
