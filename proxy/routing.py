"""The route table: which upstream serves a request (pure; built once per config).

Host matching: an exact host beats the most specific `*.suffix` wildcard, which beats
routes without a host. Within the chosen host group the longest `path_prefix` wins
(a plain string prefix, like nginx `location /api` and Traefik `PathPrefix`); when no
prefix of a group matches, the next, less specific group is tried.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["Route", "RouteTable", "normalise_host", "strip_path_prefix"]


@dataclass(frozen=True)
class Route:
    name: str
    upstream: str
    host: str | None = None
    path_prefix: str = "/"
    strip_prefix: bool = False
    pass_host: bool = True
    websocket: bool = True
    access_log: bool = True
    plugins: tuple[str, ...] = ()


@lru_cache(maxsize=1024)
def normalise_host(host: str | None) -> str:
    """Lower-case host without port or trailing dot ("Api.Example.com:8080" →
    "api.example.com"; "[::1]:80" → "[::1]")."""
    if not host:
        return ""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    host = host.partition(":")[0]
    return host.rstrip(".")


def strip_path_prefix(target: str, prefix: str) -> str:
    """Remove the route prefix from a raw request-target, keeping the query and a
    leading slash ("/api/x?q" with "/api" → "/x?q"; "/api" → "/")."""
    rest = target[len(prefix):]
    if not rest.startswith("/"):
        rest = "/" + rest
    return rest


class RouteTable:
    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        self._exact: dict[str, list[Route]] = {}
        self._wildcard: list[tuple[str, list[Route]]] = []
        self._any: list[Route] = []
        wildcards: dict[str, list[Route]] = {}
        for route in routes:
            if route.host is None:
                self._any.append(route)
            elif route.host.startswith("*."):
                wildcards.setdefault(route.host[1:], []).append(route)  # ".example.com"
            else:
                self._exact.setdefault(route.host, []).append(route)
        self._wildcard = sorted(wildcards.items(), key=lambda kv: -len(kv[0]))
        for group in [*self._exact.values(), *wildcards.values(), self._any]:
            group.sort(key=lambda r: -len(r.path_prefix))

    def match(self, host: str, path: str) -> Route | None:
        """`host` already normalised; `path` is the raw request-target."""
        group = self._exact.get(host)
        if group is not None:
            route = _longest_prefix(group, path)
            if route is not None:
                return route
        for suffix, routes in self._wildcard:
            if host.endswith(suffix) and len(host) > len(suffix):
                route = _longest_prefix(routes, path)
                if route is not None:
                    return route
        return _longest_prefix(self._any, path)

    def __repr__(self) -> str:
        return f"RouteTable({list(self.routes)!r})"


def _longest_prefix(routes: list[Route], path: str) -> Route | None:
    for route in routes:
        if path.startswith(route.path_prefix):
            return route
    return None
