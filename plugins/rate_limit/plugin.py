"""The `rate_limit` plugin: GCRA (gcra.py) by key, refusing with 429.

Options:
- `limit` requests per `period` (default "1s"), with `burst` more at once (default
  0): at rest `burst + 1` requests pass together, then one per period/limit.
- `key`: the parts that make the key, default `["client_ip"]`: `client_ip` (the
  address proxy/client_address.py resolves through trusted_proxies), `route`,
  `header:NAME`, `cookie:NAME`. A request missing a header or cookie part is not
  limited by this plugin (nginx's rule for an empty key).
- `store`: `memory` (per worker: with N workers a client may get up to N times the
  limit, since each worker counts on its own; not divided by N, because SO_REUSEPORT
  spreads connections unevenly) or `redis` (the `[redis]` table: one script per
  decision, exact across workers and Bascule instances).
- `on_store_error`: `allow` (default: fail open) or `refuse` (503) when Redis is
  slow (past `[redis] timeout`) or down; logged once by the breaker and counted.
- `dry_run`: decide and count, refuse nothing.
- `headers` (default true): `RateLimit-Policy` and `RateLimit` fields
  (draft-ietf-httpapi-ratelimit-headers-09) on every answer of the route.

Over the limit: `429 Too Many Requests` with `Retry-After` (whole seconds, rounded
up). Metrics: `bascule_rate_limit_decisions_total{route, result}` with result one of
allowed, limited, dry_run_limited, unkeyed, store_error_allowed,
store_error_refused; never the key.
"""

from __future__ import annotations

import logging
import math
import time
from http.cookies import CookieError, SimpleCookie
from typing import Any

from multidict import CIMultiDict

from plugins.rate_limit.gcra import Decision, MemoryStore, Policy
from plugins.rate_limit.redis_store import RedisStore, StoreUnavailable
from proxy.plugin import Handler, PluginContext, ProxyRequest, ProxyResponse, refuse_unknown_options
from proxy.units import parse_duration

__all__ = ["RateLimit"]

log = logging.getLogger("bascule.rate_limit")

_OPTIONS = {"limit", "period", "burst", "key", "store", "on_store_error", "dry_run",
            "headers", "max_keys", "name"}


def _int(options: dict[str, Any], key: str, default: int | None, low: int) -> int:
    value = options.get(key, default)
    if value is None:
        raise ValueError(f"{key}: required (an integer)")
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key}: must be an integer >= {low}")
    return value


def _key_parts(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise ValueError('key: must be a list like ["client_ip"] or ["header:X-Api-Key"]')
    parts = []
    for item in value:
        kind, _, name = str(item).partition(":")
        if kind in ("client_ip", "route") and not name:
            parts.append((kind, ""))
        elif kind in ("header", "cookie") and name:
            parts.append((kind, name))
        else:
            raise ValueError(f'key: {item!r} is not client_ip, route, "header:NAME" or '
                             f'"cookie:NAME"')
    return tuple(parts)


class RateLimit:
    def __init__(self, options: dict[str, Any]) -> None:
        refuse_unknown_options(options, _OPTIONS)
        limit = _int(options, "limit", None, 1)
        try:
            period = parse_duration(options.get("period", "1s"))
        except ValueError as exc:
            raise ValueError(f"period: {exc}") from None
        if period <= 0:
            raise ValueError("period: must be more than 0")
        self.policy = Policy(limit, int(period * 1_000_000), _int(options, "burst", 0, 0))
        self.period = period
        self.parts = _key_parts(options.get("key", ["client_ip"]))
        self._client_only = self.parts == (("client_ip", ""),)
        store = options.get("store", "memory")
        if store not in ("memory", "redis"):
            raise ValueError('store: must be "memory" or "redis"')
        self.store_kind = store
        on_error = options.get("on_store_error", "allow")
        if on_error not in ("allow", "refuse"):
            raise ValueError('on_store_error: must be "allow" or "refuse"')
        self.fail_open = on_error == "allow"
        for flag in ("dry_run", "headers"):
            if not isinstance(options.get(flag, False), bool):
                raise ValueError(f"{flag}: must be true or false")
        self.dry_run = options.get("dry_run", False)
        self.headers = options.get("headers", True)
        self.name = str(options.get("name", "default"))
        self.memory = MemoryStore(_int(options, "max_keys", 100_000, 1))
        self.redis: RedisStore | None = None
        self._record: Any = lambda route, result: None
        self.policy_field = f'"{self.name}";q={limit};w={max(1, round(period))}'
        self._quoted = f'"{self.name}"'

    def status(self) -> dict[str, Any]:
        """For the dashboard: the store and, for Redis, whether its breaker is open."""
        redis = getattr(self, "redis", None)
        return {"store": self.store_kind,
                "store_state": "n/a" if redis is None
                else "open (store unreachable)" if redis.breaker.is_open else "closed"}

    async def start(self, context: PluginContext) -> None:
        metrics = context.metrics
        if metrics is not None and hasattr(metrics, "record_rate_limit"):
            self._record = metrics.record_rate_limit
        if self.store_kind == "redis":
            redis = context.redis
            self.redis = RedisStore(redis.url, cluster=redis.cluster,
                                    prefix=redis.key_prefix, name=self.name,
                                    timeout=redis.timeout, pool_size=redis.pool_size)

    async def aclose(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    def key(self, request: ProxyRequest) -> str | None:
        if self._client_only:
            return request.client
        values = []
        for kind, name in self.parts:
            if kind == "client_ip":
                values.append(request.client)
            elif kind == "route":
                values.append(request.route)
            elif kind == "header":
                value = request.headers.get(name)
                if value is None:
                    return None
                values.append(value)
            else:
                value = _cookie(request.headers, name)
                if value is None:
                    return None
                values.append(value)
        return "\x00".join(values)

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        key = self.key(request)
        if key is None:
            self._record(request.route, "unkeyed")
            return await call_next(request)
        try:
            decision = await self._decide(key)
        except StoreUnavailable:
            if self.fail_open:
                self._record(request.route, "store_error_allowed")
                return await call_next(request)
            self._record(request.route, "store_error_refused")
            body = b"rate limit unavailable\n"
            return ProxyResponse(503, CIMultiDict({"Content-Type": "text/plain"}), body,
                                 length=len(body))
        if not decision.allowed:
            if self.dry_run:
                self._record(request.route, "dry_run_limited")
                return await call_next(request)
            self._record(request.route, "limited")
            return self._refuse(decision)
        self._record(request.route, "allowed")
        response = await call_next(request)
        if self.headers:
            self._describe(response.headers, decision)
        return response

    async def _decide(self, key: str) -> Decision:
        if self.redis is not None:
            return await self.redis.decide(key, self.policy)
        return self.memory.decide(key, time.monotonic_ns() // 1000, self.policy)

    def _describe(self, headers: CIMultiDict[str], decision: Decision) -> None:
        headers["RateLimit-Policy"] = self.policy_field
        # t: whole seconds until the key is back at rest, rounded up
        headers["RateLimit"] = (f"{self._quoted};r={decision.remaining(self.policy)};"
                                f"t={-(-decision.ahead_us // 1_000_000)}")

    def _refuse(self, decision: Decision) -> ProxyResponse:
        body = b"too many requests\n"
        headers = CIMultiDict({"Content-Type": "text/plain; charset=utf-8",
                               "Retry-After": str(max(1, math.ceil(
                                   decision.retry_after_us / 1_000_000)))})
        if self.headers:
            self._describe(headers, decision)
        return ProxyResponse(429, headers, body, length=len(body))


def _cookie(headers: CIMultiDict[str], name: str) -> str | None:
    for value in headers.getall("Cookie", []):
        try:
            jar = SimpleCookie(value)
        except CookieError:
            continue
        if name in jar:
            return jar[name].value
    return None
