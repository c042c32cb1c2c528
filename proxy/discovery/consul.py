"""Consul discovery: blocking queries on /v1/health/service/<name>, one watcher per
distinct (service, tags, datacenter, passing filter) in each worker.

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
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.discovery.consul_entries import ConsulEntryError, backends_from_entries, same_backends
from proxy.models import Backend, BackendSet

__all__ = ["ConsulClient", "ConsulError", "ConsulWatch", "Subscriber", "consul_address"]

log = logging.getLogger("bascule.consul")

MIN_INTERVAL = 0.25  # seconds between two queries of one watcher, plus jitter
MAX_BACKOFF = 30.0


class ConsulError(Exception):
    pass


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
                 consistency: str, max_stale: float, ca_file: str | None) -> None:
        self.address = address
        self.datacenter = datacenter
        self.consistency = consistency
        self.max_stale = max_stale
        self._headers = {"X-Consul-Token": token} if token else {}
        self._ssl: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) \
            if ca_file else True
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers, trust_env=False,
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=0))
        return self._session

    async def health_service(self, service: str, *, index: int, wait: float,
                             tags: tuple[str, ...], passing: bool, datacenter: str
                             ) -> tuple[Any, int]:
        params: list[tuple[str, str]] = [("wait", f"{int(wait)}s")]
        if index:
            params.append(("index", str(index)))
        if passing:
            params.append(("passing", "1"))
        params += [("tag", tag) for tag in tags]
        dc = datacenter or self.datacenter
        if dc:
            params.append(("dc", dc))
        if self.consistency in ("stale", "consistent"):
            params.append((self.consistency, ""))
        # Consul adds up to wait/16 of jitter to a blocking query.
        timeout = aiohttp.ClientTimeout(total=wait + wait / 16 + answer_margin(wait),
                                        connect=5.0)
        url = f"{self.address}/v1/health/service/{service}"
        async with self.session().get(url, params=params, timeout=timeout) as resp:
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


class Subscriber:
    """One upstream fed by a watch: applies its own address policy and filter,
    and publishes only real changes."""

    def __init__(self, upstream: str, apply: Callable[[BackendSet], None], *,
                 passing_only: bool, address: str,
                 on_change: Callable[[str, bool], None]) -> None:
        self.upstream = upstream
        self._apply = apply
        self.passing_only = passing_only
        self.address = address
        self._on_change = on_change
        self.backends: tuple[Backend, ...] = ()
        self.version = 0
        self.answered = False

    def publish(self, entries: Any) -> None:
        backends = backends_from_entries(entries, passing_only=self.passing_only,
                                         address=self.address)
        first = not self.answered
        self.answered = True
        if not first and same_backends(backends, self.backends):
            self._on_change(self.upstream, False)
            return
        self.backends = backends
        self.version += 1
        self._apply(BackendSet(self.version, backends))
        self._on_change(self.upstream, True)


class ConsulWatch:
    def __init__(self, client: ConsulClient, service: str, tags: tuple[str, ...],
                 datacenter: str, passing: bool, wait: float) -> None:
        self.client = client
        self.service = service
        self.tags = tags
        self.datacenter = datacenter
        self.passing = passing
        self.wait = wait
        self.subscribers: list[Subscriber] = []
        self.index = 0
        self.stale = False
        self.error = ""
        self.last_success = 0.0  # wall clock, for /status
        self._last_success_mono = time.monotonic()
        self.first_answer = asyncio.Event()
        self.on_error: Callable[[str], None] = lambda upstream: None
        self._rng = random.Random()
        self.queries = 0

    @property
    def watchdog_after(self) -> float:
        return self.wait + self.wait / 16 + answer_margin(self.wait)

    def describe(self) -> dict[str, Any]:
        return {
            "source": "consul", "service": self.service, "tags": list(self.tags),
            "stale": self.stale, "index": self.index, "error": self.error or None,
            "last_success_age": round(time.time() - self.last_success, 3)
            if self.last_success else None,
        }

    async def run(self) -> None:
        backoff = 1.0
        zero_blocked = False
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            index = self.index
            if index == 0 and zero_blocked:
                index = 1  # never block on index 0 twice in a row
            try:
                self.queries += 1
                entries, new_index = await self.client.health_service(
                    self.service, index=index, wait=self.wait, tags=self.tags,
                    passing=self.passing, datacenter=self.datacenter)
                for subscriber in self.subscribers:
                    subscriber.publish(entries)
            except asyncio.CancelledError:
                raise
            except (ConsulError, ConsulEntryError, aiohttp.ClientError, OSError,
                    TimeoutError, ValueError) as exc:
                message = f"{type(exc).__name__}: {exc}".rstrip(": ")
                if not self.stale or message != self.error:
                    log.warning("consul service %r: %s; serving the last known good set",
                                self.service, message)
                self.stale = True
                self.error = message
                for subscriber in self.subscribers:
                    self.on_error(subscriber.upstream)
                if time.monotonic() - self._last_success_mono > self.watchdog_after:
                    if self.index:
                        log.warning("consul service %r: no answer for %.0fs, restarting "
                                    "the query from index 0", self.service,
                                    self.watchdog_after)
                    self.index = 0
                await asyncio.sleep(backoff * (0.5 + self._rng.random()))
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = 1.0
            if self.stale:
                log.info("consul service %r: answering again", self.service)
            self.stale = False
            self.error = ""
            self.last_success = time.time()
            self._last_success_mono = time.monotonic()
            self.first_answer.set()
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
