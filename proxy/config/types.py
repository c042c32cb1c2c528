"""Building blocks of the config schema: the strict base model (unknown keys are
errors), durations and sizes written as strings, and "host:port" addresses."""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
)

from proxy.units import parse_duration, parse_size

__all__ = ["Duration", "Size", "Strict", "parse_hostport"]

def duration_text(seconds: float) -> str:
    """A duration as the config writes it ("0.25s"), so that a JSON dump of a
    model (sent to the agent, proxy/agent/wire.py) validates back to the same."""
    return f"{seconds:.6f}".rstrip("0").rstrip(".") + "s"


# What the config accepts, for the JSON Schema (proxy/config/schema.py): the strings
# proxy/units.py parses, not the numbers they become.
DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)\s*$"
DurationText = Annotated[str, Field(pattern=DURATION_PATTERN,
                                    examples=["250ms", "5s", "2m", "1h"])]
SizeText = Annotated[str, Field(pattern=r"^\s*\d+\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$",
                                examples=["64KiB", "10MiB"])]

Duration = Annotated[float, BeforeValidator(parse_duration, json_schema_input_type=DurationText),
                     PlainSerializer(duration_text, return_type=str, when_used="json")]
Size = Annotated[int, BeforeValidator(
    parse_size, json_schema_input_type=SizeText | Annotated[int, Field(ge=0)])]


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


