"""The backends an operator drained, kept by the agent for every worker.

Keyed by (upstream name, backend id): a reload that keeps the upstream and the
backend keeps the drain, and so does an agent restart, because each worker sends
back the set it last heard of when it reconnects (the union is kept). A Bascule
restart forgets them: a drain that must last belongs in the config (remove the
backend) or in Consul (maintenance mode).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from proxy.agent.wire import Message

__all__ = ["DrainBook"]


class DrainBook:
    def __init__(self) -> None:
        self.drained: set[tuple[str, str]] = set()

    def set(self, upstream: str, backend_id: str, drained: bool) -> bool:
        """True when this changed the set."""
        key = (upstream, backend_id)
        if (key in self.drained) == drained:
            return False
        if drained:
            self.drained.add(key)
        else:
            self.drained.discard(key)
        return True

    def merge(self, items: Iterable[Any]) -> bool:
        """Add what a reconnecting worker remembers; True when that added any."""
        before = len(self.drained)
        self.drained.update((str(u), str(b)) for u, b in items)
        return len(self.drained) != before

    def message(self) -> Message:
        return ["drained", sorted([u, b] for u, b in self.drained)]
