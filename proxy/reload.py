"""Hot reload as prepare → commit (DESIGN.md §4).

Prepare: parse and validate the file, build a whole new Runtime beside the running
one, start its plugins and its Consul watchers, and wait for every watched service's
first answer. Nothing is taken from the running runtime while preparing. Any
failure there — a bad file, a plugin whose start raises, a Consul service that does
not answer within `consul.startup_wait` — closes what was built, changes nothing,
and is reported every time: the log, /status `reload`, the answer to POST /reload
(400 for the file, 500 for the rest, naming the cause) and
bascule_config_reloads_total{result="error"}.

Commit, only then: backends whose identity is unchanged carry over their Backend
objects (in-flight counts, health) and their warm connection pools, plugins adopt
their predecessor's state, active health checks start, and one assignment swaps the
forwarder's runtime. Requests in flight finish on the old runtime, which is closed
once none is left (or after graceful_timeout).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.app import build_runtime
from proxy.config import load_config
from proxy.errors import ConfigError
from proxy.metrics import Metrics
from proxy.models import BackendSet
from proxy.runtime import Runtime

__all__ = ["ReloadHost", "ReloadResult", "Reloader", "carry_over"]

log = logging.getLogger("bascule.reload")

# Changing these needs new sockets or processes: reported, not applied, on reload.
_RESTART_ONLY = ("listen", "workers", "uvloop")


@dataclass
class ReloadResult:
    ok: bool
    changed: bool
    config_hash: str
    error: str = ""
    warnings: list[str] = field(default_factory=list)
    at: float = field(default_factory=time.time)
    status: int = 200  # for POST /reload: 400 a bad file, 500 a failed start

    def __post_init__(self) -> None:
        if not self.ok and self.status == 200:
            self.status = 400

    def as_dict(self) -> dict[str, Any]:
        return {"result": "success" if self.ok else "error", "changed": self.changed,
                "hash": self.config_hash, "error": self.error or None,
                "warnings": self.warnings, "at": self.at}


def carry_over(old: Runtime, new: Runtime) -> None:
    """Keep what survives a reload: Backend objects (stats, health), connection
    pools of backends whose identity and pool settings are unchanged, and what a
    plugin of the same name chooses to adopt (the cache keeps its memory store)."""
    for name, plugin in new.seams.adopting.items():
        previous_plugin = old.plugins.get(name)
        if previous_plugin is not None:
            plugin.adopt(previous_plugin)
    for name, upstream in new.upstreams.items():
        previous = old.upstreams.get(name)
        if previous is None:
            continue
        known = {b.identity: b for b in previous.balancer.backends}
        if upstream.config.consul is None:
            merged = tuple(known.get(b.identity, b) for b in upstream.balancer.backends)
            upstream.balancer.backends = ()  # adopt the carried objects, not merge
            upstream.balancer.update(BackendSet(upstream.balancer.version, merged))
        # Health history (ejections, check counters) stays with the backend ids.
        upstream.health.states.update(
            {k: v for k, v in previous.health.states.items()
             if any(b.id == k for b in upstream.balancer.backends)})
        upstream.balancer.panic = previous.balancer.panic
        same_pools = (previous.config.pool_size == upstream.config.pool_size
                      and previous.config.idle_timeout == upstream.config.idle_timeout
                      and previous.timeouts.connect == upstream.timeouts.connect
                      and previous.response_limits == upstream.response_limits
                      and previous.config.tls == upstream.config.tls)
        if same_pools:
            ids = {b.id for b in upstream.balancer.backends} | (
                {b.id for b in previous.balancer.backends} if upstream.config.consul else set())
            for backend_id in list(previous.pools):
                if backend_id in ids:
                    upstream.pools[backend_id] = previous.pools.pop(backend_id)


class ReloadHost(Protocol):
    """What a reload needs of the worker it reloads (server.Edge)."""

    @property
    def runtime(self) -> Runtime: ...  # the one being served

    @property
    def metrics(self) -> Metrics: ...

    def start_health(self, runtime: Runtime) -> None: ...

    def discovery_args(self) -> dict[str, Any]: ...

    def commit(self, new: Runtime) -> None: ...  # serve `new` from now on


class Reloader:
    def __init__(self, edge: ReloadHost) -> None:
        self.edge = edge
        self.last: ReloadResult | None = None
        self.history: deque[ReloadResult] = deque(maxlen=10)  # newest last (dashboard)
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    async def reload(self) -> ReloadResult:
        async with self._lock:  # one reload at a time; a second waits its turn
            result = await self._reload()
        self.last = result
        self.history.append(result)
        self.edge.metrics.record_reload(result.ok)
        return result

    async def _reload(self) -> ReloadResult:
        edge = self.edge
        old: Runtime = edge.runtime
        file = old.file
        loop = asyncio.get_running_loop()
        try:
            config = await loop.run_in_executor(None, load_config, file)
            new = build_runtime(config, file)
        except ConfigError as exc:
            message = "; ".join(str(p) for p in exc.problems)
            log.error("reload of %s failed, still serving config %s: %s", file,
                      old.config_hash, message)
            return ReloadResult(False, False, old.config_hash, message)
        except Exception as exc:  # a broken third-party strategy must not kill us
            log.exception("reload of %s failed", file)
            return ReloadResult(False, False, old.config_hash, f"{type(exc).__name__}: {exc}",
                                status=500)
        if new.config_hash == old.config_hash:
            return ReloadResult(True, False, old.config_hash)
        warnings = [
            f"server.{key} changed: takes effect after a restart"
            for key in _RESTART_ONLY
            if getattr(new.server, key) != getattr(old.server, key)
        ]
        if new.config.admin.listen != old.config.admin.listen:
            warnings.append("admin.listen changed: takes effect after a restart")
        old_tls, new_tls = old.server.tls, new.server.tls
        if (old_tls is None) != (new_tls is None) or (
                old_tls and new_tls and old_tls.listen != new_tls.listen):
            warnings.append("server.tls listeners changed: take effect after a restart "
                            "(certificates and settings are reloaded)")
        for warning in warnings:
            log.warning("reload: %s", warning)
        new.loop = loop
        failure = await self._prepare(new)
        if failure:
            log.error("reload of %s failed, still serving config %s: %s", file,
                      old.config_hash, failure)
            await self._discard(new)
            return ReloadResult(False, False, old.config_hash, failure, status=500)
        # -- commit: only now is anything taken from the old runtime ----------------
        carry_over(old, new)
        edge.start_health(new)
        if new.discovery is not None:
            registered = old.discovery.registered_id if old.discovery else None
            if registered and old.discovery is not None:
                # The registration moves to the new runtime: the old one must not
                # deregister what is still us.
                new.discovery.registered_id = registered
                old.discovery.registered_id = None
        edge.commit(new)
        log.info("reloaded %s: config %s -> %s", file, old.config_hash, new.config_hash)
        retiring = loop.create_task(self._retire(old, new.server.graceful_timeout))
        self._retiring.add(retiring)
        retiring.add_done_callback(self._retiring.discard)
        return ReloadResult(True, True, new.config_hash, warnings=warnings)

    async def _prepare(self, new: Runtime) -> str:
        """Start what the new runtime needs before it may serve; the cause of a
        failure, or "" when it is ready."""
        edge = self.edge
        try:
            await new.start_plugins(edge.metrics)
            if new.discovery is not None:
                silent = await new.discovery.start(edge.metrics, register=False,
                                                   **edge.discovery_args())
                if silent:
                    return (f"consul: no answer for {', '.join(repr(s) for s in silent)} "
                            f"within {new.config.consul.startup_wait:g}s")
        except Exception as exc:  # a third-party plugin's start may raise anything
            log.exception("reload: starting the new runtime failed")
            return f"{type(exc).__name__}: {exc}"
        return ""

    async def _discard(self, new: Runtime) -> None:
        """Close a runtime that was prepared but never served."""
        try:
            await new.aclose()
        except Exception:
            log.exception("reload: closing the discarded runtime failed")

    def file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.edge.runtime.file)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def watch_file(self, last: tuple[int, int, int] | None,
                         interval: float = 1.0) -> None:
        """`server.watch_config`: reload when the file changes from `last` (taken
        when serving started), polling its mtime, size and inode: bind-mounted files
        break inotify."""
        while True:
            await asyncio.sleep(interval)
            current = self.file_stamp()
            if current is not None and current != last:
                last = current
                log.info("config file changed; reloading")
                await self.reload()

    async def _retire(self, old: Runtime, timeout: float) -> None:
        """Close the old runtime once its in-flight requests are done."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while old.active and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await old.aclose()
