"""Active health checks, once per (check settings, backend address) for the whole
Bascule: four workers and two upstreams sharing a backend and the same `[health]`
settings make one probe per interval, not eight. `fall` consecutive failures take a
backend down and `rise` successes bring it back, counted here, so every worker
learns of a change from the same probe at the same moment."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.config import HealthConfig

__all__ = ["ProbeTarget"]

log = logging.getLogger("bascule.health")


class ProbeTarget:
    """One backend address probed with one HealthConfig. `notify(up, reason)` is
    called on every change of state."""

    def __init__(self, check: HealthConfig, host: str, port: int, *, up: bool,
                 notify: Callable[[ProbeTarget], None], tls: ssl.SSLContext | None = None,
                 server_name: str | None = None) -> None:
        self.check = check
        self.tls = tls  # HTTPS, verified like the upstream's traffic
        self.server_name = server_name
        self.key: Any = None  # the hub's name for it
        self.host = host
        self.port = port
        self.up = up
        self.reason = ""
        self.successes = 0
        self.failures = 0
        self.probes = 0
        self._notify = notify
        self._rng = random.Random()
        self.task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self, session: aiohttp.ClientSession) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(session))

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _run(self, session: aiohttp.ClientSession) -> None:
        check = self.check
        # Spread first probes over the jitter so many targets do not fire together.
        await asyncio.sleep(self._rng.random() * check.jitter)
        while True:
            await self.probe(session)
            await asyncio.sleep(check.interval + self._rng.random() * check.jitter)

    async def probe(self, session: aiohttp.ClientSession) -> None:
        check = self.check
        headers = {"Host": check.host} if check.host else {}
        self.probes += 1
        scheme = "https" if self.tls is not None else "http"
        extra: dict[str, Any] = {}
        if self.tls is not None:
            extra["ssl"] = self.tls
            if self.server_name:
                extra["server_hostname"] = self.server_name
        try:
            async with session.get(f"{scheme}://{self.address}{check.path}",
                                   headers=headers, allow_redirects=False,
                                   timeout=aiohttp.ClientTimeout(total=check.timeout),
                                   **extra) as resp:
                await resp.read()
                ok, why = check.accepts(resp.status), f"health check answered {resp.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            ok, why = False, f"health check failed: {type(exc).__name__} {exc}".strip()
        if ok:
            self.failures = 0
            self.successes += 1
            if not self.up and self.successes >= check.rise:
                self.up = True
                self.reason = f"{check.rise} health checks passed"
                self._notify(self)
        else:
            self.successes = 0
            self.failures += 1
            if self.up and self.failures >= check.fall:
                self.up = False
                self.reason = f"{why} ({check.fall} times)"
                self._notify(self)
