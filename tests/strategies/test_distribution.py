"""Weighted shares and tie-breaking of the non-hashing strategies."""

from __future__ import annotations

import collections
import itertools
import random

import pytest

from proxy.models import Backend
from proxy.strategy import RequestContext
from strategies.least_connections import LeastConnections
from strategies.round_robin import RoundRobin, smooth_schedule
from strategies.weighted_random import WeightedRandom


def backends(weights: list[int]) -> list[Backend]:
    return [Backend(f"b{i}", "127.0.0.1", 9000 + i, w) for i, w in enumerate(weights)]


def shares(strategy: object, members: list[Backend], picks: int) -> dict[str, float]:
    strategy.update(members)  # type: ignore[attr-defined]
    counts = collections.Counter(strategy.pick(RequestContext()).id  # type: ignore[attr-defined]
                                 for _ in range(picks))
    return {k: v / picks for k, v in counts.items()}


def test_round_robin_is_exact() -> None:
    assert shares(RoundRobin({}), backends([5, 3, 2]), 1000) == \
        {"b0": 0.5, "b1": 0.3, "b2": 0.2}


def test_round_robin_large_set_is_exact_and_smooth() -> None:
    members = backends([1 + i % 3 for i in range(200)])
    rr = RoundRobin({})
    rr.update(members)
    total = sum(b.weight for b in members)
    order = [rr.pick(RequestContext()).id for _ in range(total)]
    counts = collections.Counter(order)
    assert all(counts[b.id] == b.weight for b in members)
    # smooth: a weight-3 backend's turns are spread, never back to back
    assert all(a != b for a, b in itertools.pairwise(order))


def test_smooth_schedule_interleaves() -> None:
    order = smooth_schedule([5, 1, 1])
    assert sorted(order) == [0, 0, 0, 0, 0, 1, 2]
    assert max(len(run) for run in "".join(map(str, order)).split("1")) <= 3


def test_weighted_random_within_two_percent() -> None:
    result = shares(WeightedRandom({}, rng=random.Random(3)), backends([5, 3, 2]), 50_000)
    for key, expected in {"b0": 0.5, "b1": 0.3, "b2": 0.2}.items():
        assert abs(result[key] - expected) < 0.02


def test_least_connections_weighted_and_unbiased_ties() -> None:
    members = backends([1, 1, 1, 1])
    lc = LeastConnections({})
    lc.update(members)
    members[0].inflight = 3
    members[1].inflight = 1
    assert {lc.pick(RequestContext()).id for _ in range(20)} == {"b2", "b3"}
    for m in members:
        m.inflight = 0
    # all idle: every backend gets its share, the first is not favoured
    result = shares(lc, members, 4000)
    assert all(abs(v - 0.25) < 0.02 for v in result.values())
    weighted = backends([2, 1])
    lc.update(weighted)
    weighted[0].inflight, weighted[1].inflight = 3, 1  # 1.5 vs 1.0 per unit of weight
    assert lc.pick(RequestContext()).id == "b1"


@pytest.mark.parametrize("choices", [2, 3])
def test_least_connections_power_of_choices(choices: int) -> None:
    members = backends([1] * 100)
    for i, m in enumerate(members):
        m.inflight = i  # b0 is the least loaded, b99 the most
    lc = LeastConnections({"choices": choices}, rng=random.Random(5))
    lc.update(members)
    picks = [int(lc.pick(RequestContext()).id[1:]) for _ in range(5000)]
    mean = sum(picks) / len(picks)
    # the expected minimum of N uniform draws from 0..99 is ~100/(N+1)
    assert mean < 100 / (choices + 1) * 1.15


def test_least_connections_rejects_bad_choices() -> None:
    with pytest.raises(ValueError, match="choices: must be >= 2"):
        LeastConnections({"choices": 1})
