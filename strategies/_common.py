"""Helpers shared by the built-in strategies."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["float_option", "int_option", "reject_unknown_options"]


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
