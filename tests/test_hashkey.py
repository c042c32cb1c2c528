from __future__ import annotations

import pytest

from proxy.hashkey import parse_hash_on

HEADERS = {"X-User-Id": "u42", "Cookie": "a=1; session=abc; b=2"}


@pytest.mark.parametrize(("spec", "target", "key"), [
    ("client_ip", "/p", "192.0.2.1"),
    ("header:X-User-Id", "/p", "u42"),
    ("header:X-Missing", "/p", None),
    ("cookie:session", "/p", "abc"),
    ("cookie:missing", "/p", None),
    ("query:id", "/p?x=1&id=7&y", "7"),
    ("query:y", "/p?x=1&id=7&y", ""),
    ("query:id", "/p", None),
    ("path", "/a/b?q=1", "/a/b"),
])
def test_extract(spec: str, target: str, key: str | None) -> None:
    assert parse_hash_on(spec).extract(HEADERS, target, "192.0.2.1") == key


@pytest.mark.parametrize("spec", ["ip", "header:", "cookie", "query: ", 3, "path:x"])
def test_bad_specs(spec: object) -> None:
    with pytest.raises(ValueError, match="hash_on: "):
        parse_hash_on(spec)
