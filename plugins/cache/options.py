"""The cache plugin's options (`[cache]` or a `[[plugins]]` entry's `options`),
validated once: each error names its option ("max_object_size: ...")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.units import parse_duration, parse_size

__all__ = ["OPTION_NAMES", "CacheOptions"]

OPTION_NAMES = {"store", "memory_max_size", "max_object_size", "heuristic_freshness",
            "heuristic_cap", "ignore_set_cookie", "key_headers", "drop_query",
            "lock_timeout", "stale_while_revalidate", "stale_if_error", "tag_headers",
            "validator_grace", "near_cache_size", "near_cache_ttl", "targeted_cache_control"}

def _option(options: dict[str, Any], name: str, default: Any, parse: Callable[[Any], Any]
            ) -> Any:
    try:
        return parse(options.get(name, default))
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be a list of strings, got {value!r}")
    return tuple(value)


def _store_kind(value: Any) -> str:
    if value not in ("memory", "redis"):
        raise ValueError(f'must be "memory" or "redis", got {value!r}')
    return str(value)


@dataclass(frozen=True)
class CacheOptions:
    store_kind: str  # "memory" (per worker) or "redis" (shared)
    memory_max_size: int
    max_object_size: int
    heuristic: bool
    heuristic_cap: float
    ignore_set_cookie: bool
    key_headers: tuple[str, ...]
    drop_query: frozenset[str]
    lock_timeout: float
    stale_while_revalidate: float  # windows the origin did not grant (off: 0)
    stale_if_error: float
    tag_headers: tuple[str, ...]
    # Entries with a validator are kept this long past their stale windows, so a
    # revalidation can still turn them into 304s (like nginx's `inactive`).
    validator_grace: float
    near_cache_size: int
    near_cache_ttl: float
    # RFC 9213: fields that, when present, set this cache's policy instead of
    # Cache-Control and Expires (first present wins); passed on unchanged.
    targeted: tuple[str, ...]

    @classmethod
    def parse(cls, options: dict[str, Any]) -> CacheOptions:
        for key in options:
            if key not in OPTION_NAMES:
                allowed = ", ".join(sorted(OPTION_NAMES))
                raise ValueError(f"{key}: unknown option (allowed: {allowed})")
        return cls(
            store_kind=_option(options, "store", "memory", _store_kind),
            memory_max_size=_option(options, "memory_max_size", "64MiB", parse_size),
            max_object_size=_option(options, "max_object_size", "8MiB", parse_size),
            heuristic=_option(options, "heuristic_freshness", True, _bool),
            heuristic_cap=_option(options, "heuristic_cap", "1h", parse_duration),
            ignore_set_cookie=_option(options, "ignore_set_cookie", False, _bool),
            key_headers=tuple(h.lower() for h in _option(options, "key_headers", [], _names)),
            drop_query=frozenset(_option(options, "drop_query", [], _names)),
            lock_timeout=_option(options, "lock_timeout", "5s", parse_duration),
            stale_while_revalidate=_option(options, "stale_while_revalidate", "0s",
                                           parse_duration),
            stale_if_error=_option(options, "stale_if_error", "0s", parse_duration),
            tag_headers=_option(options, "tag_headers", ["Cache-Tag", "Surrogate-Key"],
                                _names),
            validator_grace=_option(options, "validator_grace", "10m", parse_duration),
            near_cache_size=_option(options, "near_cache_size", "16MiB", parse_size),
            near_cache_ttl=_option(options, "near_cache_ttl", "1s", parse_duration),
            targeted=_option(options, "targeted_cache_control", ["CDN-Cache-Control"],
                             _names),
        )
