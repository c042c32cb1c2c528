"""The TOML config: schema (pydantic, unknown keys forbidden), cross-reference checks,
and errors reported as `FILE: key.path: what is wrong`.

Defaults follow what nginx/Envoy users expect; `config/examples/reference.toml`
documents every key with its default.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
)

from proxy.errors import ConfigError, ConfigProblem
from proxy.pathnorm import readings
from proxy.units import parse_duration, parse_size

__all__ = [
    "AdminConfig",
    "BackendEntry",
    "Config",
    "ConsulConfig",
    "ConsulRegisterConfig",
    "ConsulServiceConfig",
    "PluginConfig",
    "RouteConfig",
    "ServerConfig",
    "TimeoutsConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
    "parse_hostport",
]

Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]


def parse_hostport(value: str, *, default_host: str | None = None) -> tuple[str, int]:
    """("127.0.0.1", 8080) from "127.0.0.1:8080", "[::1]:8080" or "localhost:80"."""
    if not isinstance(value, str):
        raise ValueError(f'must be "host:port", got {value!r}')
    host, sep, port_s = value.rpartition(":")
    if not sep:
        raise ValueError(f'must be "host:port", got {value!r}')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    elif ":" in host:
        raise ValueError(f'IPv6 addresses must be bracketed like "[::1]:8080", got {value!r}')
    if not host:
        if default_host is None:
            raise ValueError(f'must be "host:port" with a host, got {value!r}')
        host = default_host
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"port must be 1-65535, got {port_s!r}")
    return host, int(port_s)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False,
                              populate_by_name=False)


class ServerConfig(_Strict):
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


class AdminConfig(_Strict):
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


class RouteConfig(_Strict):
    upstream: str
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


def _backend_entry(value: Any) -> Any:
    return {"address": value} if isinstance(value, str) else value


class BackendEntry(_Strict):
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


class TimeoutsConfig(_Strict):
    connect: Duration = 3.0
    response_header: Duration = 60.0
    read_idle: Duration = 60.0
    total: Duration | None = None


_RETRY_CONDITIONS = {"connect-failure", "reset", "timeout", "5xx"}


class RetryConfig(_Strict):
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


class ConsulServiceConfig(_Strict):
    """`upstreams.<name>.consul`: which Consul service feeds this upstream."""

    service: str = Field(min_length=1)
    tags: list[str] = Field(default_factory=list)
    passing_only: bool = True
    address: str = "service"  # "service" | "node" | a tagged address like "lan_ipv4"
    datacenter: str | None = None


class ConsulRegisterConfig(_Strict):
    """`[consul.register]`: Bascule registers itself, with an HTTP check on the admin
    /healthz, and deregisters on graceful shutdown."""

    name: str = "bascule"
    id: str | None = None  # default "<name>-<hostname>-<port>"
    address: str | None = None  # default: the agent's node address
    port: int | None = Field(default=None, ge=1, le=65535)  # default: first listen port
    tags: list[str] = Field(default_factory=list)
    check_interval: Duration = 10.0
    deregister_critical_after: Duration = 60.0


class ConsulConfig(_Strict):
    address: str | None = None  # default: CONSUL_HTTP_ADDR, else http://127.0.0.1:8500
    token_file: str | None = None  # default: CONSUL_HTTP_TOKEN
    datacenter: str = ""
    consistency: Literal["default", "stale", "consistent"] = "default"
    max_stale: Duration = 10.0
    wait: Duration = 300.0
    ca_file: str | None = None
    startup_wait: Duration = 5.0
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


class HealthConfig(_Strict):
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


class OutlierConfig(_Strict):
    """`upstreams.<name>.outlier`: passive outlier detection (Envoy's)."""

    consecutive_failures: int = Field(default=5, ge=0)  # 5xx or connect failures; 0: off
    base_ejection_time: Duration = 30.0
    max_ejection_time: Duration = 300.0
    max_ejection_percent: int = Field(default=50, ge=0, le=100)


class UpstreamConfig(_Strict):
    backends: list[Annotated[BackendEntry, BeforeValidator(_backend_entry)]] | None = Field(
        default=None, min_length=1
    )
    consul: ConsulServiceConfig | None = None
    strategy: str = "round_robin"
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    pool_size: int = Field(default=64, ge=0, le=100_000)
    idle_timeout: Duration = 15.0
    retry: RetryConfig = Field(default_factory=RetryConfig)
    health: HealthConfig | None = None
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


class PluginConfig(_Strict):
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


class RedisConfig(_Strict):
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


class Config(_Strict):
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
        name = route.get("upstream")
        if isinstance(name, str) and name not in upstream_names:
            known = ", ".join(sorted(upstream_names)) or "none"
            problems.append(ConfigProblem(
                file, f"routes[{i}].upstream",
                f"upstream {name!r} is not defined (defined: {known})"))
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
_CACHE_TABLE_PLUGIN = "cache"


def _table_plugins(config: Config, file: str) -> tuple[Config, list[ConfigProblem]]:
    """`[cache]` and a route's `cache = true` are shorthand, expanded here and only
    here into an ordinary [[plugins]] entry named "cache" (options: the table) and
    that name last in the route's plugins: past this point nothing treats the cache
    apart from other plugins."""
    name = _CACHE_TABLE_PLUGIN
    defined = any(p.name == name for p in config.plugins)
    if defined and config.cache:
        return config, [ConfigProblem(file, "cache", "unused: [[plugins]] already "
                                      f"defines a plugin named {name!r}")]
    plugins = list(config.plugins)
    wanted = any(r.cache or name in r.plugins for r in config.routes)
    if not defined and (wanted or config.cache):
        entry = PluginConfig(name=name, use=_CACHE_TABLE_PLUGIN, options=dict(config.cache))
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
