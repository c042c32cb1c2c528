"""Consul discovery end to end: a real Bascule edge, real backends, and the Consul
emulator (tests/consul_emulator.py)."""

from __future__ import annotations

import asyncio
import collections
import functools
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.agent.link import LocalLink
from proxy.discovery.consul import ConsulWatch
from proxy.server import Edge
from tests.consul_emulator import ConsulEmulator
from tests.discovery.conftest import named_backend
from tests.helpers import eventually as wait_until
from tests.helpers import free_port, start_proxy_with_admin


async def consul_edge(address: str, upstream: str = 'service = "web"', extra: str = "",
                      consul_extra: str = "", startup_wait: str = "3s") -> Edge:
    return await start_proxy_with_admin(f"""
[consul]
address = "{address}"
wait = "2s"
startup_wait = "{startup_wait}"
{consul_extra}
[[routes]]
upstream = "web"
[upstreams.web]
strategy = "round_robin"
consul = {{ {upstream} }}
{extra}
""")


eventually = functools.partial(wait_until, timeout=5.0)


def per_service_watch(edge: Edge, service: str) -> ConsulWatch:
    """The blocking query the edge's in-process hub runs for `service`."""
    assert isinstance(edge.link, LocalLink)
    for source in edge.link.hub.sources.values():
        for query, (watch, _) in source.watches.items():
            if query.service == service:
                return watch
    raise AssertionError(f"no watch of {service!r}")


async def status(edge: Edge) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{edge.admin_port}/status") as resp:
        return json.loads(await resp.read())["upstreams"]["web"]  # type: ignore[no-any-return]


async def fetch(edge: Edge, session: aiohttp.ClientSession) -> tuple[int, str]:
    async with session.get(f"http://127.0.0.1:{edge.ports[0]}/") as resp:
        return resp.status, await resp.text()


async def test_instances_come_and_go_under_traffic(consul: ConsulEmulator,
                                                   backends: dict[str, int]) -> None:
    await consul.add("web", "web-a", backends["a"])
    await consul.add("web", "web-b", backends["b"])
    edge = await consul_edge(consul.address)
    seen: collections.Counter[str] = collections.Counter()
    errors: list[int] = []
    stop = asyncio.Event()

    async def client() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                code, body = await fetch(edge, session)
                if code != 200:
                    errors.append(code)
                seen[body] += 1
                await asyncio.sleep(0.005)

    clients = [asyncio.ensure_future(client()) for _ in range(5)]
    try:
        await eventually(lambda: _true(seen["a"] and seen["b"]))
        loop = asyncio.get_running_loop()
        added = loop.time()
        await consul.add("web", "web-c", backends["c"])
        await eventually(lambda: _true(seen["c"]), timeout=3)
        reached_c = loop.time() - added
        async def a_gone() -> bool:  # backend ids are "<node>/<service id>"
            return not any(i.endswith("/web-a") for i in edge.runtime.live_backends()["web"])

        assert not await a_gone()
        await consul.remove("web-a")

        await eventually(a_gone)

        async def more(count: int) -> None:
            target = seen.total() + count

            async def enough() -> bool:
                return seen.total() >= target

            await eventually(enough)

        await more(50)  # requests that had picked a before the update are done
        before = seen["a"]
        await more(100)
        assert seen["a"] == before  # a no longer gets traffic
    finally:
        stop.set()
        await asyncio.gather(*clients)
        await edge.drain(1.0)
    print(f"new instance served {reached_c * 1000:.0f} ms after registration")
    # Picked up by a blocking query that was waiting (not a poll): every query after
    # the first carries the last X-Consul-Index and a wait.
    later = consul.health_queries("web")[1:]
    assert later and all(q.get("index", ["0"])[0] != "0" and "wait" in q for q in later)
    assert errors == []


async def _true(value: object) -> bool:
    return bool(value)


async def test_service_address_falls_back_to_node_address(consul: ConsulEmulator,
                                                         backends: dict[str, int]) -> None:
    consul.add_node("n2", "127.0.0.1")
    await consul.add("web", "web-a", backends["a"], node="n2")                 # no address
    await consul.add("web", "web-b", backends["b"], node="n2", address="127.0.0.3")
    edge = await consul_edge(consul.address)
    try:
        addresses = {b["id"]: b["address"] for b in (await status(edge))["backends"]}
        assert addresses == {"n2/web-a": f"127.0.0.1:{backends['a']}",
                             "n2/web-b": f"127.0.0.3:{backends['b']}"}
    finally:
        await edge.drain(1.0)


async def test_tags_warning_weights_and_maintenance(consul: ConsulEmulator,
                                                   backends: dict[str, int]) -> None:
    await consul.add("web", "v1", backends["a"], tags=["v1"])
    await consul.add("web", "v2-ok", backends["b"], tags=["v2"], weights={"Passing": 3,
                                                                          "Warning": 1})
    await consul.add("web", "v2-warn", backends["c"], tags=["v2"], status="warning",
                     weights={"Passing": 3, "Warning": 1})
    strict = await consul_edge(consul.address, 'service = "web", tags = ["v2"]')
    lenient = await consul_edge(consul.address,
                                'service = "web", tags = ["v2"], passing_only = false')
    try:
        ids = [(b["id"], b["weight"]) for b in (await status(strict))["backends"]]
        assert ids == [("agent/v2-ok", 3)]
        ids = [(b["id"], b["weight"]) for b in (await status(lenient))["backends"]]
        assert ids == [("agent/v2-ok", 3), ("agent/v2-warn", 1)]
        query = consul.health_queries("web")[-1]
        assert query["tag"] == ["v2"]

        await consul.set_maintenance(service_id="v2-ok")
        await eventually(lambda: _backend_ids(lenient, ["agent/v2-warn"]))
        await consul.set_maintenance(service_id="v2-ok", enabled=False)
        await consul.set_maintenance(node="agent")
        await eventually(lambda: _backend_ids(lenient, []))
    finally:
        await strict.drain(1.0)
        await lenient.drain(1.0)


async def _backend_ids(edge: Edge, ids: list[str]) -> bool:
    return [b["id"] for b in (await status(edge))["backends"]] == ids


async def test_consul_down_keeps_last_known_good_then_recovers(
        consul: ConsulEmulator, backends: dict[str, int]) -> None:
    await consul.add("web", "web-a", backends["a"])
    edge = await consul_edge(consul.address)
    try:
        async with aiohttp.ClientSession() as session:
            assert await fetch(edge, session) == (200, "a")
            await consul.stop()
            await eventually(lambda: _stale(edge, True), timeout=8)
            for _ in range(5):  # still served from the last known good set
                assert await fetch(edge, session) == (200, "a")
            _, samples = await _metrics(edge)
            assert samples.get(("bascule_discovery_errors_total", "web"), 0) >= 1
            assert samples.get(("bascule_discovery_stale", "web")) == 1
            await consul.start()
            await consul.add("web", "web-b", backends["b"])
            await eventually(lambda: _stale(edge, False), timeout=10)
            await eventually(lambda: _backend_ids(edge, ["agent/web-a", "agent/web-b"]))
            _, samples = await _metrics(edge)
            assert samples.get(("bascule_discovery_stale", "web")) == 0
            assert samples.get(("bascule_discovery_updates_total", "web")) == 2
    finally:
        await edge.drain(1.0)


async def _stale(edge: Edge, expected: bool) -> bool:
    return bool((await status(edge))["discovery"]["stale"]) is expected


async def _metrics(edge: Edge) -> tuple[str, dict[tuple[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{edge.admin_port}/metrics") as resp:
        text = await resp.text()
    samples = {(s.name, s.labels.get("upstream", "")): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    return text, samples


@pytest.mark.parametrize("failure", ["500", "malformed", "stale"])
async def test_bad_answers_keep_last_known_good(consul: ConsulEmulator,
                                               backends: dict[str, int], failure: str) -> None:
    await consul.add("web", "web-a", backends["a"])
    edge = await consul_edge(consul.address, consul_extra=(
        'consistency = "stale"\nmax_stale = "1s"' if failure == "stale" else ""))
    try:
        if failure == "500":
            consul.fail_status = 500
        elif failure == "malformed":
            consul.malformed = True
        else:
            consul.last_contact_ms = 5000
        await consul.add("web", "web-b", backends["b"])  # wakes the blocking query
        await eventually(lambda: _stale(edge, True), timeout=8)
        assert [b["id"] for b in (await status(edge))["backends"]] == ["agent/web-a"]
        if failure == "stale":
            assert "stale" in consul.health_queries("web")[-1]
    finally:
        await edge.drain(1.0)


async def test_no_healthy_instances_is_applied_as_503(consul: ConsulEmulator,
                                                      backends: dict[str, int]) -> None:
    await consul.add("web", "web-a", backends["a"])
    edge = await consul_edge(consul.address)
    try:
        await consul.set_status("web-a", "critical")
        await eventually(lambda: _backend_ids(edge, []))
        async with aiohttp.ClientSession() as session:
            code, text = await fetch(edge, session)
        assert code == 503
        assert text == "no backend available: Consul reports no healthy instance of 'web'\n"
    finally:
        await edge.drain(1.0)


async def test_index_going_backwards_resets_to_zero(consul: ConsulEmulator,
                                                    backends: dict[str, int]) -> None:
    await consul.add("web", "web-a", backends["a"])
    edge = await consul_edge(consul.address)
    try:
        await consul.reset_index(3)  # lower than what Bascule holds
        await consul.add("web", "web-b", backends["b"])  # index 4, still below before
        await eventually(lambda: _backend_ids(edge, ["agent/web-a", "agent/web-b"]))

        def indexes() -> list[str]:
            return [q.get("index", ["0"])[0] for q in consul.health_queries("web")]

        # after the answer with a lower index, a fresh query from 0 (not index=11)
        await eventually(lambda: _true(len(indexes()) >= 3))
        assert indexes()[:3] == ["0", "11", "0"], indexes()
    finally:
        await edge.drain(1.0)


async def test_never_blocks_on_index_zero_twice(consul: ConsulEmulator,
                                                backends: dict[str, int]) -> None:
    await consul.reset_index(0)  # a buggy Consul answering X-Consul-Index: 0
    edge = await consul_edge(consul.address, 'service = "nothing-here"')
    try:
        await asyncio.sleep(1.0)
        indexes = [q.get("index", ["0"])[0] for q in consul.health_queries("nothing-here")]
        assert indexes[:2] == ["0", "1"]
        assert len(indexes) <= 4  # blocking from then on: no busy loop
    finally:
        await edge.drain(1.0)


async def test_watchdog_restarts_a_hung_query_from_index_zero(
        consul: ConsulEmulator, backends: dict[str, int]) -> None:
    await consul.add("web", "web-a", backends["a"])
    edge = await consul_edge(consul.address)
    try:
        watch = per_service_watch(edge, "web")
        await eventually(lambda: _true(watch.index > 0 and len(
            consul.health_queries("web")) >= 2))  # blocking on a real index
        consul.hang = True  # answers never come, even past wait
        await eventually(lambda: _true(watch.index == 0), timeout=10)
        consul.hang = False
        await eventually(lambda: _stale(edge, False), timeout=10)
    finally:
        await edge.drain(1.0)


async def test_startup_without_consul_answers_503_then_recovers(
        backends: dict[str, int]) -> None:
    port = free_port()
    edge = await consul_edge(f"http://127.0.0.1:{port}", startup_wait="300ms")
    emulator = ConsulEmulator()
    try:
        async with aiohttp.ClientSession() as session:
            code, text = await fetch(edge, session)
            assert code == 503
            assert text == ("no backend available: waiting for the first answer from "
                            "Consul about 'web'\n")
            await emulator.start(port)
            await emulator.add("web", "web-a", backends["a"])

            async def served() -> bool:
                return await fetch(edge, session) == (200, "a")

            await eventually(served, timeout=15)
    finally:
        await edge.drain(1.0)
        await emulator.stop()


async def test_self_registration_and_acl_token(tmp_path: Path,
                                               backends: dict[str, int]) -> None:
    emulator = ConsulEmulator(token="s3cret-token")
    await emulator.start()
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    await emulator.add("web", "web-a", backends["a"])
    edge = await consul_edge(emulator.address, consul_extra=(
        f'token_file = "{token}"\n[consul.register]\nname = "edge"\ntags = ["public"]\n'
        'check_interval = "5s"'))
    try:
        await eventually(lambda: _true(any(k[1].startswith("edge-")
                                            for k in emulator.instances)))
        key, registered = next((k, i) for k, i in emulator.instances.items()
                               if k[1].startswith("edge-"))
        assert key[1] == f"edge-{_hostname()}-{edge.ports[0]}"
        assert registered.service["Port"] == edge.ports[0]
        assert registered.service["Tags"] == ["public"]
        assert registered.service["Check"]["HTTP"] == \
            f"http://127.0.0.1:{edge.admin_port}/healthz"
        assert registered.service["Check"]["Interval"] == "5s"
        assert [b["id"] for b in (await status(edge))["backends"]] == ["agent/web-a"]
    finally:
        await edge.drain(1.0)
    assert not any(k[1].startswith("edge-") for k in emulator.instances)  # deregistered
    for path, query, headers in emulator.requests:
        assert headers.get("X-Consul-Token") == "s3cret-token"
        assert "token" not in query and "s3cret" not in path
    await emulator.stop()


def _hostname() -> str:
    import socket

    return socket.gethostname()


async def test_tls_with_a_private_ca(tmp_path: Path, backends: dict[str, int]) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    emulator = ConsulEmulator()
    await emulator.start(ssl_context=server_context)
    await emulator.add("web", "web-a", backends["a"])
    assert emulator.address.startswith("https://")
    edge = await consul_edge(emulator.address, consul_extra=f'ca_file = "{ca_file}"')
    try:
        assert [b["id"] for b in (await status(edge))["backends"]] == ["agent/web-a"]
        assert (await status(edge))["discovery"]["stale"] is False
    finally:
        await edge.drain(1.0)
    # without the CA, the agent's certificate is refused: nothing is discovered
    untrusting = await consul_edge(emulator.address, startup_wait="500ms")
    try:
        await eventually(lambda: _stale(untrusting, True), timeout=8)
        assert (await status(untrusting))["backends"] == []
        assert "certificate" in (await status(untrusting))["discovery"]["error"].lower()
    finally:
        await untrusting.drain(1.0)
        await emulator.stop()


async def test_sticky_pins_follow_a_consul_instance_by_its_id(
        consul: ConsulEmulator, backends: dict[str, int]) -> None:
    """The pin signs the instance's node/service id, not its address: an instance
    re-registered on another port keeps its clients; one that goes critical
    loses them to another instance, which pins them anew."""
    await consul.add("web", "web-a", backends["a"])
    await consul.add("web", "web-b", backends["b"])
    edge = await consul_edge(consul.address, extra='sticky = { cookie = "pin", '
                             'secret = "consul-sticky-secret-0123" }')
    moved: Any = None
    try:
        async with aiohttp.ClientSession() as session:
            async def get(cookie: str | None) -> tuple[str, str | None]:
                headers = {"Cookie": f"pin={cookie}"} if cookie else {}
                async with session.get(f"http://127.0.0.1:{edge.ports[0]}/",
                                       headers=headers) as resp:
                    morsel = resp.cookies.get("pin")
                    return await resp.text(), morsel.value if morsel else None
            first, pin = await get(None)
            assert pin is not None
            name = {"a": "web-a", "b": "web-b"}[first]
            # the same instance answers on another port (as after a restart)
            other, moved = await named_backend(first)
            await consul.set_port(name, other)

            async def moved_port() -> bool:
                return any(b["address"].endswith(f":{other}")
                           for b in (await status(edge))["backends"])
            await eventually(moved_port)
            assert await get(pin) == (first, None)  # still pinned, no new cookie
            await consul.set_status(name, "critical")

            async def repinned() -> bool:
                body, new = await get(pin)
                return body != first and new is not None and new != pin
            await eventually(repinned)
    finally:
        await edge.drain(1.0)
        if moved is not None:
            moved.close()
