"""/metrics, /status and /healthz on an in-process edge: exact counter movements for
a known request sequence, promtool's verdict, departed backends, the series cap."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.models import Backend, BackendSet
from proxy.server import Edge
from tests.helpers import dead_port, port_of, start_backend, start_proxy_with_admin

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def app(request: web.BaseRequest) -> web.StreamResponse:
    body = await request.read()
    if request.path == "/missing":
        return web.Response(status=404, text="nope")
    return web.Response(text=f"ok {len(body)}")


@pytest.fixture
async def edge() -> AsyncIterator[Edge]:
    listeners = [(await start_backend(app))[1] for _ in range(2)]
    a, b = (port_of(li) for li in listeners)
    dead = dead_port()
    edge = await start_proxy_with_admin(f"""
[[routes]]
name = "web"
upstream = "app"

[[routes]]
name = "broken"
path_prefix = "/broken"
upstream = "dead"

[upstreams.app]
backends = ["127.0.0.1:{a}", "127.0.0.1:{b}"]

[upstreams.dead]
backends = ["127.0.0.1:{dead}"]
retry = {{ attempts = 2 }}
""")
    yield edge
    await edge.drain(1.0)
    for listener in listeners:
        listener.close()


async def scrape(edge: Edge) -> tuple[str, Samples]:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{edge.admin_port}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = await resp.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def test_exact_counter_movements(edge: Edge) -> None:
    _, before = await scrape(edge)
    url = f"http://127.0.0.1:{edge.ports[0]}"
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(url + "/") as resp:
                assert resp.status == 200
        async with session.post(url + "/", data=b"x" * 100) as resp:
            assert await resp.text() == "ok 100"
        async with session.get(url + "/missing") as resp:
            assert resp.status == 404
        async with session.request("PROPFIND", url + "/") as resp:
            assert resp.status == 200
        async with session.get(url + "/broken") as resp:
            assert resp.status == 502
    _, after = await scrape(edge)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "bascule_requests_total"
    assert moved(requests, route="web", upstream="app", method="GET", code="2xx") == 3
    assert moved(requests, route="web", upstream="app", method="POST", code="2xx") == 1
    assert moved(requests, route="web", upstream="app", method="GET", code="4xx") == 1
    assert moved(requests, route="web", upstream="app", method="other", code="2xx") == 1
    assert moved(requests, route="broken", upstream="dead", method="GET", code="5xx") == 1
    assert total(after, requests) - total(before, requests) == 7
    assert moved("bascule_request_duration_seconds_count", route="web", upstream="app") == 6
    assert moved("bascule_request_bytes_total", route="web") == 100
    assert moved("bascule_response_bytes_total", route="web") == 4 * 4 + len("ok 100") + 4
    upstream_count = total(after, "bascule_upstream_request_duration_seconds_count",
                           upstream="app")
    assert upstream_count == 6
    dead = f"127.0.0.1:{edge.runtime.upstreams['dead'].balancer.backends[0].port}"
    assert moved("bascule_backend_connect_errors_total", upstream="dead", backend=dead) == 2
    assert moved("bascule_retries_total", upstream="dead") == 1
    assert value(after, "bascule_backend_up", upstream="app",
                 backend=edge.runtime.upstreams["app"].balancer.backends[0].id) == 1
    assert value(after, "bascule_backend_inflight", upstream="dead", backend=dead) == 0
    assert value(after, "bascule_config_info", hash=edge.runtime.config_hash) == 1
    assert value(after, "bascule_discovery_updates_total", upstream="app",
                 source="static") == 1
    assert total(after, "bascule_build_info") == 1


async def test_promtool_accepts_the_exposition(edge: Edge) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: `make test` installs Debian's prometheus package"
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{edge.ports[0]}/") as resp:
        assert resp.status == 200
    text, _ = await scrape(edge)
    result = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_departed_backend_series_disappear(edge: Edge) -> None:
    url = f"http://127.0.0.1:{edge.ports[0]}"
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            async with session.get(url + "/") as resp:
                assert resp.status == 200
    balancer = edge.runtime.upstreams["app"].balancer
    gone, stays = balancer.backends
    text, _ = await scrape(edge)
    assert f'backend="{gone.id}"' in text
    balancer.update(BackendSet(2, (stays,)))
    text, samples = await scrape(edge)
    assert f'backend="{gone.id}"' not in text
    assert value(samples, "bascule_backend_up", upstream="app", backend=stays.id) == 1


async def test_backend_series_are_capped() -> None:
    edge = await start_proxy_with_admin("""
[admin]
max_backend_series = 2
[[routes]]
upstream = "big"
[upstreams.big]
backends = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]
""", admin_table=False)
    try:
        _, samples = await scrape(edge)
        backends = {dict(labels).get("backend") for (name, labels) in samples
                    if name == "bascule_backend_up"}
        assert "other" in backends and len(backends - {"other"}) == 2
    finally:
        await edge.drain(1.0)


async def test_status_and_healthz(edge: Edge) -> None:
    admin = f"http://127.0.0.1:{edge.admin_port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(admin + "/status") as resp:
            status = json.loads(await resp.read())
        async with session.get(admin + "/healthz") as resp:
            assert resp.status == 200 and await resp.text() == "ok\n"
        async with session.post(admin + "/healthz") as resp:
            assert resp.status == 405
    assert status["config"]["hash"] == edge.runtime.config_hash
    assert [r["name"] for r in status["routes"]] == ["web", "broken"]
    app_status = status["upstreams"]["app"]
    assert app_status["strategy"] == "round_robin"
    assert app_status["discovery"] == {"source": "static", "stale": False, "version": 1}
    assert [set(b) for b in app_status["backends"]] == [
        {"id", "address", "weight", "healthy", "inflight", "fleet_inflight", "source",
         "drained", "ramp", "health"}] * 2
    assert status["draining"] is False and status["version"]


async def test_healthz_is_503_while_draining(edge: Edge) -> None:
    edge.draining = True
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{edge.admin_port}/healthz") as resp:
        assert resp.status == 503
    edge.draining = False


def test_backend_model_is_hashable_by_identity() -> None:
    assert Backend("a", "h", 1).id == "a"
