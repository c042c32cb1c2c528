"""Backend health for one upstream in one worker: what the agent decides (active
checks, ejections) applied here, plus panic mode and slow start. A backend receives
traffic when it passes the active checks (if configured) and is not ejected; Consul's
own checks apply before that, since discovery only publishes instances Consul
considers healthy.

- Active (`[upstreams.X.health]`): GET `path` every `interval` (+ random jitter),
  `timeout`, `expected_statuses`, optional Host; `fall` consecutive failures take a
  backend out, `rise` successes bring it back. Probed once per Bascule, however many
  workers (proxy/agent/prober.py); every worker gets the same verdict.
- Passive (`[upstreams.X.outlier]`, Envoy's outlier detection): this worker counts
  consecutive 5xx answers or connect failures; at `consecutive_failures` it reports
  to the agent, which ejects once for every worker for base_ejection_time x the
  number of ejections (capped at max_ejection_time), never more than
  max_ejection_percent of the upstream, though at least one backend may be ejected
  (proxy/agent/outliers.py). Ejections end here, on time, even without the agent.
- Panic (`panic_threshold`): below that share of healthy backends, the balancer
  spreads over all of them instead.
- Drain (admin API, `POST /backends/drain`): an operator takes a backend out of
  rotation for every worker (the agent keeps the set; proxy/agent/drains.py); in-flight
  requests finish; it comes back with `POST /backends/enable`.
- Slow start (`slow_start`): a new or recovered backend's weight ramps up linearly
  (for strategies where weight is a share of traffic picked per request).

Every state change is logged once per worker with its reason, counted in
bascule_backend_state_changes_total and visible in /status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.agent.wire import Message, spec_key
from proxy.config import UpstreamConfig
from proxy.models import Backend

__all__ = ["BackendHealth", "HealthLink", "HealthMonitor"]

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


class HealthLink(Protocol):
    """What a monitor needs of the worker's link to the agent (proxy/agent/link.py),
    named here so the request path never imports the agent's assembly."""

    def set_health(self, sub: str, check: Any, targets: list[Any],
                   listener: Callable[[Message], None]) -> None: ...

    def drop_health(self, sub: str) -> None: ...

    def subscribe_outliers(self, okey: str, spec: Any,
                           listener: Callable[[Message], None]) -> None: ...

    def unsubscribe_outliers(self, okey: str,
                             listener: Callable[[Message], None]) -> None: ...

    def report_outlier(self, okey: str, backend_id: str, backends: int) -> None: ...

    drained: frozenset[tuple[str, str]]  # (upstream, backend id) drained by an operator

    def on_drains(self, listener: Callable[[Message], None]) -> None: ...

    def off_drains(self, listener: Callable[[Message], None]) -> None: ...


class HealthMonitor:
    def __init__(self, name: str, config: UpstreamConfig, balancer: Any) -> None:
        self.name = name
        self.config = config
        self.balancer = balancer
        self.states: dict[str, BackendHealth] = {}
        self.on_change: Any = lambda upstream, backend, state, reason: None
        self._tasks: list[asyncio.Task[None]] = []
        self.outlier_on = config.outlier.consecutive_failures > 0
        self._failing: dict[str, bool] = {}  # backends with a current error streak
        self._link: HealthLink | None = None
        # Shared by every worker (and by the next runtime after a reload with the
        # same settings): the agent's ejections are per upstream and outlier config.
        outlier = config.outlier.model_dump(mode="json")
        self.outlier_spec = outlier
        self.outlier_key = spec_key({"upstream": name, "outlier": outlier})
        # The check and the upstream's TLS settings: HTTPS backends are checked
        # over HTTPS, with the same verification.
        self.check_spec = ({"check": config.health.model_dump(mode="json"),
                            "tls": config.tls.model_dump(mode="json") if config.tls else None}
                           if config.health is not None else None)
        self.health_sub = f"{name}@{id(self):x}"  # this runtime's subscription

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
                and state.ejected_until <= time.monotonic() and self._link is not None):
            state.consecutive_errors = 0  # the next streak reports again
            self._link.report_outlier(self.outlier_key, backend.id,
                                      len(self.balancer.backends))

    # -- from the agent ---------------------------------------------------------------

    def _backend(self, backend_id: str) -> Backend | None:
        for backend in self.balancer.backends:
            if backend.id == backend_id:
                return backend  # type: ignore[no-any-return]
        return None

    def _on_eject(self, message: Message) -> None:
        _, _, backend_id, seconds, ejections = message
        backend = self._backend(backend_id)
        if backend is None:
            return
        state = self._state(backend)
        state.ejections = int(ejections)
        state.ejected_until = time.monotonic() + float(seconds)
        state.consecutive_errors = 0
        self._apply(backend, state, f"ejected for {float(seconds):g}s after "
                                    f"{self.config.outlier.consecutive_failures} "
                                    "consecutive failures")

    def _on_health(self, message: Message) -> None:
        _, _, backend_id, up, reason = message
        backend = self._backend(backend_id)
        if backend is None:
            return
        state = self._state(backend)
        if state.active_ok == bool(up):
            return
        state.active_ok = bool(up)
        self._apply(backend, state, str(reason))

    def _on_drains(self, message: Message | None = None) -> None:
        """The operator's drains changed (or the backends did): apply them here."""
        if self._link is None:
            return
        drained = self._link.drained
        for backend in self.balancer.backends:
            want = (self.name, backend.id) in drained
            if want != backend.drained:
                backend.drained = want
                self._apply(backend, self._state(backend),
                            "drained by an operator" if want else "drain ended")

    def backends_changed(self) -> None:
        """Discovery changed the backends: the agent checks the new set."""
        self._on_drains()
        if self._link is None or self.check_spec is None:
            return
        targets = [[b.id, b.host, b.port, self._state(b).active_ok, b.tls]
                   for b in self.balancer.backends]
        self._link.set_health(self.health_sub, self.check_spec, targets, self._on_health)

    # -- state ------------------------------------------------------------------------

    def _state(self, backend: Backend) -> BackendHealth:
        state = self.states.get(backend.id)
        if state is None:
            state = self.states[backend.id] = BackendHealth(admitted_at=time.monotonic())
        return state

    def _apply(self, backend: Backend, state: BackendHealth, reason: str) -> None:
        healthy = (state.active_ok and state.ejected_until <= time.monotonic()
                   and not backend.drained)
        if healthy == backend.healthy:
            return
        backend.healthy = healthy
        state.reason = reason
        if healthy:
            state.admitted_at = time.monotonic()
            if self.config.slow_start:
                backend.ramp = 0.05
        word = "up" if healthy else "drained" if backend.drained else "down"
        log.warning("upstream %s backend %s is %s: %s", self.name, backend.id, word, reason)
        self.on_change(self.name, backend.id, word, reason)
        self._update_panic()

    def _update_panic(self) -> None:
        # Drained backends are out by choice: they count on neither side.
        backends = [b for b in self.balancer.backends if not b.drained]
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

    def start(self, loop: asyncio.AbstractEventLoop, link: HealthLink) -> None:
        self._link = link
        link.on_drains(self._on_drains)
        if self.outlier_on:
            link.subscribe_outliers(self.outlier_key, self.outlier_spec, self._on_eject)
        self.backends_changed()
        self._tasks.append(loop.create_task(self._tick_forever()))

    async def stop(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.off_drains(self._on_drains)
            if self.outlier_on:
                link.unsubscribe_outliers(self.outlier_key, self._on_eject)
            if self.check_spec is not None:
                link.drop_health(self.health_sub)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

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
