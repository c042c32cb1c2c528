"""Consul discovery: the agent client, and blocking queries on
/v1/health/service/<name>, one per distinct (service, tags, datacenter, passing
filter) while few services are watched (proxy/discovery/source.py chooses; past that,
proxy/discovery/catalog.py watches the whole catalog instead).

Follows Consul's blocking-query rules (api-docs/features/blocking, "Implementation
details"): the index from X-Consul-Index is sent back with `wait`; an index that
goes backwards resets to 0; an index of 0 is never blocked on twice in a row (1 is
used instead); queries are rate limited (a minimum interval plus jitter) and errors
back off exponentially with jitter, so a fleet of Bascules cannot hammer Consul.

Failure handling: Consul unreachable, a 5xx, a timeout, a malformed answer, or (with
`consistency = "stale"`) an answer older than `max_stale` by X-Consul-LastContact
keeps the last known good set serving, marked stale in /status and metrics, while
retrying. A successful answer with no healthy instances is applied and logged. A
watchdog restarts the query from index 0 when no answer succeeded for longer than
`wait` plus a margin (what fabio #481 lacked).

Plain aiohttp rather than py-consul: its health.service() returns only (index,
data), hiding the X-Consul-LastContact/X-Consul-KnownLeader headers `max_stale`
needs, and it gives no control of per-request timeouts for the watchdog.

Connections: one ConsulClient per Bascule process tree (it lives in the discovery
agent, proxy/agent/), and its connector never holds more than `max_connections` to
the agent, whatever the number of workers or watched services. A Consul agent
refuses a client above `limits.http_max_conns_per_client` (200 by default since
Consul PR #7289) with `429 Too Many Requests` ("Your IP is issuing too many
concurrent connections", hashicorp/go-connlimit); a 429 is backed off like any
error, honouring Retry-After when the agent sends one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from proxy.discovery.consul_entries import ConsulEntryError

__all__ = ["WATCH_ERRORS", "ConsulClient", "ConsulError", "ConsulThrottled", "ConsulWatch",
           "QueryListener", "ServiceQuery", "backoff_delay", "consul_address",
           "default_service_id", "failure_message"]

log = logging.getLogger("bascule.consul")

MIN_INTERVAL = 0.25  # seconds between two queries of one watcher, plus jitter
MAX_BACKOFF = 30.0


class ConsulError(Exception):
    pass


class ConsulThrottled(ConsulError):
    """429 from the agent: too many connections or requests from us."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def answer_margin(wait: float) -> float:
    """Time allowed beyond a blocking query's wait (+ Consul's wait/16 jitter) for
    the answer to arrive: 10 s for the default 5 m wait, less for short waits."""
    return min(10.0, max(1.0, wait / 4))


def consul_address(configured: str | None) -> str:
    address = configured or os.environ.get("CONSUL_HTTP_ADDR") or "http://127.0.0.1:8500"
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


class ConsulClient:
    """HTTP access to one Consul agent. The ACL token travels only in the
    X-Consul-Token header; it is never put in a URL or a log line."""

    def __init__(self, address: str, *, token: str | None, datacenter: str,
                 consistency: str, max_stale: float, ca_file: str | None,
                 max_connections: int = 32) -> None:
        self.address = address
        self.datacenter = datacenter
        self.consistency = consistency
        self.max_stale = max_stale
        self.max_connections = max_connections
        self._headers = {"X-Consul-Token": token} if token else {}
        self._ssl: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) \
            if ca_file else True
        self._session: aiohttp.ClientSession | None = None
        self.throttled = 0  # 429 answers seen

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers, trust_env=False,
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=self.max_connections))
        return self._session

    def _common(self, datacenter: str = "") -> list[tuple[str, str]]:
        params: list[tuple[str, str]] = []
        dc = datacenter or self.datacenter
        if dc:
            params.append(("dc", dc))
        if self.consistency in ("stale", "consistent"):
            params.append((self.consistency, ""))
        return params

    async def get(self, path: str, params: list[tuple[str, str]], *, index: int = 0,
                  wait: float | None = None) -> tuple[Any, int]:
        """GET a read endpoint: (decoded JSON, X-Consul-Index). With `wait`, a
        blocking query on `index` (api-docs/features/blocking)."""
        params = list(params)
        if wait is not None:
            params.append(("wait", f"{int(wait)}s"))
            if index:
                params.append(("index", str(index)))
            # Consul adds up to wait/16 of jitter to a blocking query.
            timeout = aiohttp.ClientTimeout(total=wait + wait / 16 + answer_margin(wait),
                                            connect=5.0)
        else:
            timeout = aiohttp.ClientTimeout(total=10.0, connect=5.0)
        async with self.session().get(f"{self.address}{path}", params=params,
                                      timeout=timeout) as resp:
            if resp.status == 429:
                self.throttled += 1
                raise ConsulThrottled("HTTP 429: the agent refuses more from us",
                                      _retry_after(resp.headers.get("Retry-After")))
            if resp.status != 200:
                text = (await resp.text())[:200]
                raise ConsulError(f"HTTP {resp.status}: {text.strip()}")
            try:
                data = await resp.json(content_type=None)
            except ValueError:
                raise ConsulEntryError("answer is not JSON") from None
            try:
                new_index = int(resp.headers.get("X-Consul-Index", ""))
            except ValueError:
                raise ConsulEntryError("no X-Consul-Index header") from None
            if self.consistency == "stale":
                last_contact_ms = int(resp.headers.get("X-Consul-LastContact", "0") or 0)
                if last_contact_ms / 1000 > self.max_stale:
                    raise ConsulError(f"answer is {last_contact_ms} ms stale "
                                      f"(max_stale {self.max_stale:g}s)")
            return data, new_index

    async def health_service(self, service: str, *, index: int, wait: float | None,
                             tags: tuple[str, ...], passing: bool, datacenter: str
                             ) -> tuple[Any, int]:
        """api-docs/health#list-service-instances-for-service; `wait=None` for a
        plain read."""
        params: list[tuple[str, str]] = []
        if passing:
            params.append(("passing", "1"))
        params += [("tag", tag) for tag in tags]
        return await self.get(f"/v1/health/service/{service}",
                              params + self._common(datacenter), index=index, wait=wait)

    async def health_state(self, *, index: int, wait: float) -> tuple[Any, int]:
        """Every check in the datacenter (api-docs/health#list-checks-in-state,
        state `any`): a blocking query on it returns when any check changes."""
        return await self.get("/v1/health/state/any", self._common(), index=index, wait=wait)

    async def catalog_services(self, *, index: int, wait: float) -> tuple[Any, int]:
        """Every service name with its tags (api-docs/catalog#list-services): a
        blocking query on it returns when any service is registered, changed or
        deregistered."""
        return await self.get("/v1/catalog/services", self._common(), index=index,
                              wait=wait)

    async def register(self, definition: dict[str, Any]) -> None:
        url = f"{self.address}/v1/agent/service/register"
        async with self.session().put(url, json=definition,
                                      timeout=aiohttp.ClientTimeout(total=5)) as resp:
            if resp.status != 200:
                raise ConsulError(f"register: HTTP {resp.status}")

    async def deregister(self, service_id: str) -> None:
        url = f"{self.address}/v1/agent/service/deregister/{service_id}"
        async with self.session().put(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            if resp.status != 200:
                raise ConsulError(f"deregister: HTTP {resp.status}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


@dataclass(frozen=True)
class ServiceQuery:
    """What one upstream asks Consul: a service's instances, filtered by tags,
    datacenter and Consul's `passing` filter. Upstreams asking the same share it."""

    service: str
    tags: tuple[str, ...] = ()
    datacenter: str = ""
    passing: bool = True


class QueryListener(Protocol):
    """Where a watcher delivers: every successful answer, and every failure (the
    last known good answer keeps serving meanwhile)."""

    def answered(self, query: ServiceQuery, entries: Any, index: int) -> None: ...

    def failed(self, query: ServiceQuery, message: str) -> None: ...


def failure_message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


WATCH_ERRORS = (ConsulError, ConsulEntryError, aiohttp.ClientError, OSError, TimeoutError,
                ValueError)


def backoff_delay(backoff: float, exc: BaseException, rng: random.Random) -> float:
    """How long to wait after a failure: exponential with jitter, or what a 429's
    Retry-After asks if that is longer."""
    delay = backoff * (0.5 + rng.random())
    if isinstance(exc, ConsulThrottled) and exc.retry_after is not None:
        delay = max(delay, exc.retry_after)
    return delay


class ConsulWatch:
    """One blocking query per service (the per-service mode of ConsulSource)."""

    def __init__(self, client: ConsulClient, query: ServiceQuery, wait: float,
                 listener: QueryListener) -> None:
        self.client = client
        self.query = query
        self.wait = wait
        self.listener = listener
        self.index = 0
        self.stale = False
        self.error = ""
        self._last_success_mono = time.monotonic()
        self._rng = random.Random()
        self.queries = 0

    @property
    def watchdog_after(self) -> float:
        return self.wait + self.wait / 16 + answer_margin(self.wait)

    async def run(self) -> None:
        backoff = 1.0
        zero_blocked = False
        loop = asyncio.get_running_loop()
        query = self.query
        while True:
            started = loop.time()
            index = self.index
            if index == 0 and zero_blocked:
                index = 1  # never block on index 0 twice in a row
            try:
                self.queries += 1
                entries, new_index = await self.client.health_service(
                    query.service, index=index, wait=self.wait, tags=query.tags,
                    passing=query.passing, datacenter=query.datacenter)
                self.listener.answered(query, entries, new_index)
            except asyncio.CancelledError:
                raise
            except WATCH_ERRORS as exc:
                message = failure_message(exc)
                if not self.stale or message != self.error:
                    log.warning("consul service %r: %s; serving the last known good set",
                                query.service, message)
                self.stale = True
                self.error = message
                self.listener.failed(query, message)
                if time.monotonic() - self._last_success_mono > self.watchdog_after:
                    if self.index:
                        log.warning("consul service %r: no answer for %.0fs, restarting "
                                    "the query from index 0", query.service,
                                    self.watchdog_after)
                    self.index = 0
                await asyncio.sleep(backoff_delay(backoff, exc, self._rng))
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = 1.0
            if self.stale:
                log.info("consul service %r: answering again", query.service)
            self.stale = False
            self.error = ""
            self._last_success_mono = time.monotonic()
            zero_blocked = index == 0
            if new_index < self.index:
                self.index = 0  # went backwards (e.g. a snapshot restore): start over
            else:
                self.index = max(new_index, 0)
            elapsed = loop.time() - started
            pause = MIN_INTERVAL - elapsed if elapsed < MIN_INTERVAL else 0.0
            await asyncio.sleep(pause + self._rng.random() * MIN_INTERVAL / 2)


def default_service_id(name: str, port: int) -> str:
    return f"{name}-{socket.gethostname()}-{port}"
