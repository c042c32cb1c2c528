"""Wires Consul watches to upstream balancers for one worker: one watch per distinct
(service, tags, datacenter, passing filter), shared by the upstreams that ask for the
same thing; self-registration when `[consul.register]` is set."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from proxy.config import Config
from proxy.discovery.consul import (
    ConsulClient,
    ConsulWatch,
    Subscriber,
    consul_address,
    default_service_id,
)
from proxy.metrics import Metrics

__all__ = ["ConsulDiscovery"]

log = logging.getLogger("bascule.consul")


class ConsulDiscovery:
    def __init__(self, config: Config, upstreams: dict[str, Any]) -> None:
        settings = config.consul
        token = None
        if settings.token_file:
            with open(settings.token_file, encoding="utf-8") as fh:
                token = fh.read().strip()
        token = token or os.environ.get("CONSUL_HTTP_TOKEN") or None
        self.settings = settings
        self.config = config
        self.client = ConsulClient(
            consul_address(settings.address), token=token, datacenter=settings.datacenter,
            consistency=settings.consistency, max_stale=settings.max_stale,
            ca_file=settings.ca_file)
        self.watches: dict[tuple[str, tuple[str, ...], str, bool], ConsulWatch] = {}
        self.by_upstream: dict[str, ConsulWatch] = {}
        self.subscribers: dict[str, Subscriber] = {}
        self._upstreams = upstreams
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics: Metrics | None = None
        self.registered_id: str | None = None
        for name, upstream in upstreams.items():
            spec = upstream.config.consul
            if spec is None:
                continue
            key = (spec.service, tuple(spec.tags), spec.datacenter or "", spec.passing_only)
            watch = self.watches.get(key)
            if watch is None:
                watch = self.watches[key] = ConsulWatch(
                    self.client, spec.service, tuple(spec.tags), spec.datacenter or "",
                    spec.passing_only, settings.wait)
                watch.on_error = self._on_error
            subscriber = Subscriber(name, upstream.balancer.update,
                                    passing_only=spec.passing_only, address=spec.address,
                                    on_change=self._on_success)
            watch.subscribers.append(subscriber)
            self.by_upstream[name] = watch
            self.subscribers[name] = subscriber

    def _on_success(self, upstream: str, changed: bool) -> None:
        subscriber = self.subscribers[upstream]
        if changed:
            count = len(subscriber.backends)
            (log.warning if count == 0 else log.info)(
                "upstream %s: Consul reports %d instance(s) of %r", upstream, count,
                self.by_upstream[upstream].service)
        if self._metrics is not None:
            self._metrics.record_discovery(upstream, "consul", ok=True, changed=changed)

    def _on_error(self, upstream: str) -> None:
        if self._metrics is not None:
            self._metrics.record_discovery(upstream, "consul", ok=False)

    def unavailable_reason(self, upstream: str) -> str | None:
        """Why an upstream has no backend, for its 503."""
        watch = self.by_upstream.get(upstream)
        if watch is None:
            return None
        if not self.subscribers[upstream].answered:
            return f"waiting for the first answer from Consul about {watch.service!r}"
        return f"Consul reports no healthy instance of {watch.service!r}"

    def describe(self, upstream: str) -> dict[str, Any] | None:
        watch = self.by_upstream.get(upstream)
        if watch is None:
            return None
        info = watch.describe()
        info["version"] = self.subscribers[upstream].version
        return info

    async def start(self, metrics: Metrics | None, *, register: bool,
                    admin_address: tuple[str, int], public_port: int) -> list[str]:
        """Start watching; wait up to `startup_wait` for first answers. Returns the
        services that did not answer in time (a reload refuses to commit then; at
        start-up their upstreams answer 503 until Consul does)."""
        self._metrics = metrics
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(w.run()) for w in self.watches.values()]
        if register and self.settings.self_register is not None:
            self._tasks.append(loop.create_task(self._register(admin_address, public_port)))
        if self.watches:
            waits = [asyncio.ensure_future(w.first_answer.wait())
                     for w in self.watches.values()]
            _, pending = await asyncio.wait(waits, timeout=self.settings.startup_wait)
            for task in pending:
                task.cancel()
            for watch in self.watches.values():
                if not watch.first_answer.is_set():
                    log.warning("consul service %r: no answer within %.1fs; its upstreams "
                                "answer 503 until Consul does", watch.service,
                                self.settings.startup_wait)
        return [w.service for w in self.watches.values() if not w.first_answer.is_set()]

    async def _register(self, admin_address: tuple[str, int], public_port: int) -> None:
        spec = self.settings.self_register
        assert spec is not None
        port = spec.port or public_port
        service_id = spec.id or default_service_id(spec.name, port)
        admin_host, admin_port = admin_address
        if admin_host in ("0.0.0.0", "::", ""):
            admin_host = "127.0.0.1"
        definition: dict[str, Any] = {
            "Name": spec.name, "ID": service_id, "Port": port, "Tags": spec.tags,
            "Check": {
                "HTTP": f"http://{admin_host}:{admin_port}/healthz",
                "Interval": f"{spec.check_interval:g}s",
                "Timeout": "5s",
                "DeregisterCriticalServiceAfter": f"{spec.deregister_critical_after:g}s",
            },
        }
        if spec.address:
            definition["Address"] = spec.address
        delay = 1.0
        while True:
            try:
                await self.client.register(definition)
                self.registered_id = service_id
                log.info("registered in Consul as %r", service_id)
                return
            except Exception as exc:  # whatever the agent or the network did: retried
                log.warning("Consul registration failed (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.registered_id is not None:
            try:
                await self.client.deregister(self.registered_id)
                log.info("deregistered %r from Consul", self.registered_id)
            except Exception as exc:  # shutting down: logged, never fatal
                log.warning("Consul deregistration failed: %s", exc)
            self.registered_id = None
        await self.client.close()
