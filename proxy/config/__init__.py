"""The TOML config: schema (pydantic, unknown keys forbidden), cross-reference checks,
and errors reported as `FILE: key.path: what is wrong`.

Defaults follow what nginx/Envoy users expect; `config/examples/reference.toml`
documents every key with its default. The package: `types.py` (strict base model,
durations, sizes, addresses), `model.py` (the document and its edge tables),
`upstream.py` (`[upstreams.<name>]`), `load.py` (reading, cross-table checks,
shorthand expansion). Everything is importable from `proxy.config`.
"""

from __future__ import annotations

from proxy.config.load import load_config, parse_config
from proxy.config.model import (
    AdminConfig,
    Config,
    ConsulConfig,
    ConsulRegisterConfig,
    PluginConfig,
    RedisConfig,
    RouteConfig,
    ServerConfig,
    SplitTarget,
)
from proxy.config.tls import CertificateEntry, ServerTlsConfig, UpstreamTlsConfig
from proxy.config.types import Duration, Size, parse_hostport
from proxy.config.upstream import (
    BackendEntry,
    ConsulServiceConfig,
    HealthConfig,
    OutlierConfig,
    RetryConfig,
    StickyConfig,
    TimeoutsConfig,
    UpstreamConfig,
)

__all__ = [
    "AdminConfig",
    "BackendEntry",
    "CertificateEntry",
    "Config",
    "ConsulConfig",
    "ConsulRegisterConfig",
    "ConsulServiceConfig",
    "Duration",
    "HealthConfig",
    "OutlierConfig",
    "PluginConfig",
    "RedisConfig",
    "RetryConfig",
    "RouteConfig",
    "ServerConfig",
    "ServerTlsConfig",
    "Size",
    "SplitTarget",
    "StickyConfig",
    "TimeoutsConfig",
    "UpstreamConfig",
    "UpstreamTlsConfig",
    "load_config",
    "parse_config",
    "parse_hostport",
]
