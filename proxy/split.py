"""A route's weighted traffic split over upstreams (`upstreams = [{ name, weight }]`):
Envoy's weighted clusters, Traefik's weighted services, nginx's split_clients.

Per request, in order: a side whose `force_header` or `force_cookie` the request
carries (testers reaching the canary on purpose); else, with `split_on` and the key
present, the side the key hashes to (xxh64 of the key into the weights' cumulative
ranges: the same user stays on one side, in every worker and every instance, and a
weight change moves only the users of the range that moved); else smooth weighted
round robin (nginx's), which keeps each worker's shares exact to within one request.
Built at config time; a reload builds a new one and requests in flight keep theirs.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping

import xxhash

from proxy.config import RouteConfig
from proxy.hashkey import HashKeySource, parse_hash_on

__all__ = ["TrafficSplit"]


def _cookie_value(cookie_header: str | None, name: str) -> str | None:
    if not cookie_header:
        return None
    prefix = name + "="
    for part in cookie_header.split(";"):
        part = part.strip()
        if part.startswith(prefix):
            return part[len(prefix):]
    return None


class TrafficSplit:
    def __init__(self, config: RouteConfig) -> None:
        targets = config.upstreams or []
        self.names = [t.name for t in targets]
        self.weights = [t.weight for t in targets]
        self.total = sum(self.weights)
        self.key: HashKeySource | None = (parse_hash_on(config.split_on)
                                          if config.split_on else None)
        ends, running = [], 0
        for weight in self.weights:
            running += weight
            ends.append(running)
        self._ends = ends  # cumulative: side i owns [ends[i-1], ends[i])
        self._current = [0] * len(targets)
        self._force_headers: list[tuple[str, str, str]] = []
        self._force_cookies: list[tuple[str, str, str]] = []
        for t in targets:
            if t.force_header:
                field, _, value = t.force_header.partition(":")
                self._force_headers.append((field.strip(), value.strip(), t.name))
            if t.force_cookie:
                cookie, _, value = t.force_cookie.partition("=")
                self._force_cookies.append((cookie, value, t.name))

    def choose(self, headers: Mapping[str, str], target: str, peer: str) -> str:
        for field, value, name in self._force_headers:
            if headers.get(field, "").strip() == value:
                return name
        if self._force_cookies:
            cookie = headers.get("Cookie")
            for cookie_name, value, name in self._force_cookies:
                if _cookie_value(cookie, cookie_name) == value:
                    return name
        if self.key is not None:
            key = self.key.extract(headers, target, peer)
            if key is not None:
                point = xxhash.xxh64_intdigest(key.encode("utf-8", "surrogateescape"))
                return self.names[bisect.bisect_right(self._ends, point % self.total)]
        return self._round_robin()

    def _round_robin(self) -> str:
        # nginx's smooth weighted round robin: exact shares, sides interleaved.
        current, weights = self._current, self.weights
        best = 0
        for i, weight in enumerate(weights):
            current[i] += weight
            if current[i] > current[best]:
                best = i
        current[best] -= self.total
        return self.names[best]

    def describe(self) -> list[dict[str, object]]:
        return [{"name": n, "weight": w} for n, w in zip(self.names, self.weights,
                                                          strict=True)]
