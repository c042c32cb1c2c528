"""The retry decision (pure), table-driven: proxy/retry.py's rules in order."""

from __future__ import annotations

import pytest

from proxy.retry import RetryDecision, RetryRules, decide_retry

RULES = RetryRules(attempts=3, retry_on=frozenset({"connect-failure", "reset", "timeout"}),
                   budget_percent=20.0, min_retry_concurrency=3)
R, N, B = RetryDecision.RETRY, RetryDecision.NO, RetryDecision.BUDGET_EXHAUSTED


@pytest.mark.parametrize(("case", "overrides", "expected"), [
    ("first failure of a GET", {}, R),
    ("attempts used up", {"attempt": 3}, N),
    ("a kind not retried on", {"rules": RetryRules(3, frozenset({"connect-failure"}), 20, 3)},
     N),
    ("a POST after something was sent", {"method": "POST"}, N),
    ("a POST that never reached a backend", {"method": "POST", "kind": "connect-failure"}, R),
    ("a PUT whose body was not all kept", {"method": "PUT", "has_body": True}, N),
    ("a PUT whose body was kept", {"method": "PUT", "has_body": True, "body_kept": True}, R),
    ("a reset is not budgeted", {"kind": "reset", "retries_active": 99}, R),
    ("a timeout within the minimum", {"kind": "timeout", "retries_active": 2}, R),
    ("a timeout past the budget", {"kind": "timeout", "retries_active": 3, "inflight": 10}, B),
    ("a 5xx within 20% of 100 in flight", {"kind": "status", "retries_active": 19,
                                           "inflight": 100}, R),
    ("a 5xx past 20% of 100 in flight", {"kind": "status", "retries_active": 20,
                                         "inflight": 100}, B),
    ("a request already holding a slot", {"kind": "status", "retries_active": 50,
                                          "already_retrying": True}, R),
])
def test_decide_retry(case: str, overrides: dict[str, object],
                      expected: RetryDecision) -> None:
    args: dict[str, object] = {"attempt": 1, "kind": "timeout", "already_retrying": False,
                               "method": "GET", "has_body": False, "body_kept": False,
                               "retries_active": 0, "inflight": 1}
    given = dict(overrides)
    rules = given.pop("rules", RULES)
    args.update(given)
    assert decide_retry(rules, **args) is expected, case  # type: ignore[arg-type]
