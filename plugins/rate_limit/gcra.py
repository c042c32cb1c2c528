"""GCRA, the generic cell rate algorithm (ATM Forum TM 4.1; as used by redis-cell
and Brandur Leach's "Rate limiting, cells, and GCRA"), and the memory store.

Why GCRA rather than a token bucket: it is the same policy (a sustained rate with
a burst) kept as one number per key — the theoretical arrival time (TAT) of the next
request — so a decision is one read and one conditional write, which a Redis script
does atomically in one round trip, and an idle key simply expires.

With `limit` requests per `period` and `burst` extra requests at once:
emission interval T = period / limit, tolerance tau = T x burst. A request at `now`
is allowed when TAT - now <= tau (with TAT = max(TAT, now)); then TAT += T. At rest
`burst + 1` requests pass at once, then one per T. Time is in microseconds.
"""

from __future__ import annotations

__all__ = ["Decision", "MemoryStore", "Policy", "decide"]


class Policy:
    """`limit` requests per period, `burst` more at once; derived values computed
    once (a decision is on the request path)."""

    __slots__ = ("burst", "interval_us", "limit", "period_us", "tolerance_us")

    def __init__(self, limit: int, period_us: int, burst: int) -> None:
        self.limit = limit
        self.period_us = period_us
        self.burst = burst
        self.interval_us = max(1, period_us // limit)
        self.tolerance_us = self.interval_us * burst


class Decision:
    __slots__ = ("ahead_us", "allowed", "retry_after_us")

    def __init__(self, allowed: bool, retry_after_us: int, ahead_us: int) -> None:
        self.allowed = allowed
        self.retry_after_us = retry_after_us  # when refused: until the next may pass
        self.ahead_us = ahead_us  # TAT - now after the decision: the key's "debt"

    def remaining(self, policy: Policy) -> int:
        """Requests that would still pass right now."""
        spare = policy.tolerance_us + policy.interval_us - self.ahead_us
        return max(0, spare // policy.interval_us)

    def reset_us(self) -> int:
        """Until the key is back at rest (full burst available)."""
        return max(0, self.ahead_us)


def decide(tat: int | None, now: int, policy: Policy) -> tuple[Decision, int | None]:
    """The decision, and the TAT to store (None: unchanged)."""
    current = now if tat is None or tat < now else tat
    if current - now > policy.tolerance_us:
        return Decision(False, current - policy.tolerance_us - now, current - now), None
    new = current + policy.interval_us
    return Decision(True, 0, new - now), new


class MemoryStore:
    """TATs in this worker's memory: the limit holds per worker (see the README).
    Keys at rest are dropped when the map grows past `max_keys` (an expired TAT
    is the same as no TAT)."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self.tats: dict[str, int] = {}

    def decide(self, key: str, now: int, policy: Policy) -> Decision:
        tats = self.tats
        decision, new = decide(tats.get(key), now, policy)
        if new is not None:
            tats[key] = new
            if len(tats) > self.max_keys:
                self._sweep(now)
        return decision

    def _sweep(self, now: int) -> None:
        self.tats = {k: v for k, v in self.tats.items() if v > now}
        while len(self.tats) > self.max_keys:  # all busy: drop the oldest inserted
            self.tats.pop(next(iter(self.tats)))
