"""What a Bascule process tree knows once and shares with every worker: Consul
answers turned into backend sets, active health check states and ejections.

Demand-driven: workers subscribe to what their runtime needs (proxy/agent/wire.py);
the hub runs the union — one Consul source per agent settings, one prober per
(check settings, address), one outlier group per upstream — and stops what nobody
asks for any more. A reload in a worker is just new subscriptions beside the old
ones until the old runtime closes; keys are derived from the specs, so what did not
change keeps its state. The same Hub serves in-process (one worker, tests) or in
the agent process (proxy/agent/process.py).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from proxy.agent.drains import DrainBook
from proxy.agent.outliers import OutlierGroup
from proxy.agent.prober import ProbeTarget
from proxy.agent.traffic import Collect, TrafficSampler
from proxy.agent.wire import Message, spec_key
from proxy.config import HealthConfig, OutlierConfig, UpstreamTlsConfig
from proxy.discovery.consul import ServiceQuery
from proxy.discovery.consul_entries import ConsulEntryError, backends_from_entries, same_backends
from proxy.discovery.source import ConsulSettings, ConsulSource
from proxy.models import Backend
from proxy.tls.client import client_context

__all__ = ["Hub", "HubClient"]

log = logging.getLogger("bascule.agent")

TargetKey = tuple[str, str, int, bool]  # check spec key, host, port, over TLS


@dataclass
class CheckSettings:
    """A health check spec as the prober uses it; its TLS context made once."""

    check: HealthConfig
    tls: UpstreamTlsConfig | None
    _context: ssl.SSLContext | None = None

    def context(self) -> ssl.SSLContext:
        if self._context is None:
            if self.tls is not None:
                self._context = client_context(self.tls)
            else:
                self._context = ssl.create_default_context()
        return self._context


class HubClient:
    """One subscriber: a worker's connection, or the in-process edge."""

    def __init__(self, send: Callable[[Message], None], name: str) -> None:
        self.send = send
        self.name = name
        self.watches: set[str] = set()
        self.health: dict[str, dict[str, TargetKey]] = {}  # sub -> backend id -> target
        self.outliers: set[str] = set()


@dataclass
class WatchEntry:
    key: str
    source: str
    query: ServiceQuery
    address: str
    subscribers: set[HubClient] = field(default_factory=set)
    backends: tuple[Backend, ...] = ()
    version: int = 0
    index: int = 0  # Consul's X-Consul-Index of the answer that made this set
    answered: bool = False
    error: str = ""

    def message(self) -> Message:
        return ["backends", self.key, self.version,
                [[b.id, b.host, b.port, b.weight, b.tls] for b in self.backends],
                self.error or None, self.index]


class _SourceListener:
    def __init__(self, hub: Hub, source: str) -> None:
        self.hub = hub
        self.source = source

    def answered(self, query: ServiceQuery, entries: Any, index: int) -> None:
        self.hub.answered(self.source, query, entries, index)

    def failed(self, query: ServiceQuery, message: str) -> None:
        self.hub.failed(self.source, query, message)


class Hub:
    def __init__(self, traffic_source: Collect | None = None) -> None:
        self.clients: set[HubClient] = set()
        self.sources: dict[str, ConsulSource] = {}
        self.watches: dict[str, WatchEntry] = {}
        self.targets: dict[TargetKey, ProbeTarget] = {}
        self.holders: dict[TargetKey, set[tuple[HubClient, str, str]]] = {}
        self.outliers: dict[str, OutlierGroup] = {}
        self.outlier_subscribers: dict[str, set[HubClient]] = {}
        self._checks: dict[str, CheckSettings] = {}
        self._session: aiohttp.ClientSession | None = None
        self._reconcile_soon: asyncio.Handle | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._fresh_at: dict[str, float] = {}
        self.drains = DrainBook()
        # the dashboard's last minute (proxy/agent/traffic.py), sampled while asked for
        self.traffic = TrafficSampler(traffic_source) if traffic_source else None

    # -- clients ----------------------------------------------------------------------

    def attach(self, send: Callable[[Message], None], name: str) -> HubClient:
        client = HubClient(send, name)
        self.clients.add(client)
        return client

    def detach(self, client: HubClient) -> None:
        self.clients.discard(client)
        self._unwatch(client, list(client.watches))
        for sub in list(client.health):
            self._set_health(client, sub, None, [])
        for okey in list(client.outliers):
            self._unsubscribe_outliers(client, okey)

    def handle(self, client: HubClient, message: Message) -> None:
        """One message from a client. Raises ValueError for a malformed one."""
        try:
            op = message[0]
            if op == "watch":
                self._watch(client, message[1])
            elif op == "unwatch":
                self._unwatch(client, message[1])
            elif op == "health":
                self._set_health(client, str(message[1]), message[2], message[3])
            elif op == "unhealth":
                self._set_health(client, str(message[1]), None, [])
            elif op == "outliers":
                self._subscribe_outliers(client, str(message[1]),
                                         OutlierConfig.model_validate(message[2]))
            elif op == "unoutliers":
                self._unsubscribe_outliers(client, str(message[1]))
            elif op == "outlier":
                self._report_outlier(str(message[1]), str(message[2]), int(message[3]))
            elif op == "traffic":
                client.send(["traffic", self.traffic.ask() if self.traffic else None])
            elif op in ("drain", "drains"):
                changed = (self.drains.set(str(message[1]), str(message[2]), bool(message[3]))
                           if op == "drain" else self.drains.merge(message[1]))
                for other in (self.clients if changed else (client,)):
                    other.send(self.drains.message())
            else:
                raise ValueError(f"unknown message {op!r}")
        except (IndexError, TypeError, KeyError) as exc:
            raise ValueError(f"malformed {message[:1]} message: {exc}") from None

    # -- Consul -------------------------------------------------------------------------

    def _watch(self, client: HubClient, items: list[Any]) -> None:
        for key, spec in items:
            entry = self.watches.get(key)
            if entry is None:
                settings = ConsulSettings(**spec["consul"])
                source = spec_key(settings.as_dict())
                if source not in self.sources:
                    self.sources[source] = ConsulSource(settings,
                                                        _SourceListener(self, source))
                query = ServiceQuery(spec["service"], tuple(spec["tags"]),
                                     spec["datacenter"], bool(spec["passing"]))
                entry = self.watches[key] = WatchEntry(key, source, query,
                                                       str(spec["address"]))
            entry.subscribers.add(client)
            client.watches.add(key)
            if entry.answered:
                client.send(entry.message())
        self._schedule_reconcile()

    def _unwatch(self, client: HubClient, keys: list[str]) -> None:
        for key in keys:
            client.watches.discard(key)
            entry = self.watches.get(key)
            if entry is None:
                continue
            entry.subscribers.discard(client)
            if not entry.subscribers:
                del self.watches[key]
        self._schedule_reconcile()

    def _schedule_reconcile(self) -> None:
        # Coalesced: a worker subscribes hundreds of watches at once, and the mode
        # (per-service or catalog) is chosen from all of them together.
        if self._reconcile_soon is None:
            self._reconcile_soon = asyncio.get_running_loop().call_soon(self._reconcile)

    def _reconcile(self) -> None:
        self._reconcile_soon = None
        wanted: dict[str, set[ServiceQuery]] = {}
        for entry in self.watches.values():
            wanted.setdefault(entry.source, set()).add(entry.query)
        for key, source in list(self.sources.items()):
            queries = wanted.get(key)
            if queries:
                source.set_queries(queries)
                continue
            del self.sources[key]
            task = asyncio.get_running_loop().create_task(source.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def answered(self, source: str, query: ServiceQuery, entries: Any, index: int = 0) -> None:
        self._fresh(source)
        for entry in list(self.watches.values()):
            if entry.source != source or entry.query != query:
                continue
            try:
                backends = backends_from_entries(entries, passing_only=query.passing,
                                                 address=entry.address)
            except ConsulEntryError as exc:
                self._stale(entry, f"ConsulEntryError: {exc}")
                continue
            recovered = bool(entry.error)
            entry.error = ""
            if entry.answered and same_backends(backends, entry.backends) and not recovered:
                continue
            if not entry.answered or not same_backends(backends, entry.backends):
                entry.version += 1
                entry.index = index
                entry.backends = backends
                (log.warning if not backends else log.info)(
                    "consul service %r: %d instance(s)", query.service, len(backends))
            entry.answered = True
            self._send_all(entry.subscribers, entry.message())

    def failed(self, source: str, query: ServiceQuery, message: str) -> None:
        for entry in list(self.watches.values()):
            if entry.source == source and entry.query == query:
                self._stale(entry, message)

    def _stale(self, entry: WatchEntry, message: str) -> None:
        if entry.error == message:
            return
        entry.error = message
        self._send_all(entry.subscribers, ["stale", entry.key, message])

    def _fresh(self, source: str) -> None:
        # For the workers' "last success" gauge: at most once a second per source.
        now = time.monotonic()
        if now - self._fresh_at.get(source, 0.0) < 1.0:
            return
        self._fresh_at[source] = now
        self._send_all(self.clients, ["fresh", source])

    # -- active health checks ---------------------------------------------------------

    def _session_for_probes(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                trust_env=False, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
                connector=aiohttp.TCPConnector(limit=0))
        return self._session

    def _check(self, spec: dict[str, Any]) -> str:
        """The key of a check spec ({"check", "tls"}), its settings made once."""
        key = spec_key(spec)
        if key not in self._checks:
            tls = UpstreamTlsConfig.model_validate(spec["tls"]) if spec.get("tls") else None
            self._checks[key] = CheckSettings(HealthConfig.model_validate(spec["check"]), tls)
        return key

    def _set_health(self, client: HubClient, sub: str, spec: dict[str, Any] | None,
                    targets: list[Any]) -> None:
        wanted: dict[str, tuple[TargetKey, bool]] = {}
        if spec is not None:
            check_key = self._check(spec)
            for backend_id, host, port, up, tls in targets:
                wanted[str(backend_id)] = ((check_key, str(host), int(port), bool(tls)),
                                           bool(up))
        held = client.health.get(sub, {})
        for backend_id, target_key in held.items():
            if wanted.get(backend_id, (None,))[0] != target_key:
                self._release(target_key, (client, sub, backend_id))
        now_held: dict[str, TargetKey] = {}
        for backend_id, (target_key, up) in wanted.items():
            now_held[backend_id] = target_key
            if held.get(backend_id) == target_key:
                continue
            target = self.targets.get(target_key)
            if target is None:
                # A new target starts from the state the worker knows (a restarted
                # agent must not bring a down backend back before it passes `rise`).
                settings = self._checks[target_key[0]]
                target = self.targets[target_key] = ProbeTarget(
                    settings.check, target_key[1], target_key[2], up=up,
                    notify=self._health_changed,
                    tls=settings.context() if target_key[3] else None,
                    server_name=settings.tls.server_name if settings.tls else None)
                target.key = target_key
                target.start(self._session_for_probes())
            self.holders.setdefault(target_key, set()).add((client, sub, backend_id))
            if target.up != up:
                client.send(["health", sub, backend_id, target.up, target.reason])
        if now_held:
            client.health[sub] = now_held
        else:
            client.health.pop(sub, None)

    def _release(self, target_key: TargetKey, holder: tuple[HubClient, str, str]) -> None:
        holders = self.holders.get(target_key)
        if holders is None:
            return
        holders.discard(holder)
        if not holders:
            del self.holders[target_key]
            self.targets.pop(target_key).stop()

    def _health_changed(self, target: ProbeTarget) -> None:
        log.warning("backend %s is %s: %s", target.address, "up" if target.up else "down",
                    target.reason)
        for client, sub, backend_id in list(self.holders.get(target.key, ())):
            client.send(["health", sub, backend_id, target.up, target.reason])

    # -- outlier ejection -------------------------------------------------------------

    def _subscribe_outliers(self, client: HubClient, okey: str,
                            config: OutlierConfig) -> None:
        group = self.outliers.get(okey)
        if group is None:
            group = self.outliers[okey] = OutlierGroup(config)
        self.outlier_subscribers.setdefault(okey, set()).add(client)
        client.outliers.add(okey)
        for backend_id, seconds, count in group.active():
            client.send(["eject", okey, backend_id, seconds, count])

    def _unsubscribe_outliers(self, client: HubClient, okey: str) -> None:
        client.outliers.discard(okey)
        subscribers = self.outlier_subscribers.get(okey)
        if subscribers is None:
            return
        subscribers.discard(client)
        if not subscribers:
            del self.outlier_subscribers[okey]
            self.outliers.pop(okey, None)

    def _report_outlier(self, okey: str, backend_id: str, backends: int) -> None:
        group = self.outliers.get(okey)
        if group is None:
            return
        ejection = group.report(backend_id, backends)
        if ejection is not None:
            self._send_all(self.outlier_subscribers.get(okey, set()),
                           ["eject", okey, *ejection])

    # -- ------------------------------------------------------------------------------

    @staticmethod
    def _send_all(clients: set[HubClient], message: Message) -> None:
        for client in list(clients):
            client.send(message)

    def stats(self) -> dict[str, Any]:
        return {
            "sources": {key: {"mode": s.mode, "queries": len(s.queries),
                              "max_connections": s.settings.max_connections,
                              "throttled": s.client.throttled}
                        for key, s in self.sources.items()},
            "watches": len(self.watches), "probes": len(self.targets),
            "workers": len(self.clients),
        }

    async def close(self) -> None:
        if self._reconcile_soon is not None:
            self._reconcile_soon.cancel()
        if self.traffic is not None:
            await self.traffic.close()
        for target in self.targets.values():
            target.stop()
        tasks = [t.task for t in self.targets.values() if t.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        self.targets.clear()
        await asyncio.gather(*(s.close() for s in self.sources.values()),
                             *self._closing, return_exceptions=True)
        self.sources.clear()
        if self._session is not None:
            await self._session.close()
