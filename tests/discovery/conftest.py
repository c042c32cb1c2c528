"""Fixtures of the discovery tests: the Consul emulator, and three named backends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from tests.consul_emulator import ConsulEmulator
from tests.helpers import port_of, start_backend


async def named_backend(name: str) -> tuple[int, Any]:
    """A backend whose every answer is its name."""
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(text=name)

    _, listener = await start_backend(handler)
    return port_of(listener), listener


@pytest.fixture
async def consul() -> AsyncIterator[ConsulEmulator]:
    emulator = ConsulEmulator()
    await emulator.start()
    yield emulator
    await emulator.stop()


@pytest.fixture
async def backends() -> AsyncIterator[dict[str, int]]:
    """Backends answering "a", "b" and "c", by name."""
    started = {name: await named_backend(name) for name in ("a", "b", "c")}
    yield {name: port for name, (port, _) in started.items()}
    for _, listener in started.values():
        listener.close()
