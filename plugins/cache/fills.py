"""One fill per key: on a miss, one request fetches and stores while the others wait
for it, in this worker (a future per key) and, with a shared store, in the whole
fleet (the store's fill lock), bounded by `lock_timeout`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from plugins.cache.store import CacheStore, Entry

__all__ = ["CoalescesFills"]


class CoalescesFills:
    """The Cache plugin's fill coordination (plugins/cache/plugin.py)."""

    store: CacheStore
    lock_timeout: float
    _fills: dict[str, asyncio.Future[None]]
    _spawn: Callable[[Any], asyncio.Task[Any]]

    async def _claim_fill(self, primary: str, secondary: Callable[[str], str]
                          ) -> tuple[Entry | None, str | None]:
        """Either the entry another request just stored, or the right to fill this key
        (a fill-lock token; None after waiting `lock_timeout` in vain: fill anyway)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lock_timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None, None
            local = self._fills.get(primary)
            if local is not None:  # this worker is filling already
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(local), remaining)
                entry = await self.store.get(primary, secondary)
                if entry is not None or local is self._fills.get(primary):
                    return entry, None
                continue
            fill: asyncio.Future[None] = loop.create_future()
            self._fills[primary] = fill  # this request fills for the worker
            try:
                token = await self.store.lock(primary, self.lock_timeout)
                if token is not None:
                    return None, token
                # Another process fills: wait for it, then look (or take over the
                # lock if its holder died or gave up).
                await self.store.wait_fill(primary, remaining)
                entry = await self.store.get(primary, secondary)
                if entry is not None:
                    self._release_local(primary, fill)
                    return entry, None
            except BaseException:
                self._release_local(primary, fill)
                raise
            self._release_local(primary, fill)

    def _release_local(self, primary: str, fill: asyncio.Future[None]) -> None:
        if self._fills.get(primary) is fill:
            del self._fills[primary]
        if not fill.done():
            fill.set_result(None)

    def _fill_done(self, primary: str, token: str | None) -> Callable[[], None]:
        """What ends a fill: waiters in this worker and the fleet look again."""
        fill = self._fills.get(primary)
        called = False

        def done() -> None:
            nonlocal called
            if called:
                return
            called = True
            if fill is not None:
                self._release_local(primary, fill)
            if token is not None and self.store.shared:
                self._spawn(self.store.unlock(primary, token))

        return done
