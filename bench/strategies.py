"""Cost of pick() and update() per strategy for 3, 100 and 1,000 backends.

    python bench/strategies.py

pick() is timed in batches of 2,000 calls (median of the batches' per-call time);
update() is timed building from scratch with background builds off, so the number
is the work itself; "mode" says whether a live update runs it on the event loop
(sync) or in a background thread.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.models import Backend
from proxy.strategy import RequestContext
from strategies.consistent_hash import _SYNC_BUILD_LIMIT, ConsistentHash
from strategies.least_connections import LeastConnections
from strategies.p2c_ewma import P2CEwma
from strategies.round_robin import RoundRobin
from strategies.weighted_random import WeightedRandom

CASES: list[tuple[str, Any, dict[str, Any]]] = [
    ("round_robin", RoundRobin, {}),
    ("random", WeightedRandom, {}),
    ("least_connections (scan)", LeastConnections, {}),
    ("least_connections choices=2", LeastConnections, {"choices": 2}),
    ("consistent_hash ring", ConsistentHash, {}),
    ("consistent_hash ring bf=1.25", ConsistentHash, {"balance_factor": 1.25}),
    ("consistent_hash maglev", ConsistentHash, {"algorithm": "maglev"}),
    ("p2c_ewma", P2CEwma, {}),
]
SIZES = (3, 100, 1000)


def backends(count: int) -> list[Backend]:
    rng = random.Random(count)
    out = [Backend(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:8080", "10.0.0.1", 8080,
                   1 + i % 3) for i in range(count)]
    for b in out:
        b.inflight = rng.randrange(10)
    return out


def time_pick(strategy: Any, batches: int = 15, size: int = 2000) -> float:
    contexts = [RequestContext(f"user-{i}") for i in range(size)]
    for c in contexts:
        c.upstream_inflight = 5000
    per_call = []
    for _ in range(batches):
        start = time.perf_counter()
        for ctx in contexts:
            strategy.pick(ctx)
        per_call.append((time.perf_counter() - start) / size)
    return statistics.median(per_call) * 1e6


def time_update(factory: Any, options: dict[str, Any], members: list[Backend]) -> float:
    runs = []
    for _ in range(3):
        strategy = factory(dict(options))
        if hasattr(strategy, "background_builds"):
            strategy.background_builds = False
        start = time.perf_counter()
        strategy.update(members)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) * 1e3


def mode(name: str, options: dict[str, Any], members: list[Backend]) -> str:
    if not name.startswith("consistent_hash"):
        return "sync"
    cost = 65537 if options.get("algorithm") == "maglev" else 160 * sum(
        b.weight for b in members)
    return "sync" if cost <= _SYNC_BUILD_LIMIT else "background"


def loop_lag_during_rebuild(options: dict[str, Any], count: int) -> tuple[float, float]:
    """(rebuild seconds, worst event-loop lag in ms) while a live update of `count`
    backends rebuilds in the background and a 1 ms ticker runs on the loop."""
    import asyncio

    async def measure() -> tuple[float, float]:
        strategy = ConsistentHash(dict(options))
        strategy.update(backends(count))
        worst = 0.0
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        strategy.update(backends(count + 1))  # a membership change: full rebuild
        builder = strategy._builder
        while builder is not None and builder.is_alive():
            before = loop.time()
            await asyncio.sleep(0.001)
            worst = max(worst, (loop.time() - before - 0.001) * 1e3)
        return time.perf_counter() - start, worst

    return asyncio.run(measure())


def main() -> int:
    print("| strategy | backends | pick µs (median) | update ms | update runs |")
    print("|---|---:|---:|---:|---|")
    for name, factory, options in CASES:
        for count in SIZES:
            members = backends(count)
            strategy = factory(dict(options))
            strategy.update(members)
            if hasattr(strategy, "wait_for_build"):
                strategy.wait_for_build()
            pick = time_pick(strategy)
            update = time_update(factory, options, members)
            print(f"| {name} | {count} | {pick:.2f} | {update:.1f} | "
                  f"{mode(name, options, members)} |")
    print()
    print("| background rebuild (1,000 backends) | rebuild s | worst loop lag ms |")
    print("|---|---:|---:|")
    for label, options in (("ring", {}), ("maglev", {"algorithm": "maglev"})):
        took, lag = loop_lag_during_rebuild(options, 1000)
        print(f"| {label} | {took:.2f} | {lag:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
