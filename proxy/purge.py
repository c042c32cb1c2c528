"""Cache purge for the admin listener: `POST /cache/purge` with `url=`, `prefix=` or
`tag=` (repeatable) in the query string.

A Redis store is shared, so one worker's purge is everyone's. A memory store is per
worker, so the purge is also broadcast: the worker writes it to a file in the run's
purge directory and signals the supervisor (SIGUSR1), which passes the signal to every
worker; each applies the files it has not seen yet. Files older than a few minutes are
removed by whoever looks.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from typing import Any

from proxy.plugin import Purgeable

__all__ = ["PURGE_DIR_ENV", "PurgeBroadcast", "PurgeSpec", "apply_purge"]

PURGE_DIR_ENV = "BASCULE_PURGE_DIR"
_KEEP_SECONDS = 300.0
log = logging.getLogger("bascule.admin")


@dataclass(frozen=True)
class PurgeSpec:
    urls: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()

    @classmethod
    def from_query(cls, query: Any) -> PurgeSpec:
        spec = cls(tuple(query.getall("url", [])), tuple(query.getall("prefix", [])),
                   tuple(query.getall("tag", [])))
        if not (spec.urls or spec.prefixes or spec.tags):
            raise ValueError("give url=, prefix= or tag= (each may repeat)")
        return spec


async def apply_purge(plugins: dict[str, Purgeable], spec: PurgeSpec) -> dict[str, int]:
    """Purge in every purgeable plugin of the runtime: entries removed per plugin."""
    removed: dict[str, int] = {}
    for name, plugin in plugins.items():
        purge = plugin.purge
        count = 0
        for url in spec.urls:
            count += await purge(url=url)
        for prefix in spec.prefixes:
            count += await purge(prefix=prefix)
        for tag in spec.tags:
            count += await purge(tag=tag)
        removed[name] = count
    return removed


class PurgeBroadcast:
    """Passes purges between the workers of one supervisor (memory stores)."""

    def __init__(self) -> None:
        self.directory = os.environ.get(PURGE_DIR_ENV)
        # A worker (re)started after a purge starts empty: earlier purges are moot.
        self._seen: set[str] = set(os.listdir(self.directory)) if self.directory and (
            os.path.isdir(self.directory)) else set()

    @property
    def enabled(self) -> bool:
        return bool(self.directory)

    def send(self, spec: PurgeSpec) -> None:
        assert self.directory is not None
        name = f"{time.time_ns()}-{os.getpid()}.json"
        self._seen.add(name)  # this worker applied it already
        temp = os.path.join(self.directory, "." + name)
        with open(temp, "w", encoding="utf-8") as fh:
            json.dump(asdict(spec), fh)
        os.replace(temp, os.path.join(self.directory, name))  # whole or not at all
        os.kill(os.getppid(), signal.SIGUSR1)

    def receive(self) -> list[PurgeSpec]:
        """The purges other workers sent since the last call."""
        if not self.directory:
            return []
        specs: list[PurgeSpec] = []
        now = time.time()
        for name in sorted(os.listdir(self.directory)):
            if name.startswith(".") or name in self._seen:
                continue
            path = os.path.join(self.directory, name)
            try:
                if now - os.path.getmtime(path) > _KEEP_SECONDS:
                    os.unlink(path)
                    continue
                with open(path, encoding="utf-8") as fh:
                    data = json.load(fh)
                specs.append(PurgeSpec(tuple(data["urls"]), tuple(data["prefixes"]),
                                       tuple(data["tags"])))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("cannot read purge %s: %s", name, exc)
            self._seen.add(name)
        return specs
