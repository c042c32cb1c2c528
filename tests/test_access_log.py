"""Access logs (JSON and combined, per-route switch) and X-Request-Id."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.accesslog import AccessLog, AccessRecord
from proxy.app import build_runtime
from proxy.config import parse_config
from proxy.server import Edge
from tests.helpers import free_port, poll, port_of, start_backend

seen_ids: list[str] = []


async def echo_id(request: web.BaseRequest) -> web.StreamResponse:
    seen_ids.append(request.headers.get("X-Request-Id", ""))
    return web.Response(text="hello")


async def start(tmp_path: Path, server_extra: str) -> tuple[Edge, Path, object]:
    seen_ids.clear()
    _, listener = await start_backend(echo_id)
    log = tmp_path / "access.log"
    text = f"""
[server]
listen = ["127.0.0.1:{free_port()}"]
access_log = "{log}"
{server_extra}
[admin]
listen = "127.0.0.1:{free_port()}"
[[routes]]
name = "main"
upstream = "app"
[[routes]]
path_prefix = "/quiet"
access_log = false
upstream = "app"
[upstreams.app]
backends = ["127.0.0.1:{port_of(listener)}"]
"""
    edge = Edge(build_runtime(parse_config(tomllib.loads(text), "<t>"), "<t>"))
    await edge.start(admin=False)
    return edge, log, listener


def lines(log: Path, count: int) -> list[str]:
    assert poll(lambda: log.exists() and len(log.read_text().splitlines()) >= count, 5.0)
    return log.read_text().splitlines()


async def test_json_lines_and_request_ids(tmp_path: Path) -> None:
    edge, log, listener = await start(tmp_path, "")
    url = f"http://127.0.0.1:{edge.ports[0]}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/a?b=1", headers={"X-Request-Id": "spoofed"}) as r:
                assert r.status == 200
            async with session.get(url + "/quiet") as r:
                assert r.status == 200
            async with session.get(url + "/c") as r:
                assert r.status == 200
    finally:
        await edge.drain(1.0)
        listener.close()  # type: ignore[attr-defined]
    records = [json.loads(line) for line in lines(log, 2)]
    assert [r["path"] for r in records] == ["/a?b=1", "/c"]  # /quiet is not logged
    first = records[0]
    assert set(first) == {"time", "client", "method", "host", "path", "status", "bytes",
                          "duration", "upstream", "backend", "cache", "request_id"}
    assert first["status"] == 200 and first["bytes"] == 5 and first["method"] == "GET"
    assert first["upstream"] == "app" and first["client"] == "127.0.0.1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    # not trusted: the client's id is replaced by a generated one, sent upstream
    assert first["request_id"] != "spoofed" and re.fullmatch(r"[0-9a-f]{32}",
                                                             first["request_id"])
    assert seen_ids[0] == first["request_id"]
    assert len(set(seen_ids)) == 3


async def test_trusted_request_id_and_combined_format(tmp_path: Path) -> None:
    edge, log, listener = await start(
        tmp_path, 'trust_request_id = true\naccess_log_format = "combined"')
    url = f"http://127.0.0.1:{edge.ports[0]}"
    try:
        async with aiohttp.ClientSession() as session, session.get(
                url + "/x", headers={"X-Request-Id": "abc-123", "User-Agent": "t/1",
                                     "Referer": "http://r/"}) as r:
            assert r.status == 200
    finally:
        await edge.drain(1.0)
        listener.close()  # type: ignore[attr-defined]
    assert seen_ids == ["abc-123"]
    line = lines(log, 1)[0]
    assert re.fullmatch(r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] '
                        r'"GET /x HTTP/1\.1" 200 5 "http://r/" "t/1"', line), line


def test_writer_never_blocks_and_counts_drops(tmp_path: Path) -> None:
    log = AccessLog(str(tmp_path / "a.log"), max_pending=3, interval=60)
    from aiohttp.http_parser import RawRequestMessage
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    message = RawRequestMessage("GET", "/", (1, 1), CIMultiDictProxy(CIMultiDict()), (),
                                False, None, False, False, URL("/"))
    record = AccessRecord(0.0, "c", message, 200, 0, 0.0, "u", "b", "", b"i")
    for _ in range(5):
        log.log(record)  # the writer sleeps: only 3 fit, 2 are dropped, none block
    assert log.dropped == 2
    log.close()
    assert len((tmp_path / "a.log").read_text().splitlines()) == 3
