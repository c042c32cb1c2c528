"""Route matching is a pure function: table-driven tests."""

from __future__ import annotations

import pytest

from proxy.routing import Route, RouteTable, normalise_host, strip_path_prefix

TABLE = RouteTable([
    Route("any-root", "default"),
    Route("any-api", "api", path_prefix="/api"),
    Route("any-api-v2", "api2", path_prefix="/api/v2"),
    Route("exact", "exact", host="app.example.com"),
    Route("exact-admin", "admin", host="app.example.com", path_prefix="/admin"),
    Route("wild", "wild", host="*.example.com"),
    Route("wild-deeper", "deeper", host="*.eu.example.com"),
])


@pytest.mark.parametrize(("host", "path", "upstream"), [
    ("other.org", "/", "default"),
    ("other.org", "/api", "api"),
    ("other.org", "/api/v1/x", "api"),
    ("other.org", "/api/v2/x", "api2"),          # longest prefix wins
    ("app.example.com", "/x", "exact"),           # exact host beats wildcard
    ("app.example.com", "/admin/users", "admin"),
    ("shop.example.com", "/x", "wild"),
    ("shop.eu.example.com", "/x", "deeper"),      # most specific wildcard
    ("example.com", "/api", "api"),               # "*.example.com" needs a subdomain
])
def test_match(host: str, path: str, upstream: str) -> None:
    route = TABLE.match(host, path)
    assert route is not None and route.upstream == upstream


def test_no_match_without_catch_all() -> None:
    table = RouteTable([Route("r", "a", host="a.test"), Route("p", "b", path_prefix="/b")])
    assert table.match("other.test", "/x") is None
    assert table.match("a.test", "/x") is not None


def test_host_group_falls_through_when_no_prefix_matches() -> None:
    table = RouteTable([Route("r", "a", host="a.test", path_prefix="/only"),
                        Route("p", "b")])
    route = table.match("a.test", "/elsewhere")
    assert route is not None and route.upstream == "b"


@pytest.mark.parametrize(("raw", "host"), [
    ("App.Example.COM:8080", "app.example.com"), ("example.com.", "example.com"),
    ("[::1]:8080", "[::1]"), ("", ""), (None, ""),
])
def test_normalise_host(raw: str | None, host: str) -> None:
    assert normalise_host(raw) == host


@pytest.mark.parametrize(("target", "prefix", "out"), [
    ("/api/x?q=1", "/api", "/x?q=1"), ("/api", "/api", "/"), ("/api?x", "/api", "/?x"),
    ("/api/", "/api/", "/"), ("/apix/y", "/api", "/x/y"),
])
def test_strip_prefix(target: str, prefix: str, out: str) -> None:
    assert strip_path_prefix(target, prefix) == out
