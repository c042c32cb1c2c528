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


def test_the_engine_reads_hash_on_from_the_upstream_config() -> None:
    """A third-party strategy that accepts any option still gets a valid hash_on: the
    engine parses it from the upstream's config, not from a strategy attribute."""
    from proxy.app import build_runtime
    from proxy.config import parse_config
    from proxy.errors import ConfigError

    def runtime(options: dict[str, object]) -> object:
        return build_runtime(parse_config({
            "routes": [{"upstream": "a"}],
            "upstreams": {"a": {"backends": ["127.0.0.1:1"],
                                "strategy": "tests.test_hashkey:AnyOptions",
                                "strategy_options": options}}}, "f.toml"), "f.toml")

    built = runtime({"hash_on": "header:X-User"})
    assert str(built.upstreams["a"].hash_on) == "header:X-User"  # type: ignore[attr-defined]
    assert str(runtime({}).upstreams["a"].hash_on) == "client_ip"  # type: ignore[attr-defined]
    try:
        runtime({"hash_on": "nonsense"})
    except ConfigError as exc:
        [problem] = exc.problems
        assert str(problem).startswith("f.toml: upstreams.a.strategy_options.hash_on: must be")
    else:
        raise AssertionError("a bad hash_on passed")


class AnyOptions:
    """A strategy that takes any options (round robin over what it is given)."""

    def __init__(self, options: dict[str, object]) -> None:
        self.backends: list[object] = []

    def update(self, backends: list[object]) -> None:
        self.backends = list(backends)

    def pick(self, ctx: object) -> object:
        return self.backends[0]
