"""Finds strategies (and later plugins) through entry points, or a "pkg.mod:Attr"
dotted path. `proxy` never imports `strategies/` or `plugins/` by name."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

__all__ = ["PLUGIN_GROUP", "STRATEGY_GROUP", "available", "load"]

STRATEGY_GROUP = "bascule.strategies"
PLUGIN_GROUP = "bascule.plugins"


def available(group: str) -> list[str]:
    return sorted({ep.name for ep in entry_points(group=group)})


def load(group: str, name: str) -> Any:
    """The object registered as `name` in `group`, or at "pkg.mod:Attr".
    Raises ValueError with a message fit for a config error."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"cannot import {module_name!r}: {exc}") from None
        try:
            return getattr(module, attr)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
    matches = [ep for ep in entry_points(group=group) if ep.name == name]
    kind = {"bascule.strategies": "strategy", "bascule.plugins": "plugin"}.get(group, "name")
    if not matches:
        names = ", ".join(available(group)) or "none installed"
        raise ValueError(f"unknown {kind} {name!r} (available: {names})")
    if len({ep.value for ep in matches}) > 1:
        # Two packages claim the name: which one wins must not depend on install order.
        claims = " and ".join(f"{_dist_name(ep)} ({ep.value})" for ep in matches)
        raise ValueError(f"{kind} {name!r} is registered by more than one package: {claims}; "
                         f'uninstall one, or name the class as "package.module:Class"')
    return matches[0].load()


def _dist_name(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    return str(dist.name) if dist is not None else "an unknown package"
