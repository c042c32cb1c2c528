"""Watching many services through the whole catalog: two blocking queries as change
signals, and plain reads of only the services that changed.

Why: a blocking query holds a connection to the agent for up to `wait`, so one query
per service needs one connection per service. The agent refuses a client past
`limits.http_max_conns_per_client` (200 by default, Consul PR #7289; agent config
docs, `limits`), so past a few dozen services Bascule watches the catalog instead,
within a fixed budget whatever the number of services (proxy/discovery/source.py
decides).

The two signals (both are blocking endpoints, api-docs/features/blocking):
- `/v1/health/state/any` (api-docs/health#list-checks-in-state): every check with its
  Node, CheckID, Status, ServiceName, ServiceTags and ModifyIndex; it returns when any
  check changes. A watched service's fingerprint is its own checks plus the
  node-level checks (serfHealth, node maintenance) of the nodes it runs on; a service
  whose fingerprint moved is read again.
- `/v1/catalog/services` (api-docs/catalog#list-services): every service with its
  tags; it returns when any registration changes. A watched service that appeared,
  went away or whose tags changed is read again. The index moving with no such
  visible change can be an instance's new address or port: then every watched
  service is read again, at most once per RESYNC_MIN_INTERVAL (coalesced).

Reads are plain (non-blocking) `/v1/health/service/<name>` queries, `concurrency` at
a time, so the connections held are the two signals plus at most `concurrency`.
A failing signal marks every service stale (the last known good sets keep serving),
backs off, and once it answers again every service is read again: a change made
during the outage is never missed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from proxy.discovery.consul import (
    MAX_BACKOFF,
    MIN_INTERVAL,
    WATCH_ERRORS,
    ConsulClient,
    QueryListener,
    ServiceQuery,
    backoff_delay,
    failure_message,
)
from proxy.discovery.consul_entries import ConsulEntryError

__all__ = ["RESYNC_MIN_INTERVAL", "CatalogWatch", "check_fingerprints", "tags_changed"]

log = logging.getLogger("bascule.consul")

RESYNC_MIN_INTERVAL = 5.0

Fingerprint = tuple[tuple[Any, ...], ...]


def check_fingerprints(checks: Any) -> tuple[dict[str, list[tuple[Any, ...]]],
                                               dict[str, list[tuple[Any, ...]]],
                                               dict[str, set[str]]]:
    """From a health/state answer: each service's checks, each node's node-level
    checks, and the nodes each service has a check on."""
    if not isinstance(checks, list):
        raise ConsulEntryError("expected a JSON list of checks")
    by_service: dict[str, list[tuple[Any, ...]]] = {}
    by_node: dict[str, list[tuple[Any, ...]]] = {}
    nodes_of: dict[str, set[str]] = {}
    for check in checks:
        if not isinstance(check, dict):
            raise ConsulEntryError("a check is not an object")
        node = str(check.get("Node", ""))
        service = str(check.get("ServiceName") or "")
        item = (node, str(check.get("CheckID", "")), str(check.get("Status", "")),
                str(check.get("ServiceID") or ""), tuple(check.get("ServiceTags") or ()),
                check.get("ModifyIndex", 0))
        if service:
            by_service.setdefault(service, []).append(item)
            nodes_of.setdefault(service, set()).add(node)
        else:
            by_node.setdefault(node, []).append(item)
    return by_service, by_node, nodes_of


def tags_changed(old: dict[str, Any] | None, new: Any, services: Iterable[str]) -> set[str]:
    """Services (of `services`) that appeared, went away or changed tags."""
    if not isinstance(new, dict):
        raise ConsulEntryError("expected a JSON object of services")
    if old is None:
        return set()
    return {s for s in services if sorted(old.get(s) or ()) != sorted(new.get(s) or ())
            or (s in old) != (s in new)}


class CatalogWatch:
    """Many ServiceQuery answers kept current through the two catalog signals."""

    def __init__(self, client: ConsulClient, wait: float, concurrency: int,
                 listener: QueryListener) -> None:
        self.client = client
        self.wait = wait
        self.concurrency = max(1, concurrency)
        self.listener = listener
        self.queries: set[ServiceQuery] = set()
        self.fingerprints: dict[ServiceQuery, Fingerprint] = {}
        self.indexes: dict[ServiceQuery, int] = {}  # X-Consul-Index of the last read
        self.stale: dict[ServiceQuery, str] = {}  # failing queries, with the error
        self.reads = 0
        self.signal_answers = 0
        self._nodes_seen: dict[str, set[str]] = {}  # service -> nodes in its entries
        self._tags: dict[str, Any] | None = None
        self._dirty: list[ServiceQuery] = []
        self._dirty_set: set[ServiceQuery] = set()
        self._wake = asyncio.Event()
        self._signals_ok = {"checks": True, "catalog": True}
        self._last_resync = 0.0
        self._resync_handle: asyncio.TimerHandle | None = None
        self._rng = random.Random()

    # -- what is watched ------------------------------------------------------------

    def set_queries(self, queries: set[ServiceQuery]) -> None:
        added = queries - self.queries
        self.queries = set(queries)
        for gone in [q for q in self.fingerprints if q not in queries]:
            self.fingerprints.pop(gone, None)
            self.indexes.pop(gone, None)
            self.stale.pop(gone, None)
        self._mark(added)

    def _mark(self, queries: Iterable[ServiceQuery]) -> None:
        for query in queries:
            if query in self.queries and query not in self._dirty_set:
                self._dirty_set.add(query)
                self._dirty.append(query)
        if self._dirty:
            self._wake.set()

    def _resync(self) -> None:
        """Read every watched service again, at most once per RESYNC_MIN_INTERVAL."""
        now = time.monotonic()
        if now - self._last_resync >= RESYNC_MIN_INTERVAL:
            self._last_resync = now
            self._mark(sorted(self.queries, key=lambda q: q.service))
        elif self._resync_handle is None:
            delay = RESYNC_MIN_INTERVAL - (now - self._last_resync)

            def later() -> None:
                self._resync_handle = None
                self._resync()

            self._resync_handle = asyncio.get_running_loop().call_later(delay, later)

    # -- the loops ----------------------------------------------------------------------

    async def run(self) -> None:
        tasks = [self._follow("checks", self.client.health_state, self._on_checks),
                 self._follow("catalog", self.client.catalog_services, self._on_catalog)]
        tasks += [self._read_forever() for _ in range(self.concurrency)]
        try:
            await asyncio.gather(*tasks)
        finally:
            if self._resync_handle is not None:
                self._resync_handle.cancel()

    async def _follow(self, name: str, fetch: Callable[..., Awaitable[tuple[Any, int]]],
                      on_answer: Callable[[Any, bool], None]) -> None:
        """One change signal: a blocking query followed forever (same index rules as
        ConsulWatch). `on_answer(data, moved)` gets every answer."""
        loop = asyncio.get_running_loop()
        index, backoff, zero_blocked = 0, 1.0, False
        while True:
            started = loop.time()
            asked = 1 if index == 0 and zero_blocked else index
            try:
                data, new_index = await fetch(index=asked, wait=self.wait)
                self.signal_answers += 1
                recovered = not self._signals_ok[name]
                self._signals_ok[name] = True
                on_answer(data, new_index != index)
            except asyncio.CancelledError:
                raise
            except WATCH_ERRORS as exc:
                message = failure_message(exc)
                if self._signals_ok[name]:
                    log.warning("consul catalog (%s): %s; serving the last known good sets",
                                name, message)
                self._signals_ok[name] = False
                for query in self.queries:
                    self.stale[query] = message
                    self.listener.failed(query, message)
                index = 0
                await asyncio.sleep(backoff_delay(backoff, exc, self._rng))
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            if recovered:
                log.info("consul catalog (%s): answering again; reading every service",
                         name)
                self._mark(self.queries)
            backoff = 1.0
            zero_blocked = asked == 0
            index = 0 if new_index < index else max(new_index, 0)
            elapsed = loop.time() - started
            pause = MIN_INTERVAL - elapsed if elapsed < MIN_INTERVAL else 0.0
            await asyncio.sleep(pause + self._rng.random() * MIN_INTERVAL / 2)

    def _on_checks(self, checks: Any, moved: bool) -> None:
        by_service, by_node, nodes_of = check_fingerprints(checks)
        changed = []
        for query in self.queries:
            nodes = nodes_of.get(query.service, set()) | self._nodes_seen.get(
                query.service, set())
            fingerprint = (tuple(sorted(by_service.get(query.service, ()))),
                           tuple(sorted(c for n in sorted(nodes) for c in by_node.get(n, ()))))
            if self.fingerprints.get(query) != fingerprint:
                if query in self.fingerprints:
                    changed.append(query)
                self.fingerprints[query] = fingerprint
        self._mark(changed)

    def _on_catalog(self, services: Any, moved: bool) -> None:
        changed = tags_changed(self._tags, services, {q.service for q in self.queries})
        first = self._tags is None
        self._tags = services
        if changed:
            self._mark(q for q in self.queries if q.service in changed)
        elif moved and not first:
            self._resync()

    async def _read_forever(self) -> None:
        while True:
            while not self._dirty:
                self._wake.clear()
                await self._wake.wait()
            query = self._dirty.pop(0)
            self._dirty_set.discard(query)
            try:
                self.reads += 1
                entries, index = await self.client.health_service(
                    query.service, index=0, wait=None, tags=query.tags,
                    passing=query.passing, datacenter=query.datacenter)
            except asyncio.CancelledError:
                raise
            except WATCH_ERRORS as exc:
                message = failure_message(exc)
                if self.stale.get(query) != message:
                    log.warning("consul service %r: %s; serving the last known good set",
                                query.service, message)
                self.stale[query] = message
                self.listener.failed(query, message)
                delay = backoff_delay(1.0, exc, self._rng)
                asyncio.get_running_loop().call_later(delay, self._mark, [query])
                continue
            if query not in self.queries:
                continue  # unwatched while being read
            self.stale.pop(query, None)
            self.indexes[query] = index
            if isinstance(entries, list):
                self._nodes_seen[query.service] = {
                    str(e["Node"].get("Node", "")) for e in entries
                    if isinstance(e, dict) and isinstance(e.get("Node"), dict)}
            self.listener.answered(query, entries, index)
