"""Parsing of the human-readable durations ("250ms", "5s", "2m") and sizes ("64KiB")
used throughout the TOML config."""

from __future__ import annotations

import re

__all__ = ["parse_duration", "parse_size"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {
    "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3,
}


def parse_duration(value: object) -> float:
    """Seconds from "250ms" / "5s" / "2m" / "1h". Bare numbers are refused so a
    missing unit cannot silently mean seconds where the user meant milliseconds."""
    if not isinstance(value, str):
        raise ValueError(f'must be a duration string like "5s" or "250ms", got {value!r}')
    match = _DURATION.match(value)
    if match is None:
        raise ValueError(f'must be a duration like "250ms", "5s", "2m" or "1h", got {value!r}')
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(value: object) -> int:
    """Bytes from "64KiB" / "10MiB" / "512" (bytes)."""
    if isinstance(value, bool):
        raise ValueError(f"must be a size like \"64KiB\", got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f'must be a size like "64KiB" or "10MiB", got {value!r}')
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(f'must be a size like "64KiB", "10MiB" or "1GiB", got {value!r}')
    return int(match.group(1)) * _SIZE_UNITS[match.group(2) or "B"]
