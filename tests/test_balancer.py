"""The balancer's lease and release (pure, no sockets): in-flight counts, the
strategy's observation, panic mode."""

from __future__ import annotations

from proxy.balancer import Balancer
from proxy.models import Backend, BackendSet
from proxy.strategy import RequestContext


class Recording:
    """A strategy that picks the first backend not excluded and records what it
    observes."""

    def __init__(self) -> None:
        self.backends: list[Backend] = []
        self.observed: list[tuple[str, float, bool]] = []

    def update(self, backends: list[Backend]) -> None:
        self.backends = list(backends)

    def pick(self, ctx: RequestContext) -> Backend:
        return next(b for b in self.backends if b.id not in ctx.exclude)

    def observe(self, backend: Backend, latency_s: float, ok: bool) -> None:
        self.observed.append((backend.id, latency_s, ok))


def balancer() -> tuple[Balancer, Recording]:
    strategy = Recording()
    b = Balancer("app", strategy)
    b.update(BackendSet(1, (Backend("a", "10.0.0.1", 80), Backend("b", "10.0.0.2", 80))))
    return b, strategy


def test_lease_and_release_count_in_flight_and_observe() -> None:
    b, strategy = balancer()
    first = b.lease(RequestContext())
    second = b.lease(RequestContext())
    assert (first.id, second.id) == ("a", "a")
    assert b.inflight == 2 and first.inflight == 2
    b.release(first, 0.25, True)
    b.release(second, 1.5, False)
    assert b.inflight == 0 and first.inflight == 0
    assert strategy.observed == [("a", 0.25, True), ("a", 1.5, False)]


def test_an_update_keeps_the_state_of_unchanged_backends() -> None:
    b, _ = balancer()
    leased = b.lease(RequestContext())
    b.update(BackendSet(2, (Backend("a", "10.0.0.1", 80), Backend("c", "10.0.0.3", 80))))
    assert b.backends[0] is leased and leased.inflight == 1
    b.release(leased)
    assert b.inflight == 0


def test_panic_mode_spreads_over_every_backend_but_the_ones_tried() -> None:
    b, _ = balancer()
    b.panic = True
    for backend in b.backends:
        backend.healthy = False
    ctx = RequestContext()
    ctx.exclude = frozenset({"a"})
    assert {b.lease(ctx).id for _ in range(4)} == {"b"}
