"""Building blocks of the config schema: the strict base model (unknown keys are
errors), durations and sizes written as strings, and "host:port" addresses."""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
)

from proxy.units import parse_duration, parse_size

__all__ = ["Duration", "Size", "Strict", "parse_hostport"]

def duration_text(seconds: float) -> str:
    """A duration as the config writes it ("0.25s"), so that a JSON dump of a
    model (sent to the agent, proxy/agent/wire.py) validates back to the same."""
    return f"{seconds:.6f}".rstrip("0").rstrip(".") + "s"


Duration = Annotated[float, BeforeValidator(parse_duration),
                     PlainSerializer(duration_text, return_type=str, when_used="json")]
Size = Annotated[int, BeforeValidator(parse_size)]


def parse_hostport(value: str, *, default_host: str | None = None) -> tuple[str, int]:
    """("127.0.0.1", 8080) from "127.0.0.1:8080", "[::1]:8080" or "localhost:80"."""
    if not isinstance(value, str):
        raise ValueError(f'must be "host:port", got {value!r}')
    host, sep, port_s = value.rpartition(":")
    if not sep:
        raise ValueError(f'must be "host:port", got {value!r}')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    elif ":" in host:
        raise ValueError(f'IPv6 addresses must be bracketed like "[::1]:8080", got {value!r}')
    if not host:
        if default_host is None:
            raise ValueError(f'must be "host:port" with a host, got {value!r}')
        host = default_host
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"port must be 1-65535, got {port_s!r}")
    return host, int(port_s)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False,
                              populate_by_name=False)


