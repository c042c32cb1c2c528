"""Consul discovery as one worker's runtime sees it: each Consul upstream subscribes
to a watch in the agent (proxy/agent/), which queries Consul once for every worker;
the worker applies the snapshots it is sent to its balancers (merged by identity, so
in-flight counts and health survive) and keeps what /status and the metrics show.
Self-registration (`[consul.register]`) is done by worker 1 alone."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from typing import Any

from proxy.agent.link import Link, Listener
from proxy.agent.wire import Message, spec_key
from proxy.config import Config
from proxy.discovery.consul import ConsulClient, consul_address, default_service_id
from proxy.discovery.source import ConsulSettings
from proxy.metrics import Metrics
from proxy.models import Backend, BackendSet

__all__ = ["ConsulDiscovery", "UpstreamFeed"]

log = logging.getLogger("bascule.consul")


class UpstreamFeed:
    """One upstream fed by a watch: what it was last sent, and its own version."""

    def __init__(self, upstream: Any, key: str, spec: dict[str, Any]) -> None:
        self.upstream = upstream
        self.key = key
        self.spec = spec
        self.service = str(spec["service"])
        self.version = 0
        self.answered = asyncio.Event()
        self.stale = False
        self.error = ""
        self.last_success = 0.0
        self.consul_index = 0  # of the answer that made the current set
        self.backends: tuple[tuple[str, str, int, int, bool], ...] = ()


class ConsulDiscovery:
    def __init__(self, config: Config, upstreams: dict[str, Any]) -> None:
        consul = config.consul
        token = None
        if consul.token_file:
            with open(consul.token_file, encoding="utf-8") as fh:
                token = fh.read().strip()
        token = token or os.environ.get("CONSUL_HTTP_TOKEN") or None
        self.settings = consul
        self.agent_settings = ConsulSettings(
            address=consul_address(consul.address), token=token,
            datacenter=consul.datacenter, consistency=consul.consistency,
            max_stale=consul.max_stale, ca_file=consul.ca_file, wait=consul.wait,
            max_connections=consul.max_connections)
        self.source_key = spec_key(self.agent_settings.as_dict())
        self.feeds: dict[str, UpstreamFeed] = {}
        for name, upstream in upstreams.items():
            service = upstream.config.consul
            if service is None:
                continue
            spec = {"consul": self.agent_settings.as_dict(), "service": service.service,
                    "tags": list(service.tags), "datacenter": service.datacenter or "",
                    "passing": service.passing_only, "address": service.address}
            self.feeds[name] = UpstreamFeed(upstream, spec_key(spec), spec)
        self._listeners: dict[str, Listener] = {}
        self._link: Link | None = None
        self._metrics: Metrics | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.registered_id: str | None = None

    # -- from the agent ---------------------------------------------------------------

    def _on_message(self, name: str, message: Message) -> None:
        feed = self.feeds[name]
        if message[0] == "stale":
            feed.stale, feed.error = True, str(message[2])
            if self._metrics is not None:
                self._metrics.record_discovery(name, "consul", ok=False)
            return
        _, _, _, backends, error, *rest = message
        identities = tuple((str(i), str(h), int(p), int(w), bool(t))
                           for i, h, p, w, t in backends)
        first = not feed.answered.is_set()
        changed = first or identities != feed.backends
        feed.stale, feed.error = bool(error), str(error or "")
        feed.last_success = time.time()
        if rest:
            feed.consul_index = int(rest[0])
        if changed:
            feed.backends = identities
            feed.version += 1
            upstream = feed.upstream
            upstream.balancer.update(BackendSet(
                feed.version, tuple(Backend(*identity) for identity in identities)))
            upstream.drop_moved_pools()
            upstream.health.backends_changed()
            (log.warning if not identities else log.info)(
                "upstream %s: Consul reports %d instance(s) of %r", name, len(identities),
                feed.service)
        feed.answered.set()
        if self._metrics is not None and not feed.stale:
            self._metrics.record_discovery(name, "consul", ok=True, changed=changed)

    def _on_fresh(self, message: Message) -> None:
        if message[1] != self.source_key:
            return
        now = time.time()
        for name, feed in self.feeds.items():
            if feed.answered.is_set() and not feed.stale:
                feed.last_success = now
                if self._metrics is not None:
                    self._metrics.record_discovery(name, "consul", ok=True, changed=False)

    # -- what the runtime asks --------------------------------------------------------

    def unavailable_reason(self, upstream: str) -> str | None:
        """Why an upstream has no backend, for its 503."""
        feed = self.feeds.get(upstream)
        if feed is None:
            return None
        if not feed.answered.is_set():
            return f"waiting for the first answer from Consul about {feed.service!r}"
        return f"Consul reports no healthy instance of {feed.service!r}"

    def describe(self, upstream: str) -> dict[str, Any] | None:
        feed = self.feeds.get(upstream)
        if feed is None:
            return None
        spec = feed.spec
        return {
            "source": "consul", "service": feed.service, "tags": list(spec["tags"]),
            "stale": feed.stale, "error": feed.error or None, "version": feed.version,
            "consul_index": feed.consul_index or None,
            "last_success_age": round(time.time() - feed.last_success, 3)
            if feed.last_success else None,
        }

    async def start(self, metrics: Metrics | None, *, link: Link, register: bool,
                    admin_address: tuple[str, int], public_port: int) -> list[str]:
        """Subscribe; wait up to `startup_wait` for first answers. Returns the
        services that did not answer in time (a reload refuses to commit then; at
        start-up their upstreams answer 503 until Consul does)."""
        self._metrics = metrics
        self._link = link
        loop = asyncio.get_running_loop()
        items: list[tuple[str, Any, Listener]] = []
        for name, feed in self.feeds.items():
            listener = self._listeners[name] = functools.partial(self._on_message, name)
            items.append((feed.key, feed.spec, listener))
        if items:
            link.watch(items)
            link.on_fresh(self._on_fresh)
        if register and self.settings.self_register is not None:
            self._tasks.append(loop.create_task(self._register(admin_address, public_port)))
        if self.feeds:
            waits = [asyncio.ensure_future(f.answered.wait()) for f in self.feeds.values()]
            _, pending = await asyncio.wait(waits, timeout=self.settings.startup_wait)
            for task in pending:
                task.cancel()
        silent = list(dict.fromkeys(f.service for f in self.feeds.values()
                                    if not f.answered.is_set()))
        for service in silent:
            log.warning("consul service %r: no answer within %.1fs; its upstreams "
                        "answer 503 until Consul does", service, self.settings.startup_wait)
        return silent

    def _registration_client(self) -> ConsulClient:
        s = self.agent_settings
        return ConsulClient(s.address, token=s.token, datacenter=s.datacenter,
                            consistency=s.consistency, max_stale=s.max_stale,
                            ca_file=s.ca_file, max_connections=1)

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
            # A client per attempt, closed after: no connection to the agent is kept
            # open for a request made once.
            client = self._registration_client()
            try:
                await client.register(definition)
                self.registered_id = service_id
                log.info("registered in Consul as %r", service_id)
                return
            except Exception as exc:  # whatever the agent or the network did: retried
                log.warning("Consul registration failed (%s); retrying", exc)
            finally:
                await client.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        link, self._link = self._link, None
        if link is not None:
            link.unwatch([(self.feeds[name].key, listener)
                          for name, listener in self._listeners.items()])
            link.off_fresh(self._on_fresh)
        if self.registered_id is not None:
            client = self._registration_client()
            try:
                await client.deregister(self.registered_id)
                log.info("deregistered %r from Consul", self.registered_id)
            except Exception as exc:  # shutting down: logged, never fatal
                log.warning("Consul deregistration failed: %s", exc)
            finally:
                await client.close()
            self.registered_id = None
