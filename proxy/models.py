"""Runtime values shared by discovery, balancer and strategies."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Backend", "BackendSet"]


class Backend:
    """One backend of an upstream. Identity (`id`, address, weight) is fixed; the
    counters are mutable runtime state kept by the balancer's lease, so they survive
    discovery updates that keep the backend's identity."""

    __slots__ = ("drained", "fleet_inflight", "healthy", "host", "id", "inflight", "port",
                 "ramp", "tls", "weight")

    def __init__(self, id: str, host: str, port: int, weight: int = 1,
                 tls: bool = False) -> None:
        self.id = id
        self.host = host
        self.port = port
        self.weight = weight
        self.tls = tls  # spoken to over HTTPS (upstream `tls`, or Consul's proto=https)
        self.inflight = 0
        # Other workers' and instances' in-flight requests on this backend, as Redis
        # last said (proxy/fleet.py); 0 unless the strategy has shared = "redis".
        self.fleet_inflight = 0
        self.healthy = True
        # Slow start: share of its weight a (re)admitted backend gets while it warms up
        self.ramp = 1.0
        # Drained by an operator (admin API): no new requests, in-flight ones finish.
        # Also not healthy while drained, so strategies need no second test.
        self.drained = False

    @property
    def identity(self) -> tuple[str, str, int, int, bool]:
        """What must stay the same for the Backend object (its counters and health)
        to carry over an update."""
        return (self.id, self.host, self.port, self.weight, self.tls)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        state = "drained" if self.drained else "up" if self.healthy else "down"
        return (f"Backend({self.id!r}, {self.address}, weight={self.weight}, "
                f"inflight={self.inflight}, {state})")


@dataclass(frozen=True)
class BackendSet:
    """A complete, versioned set of backends as published by discovery."""

    version: int
    backends: tuple[Backend, ...]
