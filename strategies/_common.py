"""Helpers shared by the built-in strategies."""

from __future__ import annotations

from typing import Any

__all__ = ["reject_unknown_options"]


def reject_unknown_options(options: dict[str, Any], known: set[str]) -> None:
    for key in options:
        if key not in known:
            allowed = ", ".join(sorted(known)) or "none"
            raise ValueError(f"{key}: unknown option (allowed: {allowed})")
