"""A circuit breaker for a store the cache can live without: after `threshold`
failures in a row it opens and the store is not called for `cooldown` seconds; then
one call is let through (half-open) and its outcome closes or re-opens it."""

from __future__ import annotations

import logging
import time

__all__ = ["Breaker"]

log = logging.getLogger("bascule.cache")


class Breaker:
    def __init__(self, name: str, threshold: int = 3, cooldown: float = 5.0,
                 what: str = "cache store", log: logging.Logger = log) -> None:
        self.name = name
        self.what = what  # for the log lines: "cache store", "rate limit store"
        self._log = log
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self.opened_at: float | None = None
        self._trial = False

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def allow(self) -> bool:
        opened = self.opened_at
        if opened is None:
            return True
        if not self._trial and time.monotonic() - opened >= self.cooldown:
            self._trial = True  # one call finds out whether the store is back
            return True
        return False

    def success(self) -> None:
        if self.opened_at is not None:
            self._log.warning("%s %s is back; using it again", self.what, self.name)
        self.failures = 0
        self.opened_at = None
        self._trial = False

    def failure(self, error: BaseException) -> None:
        self.failures += 1
        if self.opened_at is not None:
            self.opened_at = time.monotonic()  # the trial failed: another cooldown
            self._trial = False
        elif self.failures >= self.threshold:
            self.opened_at = time.monotonic()
            self._log.warning("%s %s failing (%s: %s); serving without it for %.0fs "
                              "and retrying", self.what, self.name, type(error).__name__,
                              error, self.cooldown)
