"""The route table: which upstream serves a request (pure; built once per config).

Host matching: an exact host beats the most specific `*.suffix` wildcard, which beats
routes without a host. Within the chosen host group the longest `path_prefix` wins
(a plain string prefix, like nginx `location /api` and Traefik `PathPrefix`); when no
prefix of a group matches, the next, less specific group is tried.

Paths are matched normalised, never raw: every reading of the path that a backend
may apply (proxy/pathnorm.py) must pick the same route, or the request is refused
(`AmbiguousPath`, 400). So `/%61dmin/x`, `/public/../admin/x` and `/./admin/x` all
reach an `/admin` route, and `//admin/x` or `/public/..%2fadmin/x` are refused.
Matching is case-sensitive, like nginx on Linux.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from proxy.errors import AmbiguousPath
from proxy.pathnorm import needs_normalising, readings

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
    normalise_path: bool = False  # forward the normal form instead of the client's bytes
    buffer_requests: int = 64 * 1024  # bodies up to this size are read before forwarding
    # A weighted split over upstreams (proxy/split.py); `upstream` is then its first.
    split: Any = None


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
        """The route for `host` (already normalised) and `path` (the raw path of the
        request-target, without the query); raises AmbiguousPath when readings of
        the path disagree."""
        if not needs_normalising(path):
            return self._match_one(host, path)
        views = readings(path)
        route = self._match_one(host, views[0])
        for view in views[1:]:
            if self._match_one(host, view) is not route:
                raise AmbiguousPath(f"readings of {path!r} route differently")
        return route

    def _match_one(self, host: str, path: str) -> Route | None:
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
