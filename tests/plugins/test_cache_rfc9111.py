"""RFC 9111 / RFC 9213 rules end to end: a real origin on 127.0.0.1 sends the
responses in question, a raw client reads what Bascule answers. Each test names its
section."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from email.utils import formatdate

import pytest

from proxy.server import Edge
from tests.helpers import port_of, proxy_config, raw_request, start_proxy

hits: collections.Counter[str] = collections.Counter()


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The origin: raw responses, so that any field lines can be sent as they are."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            method, path = head.split(b" ", 2)[:2]
            hits[path.decode()] += 1
            answer = ANSWERS.get(path.decode())
            if path == b"/drops":  # dated now: its stale-if-error window is 60 s from here
                answer = drops_answer()
            if method not in (b"GET", b"HEAD"):
                answer = b"HTTP/1.1 204 No Content\r\n\r\n"
            if answer is None or (path == b"/drops" and hits["/drops"] > 1):
                writer.close()  # the origin drops the connection before any head
                return
            writer.write(answer)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def drops_answer() -> bytes:
    return answer("Cache-Control: max-age=0, stale-if-error=60", f"Date: {now()}")


def answer(*fields: str, status: str = "200 OK", body: bytes = b"ok") -> bytes:
    lines = "".join(f"{f}\r\n" for f in fields)
    return (f"HTTP/1.1 {status}\r\n{lines}Content-Length: {len(body)}\r\n\r\n").encode() + body


def now() -> str:
    return formatdate(usegmt=True)


ANSWERS = {
    "/aged": answer("Cache-Control: max-age=100", "Age: 30", f"Date: {now()}"),
    "/too-old": answer("Cache-Control: max-age=100", "Age: 120"),
    "/vary-star-later": answer("Cache-Control: max-age=60", "Vary: Accept", "Vary: *"),
    "/unknown-status": answer("Cache-Control: max-age=60", status="299 Whatever"),
    "/unknown-status-must-understand": answer(
        "Cache-Control: no-store, must-understand, max-age=60", status="299 Whatever"),
    "/drops": b"",  # made per request: drops_answer()
    "/cdn": answer("CDN-Cache-Control: max-age=60", "Cache-Control: no-store"),
    "/cdn-no-store": answer("CDN-Cache-Control: no-store", "Cache-Control: max-age=60"),
    "/bad-expires": answer("Expires: Sun, 06 Nov 2094 08:49:37 UTC", f"Date: {now()}"),
    "/two-expires": answer("Expires: Sun, 06 Nov 2094 08:49:37 GMT",
                           "Expires: Sun, 06 Nov 2094 08:49:37 GMT", f"Date: {now()}"),
    "/bad-date": answer(f"Expires: {formatdate(time.time() + 600, usegmt=True)}",
                        "Date: 2026-12-02T00:00:00Z"),
    "/page": answer("Cache-Control: max-age=60"),
    "/modified": answer("Cache-Control: max-age=60",
                        "Last-Modified: Sun, 06 Nov 1994 08:49:37 GMT"),
}


@pytest.fixture
async def edge() -> AsyncIterator[Edge]:
    hits.clear()
    origin = await asyncio.start_server(serve, "127.0.0.1", 0)
    edge = await start_proxy(proxy_config(
        {"app": [f"127.0.0.1:{port_of(origin)}"]},
        routes='[[routes]]\nupstream = "app"\ncache = true\n'))
    yield edge
    await edge.drain(1.0)
    origin.close()


async def get(edge: Edge, path: str, method: str = "GET") -> bytes:
    return await raw_request(edge.ports[0], f"{method} {path} HTTP/1.1\r\nHost: t\r\n"
                             "Connection: close\r\n\r\n".encode())


def field(raw: bytes, name: bytes) -> bytes | None:
    for line in raw.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(name.lower() + b":"):
            return line.partition(b":")[2].strip()
    return None


async def test_the_received_age_counts(edge: Edge) -> None:
    """§4.2.3, §5.1: the Age a response arrived with is part of its age."""
    await get(edge, "/aged")
    hit = await get(edge, "/aged")
    assert field(hit, b"Cache-Status") == b"bascule; hit"
    age = field(hit, b"Age")
    assert age is not None and int(age) >= 30
    await get(edge, "/too-old")  # already older than its max-age: stale at once
    again = await get(edge, "/too-old")
    assert hits["/too-old"] == 2 and b"hit" not in (field(again, b"Cache-Status") or b"")


async def test_vary_star_on_a_later_line_is_never_reused(edge: Edge) -> None:
    """§4.1, RFC 9110 §5.3: every Vary line counts."""
    await get(edge, "/vary-star-later")
    await get(edge, "/vary-star-later")
    assert hits["/vary-star-later"] == 2


async def test_an_unknown_status_with_explicit_freshness_is_stored(edge: Edge) -> None:
    """§3: any final status whose caching explicit freshness permits."""
    await get(edge, "/unknown-status")
    hit = await get(edge, "/unknown-status")
    assert hit.startswith(b"HTTP/1.1 299 Whatever") and hits["/unknown-status"] == 1
    # §5.2.2.3: with must-understand, only understood status codes are stored
    await get(edge, "/unknown-status-must-understand")
    await get(edge, "/unknown-status-must-understand")
    assert hits["/unknown-status-must-understand"] == 2


@pytest.mark.parametrize("method", ["M-SEARCH", "PATCH", "PURGE"])
async def test_any_method_not_known_safe_invalidates(edge: Edge, method: str) -> None:
    """§4.4: unsafe methods and methods of unknown safety."""
    await get(edge, "/page")
    await get(edge, "/page", method=method)
    await get(edge, "/page")
    assert hits["/page"] == 3


async def test_a_dropped_connection_is_an_error_for_stale_if_error(edge: Edge) -> None:
    """§4.2.4 / RFC 5861: the origin drops the connection before a head: serve stale."""
    first = await get(edge, "/drops")
    assert first.startswith(b"HTTP/1.1 200")
    stale = await get(edge, "/drops")
    assert stale.startswith(b"HTTP/1.1 200") and stale.endswith(b"ok"), stale[:200]
    assert field(stale, b"Cache-Status") == b"bascule; hit; detail=stale-if-error"


async def test_cdn_cache_control_sets_the_policy_and_is_passed_on(edge: Edge) -> None:
    """RFC 9213 §2.2: the targeted field overrides Cache-Control for this cache; both
    reach the client unchanged."""
    first = await get(edge, "/cdn")
    hit = await get(edge, "/cdn")
    assert hits["/cdn"] == 1 and field(hit, b"Cache-Status") == b"bascule; hit"
    assert field(first, b"CDN-Cache-Control") == b"max-age=60"
    assert field(hit, b"Cache-Control") == b"no-store"
    await get(edge, "/cdn-no-store")
    await get(edge, "/cdn-no-store")
    assert hits["/cdn-no-store"] == 2


@pytest.mark.parametrize("path", ["/bad-expires", "/two-expires"])
async def test_an_invalid_expires_means_expired(edge: Edge, path: str) -> None:
    """§5.3 with RFC 9110 §5.6.7's strict HTTP-date: a date in UTC (not GMT), or two
    Expires lines, are invalid: already expired."""
    await get(edge, path)
    await get(edge, path)
    assert hits[path] == 2


async def test_an_invalid_date_is_the_time_of_receipt(edge: Edge) -> None:
    """§4.2.3 (optional): Expires counts from the time of receipt when the Date cannot
    be read, instead of the response being stale at once."""
    await get(edge, "/bad-date")
    hit = await get(edge, "/bad-date")
    assert hits["/bad-date"] == 1 and field(hit, b"Cache-Status") == b"bascule; hit"


async def test_the_example_config_does_not_override_the_origin() -> None:
    """The example teaches nothing that serves stale responses the origin did not
    allow (§4.2.4): stale windows stay commented out."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "config/examples/cache.toml").read_text()
    active = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any(line.lstrip().startswith(("stale_while_revalidate", "stale_if_error"))
                   for line in active)



async def test_if_modified_since_is_read_strictly(edge: Edge) -> None:
    """RFC 9110 §13.1.3: a valid HTTP-date at or after Last-Modified gets a 304 from
    the stored response; an invalid one (here in UTC) is ignored: the full response."""
    await get(edge, "/modified")
    valid = await raw_request(edge.ports[0], b"GET /modified HTTP/1.1\r\nHost: t\r\n"
                              b"If-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
                              b"Connection: close\r\n\r\n")
    assert valid.startswith(b"HTTP/1.1 304 ")
    invalid = await raw_request(edge.ports[0], b"GET /modified HTTP/1.1\r\nHost: t\r\n"
                                b"If-Modified-Since: Sun, 06 Nov 1994 08:49:37 UTC\r\n"
                                b"Connection: close\r\n\r\n")
    assert invalid.startswith(b"HTTP/1.1 200 ") and invalid.endswith(b"ok")
    assert hits["/modified"] == 1  # both answered from the stored response
