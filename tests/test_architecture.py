"""DESIGN.md §2: proxy/ reaches strategies and plugins only through the loader."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_proxy_never_imports_strategies_or_plugins() -> None:
    offenders = []
    for file in (ROOT / "proxy").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{file.name}: {n}" for n in names
                          if n.split(".")[0] in {"strategies", "plugins"}]
    assert offenders == []


def test_builtin_strategies_are_registered_entry_points() -> None:
    from proxy.loader import STRATEGY_GROUP, available, load

    assert {"round_robin", "random"} <= set(available(STRATEGY_GROUP))
    assert load(STRATEGY_GROUP, "round_robin").__name__ == "RoundRobin"
