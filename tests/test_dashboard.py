"""The dashboard's server side: the page and its headers, the state document with
the last minute of traffic, and the defences of what a browser can be made to send
(cross-site requests, DNS rebinding, the token off loopback). The browser itself:
test_dashboard_browser.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.agent.traffic import Snapshot, TrafficWindow, quantile
from proxy.app import build_runtime
from proxy.config import load_config
from proxy.dashboard.assets import ASSETS
from proxy.server import Edge
from tests.helpers import eventually, free_port, port_of, start_backend


async def edge_with(tmp_path: Path, admin_host: str = "127.0.0.1", admin_extra: str = ""
                    ) -> tuple[Edge, int, int, Any]:
    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response(status=503 if request.path == "/fail" else 200, text="ok")
    _server, listener = await start_backend(handler)
    port, admin = free_port(), free_port()
    path = tmp_path / "b.toml"
    path.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\naccess_log = "off"\n'
        f'[admin]\nlisten = "{admin_host}:{admin}"\n{admin_extra}\n'
        '[[routes]]\nname = "main"\nupstream = "app"\n'
        f'[upstreams.app]\nbackends = ["127.0.0.1:{port_of(listener)}"]\n')
    edge = Edge(build_runtime(load_config(path), str(path)))
    await edge.start()
    return edge, port, admin, listener


def test_the_page_needs_no_inline_script_or_style_and_no_outside_fetch() -> None:
    page = ASSETS["/"][0].decode()
    assert not re.search(r"\son[a-z]+\s*=", page)  # no inline event handlers
    assert not re.search(r"<script(?![^>]*\bsrc=)", page)  # every script from a file
    assert "style=" not in page and "<style" not in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing from elsewhere
    script = ASSETS["/dashboard/app.js"][0].decode()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert "eval(" not in script


async def test_page_headers_and_state_with_traffic(tmp_path: Path) -> None:
    edge, port, admin, listener = await edge_with(tmp_path)
    base = f"http://127.0.0.1:{admin}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/") as resp:
                assert resp.status == 200
                csp = resp.headers["Content-Security-Policy"]
                assert "script-src 'self'" in csp and "unsafe-inline" not in csp
                assert "frame-ancestors 'none'" in csp
                etag = resp.headers["ETag"]
            async with session.get(f"{base}/", headers={"If-None-Match": etag}) as resp:
                assert resp.status == 304
            for _ in range(10):
                async with session.get(f"http://127.0.0.1:{port}/") as resp:
                    assert resp.status == 200
                async with session.get(f"http://127.0.0.1:{port}/fail") as resp:
                    assert resp.status == 503

            async def traffic_shown() -> bool:
                # keeps asking (the agent samples while asked) and sends more traffic
                async with session.get(f"http://127.0.0.1:{port}/") as resp:
                    await resp.read()
                async with session.get(f"{base}/dashboard/state") as resp:
                    state = await resp.json()
                backends = ((state["traffic"] or {}).get("backends") or {}).get("app", {})
                return any(b["rps"] > 0 for b in backends.values())
            await eventually(traffic_shown, timeout=10)
            async with session.get(f"{base}/dashboard/state") as resp:
                assert resp.headers["Cache-Control"] == "no-store"
                state = await resp.json()
        assert state["routes"][0]["name"] == "main"
        assert state["listeners"][0] == {"address": f"127.0.0.1:{port}", "kind": "http"}
        assert state["workers"] == 1 and state["metrics"] is True
        (backend,) = state["traffic"]["backends"]["app"].values()
        assert 0 < backend["error_ratio"] < 1  # the 503s are the backend's errors
        assert backend["p50_ms"] is not None and backend["p99_ms"] >= backend["p50_ms"]
        route = state["traffic"]["routes"]["main"]["app"]
        assert route["errors_per_s"] > 0
    finally:
        await edge.drain(1.0)
        listener.close()


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
    {"Host": "rebound.example"},
])
async def test_what_another_site_can_make_a_browser_send_is_refused(
        tmp_path: Path, headers: dict[str, str]) -> None:
    edge, _port, admin, listener = await edge_with(tmp_path)
    base = f"http://127.0.0.1:{admin}"
    try:
        async with aiohttp.ClientSession() as session:
            for method, path in (("POST", "/reload"), ("POST", "/cache/purge?url=/x"),
                                 ("POST", "/backends/drain?upstream=app&backend=x"),
                                 ("GET", "/dashboard/state")):
                async with session.request(method, base + path, headers=headers) as resp:
                    assert resp.status == 403, (method, path, headers)
            async with session.get(f"{base}/healthz", headers=headers) as resp:
                assert resp.status == 200  # load balancers' probes stay open
    finally:
        await edge.drain(1.0)
        listener.close()


async def test_same_origin_browser_posts_go_through(tmp_path: Path) -> None:
    edge, _port, admin, listener = await edge_with(tmp_path)
    base = f"http://127.0.0.1:{admin}"
    try:
        async with aiohttp.ClientSession() as session, session.post(
                f"{base}/reload", headers={"Origin": base, "Sec-Fetch-Site": "same-origin"}
        ) as resp:
            assert resp.status == 200
    finally:
        await edge.drain(1.0)
        listener.close()


async def test_off_loopback_the_state_and_the_actions_need_the_token(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    edge, _port, admin, listener = await edge_with(
        tmp_path, admin_host="0.0.0.0", admin_extra=f'token_file = "{token}"')
    base = f"http://127.0.0.1:{admin}"
    backend = edge.runtime.upstreams["app"].balancer.backends[0].id
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/") as resp:
                assert resp.status == 200  # the page holds no data
            async with session.get(f"{base}/dashboard/state") as resp:
                assert resp.status == 401
            drain = f"{base}/backends/drain?upstream=app&backend={backend}"
            async with session.post(drain) as resp:
                assert resp.status == 401
            auth = {"Authorization": "Bearer s3cret"}
            async with session.get(f"{base}/dashboard/state", headers=auth) as resp:
                assert resp.status == 200
            async with session.post(drain, headers=auth) as resp:
                assert resp.status == 200
    finally:
        await edge.drain(1.0)
        listener.close()


def test_quantiles_follow_histogram_quantile() -> None:
    # 100 observations: 50 at or below 0.1, 90 at or below 0.5, all at or below 1
    buckets = {0.1: 50.0, 0.5: 90.0, 1.0: 100.0, float("inf"): 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.7, buckets) == pytest.approx(0.3)  # halfway through (0.1, 0.5]
    assert quantile(0.99, buckets) == pytest.approx(0.95)
    assert quantile(0.5, {float("inf"): 0.0}) is None
    # past the last finite bound: that bound, as PromQL answers
    assert quantile(0.99, {0.1: 1.0, float("inf"): 10.0}) == pytest.approx(0.1)


class _Sample:
    def __init__(self, name: str, labels: dict[str, str], value: float) -> None:
        self.name, self.labels, self.value = name, labels, value


class _Family:
    def __init__(self, name: str, samples: list[_Sample]) -> None:
        self.name, self.samples = name, samples


def _families(count: float, errors: float) -> list[_Family]:
    labels = {"upstream": "app", "backend": "b1"}
    return [
        _Family("bascule_upstream_request_duration_seconds", [
            _Sample("bascule_upstream_request_duration_seconds_bucket",
                    {**labels, "le": "0.1"}, count),
            _Sample("bascule_upstream_request_duration_seconds_bucket",
                    {**labels, "le": "+Inf"}, count),
            _Sample("bascule_upstream_request_duration_seconds_count", labels, count)]),
        _Family("bascule_backend_server_errors", [
            _Sample("bascule_backend_server_errors_total", labels, errors)]),
        _Family("bascule_cache_lookups", [
            _Sample("bascule_cache_lookups_total", {"route": "r", "result": "hit"}, count),
            _Sample("bascule_cache_lookups_total", {"route": "r", "result": "miss"}, count)]),
    ]


def test_the_window_reports_differences_over_its_span() -> None:
    series = iter([(100.0, 0.0), (160.0, 6.0), (400.0, 30.0)])
    window = TrafficWindow(lambda: _families(*next(series)), span=60.0)
    window.sample(now=1000.0)
    window.sample(now=1030.0)
    summary = window.summary()
    backend = summary["backends"]["app"]["b1"]
    assert backend["rps"] == 2.0 and backend["error_ratio"] == 0.1
    assert summary["cache"]["hit_ratio"] == 0.5
    window.sample(now=1100.0)  # the first sample is past the span now
    assert [s.at for s in window.samples] == [1030.0, 1100.0]
    assert window.summary()["backends"]["app"]["b1"]["rps"] == pytest.approx(240 / 70, 0.01)
    assert Snapshot.of([], 0.0).backends == {}
