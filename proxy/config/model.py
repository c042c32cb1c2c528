"""The whole config document: listeners (`[server]`, `[admin]`), routes, upstreams,
Consul, plugins, the cache table and Redis."""

from __future__ import annotations

import ipaddress
import os
from typing import Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from proxy.config.tls import ServerTlsConfig
from proxy.config.types import Duration, Size, Strict, parse_hostport
from proxy.config.upstream import UpstreamConfig
from proxy.hashkey import parse_hash_on
from proxy.pathnorm import readings

__all__ = ["AdminConfig", "Config", "ConsulConfig", "ConsulRegisterConfig", "PluginConfig",
           "RedisConfig", "RouteConfig", "ServerConfig", "SplitTarget"]


class ServerConfig(Strict):
    listen: list[str] = Field(default_factory=lambda: ["127.0.0.1:8080"], min_length=1)
    workers: int | Literal["auto"] = 1
    uvloop: bool = True
    graceful_timeout: Duration = 30.0
    keepalive_timeout: Duration = 75.0
    request_header_timeout: Duration = 5.0
    body_idle_timeout: Duration = 30.0
    max_body_size: Size = 100 * 1024**2
    max_request_line: Size = 8 * 1024  # over it: 414
    max_field_size: Size = 8 * 1024  # one field line; over it: 431
    max_header_size: Size = 32 * 1024  # the whole head; over it: 431
    max_headers: int = Field(default=100, ge=1, le=10_000)
    # Client connections per worker; at the cap a new connection replaces the one
    # idle longest (nginx's reusable connections), or is closed when none is idle.
    max_connections: int = Field(default=4096, ge=1, le=1_000_000)
    trusted_proxies: list[str] = Field(default_factory=list)
    forwarded: bool = False  # add an RFC 7239 Forwarded field
    x_real_ip: bool = False  # add X-Real-IP
    underscores_in_headers: bool = False  # pass field names with "_" (nginx: off)
    access_log: str = "stdout"
    access_log_format: Literal["json", "combined"] = "json"
    request_id: bool = True
    trust_request_id: bool = False
    watch_config: bool = False
    tls: ServerTlsConfig | None = None  # TLS listeners (proxy/tls/)

    def all_listen(self) -> list[str]:
        """Every public listen address, plain and TLS."""
        return [*self.listen, *(self.tls.listen if self.tls else [])]

    @field_validator("access_log")
    @classmethod
    def _access_log(cls, value: str) -> str:
        if value in ("stdout", "stderr", "off"):
            return value
        directory = os.path.dirname(os.path.abspath(value))
        if not os.path.isdir(directory):
            raise ValueError(f'must be "stdout", "stderr", "off" or a file in an existing '
                             f"directory, got {value!r}")
        return value

    @field_validator("listen")
    @classmethod
    def _listen_addresses(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_hostport(item, default_host="0.0.0.0")
        return value

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 256:
            raise ValueError('must be 1-256 or "auto"')
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR") from None
        return value

    @field_validator("max_header_size", "max_request_line", "max_field_size")
    @classmethod
    def _header_size(cls, value: int) -> int:
        if not 1024 <= value <= 1024**2:
            raise ValueError("must be between 1KiB and 1MiB")
        return value

    def worker_count(self) -> int:
        return (os.cpu_count() or 1) if self.workers == "auto" else int(self.workers)

    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.trusted_proxies)


class AdminConfig(Strict):
    listen: str = "127.0.0.1:9901"
    metrics: bool = True
    max_backend_series: int = Field(default=1000, ge=1, le=1_000_000)
    token_file: str | None = None
    # Off loopback, /status and /metrics need the token too (when one is set).
    protect_reads: bool = True

    @field_validator("token_file")
    @classmethod
    def _token_file(cls, value: str | None) -> str | None:
        if value is not None and not os.path.isfile(value):
            raise ValueError(f"file not found: {value!r}")
        return value

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_hostport(value, default_host="0.0.0.0")
        return value


class SplitTarget(Strict):
    """One side of a route's traffic split (`upstreams = [{ name, weight }, ...]`)."""

    name: str
    weight: int = Field(default=1, ge=0, le=1_000_000)  # a share; 0: only when forced
    # Requests carrying this header value ("X-Canary: always") or cookie value
    # ("canary=always") go to this side whatever the weights (for testers).
    force_header: str | None = Field(default=None, pattern=r"^[!-9;-~]+:\s*\S.*$")
    force_cookie: str | None = Field(default=None, pattern=r"^[^=;\s]+=[^;\s]*$")


class RouteConfig(Strict):
    upstream: str | None = None  # one upstream, or:
    # weighted upstreams (Envoy's weighted clusters): see proxy/split.py
    upstreams: list[SplitTarget] | None = Field(default=None, min_length=1)
    # keep a client on one side: a hash_on form ("cookie:session", "header:X-User",
    # "client_ip", ...); unset or absent in a request: weighted round robin
    split_on: str | None = None
    name: str | None = Field(default=None, min_length=1, max_length=100)
    host: str | None = None
    path_prefix: str = "/"
    strip_prefix: bool = False
    pass_host: bool = True
    websocket: bool = True
    access_log: bool = True
    plugins: list[str] = Field(default_factory=list)  # names from [[plugins]], outermost first
    cache: bool = False  # the [cache] plugin, innermost (after the route's own plugins)
    normalise_path: bool = False  # forward the normalised path, not the client's bytes
    # Request bodies up to this size are read whole before a backend is chosen, so a
    # slow client holds no backend connection; larger ones stream. 0: always stream.
    buffer_requests: Size = 64 * 1024

    @model_validator(mode="after")
    def _one_upstream_or_a_split(self) -> RouteConfig:
        if (self.upstream is None) == (self.upstreams is None):
            raise ValueError("set upstream (one) or upstreams (a weighted split), not both")
        if self.upstreams is not None:
            names = [t.name for t in self.upstreams]
            if len(set(names)) != len(names):
                raise ValueError("upstreams: an upstream is listed twice")
            if not any(t.weight for t in self.upstreams):
                raise ValueError("upstreams: at least one weight must be above 0")
        elif self.split_on is not None:
            raise ValueError("split_on needs upstreams (a weighted split)")
        return self

    @field_validator("split_on")
    @classmethod
    def _split_on(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_hash_on(value)
            except ValueError as exc:
                raise ValueError(str(exc).removeprefix("hash_on: ")) from None
        return value

    @property
    def upstream_names(self) -> list[str]:
        return [self.upstream] if self.upstream is not None else [
            t.name for t in self.upstreams or ()]

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host = value.strip().lower()
        bare = host[2:] if host.startswith("*.") else host
        if not bare or "*" in bare or "/" in bare or " " in bare:
            raise ValueError(f'must be a host name like "api.example.com" or "*.example.com", '
                             f"got {value!r}")
        return host

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f'must start with "/", got {value!r}')
        if "?" in value or "#" in value:
            raise ValueError(f"must be a path without query or fragment, got {value!r}")
        views = readings(value)
        if views != (value,):
            # Requests are matched normalised: a prefix that is not could never match.
            raise ValueError(f"must be a normalised path (no dot segments, //, \\, ; or "
                             f"percent-encoding), got {value!r}")
        return value


class ConsulRegisterConfig(Strict):
    """`[consul.register]`: Bascule registers itself, with an HTTP check on the admin
    /healthz, and deregisters on graceful shutdown."""

    name: str = "bascule"
    id: str | None = None  # default "<name>-<hostname>-<port>"
    address: str | None = None  # default: the agent's node address
    port: int | None = Field(default=None, ge=1, le=65535)  # default: first listen port
    tags: list[str] = Field(default_factory=list)
    check_interval: Duration = 10.0
    deregister_critical_after: Duration = 60.0


class ConsulConfig(Strict):
    address: str | None = None  # default: CONSUL_HTTP_ADDR, else http://127.0.0.1:8500
    token_file: str | None = None  # default: CONSUL_HTTP_TOKEN
    datacenter: str = ""
    consistency: Literal["default", "stale", "consistent"] = "default"
    max_stale: Duration = 10.0
    wait: Duration = 300.0
    ca_file: str | None = None
    startup_wait: Duration = 5.0
    # The most connections Bascule holds to the agent, whatever its workers and
    # services (proxy/discovery/source.py); well below Consul's default
    # limits.http_max_conns_per_client of 200.
    max_connections: int = Field(default=32, ge=4, le=1000)
    # `register` would shadow ABCMeta.register on the model class: aliased.
    self_register: ConsulRegisterConfig | None = Field(default=None, alias="register")

    @field_validator("wait")
    @classmethod
    def _wait(cls, value: float) -> float:
        if not 1.0 <= value <= 600.0:
            raise ValueError("must be between 1s and 10m (Consul's limit)")
        return value

    @field_validator("token_file", "ca_file")
    @classmethod
    def _file(cls, value: str | None) -> str | None:
        if value and not os.path.isfile(value):
            raise ValueError(f"file not found: {value!r}")
        return value or None

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f'must start with "http://" or "https://", got {value!r}')
        return value


class PluginConfig(Strict):
    """`[[plugins]]`: a plugin instance routes can name."""

    name: str = Field(min_length=1)
    use: str = Field(min_length=1)  # an entry point in `bascule.plugins` or "pkg.mod:Attr"
    options: dict[str, Any] = Field(default_factory=dict)
    # Where the user wrote this entry, when not in [[plugins]] (the [cache] table): its
    # errors are reported there.
    _key_path: str | None = PrivateAttr(default=None)

    @property
    def key_path(self) -> str | None:
        return self._key_path


class RedisConfig(Strict):
    """`[redis]`: the Redis shared by stateful plugins (the cache's `store = "redis"`)."""

    url: str = "redis://127.0.0.1:6379/0"  # redis:// or rediss:// (TLS), db in the path
    cluster: bool = False  # Redis Cluster via redis-py's cluster client
    key_prefix: str = "bascule:"
    pool_size: int = Field(default=32, ge=1, le=10_000)  # connections per worker
    timeout: Duration = 0.05  # per operation; a slower Redis counts as down
    breaker_failures: int = Field(default=3, ge=1)  # failures in a row that open it
    breaker_cooldown: Duration = 5.0  # then calls are skipped this long

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f'must be a redis://, rediss:// or unix:// URL, got {value!r}')
        return value

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if "{" in value or "}" in value:
            raise ValueError("must not contain { or } (they delimit Redis Cluster hash tags)")
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be more than 0")
        return value


class Config(Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    routes: list[RouteConfig] = Field(min_length=1)
    upstreams: dict[str, UpstreamConfig] = Field(min_length=1)
    consul: ConsulConfig = Field(default_factory=ConsulConfig)
    plugins: list[PluginConfig] = Field(default_factory=list)
    # `[cache]`: options of the cache routes turn on with `cache = true`; validated
    # by the cache plugin itself (reported as cache.<option>).
    cache: dict[str, Any] = Field(default_factory=dict)
    redis: RedisConfig = Field(default_factory=RedisConfig)


