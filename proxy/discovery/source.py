"""One Consul agent as a source of answers for a set of ServiceQuery, within a
connection budget.

`max_connections` (`[consul] max_connections`, 32 by default) is the most Bascule
holds to the agent at once: the client's connector is capped at it. While the
watched queries fit in half of it, each has its own blocking query (the quickest to
see a change; proxy/discovery/consul.py). Past that, the catalog is watched instead:
two blocking queries as change signals and plain reads of what changed, at most
`max_connections - 2` at a time and never more than 8 (proxy/discovery/catalog.py).
The other half is headroom: reads, and the worker's self-registration.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from proxy.discovery.catalog import CatalogWatch
from proxy.discovery.consul import ConsulClient, ConsulWatch, QueryListener, ServiceQuery

__all__ = ["ConsulSettings", "ConsulSource"]

log = logging.getLogger("bascule.consul")

MAX_READS = 8


@dataclass(frozen=True)
class ConsulSettings:
    """How to reach and ask one agent (from `[consul]`, the token resolved)."""

    address: str
    token: str | None = None
    datacenter: str = ""
    consistency: str = "default"
    max_stale: float = 10.0
    ca_file: str | None = None
    wait: float = 300.0
    max_connections: int = 32

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ConsulSource:
    def __init__(self, settings: ConsulSettings, listener: QueryListener) -> None:
        self.settings = settings
        self.client = ConsulClient(
            settings.address, token=settings.token, datacenter=settings.datacenter,
            consistency=settings.consistency, max_stale=settings.max_stale,
            ca_file=settings.ca_file, max_connections=settings.max_connections)
        self.listener = listener
        self.queries: set[ServiceQuery] = set()
        self.watches: dict[ServiceQuery, tuple[ConsulWatch, asyncio.Task[None]]] = {}
        self.catalog: CatalogWatch | None = None
        self._catalog_task: asyncio.Task[None] | None = None

    @property
    def per_service_limit(self) -> int:
        return max(1, self.settings.max_connections // 2)

    @property
    def mode(self) -> str:
        return "catalog" if self.catalog is not None else "per-service"

    def set_queries(self, queries: set[ServiceQuery]) -> None:
        loop = asyncio.get_running_loop()
        self.queries = set(queries)
        if len(queries) <= self.per_service_limit:
            if self.catalog is not None:
                log.info("consul: %d services watched, one blocking query each",
                         len(queries))
                self._stop_catalog()
            for query in [q for q in self.watches if q not in queries]:
                self.watches.pop(query)[1].cancel()
            for query in queries - self.watches.keys():
                watch = ConsulWatch(self.client, query, self.settings.wait, self.listener)
                self.watches[query] = (watch, loop.create_task(watch.run()))
            return
        if self.catalog is None:
            log.info("consul: %d services watched, more than %d: watching the catalog "
                     "(2 blocking queries, reads %d at a time)", len(queries),
                     self.per_service_limit, self._reads())
            for _, task in self.watches.values():
                task.cancel()
            self.watches.clear()
            self.catalog = CatalogWatch(self.client, self.settings.wait, self._reads(),
                                        self.listener)
            self._catalog_task = loop.create_task(self.catalog.run())
        self.catalog.set_queries(self.queries)

    def _reads(self) -> int:
        return max(1, min(MAX_READS, self.settings.max_connections - 2))

    def _stop_catalog(self) -> None:
        if self._catalog_task is not None:
            self._catalog_task.cancel()
        self.catalog = None
        self._catalog_task = None

    def describe(self, query: ServiceQuery) -> dict[str, Any]:
        if self.catalog is not None:
            return {"mode": "catalog", "index": self.catalog.indexes.get(query, 0)}
        watch = self.watches.get(query)
        return {"mode": "per-service", "index": watch[0].index if watch else 0}

    async def close(self) -> None:
        tasks = [task for _, task in self.watches.values()]
        if self._catalog_task is not None:
            tasks.append(self._catalog_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.watches.clear()
        self.catalog = None
        await self.client.close()
