"""Consistent hashing of a per-request key (`hash_on`) onto backends, with an
optional bound on each backend's load.

`algorithm = "ring"` (default): a ketama-style ring (libketama, Karger et al. 1997)
with `vnodes` points per unit of weight (default 160). Removing a backend moves only
the keys it owned; adding one moves about 1/(N+1) of the keys. pick O(log(vnodes·n)),
update O(vnodes·n·log(vnodes·n)) — points of backends already on the ring are
cached, so an update that adds or removes a few backends rehashes only those.

`algorithm = "maglev"`: Google's Maglev lookup table (Eisenbud et al., NSDI 2016) of
prime size `table_size` (default 65537), weighted by letting each backend claim
entries in proportion to its weight. pick O(1); update O(M log M) for table size M.

Rebuilds larger than 20,000 points or entries run in a background thread (off-loop;
the GIL still interleaves, in slices of sys.getswitchinterval()); until the new ring
or table is installed, picks use the previous one restricted to the current backends.
The first build, before serving, is synchronous.

`balance_factor` (e.g. 1.25): consistent hashing with bounded loads (Mirrokni,
Thorup, Zadimoghaddam, SODA 2018; HAProxy `hash-balance-factor`, Envoy
`hash_balance_factor`). No backend takes more than ceil(factor x (in-flight + 1) x
weight share); a key whose backend is full walks on to the next distinct candidate
on the ring (or table) until one has room.

Placement hashes backend *identity* (`Backend.id`: the address for static backends,
the service ID for Consul ones) with xxHash64, never Python's salted `hash()`, so
every process, worker and machine maps a key to the same backend. A request without
a key (no such header/cookie/parameter) is balanced by `fallback` (`round_robin`
or `random`).
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import math
import struct
import threading
from collections.abc import Sequence
from typing import Any

import xxhash

from proxy.errors import NoBackendError
from proxy.hashkey import parse_hash_on
from proxy.models import Backend
from proxy.strategy import RequestContext
from strategies._common import float_option, int_option, reject_unknown_options
from strategies.round_robin import RoundRobin
from strategies.weighted_random import WeightedRandom

__all__ = ["ConsistentHash", "build_maglev_table", "build_ring", "ring_points"]

_OPTIONS = {"hash_on", "fallback", "algorithm", "vnodes", "table_size", "balance_factor"}
# Rebuilds bigger than this (ring points, or Maglev entries) run in a background
# thread so an update never stalls the event loop for long; the first build of a
# strategy is always synchronous (it happens before serving).
_SYNC_BUILD_LIMIT = 20_000
_hash = xxhash.xxh64_intdigest


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def ring_points(backend_id: str, count: int) -> list[int]:
    """The ring positions of one backend, sorted: `count` 64-bit values read from
    SHAKE-128 of its identity (one stable XOF call, like ketama's one MD5 per four
    points), identical in every process and on every machine."""
    digest = hashlib.shake_128(backend_id.encode()).digest(8 * count)
    return sorted(struct.unpack(f"<{count}Q", digest))


def build_ring(backends: Sequence[Backend], vnodes: int,
               cache: dict[tuple[str, int], list[int]], *,
               interleave: bool = False) -> tuple[list[int], list[Backend]]:
    """Sorted positions and their owners. `cache` holds each backend's sorted points
    per (id, weight) and is updated in place, so only new or reweighted backends are
    hashed again. Position and owner index are packed in one int (sorting ints is
    several times faster than tuples). With `interleave`, the per-backend lists are
    merged by heapq.merge, whose Python-level steps let the GIL pass to the event
    loop, instead of one long C-level sort that would hold it throughout."""
    shift = max(1, len(backends).bit_length())
    mask = (1 << shift) - 1
    runs: list[list[int]] = []
    for index, backend in enumerate(backends):
        key = (backend.id, backend.weight)
        points = cache.get(key)
        if points is None:
            points = cache[key] = ring_points(backend.id, vnodes * backend.weight)
        runs.append([(p << shift) | index for p in points])
    if interleave:
        encoded = list(heapq.merge(*runs))
    else:
        encoded = [e for run in runs for e in run]
        encoded.sort()
    return [e >> shift for e in encoded], [backends[e & mask] for e in encoded]


def build_maglev_table(ids: Sequence[str], weights: Sequence[int], size: int) -> list[int]:
    """Maglev population (paper §3.4): each backend walks its own permutation of the
    table, (offset + j*skip) mod M, claiming the next free entry on its turn. Weights
    are honoured by giving a backend a turn only while it holds fewer than
    turn*weight/max_weight entries."""
    count = len(ids)
    if not count:
        return []
    offsets = [_hash(i.encode(), seed=1) % size for i in ids]
    skips = [_hash(i.encode(), seed=2) % (size - 1) + 1 for i in ids]
    nexts = [0] * count
    claimed = [0] * count
    max_weight = max(weights)
    table = [-1] * size
    filled = 0
    turn = 0
    while True:
        turn += 1
        for i in range(count):
            if claimed[i] * max_weight >= turn * weights[i]:
                continue
            offset, skip, j = offsets[i], skips[i], nexts[i]
            entry = (offset + j * skip) % size
            while table[entry] >= 0:
                j += 1
                entry = (offset + j * skip) % size
            table[entry] = i
            nexts[i] = j + 1
            claimed[i] += 1
            filled += 1
            if filled == size:
                return table


class ConsistentHash:
    def __init__(self, options: dict[str, Any], *, rng: Any = None) -> None:
        reject_unknown_options(options, _OPTIONS)
        self.hash_on = parse_hash_on(options.get("hash_on", "client_ip"))
        algorithm = options.get("algorithm", "ring")
        if algorithm not in ("ring", "maglev"):
            raise ValueError(f'algorithm: must be "ring" or "maglev", got {algorithm!r}')
        self.algorithm = algorithm
        self.vnodes = int_option(options, "vnodes", 160, minimum=1) or 160
        self.table_size = int_option(options, "table_size", 65537, minimum=3) or 65537
        if not _is_prime(self.table_size):
            raise ValueError(f"table_size: must be a prime (e.g. 65537), got {self.table_size}")
        self.balance_factor = float_option(options, "balance_factor", None, above=1.0)
        fallback = options.get("fallback", "round_robin")
        if fallback == "round_robin":
            self._fallback: RoundRobin | WeightedRandom = RoundRobin({}, rng=rng)
        elif fallback == "random":
            self._fallback = WeightedRandom({}, rng=rng)
        else:
            raise ValueError(f'fallback: must be "round_robin" or "random", got {fallback!r}')
        self._backends: list[Backend] = []
        self._live: frozenset[str] = frozenset()
        self._total_weight = 0
        # ring: sorted positions and the backend owning each; maglev: table of indexes
        self._positions: list[int] = []
        self._owners: list[Backend] = []
        self._point_cache: dict[tuple[str, int], list[int]] = {}
        self._table: list[Backend] = []
        self._build_generation = 0
        self._lock = threading.Lock()
        self._builder: threading.Thread | None = None
        self.background_builds = True

    # -- cold path ------------------------------------------------------------------

    def update(self, backends: Sequence[Backend]) -> None:
        snapshot = list(backends)
        self._fallback.update(snapshot)
        self._build_generation += 1
        generation = self._build_generation
        cost = (self.vnodes * sum(b.weight for b in snapshot) if self.algorithm == "ring"
                else self.table_size)
        first_build = not self._positions and not self._table
        # The live set and weights change at once: picks never return a departed
        # backend, even from a ring or table still being rebuilt.
        self._backends = snapshot
        self._live = frozenset(b.id for b in snapshot)
        self._total_weight = sum(b.weight for b in snapshot)
        if first_build or cost <= _SYNC_BUILD_LIMIT or not self.background_builds:
            self._install(self._build(snapshot), generation)
            return
        self._builder = threading.Thread(
            target=lambda: self._install(self._build(snapshot, background=True), generation),
            name="bascule-hash-build", daemon=True)
        self._builder.start()

    def wait_for_build(self, timeout: float = 30.0) -> None:
        """Block until a background rebuild has been installed (tests, benchmarks)."""
        if self._builder is not None:
            self._builder.join(timeout)

    def _build(self, backends: list[Backend], *, background: bool = False) -> Any:
        if self.algorithm == "ring":
            return build_ring(backends, self.vnodes, self._point_cache,
                              interleave=background)
        table = build_maglev_table([b.id for b in backends], [b.weight for b in backends],
                                   self.table_size)
        return [backends[i] for i in table]

    def _install(self, built: Any, generation: int) -> None:
        with self._lock:
            if generation != self._build_generation:
                return  # a newer update superseded this build
            if self.algorithm == "ring":
                self._positions, self._owners = built
                live = {(b.id, b.weight) for b in self._backends}
                # list() copies in one C call, safe while a builder thread inserts
                self._point_cache = {k: v for k, v in list(self._point_cache.items())
                                     if k in live}
            else:
                self._table = built

    # -- hot path -------------------------------------------------------------------

    def pick(self, ctx: RequestContext) -> Backend:
        key = ctx.hash_key
        if key is None or not self._backends:
            return self._fallback.pick(ctx)
        point = _hash(key.encode("utf-8", "surrogateescape"))
        limit = self._load_limit(ctx) if self.balance_factor else 0.0
        if self.algorithm == "ring":
            sequence: list[Backend] = self._owners
            start = bisect.bisect_left(self._positions, point)
        else:
            sequence = self._table
            start = point % len(sequence) if sequence else 0
        found = self._walk(sequence, start, ctx.exclude, limit)
        if found is None and ctx.exclude:
            found = self._walk(sequence, start, frozenset(), limit)
        if found is None:
            raise NoBackendError("no healthy backend")
        return found

    def _load_limit(self, ctx: RequestContext) -> float:
        """Capacity per unit of weight: factor x (in-flight + 1) / total weight."""
        total = ctx.upstream_inflight
        return self.balance_factor * (total + 1) / self._total_weight  # type: ignore[operator]

    def _acceptable(self, backend: Backend, exclude: frozenset[str], limit: float) -> bool:
        if not backend.healthy or backend.id in exclude or backend.id not in self._live:
            return False
        return not limit or backend.inflight < math.ceil(limit * backend.weight)

    def _walk(self, sequence: list[Backend], start: int, exclude: frozenset[str],
              limit: float) -> Backend | None:
        """The key's own backend, or when it is unhealthy, excluded or full, the next
        distinct one along the ring (or table) from the key's place: a deterministic,
        key-specific order of candidates."""
        size = len(sequence)
        if size:
            first = sequence[start % size]
            if self._acceptable(first, exclude, limit):
                return first
            seen = {first.id}
            distinct = len(self._backends)
            for step in range(1, size):
                backend = sequence[(start + step) % size]
                if backend.id in seen:
                    continue
                if self._acceptable(backend, exclude, limit):
                    return backend
                seen.add(backend.id)
                if len(seen) >= distinct:
                    break
        for backend in self._backends:  # backends newer than a ring/table being rebuilt
            if self._acceptable(backend, exclude, limit):
                return backend
        return None

    def __repr__(self) -> str:
        return (f"ConsistentHash({self.algorithm}, hash_on={self.hash_on}, "
                f"balance_factor={self.balance_factor}, {self._backends!r})")
