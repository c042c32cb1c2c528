"""Whether a failed attempt is tried again (pure: the I/O that carries a retry out is
in forward.py). Envoy's retry policy and retry budget, with RFC 9110's rule for what
may be repeated.

Rules, in order:
1. No more than `attempts` tries in all.
2. The failure kind must be one the upstream retries on (`retry_on`); a status only
   reaches here when it is one of the retried statuses.
3. After something was sent (anything but a connect failure), only idempotent
   methods go again (RFC 9110 §9.2.2), and a request body only when all of it was
   kept (`retry_body_limit`, or read whole by `buffer_requests`).
4. Retry budget: the retries that add load — after a 5xx or a timeout the first
   backend did (or still does) the work — may be at most `budget_percent` of the
   upstream's requests in flight, never fewer than `min_retry_concurrency`. A connect
   failure or a reset means that backend is gone, so failing over is not budgeted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

__all__ = ["IDEMPOTENT", "RetryDecision", "RetryRules", "decide_retry"]

# RFC 9110 §9.2.2
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_BUDGETED: Final = frozenset({"status", "timeout"})


class RetryDecision(enum.Enum):
    RETRY = "retry"
    NO = "no"
    BUDGET_EXHAUSTED = "budget exhausted"  # would retry, but the budget is used up


@dataclass(frozen=True, slots=True)
class RetryRules:
    """An upstream's retry policy, fixed at config time."""

    attempts: int
    retry_on: frozenset[str]  # "connect-failure", "reset", "timeout"
    budget_percent: float
    min_retry_concurrency: int


def decide_retry(rules: RetryRules, *, attempt: int, kind: str, already_retrying: bool,
                 method: str, has_body: bool, body_kept: bool, retries_active: int,
                 inflight: int) -> RetryDecision:
    """`attempt`: tries made so far; `kind`: "connect-failure", "reset", "timeout" or
    "status"; `already_retrying`: this request holds a budget slot already."""
    if attempt >= rules.attempts:
        return RetryDecision.NO
    if kind != "status" and kind not in rules.retry_on:
        return RetryDecision.NO
    if kind != "connect-failure" and (method not in IDEMPOTENT or (has_body and not body_kept)):
        return RetryDecision.NO
    if not already_retrying and kind in _BUDGETED:
        allowed = max(rules.min_retry_concurrency, rules.budget_percent / 100 * inflight)
        if retries_active >= allowed:
            return RetryDecision.BUDGET_EXHAUSTED
    return RetryDecision.RETRY
