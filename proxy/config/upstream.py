"""`[upstreams.<name>]`: backends or a Consul service, strategy, timeouts, retries,
health checks, outlier detection and limits."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)

from proxy.config.tls import UpstreamTlsConfig
from proxy.config.types import Duration, Size, Strict, parse_hostport

__all__ = ["BackendEntry", "ConsulServiceConfig", "HealthConfig", "OutlierConfig",
           "RetryConfig", "StickyConfig", "TimeoutsConfig", "UpstreamConfig"]


def _backend_entry(value: Any) -> Any:
    return {"address": value} if isinstance(value, str) else value


class BackendEntry(Strict):
    address: str
    weight: int = Field(default=1, ge=1, le=10_000)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_hostport(value)
        return value

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_hostport(self.address)


class TimeoutsConfig(Strict):
    connect: Duration = 3.0
    response_header: Duration = 60.0
    read_idle: Duration = 60.0
    total: Duration | None = None


_RETRY_CONDITIONS = {"connect-failure", "reset", "timeout", "5xx"}


class RetryConfig(Strict):
    """`upstreams.<name>.retry`: when and how often a request is tried again, always
    on another backend when there is one (Envoy's retry policy and retry budget)."""

    attempts: int = Field(default=3, ge=1, le=10)  # tries in all, the first included
    retry_on: list[str | int] = Field(
        default_factory=lambda: list[str | int](["connect-failure", "reset"]))
    per_try_timeout: Duration | None = None  # per attempt, until the response head
    backoff_base: Duration = 0.025
    backoff_max: Duration = 0.25
    budget_percent: float = Field(default=20.0, ge=0, le=100)
    min_retry_concurrency: int = Field(default=3, ge=0)
    retry_body_limit: Size = 64 * 1024  # request bodies up to this size are kept to retry

    @field_validator("retry_on")
    @classmethod
    def _conditions(cls, value: list[str | int]) -> list[str | int]:
        for item in value:
            if isinstance(item, int):
                if not 500 <= item <= 599:
                    raise ValueError(f"status {item} is not a 5xx code")
            elif item not in _RETRY_CONDITIONS:
                allowed = ", ".join(sorted(_RETRY_CONDITIONS))
                raise ValueError(f"{item!r} is not one of {allowed} or a 5xx status code")
        return value

    def retry_statuses(self) -> frozenset[int]:
        codes = {c for c in self.retry_on if isinstance(c, int)}
        if "5xx" in self.retry_on:
            codes |= set(range(500, 600))
        return frozenset(codes)


class ConsulServiceConfig(Strict):
    """`upstreams.<name>.consul`: which Consul service feeds this upstream."""

    service: str = Field(min_length=1)
    tags: list[str] = Field(default_factory=list)
    passing_only: bool = True
    address: str = "service"  # "service" | "node" | a tagged address like "lan_ipv4"
    datacenter: str | None = None


class HealthConfig(Strict):
    """`upstreams.<name>.health`: active checks. A backend must pass them (and, for a
    Consul upstream, Consul's own checks) to receive traffic."""

    path: str = "/"
    interval: Duration = 5.0
    timeout: Duration = 2.0
    expected_statuses: list[int | str] = Field(default_factory=lambda: list[int | str](
        ["2xx", "3xx"]))
    host: str | None = None
    rise: int = Field(default=2, ge=1, le=100)
    fall: int = Field(default=3, ge=1, le=100)
    jitter: Duration = 0.5

    @field_validator("expected_statuses")
    @classmethod
    def _statuses(cls, value: list[int | str]) -> list[int | str]:
        for item in value:
            ok = (isinstance(item, int) and 100 <= item <= 599) or (
                isinstance(item, str) and len(item) == 3 and item[0] in "12345"
                and item[1:] == "xx")
            if not ok:
                raise ValueError(f'{item!r} is not a status code or class like "2xx"')
        return value

    def accepts(self, status: int) -> bool:
        return any(status == s if isinstance(s, int) else str(status)[0] == s[0]
                   for s in self.expected_statuses)


class OutlierConfig(Strict):
    """`upstreams.<name>.outlier`: passive outlier detection (Envoy's)."""

    consecutive_failures: int = Field(default=5, ge=0)  # 5xx or connect failures; 0: off
    base_ejection_time: Duration = 30.0
    max_ejection_time: Duration = 300.0
    max_ejection_percent: int = Field(default=50, ge=0, le=100)


_COOKIE_NAME = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$"  # an RFC 9110 token (RFC 6265 §4.1.1)


class StickyConfig(Strict):
    """`upstreams.<name>.sticky`: the first answer sets a cookie naming the chosen
    backend by an HMAC of its identity (never its address); later requests carrying
    it go to that backend while it is healthy and present, else the strategy picks
    again and the cookie is replaced. The same secret gives the same cookie values in
    every worker and every instance."""

    cookie: str = Field(pattern=_COOKIE_NAME, max_length=64)
    secret_file: str | None = None  # the HMAC key, from a file (preferred)
    secret: str | None = Field(default=None, min_length=16)  # or inline
    max_age: Duration | None = None  # unset: a session cookie
    path: str = "/"
    domain: str | None = None
    same_site: Literal["Lax", "Strict", "None"] = "Lax"
    http_only: bool = True
    secure: bool | Literal["auto"] = "auto"  # auto: on requests that came over TLS

    @field_validator("secret_file")
    @classmethod
    def _secret_file(cls, value: str | None) -> str | None:
        if value is not None and not os.path.isfile(value):
            raise ValueError(f"file not found: {value!r}")
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> StickyConfig:
        if (self.secret is None) == (self.secret_file is None):
            raise ValueError("set one of secret_file or secret (at least 16 characters): "
                             "the same secret in every instance gives the same pins")
        return self

    @field_validator("path", "domain")
    @classmethod
    def _attribute(cls, value: str | None) -> str | None:
        if value is not None and (";" in value or any(ord(c) < 0x21 for c in value)):
            raise ValueError(f"must not contain ';', spaces or controls, got {value!r}")
        return value


class UpstreamConfig(Strict):
    backends: list[Annotated[BackendEntry, BeforeValidator(
        _backend_entry, json_schema_input_type=str | BackendEntry)]] | None = Field(
        default=None, min_length=1
    )
    consul: ConsulServiceConfig | None = None
    strategy: str = "round_robin"
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    # Picks beside the real strategy on every request, without effect, to compare
    # before switching (bascule_shadow_* metrics; proxy/balancer.py).
    shadow_strategy: str | None = None
    shadow_strategy_options: dict[str, Any] = Field(default_factory=dict)
    # Pin clients to a backend with a signed cookie (proxy/sticky.py).
    sticky: StickyConfig | None = None
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    pool_size: int = Field(default=64, ge=0, le=100_000)
    idle_timeout: Duration = 15.0
    retry: RetryConfig = Field(default_factory=RetryConfig)
    health: HealthConfig | None = None
    tls: UpstreamTlsConfig | None = None  # HTTPS to the backends (proxy/tls/client.py)
    outlier: OutlierConfig = Field(default_factory=OutlierConfig)
    # Below this share of healthy backends, balance over all of them (Envoy's panic
    # threshold) rather than overload the survivors or fail everything.
    panic_threshold: int = Field(default=50, ge=0, le=100)
    slow_start: Duration = 0.0
    max_inflight: int = Field(default=0, ge=0)  # per upstream and worker; 0 = no limit
    max_inflight_per_backend: int = Field(default=0, ge=0)
    # What a backend may send in a response head (all 1xx heads of an exchange and
    # the final one together; fields per head). Over them: 502, connection closed.
    max_response_header_size: Size = 16 * 1024
    max_response_headers: int = Field(default=100, ge=1, le=10_000)

    @field_validator("max_response_header_size")
    @classmethod
    def _response_head(cls, value: int) -> int:
        if not 1024 <= value <= 16 * 1024**2:
            raise ValueError("must be between 1KiB and 16MiB")
        return value


