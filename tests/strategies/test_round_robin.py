from __future__ import annotations

import collections

import pytest

from proxy.errors import NoBackendError
from proxy.models import Backend
from proxy.strategy import RequestContext
from strategies.round_robin import RoundRobin
from strategies.weighted_random import WeightedRandom


def backends(*weights: int) -> list[Backend]:
    return [Backend(name, "127.0.0.1", 9000 + i, weight=w)
            for i, (name, w) in enumerate(zip("abcdefgh", weights, strict=False))]


def test_smooth_weighted_order_like_nginx() -> None:
    rr = RoundRobin({})
    rr.update(backends(5, 1, 1))
    assert "".join(rr.pick(RequestContext()).id for _ in range(7)) == "aabacaa"


def test_exclude_and_health() -> None:
    rr = RoundRobin({})
    bs = backends(1, 1, 1)
    rr.update(bs)
    bs[1].healthy = False
    picks = {rr.pick(RequestContext(exclude=frozenset({"a"}))).id for _ in range(10)}
    assert picks == {"c"}
    # every healthy backend excluded: still answer rather than fail a retry
    assert rr.pick(RequestContext(exclude=frozenset({"a", "c"}))).id in {"a", "c"}
    for b in bs:
        b.healthy = False
    with pytest.raises(NoBackendError):
        rr.pick(RequestContext())


def test_unknown_option_rejected() -> None:
    with pytest.raises(ValueError, match="vnodes: unknown option"):
        RoundRobin({"vnodes": 3})


def test_weighted_random_distribution() -> None:
    import random

    wr = WeightedRandom({}, rng=random.Random(7))
    wr.update(backends(3, 1))
    counts = collections.Counter(wr.pick(RequestContext()).id for _ in range(20_000))
    assert abs(counts["a"] / 20_000 - 0.75) < 0.02
