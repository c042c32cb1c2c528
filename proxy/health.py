"""Backend health for one upstream in one worker: active checks, passive outlier
ejection, panic mode and slow start. A backend receives traffic when it passes the
active checks (if configured) and is not ejected; Consul's own checks apply before
that, since discovery only publishes instances Consul considers healthy.

- Active (`[upstreams.X.health]`): GET `path` every `interval` (+ random jitter so a
  fleet does not check in lockstep), `timeout`, `expected_statuses`, optional Host;
  `fall` consecutive failures take a backend out, `rise` successes bring it back.
- Passive (`[upstreams.X.outlier]`, Envoy's outlier detection): `consecutive_failures`
  5xx answers or connect failures eject a backend for base_ejection_time x the number
  of its ejections (capped at max_ejection_time); never more than
  max_ejection_percent of the upstream, though at least one backend may be ejected.
- Panic (`panic_threshold`): below that share of healthy backends, the balancer
  spreads over all of them instead.
- Slow start (`slow_start`): a new or recovered backend's weight ramps up linearly
  (for strategies where weight is a share of traffic picked per request).

Every state change is logged once with its reason, counted in
bascule_backend_state_changes_total and visible in /status.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from proxy.config import UpstreamConfig
from proxy.models import Backend

__all__ = ["BackendHealth", "HealthMonitor"]

log = logging.getLogger("bascule.health")


@dataclass
class BackendHealth:
    active_ok: bool = True
    successes: int = 0
    failures: int = 0
    consecutive_errors: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    admitted_at: float = 0.0
    reason: str = ""

    def describe(self, now: float) -> dict[str, Any]:
        return {"active": "pass" if self.active_ok else "fail",
                "ejected_for": round(self.ejected_until - now, 3)
                if self.ejected_until > now else 0,
                "ejections": self.ejections, "reason": self.reason or None}


class HealthMonitor:
    def __init__(self, name: str, config: UpstreamConfig, balancer: Any) -> None:
        self.name = name
        self.config = config
        self.balancer = balancer
        self.states: dict[str, BackendHealth] = {}
        self.on_change: Any = lambda upstream, backend, state, reason: None
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._rng = random.Random()
        self.outlier_on = config.outlier.consecutive_failures > 0
        self._failing: dict[str, bool] = {}  # backends with a current error streak

    # -- passive: called by the forwarder --------------------------------------------

    def record(self, backend: Backend, failed: bool) -> None:
        if not self.outlier_on:
            return
        if not failed:
            # The common case costs one dict check: only failing backends are listed.
            if self._failing and self._failing.pop(backend.id, None) is not None:
                self._state(backend).consecutive_errors = 0
            return
        state = self._state(backend)
        self._failing[backend.id] = True
        state.consecutive_errors += 1
        if (state.consecutive_errors >= self.config.outlier.consecutive_failures
                and state.ejected_until <= time.monotonic()):
            self._eject(backend, state)

    def _eject(self, backend: Backend, state: BackendHealth) -> None:
        outlier = self.config.outlier
        backends = self.balancer.backends
        now = time.monotonic()
        ejected = sum(1 for b in backends if self._state(b).ejected_until > now)
        allowed = max(1, math.floor(len(backends) * outlier.max_ejection_percent / 100))
        if ejected >= allowed:
            return  # max_ejection_percent: keep the rest serving
        state.ejections += 1
        duration = min(outlier.max_ejection_time,
                       outlier.base_ejection_time * state.ejections)
        state.ejected_until = now + duration
        state.consecutive_errors = 0
        self._apply(backend, state, f"ejected for {duration:g}s after "
                                    f"{outlier.consecutive_failures} consecutive failures")

    # -- state ------------------------------------------------------------------------

    def _state(self, backend: Backend) -> BackendHealth:
        state = self.states.get(backend.id)
        if state is None:
            state = self.states[backend.id] = BackendHealth(admitted_at=time.monotonic())
        return state

    def _apply(self, backend: Backend, state: BackendHealth, reason: str) -> None:
        healthy = state.active_ok and state.ejected_until <= time.monotonic()
        if healthy == backend.healthy:
            return
        backend.healthy = healthy
        state.reason = reason
        if healthy:
            state.admitted_at = time.monotonic()
            if self.config.slow_start:
                backend.ramp = 0.05
        log.warning("upstream %s backend %s is %s: %s", self.name, backend.id,
                    "up" if healthy else "down", reason)
        self.on_change(self.name, backend.id, "up" if healthy else "down", reason)
        self._update_panic()

    def _update_panic(self) -> None:
        backends = self.balancer.backends
        if not backends:
            self.balancer.panic = False
            return
        healthy = sum(1 for b in backends if b.healthy)
        panic = healthy * 100 < self.config.panic_threshold * len(backends)
        if panic != self.balancer.panic:
            self.balancer.panic = panic
            log.warning("upstream %s: %d of %d backends healthy, %s panic mode", self.name,
                        healthy, len(backends), "entering" if panic else "leaving")

    def describe(self, backend: Backend) -> dict[str, Any]:
        return self._state(backend).describe(time.monotonic())

    # -- background: active checks, ejection expiry, slow start -----------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._tasks.append(loop.create_task(self._tick_forever()))
        if self.config.health is not None:
            self._tasks.append(loop.create_task(self._check_forever()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _tick_forever(self, interval: float = 0.25) -> None:
        slow_start = self.config.slow_start
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for backend in self.balancer.backends:
                state = self._state(backend)
                if not backend.healthy and state.active_ok and 0 < state.ejected_until <= now:
                    state.ejected_until = 0.0
                    self._apply(backend, state, "ejection time over")
                if backend.ramp < 1.0:
                    backend.ramp = 1.0 if not slow_start else min(
                        1.0, max(0.05, (now - state.admitted_at) / slow_start))

    async def _check_forever(self) -> None:
        health = self.config.health
        assert health is not None
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=health.timeout), trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False)
        while True:
            await asyncio.gather(*(self._check(b) for b in self.balancer.backends))
            await asyncio.sleep(health.interval + self._rng.random() * health.jitter)

    async def _check(self, backend: Backend) -> None:
        health = self.config.health
        assert health is not None and self._session is not None
        headers = {"Host": health.host} if health.host else {}
        try:
            async with self._session.get(f"http://{backend.address}{health.path}",
                                         headers=headers, allow_redirects=False) as resp:
                await resp.read()
                ok, why = health.accepts(resp.status), f"health check answered {resp.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            ok, why = False, f"health check failed: {type(exc).__name__} {exc}".strip()
        state = self._state(backend)
        if ok:
            state.failures = 0
            state.successes += 1
            if not state.active_ok and state.successes >= health.rise:
                state.active_ok = True
                self._apply(backend, state, f"{health.rise} health checks passed")
        else:
            state.successes = 0
            state.failures += 1
            if state.active_ok and state.failures >= health.fall:
                state.active_ok = False
                self._apply(backend, state, f"{why} ({health.fall} times)")
