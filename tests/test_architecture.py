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


def test_proxy_never_looks_a_plugin_up_by_a_literal_name() -> None:
    """The engine reaches plugins only through config entries: no `load(GROUP,
    "name")` with a literal name, and no plugin attribute probed with getattr/hasattr
    (what a plugin may do is declared in proxy/plugin.py and found once)."""
    offenders = []
    for file in (ROOT / "proxy").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else (
                func.attr if isinstance(func, ast.Attribute) else "")
            args = node.args
            if name == "load" and len(args) >= 2 and isinstance(args[1], ast.Constant):
                offenders.append(f"{file.name}:{node.lineno}: load(..., {args[1].value!r})")
            if (name in ("getattr", "hasattr") and len(args) >= 2
                    and isinstance(args[0], ast.Name) and "plugin" in args[0].id.lower()):
                offenders.append(f"{file.name}:{node.lineno}: {name}({args[0].id}, ...)")
    assert offenders == []


def test_the_cache_table_is_an_ordinary_plugin_entry() -> None:
    from proxy.app import build_runtime
    from proxy.config import parse_config

    config = parse_config({"cache": {"memory_max_size": "1MiB"},
                           "routes": [{"upstream": "a", "cache": True, "plugins": []}],
                           "upstreams": {"a": {"backends": ["127.0.0.1:1"]}}}, "f.toml")
    assert [(p.name, p.use) for p in config.plugins] == [("cache", "cache")]
    assert config.routes[0].plugins == ["cache"]
    runtime = build_runtime(config, "f.toml")
    assert list(runtime.chains) == ["routes[0]"] and "cache" in runtime.seams.purgeable


def _proxy_imports(module: str) -> set[str]:
    """Modules of the proxy package that `module` imports, transitively."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = ROOT / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = ROOT / name.replace(".", "/") / "__init__.py"
        if not path.exists():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and (
                    node.module.startswith("proxy.")):
                todo.append(node.module)
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("proxy.")]
    return seen - {module}


def test_the_request_path_never_imports_assembly() -> None:
    """DESIGN.md §2: the engine imports the Runtime it serves from a leaf module;
    assembly (config to Runtime, discovery, the loader, reload) sits above it."""
    assembly = {"proxy.app", "proxy.reload", "proxy.loader", "proxy.workers", "proxy.cli"}
    for engine in ("proxy.forward", "proxy.exchange", "proxy.relay", "proxy.chain", "proxy.body",
                   "proxy.websocket", "proxy.runtime", "proxy.response",
                   "proxy.upstream.connection", "proxy.upstream.pool"):
        imported = _proxy_imports(engine)
        bad = sorted(m for m in imported
                     if m in assembly or m.startswith("proxy.discovery"))
        assert bad == [], f"{engine} imports {bad}"
