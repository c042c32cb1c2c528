"""Reading a config file: TOML, the schema, then the checks that span tables (every
problem reported at once as `FILE: key.path: message`), and the expansion of
shorthand tables into ordinary entries."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import (
    ValidationError,
)

from proxy.config.model import Config, PluginConfig
from proxy.config.types import parse_hostport
from proxy.errors import ConfigError, ConfigProblem

__all__ = ["load_config", "parse_config"]


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith("function-") or part in {"str", "int", "literal['auto']"}:
            continue  # pydantic's union/validator branch names mean nothing to a user
        else:
            out += ("." if out else "") + part
    return out


def _message(error: Any) -> str:
    msg = str(error["msg"])
    if error["type"] == "extra_forbidden":
        return "unknown key (typo?)"
    if error["type"] == "missing":
        return "required key is missing"
    return msg.removeprefix("Value error, ")


def _cross_check(data: dict[str, Any], file: str) -> list[ConfigProblem]:
    """References between tables, checked on the raw document so they are reported
    together with any schema problems (every mistake at once, not one per run)."""
    problems: list[ConfigProblem] = []
    routes = data.get("routes")
    upstreams = data.get("upstreams")
    upstream_names = set(upstreams) if isinstance(upstreams, dict) else set()
    seen: dict[tuple[Any, Any], int] = {}
    names: dict[str, int] = {}
    for i, route in enumerate(routes if isinstance(routes, list) else []):
        if not isinstance(route, dict):
            continue
        label = route.get("name")
        if isinstance(label, str):
            if label in names:
                problems.append(ConfigProblem(
                    file, f"routes[{i}].name", f"name {label!r} is used by routes[{names[label]}]"))
            names[label] = i
        split = route.get("upstreams")
        references = [(f"routes[{i}].upstream", route.get("upstream"))] + [
            (f"routes[{i}].upstreams[{j}].name", t.get("name") if isinstance(t, dict) else None)
            for j, t in enumerate(split if isinstance(split, list) else [])]
        for where, name in references:
            if isinstance(name, str) and name not in upstream_names:
                known = ", ".join(sorted(upstream_names)) or "none"
                problems.append(ConfigProblem(
                    file, where, f"upstream {name!r} is not defined (defined: {known})"))
        host = route.get("host")
        key = (host.strip().lower() if isinstance(host, str) else host,
               route.get("path_prefix", "/"))
        if key in seen:
            problems.append(ConfigProblem(
                file, f"routes[{i}]",
                f"duplicate route: same host and path_prefix as routes[{seen[key]}]"))
        else:
            seen[key] = i
    plugins = data.get("plugins")
    plugin_names: dict[str, int] = {}
    for i, plugin in enumerate(plugins if isinstance(plugins, list) else []):
        pname = plugin.get("name") if isinstance(plugin, dict) else None
        if isinstance(pname, str):
            if pname in plugin_names:
                problems.append(ConfigProblem(
                    file, f"plugins[{i}].name",
                    f"name {pname!r} is used by plugins[{plugin_names[pname]}]"))
            plugin_names[pname] = i
    for i, route in enumerate(routes if isinstance(routes, list) else []):
        wanted = route.get("plugins") if isinstance(route, dict) else None
        for j, pname in enumerate(wanted if isinstance(wanted, list) else []):
            if isinstance(pname, str) and pname not in plugin_names and pname != "cache":
                known = ", ".join(sorted({*plugin_names, "cache"}))
                problems.append(ConfigProblem(
                    file, f"routes[{i}].plugins[{j}]",
                    f"plugin {pname!r} is not defined in [[plugins]] (defined: {known})"))
    for name, upstream in (upstreams.items() if isinstance(upstreams, dict) else []):
        if isinstance(upstream, dict):
            has_backends, has_consul = "backends" in upstream, "consul" in upstream
            if has_backends == has_consul:
                problems.append(ConfigProblem(
                    file, f"upstreams.{name}",
                    "set either backends or consul, not both" if has_backends
                    else "needs backends (a static list) or consul (a service to watch)"))
        backends = upstream.get("backends") if isinstance(upstream, dict) else None
        if not isinstance(backends, list):
            continue
        addresses = [b if isinstance(b, str) else b.get("address") if isinstance(b, dict)
                     else None for b in backends]
        for dup in sorted({a for a in addresses if a and addresses.count(a) > 1}):
            problems.append(ConfigProblem(
                file, f"upstreams.{name}.backends", f"backend {dup!r} is listed twice"))
    return problems


_WILDCARDS = frozenset({"0.0.0.0", "::"})


def _listen_problems(config: Config, file: str) -> list[ConfigProblem]:
    """Admin never shares a port with traffic, and no address is listed twice: an
    overlap would make the kernel split connections between the two listeners."""
    problems: list[ConfigProblem] = []
    seen: dict[tuple[str, int], int] = {}
    parsed = []
    for i, address in enumerate(config.server.listen):
        key = parse_hostport(address, default_host="0.0.0.0")
        if key in seen:
            problems.append(ConfigProblem(file, f"server.listen[{i}]",
                                          f"{address!r} is listed twice"))
        seen[key] = i
        parsed.append(key)
    admin_host, admin_port = parse_hostport(config.admin.listen, default_host="0.0.0.0")
    for i, (host, port) in enumerate(parsed):
        if port == admin_port and (host == admin_host or host in _WILDCARDS
                                   or admin_host in _WILDCARDS):
            problems.append(ConfigProblem(
                file, "admin.listen",
                f"{config.admin.listen!r} overlaps server.listen[{i}] "
                f"({config.server.listen[i]!r}): the admin listener never shares a port "
                "with traffic"))
    return problems


# The plugin the [cache] table and `cache = true` stand for: an entry point name in
# `bascule.plugins`, resolved by the loader like any [[plugins]] `use`.
CACHE_TABLE_PLUGIN = "cache"


def _table_plugins(config: Config, file: str) -> tuple[Config, list[ConfigProblem]]:
    """`[cache]` and a route's `cache = true` are shorthand, expanded here and only
    here into an ordinary [[plugins]] entry named "cache" (options: the table) and
    that name last in the route's plugins: past this point nothing treats the cache
    apart from other plugins."""
    name = CACHE_TABLE_PLUGIN
    defined = any(p.name == name for p in config.plugins)
    if defined and config.cache:
        return config, [ConfigProblem(file, "cache", "unused: [[plugins]] already "
                                      f"defines a plugin named {name!r}")]
    plugins = list(config.plugins)
    wanted = any(r.cache or name in r.plugins for r in config.routes)
    if not defined and (wanted or config.cache):
        entry = PluginConfig(name=name, use=CACHE_TABLE_PLUGIN, options=dict(config.cache))
        entry._key_path = "cache"
        plugins.append(entry)
    routes = [r.model_copy(update={"plugins": list(dict.fromkeys([*r.plugins, name]))})
              if r.cache else r for r in config.routes]
    return config.model_copy(update={"plugins": plugins, "routes": routes}), []


def parse_config(data: dict[str, Any], file: str) -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    problems: list[ConfigProblem] = []
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems = [
            ConfigProblem(file, _format_loc(err["loc"]), _message(err))
            for err in exc.errors()
        ]
    problems += _cross_check(data, file)
    if config is not None:
        problems += _listen_problems(config, file)
        config, table_problems = _table_plugins(config, file)
        problems += table_problems
    if problems or config is None:
        raise ConfigError(problems)
    return config


def load_config(path: str | Path) -> Config:
    file = str(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError([ConfigProblem(file, "", "file not found")]) from None
    except OSError as exc:
        raise ConfigError([ConfigProblem(file, "", f"cannot read: {exc.strerror}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem(file, "", f"invalid TOML: {exc}")]) from None
    return parse_config(data, file)
