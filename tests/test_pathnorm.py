"""Path readings and route matching on them (pure): no spelling of a protected prefix
routes anywhere else."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import AmbiguousPath
from proxy.pathnorm import decoded, no_params, normal_form, readings, remove_dot_segments, rfc3986
from proxy.routing import Route, RouteTable

ADMIN = Route("admin", "private", path_prefix="/admin")
PUBLIC = Route("public", "app", path_prefix="/")
TABLE = RouteTable([ADMIN, PUBLIC])


@pytest.mark.parametrize(("path", "expected"), [
    ("/a/b/c/./../../g", "/a/g"),  # RFC 3986 §5.4.2 examples
    ("/mid/content=5/../6", "/mid/6"),
    ("/..", "/"), ("/../..", "/"), ("/.", "/"), ("/a/..", "/"), ("/a/.", "/a/"),
    ("/a/b/..", "/a/"), ("/a//b", "/a//b"), ("/", "/"),
])
def test_remove_dot_segments(path: str, expected: str) -> None:
    assert remove_dot_segments(path) == expected


@pytest.mark.parametrize(("path", "strict", "loose", "params"), [
    ("/%61dmin/x", "/admin/x", "/admin/x", "/admin/x"),
    ("/%2e%2E/admin", "/admin", "/admin", "/admin"),
    ("/a%2fb", "/a%2Fb", "/a/b", "/a%2Fb"),
    ("//admin/x", "//admin/x", "/admin/x", "//admin/x"),
    ("/public/..;/admin", "/public/..;/admin", "/public/..;/admin", "/admin"),
    ("/a\\..\\admin", "/a\\..\\admin", "/admin", "/a\\..\\admin"),
])
def test_readings(path: str, strict: str, loose: str, params: str) -> None:
    assert (rfc3986(path), decoded(path), no_params(path)) == (strict, loose, params)


def test_plain_paths_have_one_reading_and_keep_their_bytes() -> None:
    assert readings("/api/v1/users") == ("/api/v1/users",)
    assert normal_form("/api/v1/users") == "/api/v1/users"
    assert normal_form("/a/./b//c/%7euser") == "/a/b/c/~user"


@pytest.mark.parametrize("path", [
    "/admin/x", "/%61dmin/x", "/public/../admin/x", "/./admin/x", "/%2e/admin/x",
    "/x/%2E%2E/admin/x", "/admin;jsessionid=1/x", "/admin/./x", "/public/./../admin",
])
def test_spellings_of_admin_reach_admin(path: str) -> None:
    assert TABLE.match("", path) is ADMIN


@pytest.mark.parametrize("path", [
    "//admin/x", "/public/..%2fadmin/x", "/public/..;/admin/x", "/public\\..\\admin/x",
    "/admin/..%2Fpublic", "/admin//../x", "/%2fadmin/x",
])
def test_spellings_that_readings_route_apart_are_refused(path: str) -> None:
    with pytest.raises(AmbiguousPath):
        TABLE.match("", path)


def test_paths_that_only_look_odd_still_route() -> None:
    assert TABLE.match("", "/api//v1") is PUBLIC  # every reading stays public
    assert TABLE.match("", "/files/a%2Fb") is PUBLIC
    assert TABLE.match("", "/search;q=1") is PUBLIC


# Ways to spell one segment separator or character of "/admin/x".
def _spell_char(c: str) -> st.SearchStrategy[str]:
    options = [st.just(c), st.just(f"%{ord(c):02x}"), st.just(f"%{ord(c):02X}")]
    return st.one_of(*options)


_NOISE = st.sampled_from(["", "./", "x/../", "../", ".;/", "%2e/", "a/%2e%2e/", "/", "\\",
                          "x%2f..%2f", ";p/", "x/..;/"])


@st.composite
def admin_spellings(draw: st.DrawFn) -> str:
    out = "/"
    for segment in ("admin", "x"):
        out += draw(_NOISE)
        out += "".join(draw(_spell_char(c)) for c in segment)
        out += "/"
    return out


@settings(max_examples=500, deadline=None)
@given(admin_spellings())
def test_no_spelling_of_the_protected_prefix_routes_elsewhere(path: str) -> None:
    """Whatever the spelling, a backend reading it as /admin/... only gets it through
    the admin route: either some reading is outside /admin (then they disagree and
    it is refused, or all are outside and it is not an /admin path to anyone), or
    the route is admin."""
    views = [rfc3986(path), decoded(path), no_params(path)]
    reaches_admin = any(v.startswith("/admin") for v in views)
    try:
        route = TABLE.match("", path)
    except AmbiguousPath:
        return
    if reaches_admin:
        assert route is ADMIN, (path, views)
