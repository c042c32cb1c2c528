"""RFC 9111 policy functions, table-driven."""

from __future__ import annotations

from email.utils import formatdate

import pytest
from multidict import CIMultiDict

from plugins.cache.policy import (
    current_age,
    freshness_lifetime,
    invalidated_uris,
    parse_cache_control,
    request_accepts,
    storable,
    vary_key,
)

NOW = 1_800_000_000.0


def date(offset: float = 0.0) -> str:
    return formatdate(NOW + offset, usegmt=True)


def test_parse_cache_control() -> None:
    assert parse_cache_control(['public, max-age=60, s-maxage="120"', 'no-cache="Set-Cookie, X"',
                                "MAX-AGE=5"]) == {
        "public": None, "max-age": "60", "s-maxage": "120", "no-cache": "Set-Cookie, X"}


@pytest.mark.parametrize(("method", "status", "req", "resp", "expected"), [
    ("GET", 200, {}, {"Cache-Control": "max-age=60"}, (True, "")),
    ("HEAD", 200, {}, {"Cache-Control": "max-age=60"}, (False, "method")),
    ("POST", 200, {}, {"Cache-Control": "max-age=60"}, (False, "method")),
    # §3: any final status with explicit freshness may be stored ...
    ("GET", 299, {}, {"Cache-Control": "max-age=60"}, (True, "")),
    ("GET", 599, {}, {"Expires": date(60), "Date": date()}, (True, "")),
    # ... but not an interim one, a 206 or a 304 (not understood for storing here)
    ("GET", 103, {}, {"Cache-Control": "max-age=60"}, (False, "status")),
    ("GET", 206, {}, {"Cache-Control": "max-age=60"}, (False, "status")),
    ("GET", 304, {}, {"Cache-Control": "max-age=60"}, (False, "status")),
    # §5.2.2.3 must-understand: only understood codes, and then no-store is ignored
    ("GET", 200, {}, {"Cache-Control": "no-store, must-understand, max-age=60"}, (True, "")),
    ("GET", 299, {}, {"Cache-Control": "no-store, must-understand, max-age=60"},
     (False, "status")),
    # §3: without explicit freshness only a heuristically cacheable status is stored
    ("GET", 299, {}, {"ETag": '"v1"'}, (False, "no-freshness")),
    ("GET", 200, {}, {"Cache-Control": "no-store, max-age=60"}, (False, "no-store")),
    ("GET", 200, {"Cache-Control": "no-store"}, {"Cache-Control": "max-age=60"},
     (False, "no-store")),
    ("GET", 200, {}, {"Cache-Control": "private, max-age=60"}, (False, "private")),
    ("GET", 200, {"Authorization": "Bearer x"}, {"Cache-Control": "max-age=60"},
     (False, "authorization")),
    ("GET", 200, {"Authorization": "Bearer x"}, {"Cache-Control": "public, max-age=60"},
     (True, "")),
    ("GET", 200, {"Authorization": "Bearer x"}, {"Cache-Control": "s-maxage=60"}, (True, "")),
    ("GET", 200, {}, {"Cache-Control": "max-age=60", "Set-Cookie": "a=1"},
     (False, "set-cookie")),
    ("GET", 200, {}, {"Cache-Control": "max-age=60", "Vary": "Accept, *"},
     (False, "vary-star")),
    ("GET", 200, {}, {}, (False, "no-freshness")),                  # no blanket TTL
    ("GET", 200, {}, {"ETag": '"v1"'}, (True, "")),                 # validator: revalidate
    ("GET", 200, {}, {"Last-Modified": date(-1000)}, (True, "")),   # heuristic
    ("GET", 302, {}, {"Last-Modified": date(-1000)}, (False, "no-freshness")),  # §3
    # §4.1, RFC 9110 §5.3: Vary: * on a later line counts
    ("GET", 200, {}, [("Cache-Control", "max-age=60"), ("Vary", ""), ("Vary", "*")],
     (False, "vary-star")),
    ("GET", 404, {}, {"Expires": date(60), "Date": date()}, (True, "")),
])
def test_storable(method: str, status: int, req: dict[str, str],
                  resp: dict[str, str] | list[tuple[str, str]],
                  expected: tuple[bool, str]) -> None:
    headers = CIMultiDict(resp)
    assert storable(method, status, req, headers) == expected


def test_set_cookie_can_be_ignored() -> None:
    resp = {"Cache-Control": "max-age=60", "Set-Cookie": "a=1"}
    assert storable("GET", 200, {}, resp, ignore_set_cookie=True) == (True, "")


@pytest.mark.parametrize(("resp", "lifetime", "heuristic"), [
    ({"Cache-Control": "max-age=60, s-maxage=120"}, 120.0, False),   # s-maxage wins
    ({"Cache-Control": "max-age=60", "Expires": date(600), "Date": date()}, 60.0, False),
    ({"Expires": date(600), "Date": date()}, 600.0, False),
    ({"Expires": "0", "Date": date()}, 0.0, False),                  # invalid: expired
    ({"Cache-Control": "max-age=abc"}, 0.0, False),                  # invalid: stale
    ({"Date": date(), "Last-Modified": date(-10_000)}, 1000.0, True),  # 10% rule
    ({"Date": date(), "Last-Modified": date(-100 * 86400)}, 86400.0, True),  # capped
    ({"Date": date()}, 0.0, False),
])
def test_freshness_lifetime(resp: dict[str, str], lifetime: float, heuristic: bool) -> None:
    assert freshness_lifetime(resp) == type(freshness_lifetime(resp))(lifetime, heuristic)


def test_heuristic_can_be_turned_off_and_needs_a_cacheable_status() -> None:
    resp = {"Date": date(), "Last-Modified": date(-10_000)}
    assert freshness_lifetime(resp, heuristic=False).lifetime == 0.0
    assert freshness_lifetime(resp, status=302).lifetime == 0.0


def test_current_age_follows_section_4_2_3() -> None:
    # origin said Age 10; the response left the origin 5 s before it reached us
    # (Date), the exchange took 2 s, and it has been stored 30 s
    resp = {"Date": date(-5), "Age": "10"}
    assert current_age(resp, request_time=NOW - 2, response_time=NOW, now=NOW + 30) == 42.0
    # a clock-skewed Date in the future is not a negative age
    assert current_age({"Date": date(100)}, NOW, NOW, NOW + 1) == 1.0


@pytest.mark.parametrize(("req", "resp_cc", "age", "lifetime", "decision"), [
    ({}, "max-age=60", 10, 60, "fresh"),
    ({}, "max-age=60", 70, 60, "revalidate"),
    ({"Cache-Control": "no-cache"}, "max-age=60", 10, 60, "revalidate"),
    ({"Pragma": "no-cache"}, "max-age=60", 10, 60, "revalidate"),
    ({"Cache-Control": "max-age=5"}, "max-age=60", 10, 60, "revalidate"),
    ({"Cache-Control": "min-fresh=55"}, "max-age=60", 10, 60, "revalidate"),
    ({"Cache-Control": "max-stale=30"}, "max-age=60", 80, 60, "stale-ok"),
    ({"Cache-Control": "max-stale=10"}, "max-age=60", 80, 60, "revalidate"),
    ({"Cache-Control": "max-stale"}, "max-age=60", 9999, 60, "stale-ok"),
    ({"Cache-Control": "max-stale"}, "max-age=60, must-revalidate", 80, 60, "revalidate"),
    ({}, "no-cache, max-age=60", 10, 60, "revalidate"),
])
def test_request_accepts(req: dict[str, str], resp_cc: str, age: float, lifetime: float,
                         decision: str) -> None:
    assert request_accepts(req, age, lifetime, {"Cache-Control": resp_cc}) == decision


def test_vary_key_normalises_and_orders() -> None:
    resp = {"Vary": "Accept-Encoding, accept-language"}
    a = vary_key(resp, [("Accept-Language", "en-GB"), ("Accept-Encoding", "gzip,  BR")])
    b = vary_key(resp, [("accept-encoding", "GZIP, br"), ("accept-language", " en-gb ")])
    assert a == b == "accept-encoding:gzip,br\naccept-language:en-gb"
    assert vary_key(resp, [("Accept-Encoding", "gzip")]) != a
    assert vary_key({}, []) == ""


@pytest.mark.parametrize(("method", "status", "resp", "expected"), [
    ("POST", 201, {"Location": "/items/7", "Content-Location": "https://other.test/x"},
     ["https://a.test/items", "https://a.test/items/7"]),
    ("DELETE", 204, {"Content-Location": "https://a.test/items?all"},
     ["https://a.test/items", "https://a.test/items?all"]),
    ("POST", 500, {}, []),
    ("GET", 200, {}, []),
])
def test_invalidated_uris(method: str, status: int, resp: dict[str, str],
                          expected: list[str]) -> None:
    assert invalidated_uris(method, status, "https://a.test/items", resp) == expected


async def test_memory_store_never_exceeds_its_budget() -> None:
    from plugins.cache.store import Entry, MemoryStore

    store = MemoryStore(50_000)
    for i in range(100):
        entry = Entry(200, "OK", [("Content-Type", "text/plain")], b"x" * (i * 97 % 9000),
                      0.0, 0.0)
        await store.put(f"h/{i}", "", entry, 60)
        assert store.used <= store.max_bytes
    assert await store.get("h/99", lambda vary: "") is not None  # recent ones stay
    assert await store.get("h/1", lambda vary: "") is None  # old ones went first
    assert store.used == sum(e.size for e in store._entries.values())


@pytest.mark.parametrize(("resp", "lifetime"), [
    # §5.3: an invalid Expires, or more than one, means already expired
    ([("Expires", "Sun, 06 Nov 2094 08:49:37 UTC"), ("Date", date())], 0.0),
    ([("Expires", date(600)), ("Expires", date(600)), ("Date", date())], 0.0),
    # §4.2.3: no valid Date -> the time of receipt, not "stale at once"
    ([("Expires", date(600)), ("Date", "yesterday")], 600.0),
    # RFC 9213 §2.2: a targeted field replaces Cache-Control and Expires ...
    ([("CDN-Cache-Control", "max-age=300"), ("Cache-Control", "max-age=5"),
      ("Expires", date(9)), ("Date", date())], 300.0),
    # ... and an empty one is skipped
    ([("CDN-Cache-Control", ""), ("Cache-Control", "max-age=5")], 5.0),
])
def test_freshness_rules(resp: list[tuple[str, str]], lifetime: float) -> None:
    got = freshness_lifetime(CIMultiDict(resp), targeted=("CDN-Cache-Control",),
                             received=NOW)
    assert got.lifetime == lifetime


@pytest.mark.parametrize(("resp", "expected"), [
    # RFC 9213: CDN-Cache-Control decides storing for this cache
    ([("CDN-Cache-Control", "no-store"), ("Cache-Control", "max-age=60")],
     (False, "no-store")),
    ([("CDN-Cache-Control", "max-age=60"), ("Cache-Control", "no-store")], (True, "")),
    ([("CDN-Cache-Control", "max-age=60"), ("Cache-Control", "private")], (True, "")),
])
def test_targeted_cache_control_decides_storing(resp: list[tuple[str, str]],
                                                 expected: tuple[bool, str]) -> None:
    assert storable("GET", 200, {}, CIMultiDict(resp),
                    targeted=("Bascule-Cache-Control", "CDN-Cache-Control")) == expected


@pytest.mark.parametrize("method", ["PUT", "PATCH", "M-SEARCH", "PURGE", "LOCK"])
def test_every_method_not_known_safe_invalidates(method: str) -> None:
    """§4.4 (RFC 9110 §9.2.1): unsafe methods and methods of unknown safety."""
    assert invalidated_uris(method, 200, "https://a.test/x", {}) == ["https://a.test/x"]


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "TRACE"])
def test_safe_methods_do_not_invalidate(method: str) -> None:
    assert invalidated_uris(method, 200, "https://a.test/x", {}) == []


def test_vary_over_several_lines_keys_every_named_field() -> None:
    """RFC 9110 §5.3: Vary field lines combine."""
    resp = CIMultiDict([("Vary", "Accept-Encoding"), ("Vary", "Accept-Language")])
    assert vary_key(resp, [("Accept-Encoding", "gzip"), ("Accept-Language", "fr")]) == (
        "accept-encoding:gzip\naccept-language:fr")
