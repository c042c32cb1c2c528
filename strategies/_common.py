"""Helpers shared by the built-in strategies."""

from __future__ import annotations

import math
from typing import Any

from proxy.units import parse_duration

__all__ = ["SHARED_OPTIONS", "check_shared_options", "float_option", "int_option",
           "reject_unknown_options"]

# Options the engine acts on for strategies that count in-flight requests: the counts
# are shared across the fleet through Redis (proxy/fleet.py reads them too).
SHARED_OPTIONS = {"shared", "shared_interval"}


def reject_unknown_options(options: dict[str, Any], known: set[str]) -> None:
    for key in options:
        if key not in known:
            allowed = ", ".join(sorted(known)) or "none"
            raise ValueError(f"{key}: unknown option (allowed: {allowed})")


def int_option(options: dict[str, Any], name: str, default: int | None, *,
               minimum: int) -> int | None:
    value = options.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}")
    return value


def float_option(options: dict[str, Any], name: str, default: float | None, *,
                 above: float) -> float | None:
    value = options.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a number, got {value!r}")
    if value <= above:
        raise ValueError(f"{name}: must be > {above}")
    return float(value)


def check_shared_options(options: dict[str, Any]) -> None:
    shared = options.get("shared")
    if shared is not None and shared != "redis":
        raise ValueError(f'shared: must be "redis", got {shared!r}')
    interval = options.get("shared_interval")
    if interval is not None:
        if shared is None:
            raise ValueError('shared_interval: only with shared = "redis"')
        try:
            seconds = parse_duration(interval)
        except ValueError as exc:
            raise ValueError(f"shared_interval: {exc}") from None
        if not 0.01 <= seconds <= 10:
            raise ValueError("shared_interval: must be between 10ms and 10s")
