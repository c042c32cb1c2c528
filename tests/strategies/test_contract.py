"""The contract every registered strategy keeps (DESIGN.md §2), run against all of
them — built-ins and anything else installed under `bascule.strategies`."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import NoBackendError
from proxy.loader import STRATEGY_GROUP, available, load
from proxy.models import Backend
from proxy.strategy import RequestContext, Strategy

NAMES = available(STRATEGY_GROUP)


def make(name: str, seed: int = 1) -> Strategy:
    strategy: Strategy = load(STRATEGY_GROUP, name)({}, rng=random.Random(seed))
    return strategy


def backends(count: int, weights: list[int] | None = None) -> list[Backend]:
    return [Backend(f"b{i}", "127.0.0.1", 9000 + i, (weights or [1] * count)[i])
            for i in range(count)]


def ctx(i: int, exclude: frozenset[str] = frozenset()) -> RequestContext:
    context = RequestContext(f"key-{i}" if i % 3 else None, exclude)
    return context


def test_builtins_are_registered() -> None:
    assert {"round_robin", "random", "least_connections", "consistent_hash",
            "p2c_ewma"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_picks_only_healthy_members(name: str) -> None:
    strategy = make(name)
    members = backends(6)
    for b in members[::2]:
        b.healthy = False
    strategy.update(members)
    picked = {strategy.pick(ctx(i)).id for i in range(300)}
    assert picked <= {"b1", "b3", "b5"} and picked


@pytest.mark.parametrize("name", NAMES)
def test_no_backend_raises(name: str) -> None:
    strategy = make(name)
    strategy.update([])
    with pytest.raises(NoBackendError):
        strategy.pick(ctx(1))
    members = backends(3)
    for b in members:
        b.healthy = False
    strategy.update(members)
    with pytest.raises(NoBackendError):
        strategy.pick(ctx(1))


@pytest.mark.parametrize("name", NAMES)
def test_honours_retry_exclusions(name: str) -> None:
    strategy = make(name)
    strategy.update(backends(4))
    for i in range(200):
        exclude = frozenset({f"b{i % 4}", f"b{(i + 1) % 4}"})
        assert strategy.pick(ctx(i, exclude)).id not in exclude
    # when every healthy backend was tried already, a retry still gets one
    assert strategy.pick(ctx(1, frozenset({"b0", "b1", "b2", "b3"}))).id.startswith("b")


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_with_seeded_rng(name: str) -> None:
    first, second = make(name, seed=42), make(name, seed=42)
    first.update(backends(5, [1, 2, 3, 1, 1]))
    second.update(backends(5, [1, 2, 3, 1, 1]))
    assert [first.pick(ctx(i)).id for i in range(100)] == \
        [second.pick(ctx(i)).id for i in range(100)]


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=30, deadline=None)
@given(plan=st.lists(st.lists(st.tuples(st.integers(0, 15), st.integers(1, 5),
                                        st.booleans()), min_size=1, max_size=10,
                              unique_by=lambda t: t[0]), min_size=1, max_size=6))
def test_keeps_working_across_updates(name: str, plan: list[list[tuple[int, int, bool]]]
                                      ) -> None:
    """Backends are added, removed, reweighted and change health between updates;
    every pick comes from the current healthy set."""
    strategy = make(name)
    for step in plan:
        members = [Backend(f"b{n}", "127.0.0.1", 9000 + n, w) for n, w, _ in step]
        for member, (_, _, healthy) in zip(members, step, strict=True):
            member.healthy = healthy
        strategy.update(members)
        healthy_ids = {m.id for m in members if m.healthy}
        for i in range(20):
            if not healthy_ids:
                with pytest.raises(NoBackendError):
                    strategy.pick(ctx(i))
            else:
                assert strategy.pick(ctx(i)).id in healthy_ids
