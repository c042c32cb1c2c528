"""Weighted traffic splits over upstreams: shares within 2 points of the weights over
10,000 requests, a keyed split that keeps each user on one side (in every worker and
instance), the testers' override by header and cookie, and weights changed by a
reload without a failed request."""

from __future__ import annotations

import asyncio
import collections
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import build_runtime
from proxy.config import load_config, parse_config
from proxy.errors import ConfigError
from proxy.server import Edge
from tests.helpers import GetLoad, free_port, port_of, start_backend


async def side(name: str) -> Any:
    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response(text=name)
    _server, listener = await start_backend(handler)
    return listener


def config(port: int, ports: dict[str, int], split: str, extra: str = "") -> str:
    text = (f'[server]\nlisten = ["127.0.0.1:{port}"]\naccess_log = "off"\n'
            f'[admin]\nlisten = "127.0.0.1:{free_port()}"\n'
            f'[[routes]]\nname = "api"\nupstreams = {split}\n{extra}\n')
    for name, p in ports.items():
        text += f'[upstreams.{name}]\nbackends = ["127.0.0.1:{p}"]\n'
    return text


async def start(text: str, tmp_path: Path | None = None) -> Edge:
    if tmp_path is not None:
        path = tmp_path / "b.toml"
        path.write_text(text)
        edge = Edge(build_runtime(load_config(path), str(path)))
    else:
        edge = Edge(build_runtime(parse_config(tomllib.loads(text), "<test>"), "<test>"))
    await edge.start()
    return edge


async def count(port: int, n: int, headers: Any = None, clients: int = 16
                ) -> collections.Counter[str]:
    seen: collections.Counter[str] = collections.Counter()
    queue = iter(range(n))

    async def client(session: aiohttp.ClientSession) -> None:
        for i in queue:
            extra = headers(i) if callable(headers) else headers
            async with session.get(f"http://127.0.0.1:{port}/", headers=extra) as resp:
                seen[await resp.text()] += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return seen


@pytest.mark.slow
async def test_shares_follow_the_weights_over_10000_requests() -> None:
    stable, canary = await side("stable"), await side("canary")
    port = free_port()
    edge = await start(config(port, {"stable": port_of(stable), "canary": port_of(canary)},
                              '[{ name = "stable", weight = 95 }, '
                              '{ name = "canary", weight = 5 }]'))
    try:
        unkeyed = await count(port, 10_000)
        assert abs(unkeyed["canary"] / 10_000 - 0.05) <= 0.02, unkeyed
        assert unkeyed["stable"] + unkeyed["canary"] == 10_000
    finally:
        await edge.drain(1.0)
        stable.close()
        canary.close()


@pytest.mark.slow
async def test_a_keyed_split_keeps_each_user_on_one_side_in_every_instance() -> None:
    a, b = await side("a"), await side("b")
    ports = {"a": port_of(a), "b": port_of(b)}
    split = '[{ name = "a", weight = 70 }, { name = "b", weight = 30 }]'
    one, two = free_port(), free_port()
    first = await start(config(one, ports, split, 'split_on = "header:X-User"'))
    second = await start(config(two, ports, split, 'split_on = "header:X-User"'))
    try:
        # 10,000 requests from 2,000 users: the shares follow the weights...
        users = await count(one, 10_000, lambda i: {"X-User": f"user-{i % 2000}"})
        assert abs(users["b"] / 10_000 - 0.30) <= 0.02, users
        # ...and each user always lands on the same side, in either instance
        async with aiohttp.ClientSession() as session:
            for user in range(40):
                sides = set()
                for port in (one, two, one, two):
                    async with session.get(f"http://127.0.0.1:{port}/",
                                           headers={"X-User": f"user-{user}"}) as resp:
                        sides.add(await resp.text())
                assert len(sides) == 1, (user, sides)
    finally:
        for edge in (first, second):
            await edge.drain(1.0)
        a.close()
        b.close()


async def test_testers_reach_a_side_by_header_or_cookie_whatever_its_weight() -> None:
    stable, canary = await side("stable"), await side("canary")
    port = free_port()
    edge = await start(config(
        port, {"stable": port_of(stable), "canary": port_of(canary)},
        '[{ name = "stable", weight = 1 }, { name = "canary", weight = 0, '
        'force_header = "X-Canary: always", force_cookie = "canary=always" }]'))
    try:
        assert await count(port, 20) == {"stable": 20}  # weight 0: never by chance
        assert await count(port, 5, {"X-Canary": "always"}) == {"canary": 5}
        assert await count(port, 5, {"Cookie": "a=1; canary=always"}) == {"canary": 5}
        assert await count(port, 5, {"X-Canary": "never"}) == {"stable": 5}
    finally:
        await edge.drain(1.0)
        stable.close()
        canary.close()


async def test_a_reload_changes_the_weights_without_a_failed_request(tmp_path: Path) -> None:
    stable, canary = await side("stable"), await side("canary")
    port = free_port()
    ports = {"stable": port_of(stable), "canary": port_of(canary)}
    text = config(port, ports, '[{ name = "stable", weight = 100 }, '
                               '{ name = "canary", weight = 0 }]')
    edge = await start(text, tmp_path)
    admin = edge.admin_port
    try:
        async with GetLoad(f"http://127.0.0.1:{port}/", clients=8) as load:
            await load.more(200)
            assert set(load.seen) == {"stable"}
            (tmp_path / "b.toml").write_text(text.replace("weight = 100", "weight = 50")
                                             .replace("weight = 0", "weight = 50"))
            async with aiohttp.ClientSession() as session, session.post(
                    f"http://127.0.0.1:{admin}/reload") as resp:
                assert (await resp.json())["changed"] is True
            load.seen.clear()
            await load.answered("canary", 100)
            await load.more(200)
        assert load.errors == []
        assert abs(load.seen["canary"] / sum(load.seen.values()) - 0.5) < 0.1, load.seen
    finally:
        await edge.drain(1.0)
        stable.close()
        canary.close()


def test_bad_splits_are_config_errors_with_their_place() -> None:
    base = {"upstreams": {"a": {"backends": ["127.0.0.1:1"]}}}
    cases = {
        "routes[0].upstreams[1].name": [{"upstreams": [{"name": "a"}, {"name": "nope"}]}],
        "routes[0]": [{"upstream": "a", "upstreams": [{"name": "a"}]}],
        "routes[0].split_on": [{"upstreams": [{"name": "a"}], "split_on": "bogus"}],
        "routes[0].upstreams[0].force_header": [
            {"upstreams": [{"name": "a", "force_header": "no colon"}]}],
    }
    for where, routes in cases.items():
        with pytest.raises(ConfigError) as caught:
            parse_config({**base, "routes": routes}, "x.toml")
        assert any(f"x.toml: {where}" in str(p) for p in caught.value.problems), (
            where, caught.value.problems)
    with pytest.raises(ConfigError, match="at least one weight"):
        parse_config({**base, "routes": [{"upstreams": [{"name": "a", "weight": 0}]}]},
                     "x.toml")
