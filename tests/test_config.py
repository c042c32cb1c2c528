"""Config validation: every problem named as `FILE: key.path: message`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.app import build_runtime
from proxy.config import load_config, parse_config
from proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

GOOD = {
    "routes": [{"upstream": "api"}],
    "upstreams": {"api": {"backends": ["127.0.0.1:9001", {"address": "127.0.0.1:9002",
                                                          "weight": 3}]}},
}


def problems(data: dict[str, object]) -> list[str]:
    try:
        build_runtime(parse_config(data, "f.toml"), "f.toml")
    except ConfigError as exc:
        return [str(p) for p in exc.problems]
    return []


def test_good_config_has_defaults() -> None:
    config = parse_config(GOOD, "f.toml")
    assert config.server.listen == ["127.0.0.1:8080"]
    assert config.server.graceful_timeout == 30.0
    assert config.server.max_body_size == 100 * 1024 * 1024
    assert config.upstreams["api"].backends[1].weight == 3
    assert config.upstreams["api"].timeouts.connect == 3.0
    assert config.routes[0].pass_host is True


@pytest.mark.parametrize(("patch", "expected"), [
    ({"server": {"workrs": 2}}, "f.toml: server.workrs: unknown key (typo?)"),
    ({"server": {"graceful_timeout": 5}},
     'f.toml: server.graceful_timeout: must be a duration string like "5s" or "250ms", got 5'),
    ({"server": {"max_body_size": "1XB"}}, "f.toml: server.max_body_size: must be a size"),
    ({"server": {"trusted_proxies": ["10.0.0.0/8", "nope"]}},
     "f.toml: server.trusted_proxies: 'nope' is not an IP address or CIDR"),
    ({"server": {"workers": 0}}, 'f.toml: server.workers: must be 1-256 or "auto"'),
    ({"routes": [{"upstream": "nope"}]},
     "f.toml: routes[0].upstream: upstream 'nope' is not defined (defined: api)"),
    ({"routes": [{"upstream": "api"}, {"upstream": "api", "path_prefix": "/"}]},
     "f.toml: routes[1]: duplicate route: same host and path_prefix as routes[0]"),
    ({"routes": [{"upstream": "api", "path_prefix": "api"}]},
     'f.toml: routes[0].path_prefix: must start with "/"'),
    ({"routes": [{"upstream": "api", "host": "a*.example.com"}]}, "f.toml: routes[0].host:"),
    ({"upstreams": {"api": {"backends": ["127.0.0.1:99999"]}}},
     "f.toml: upstreams.api.backends[0].address: port must be 1-65535"),
    ({"upstreams": {"api": {"backends": ["nohost"]}}},
     'f.toml: upstreams.api.backends[0].address: must be "host:port"'),
    ({"upstreams": {"api": {"backends": [{"address": "127.0.0.1:1", "weight": 0}]}}},
     "f.toml: upstreams.api.backends[0].weight:"),
    ({"upstreams": {"api": {"backends": ["127.0.0.1:1", "127.0.0.1:1"]}}},
     "f.toml: upstreams.api.backends: backend '127.0.0.1:1' is listed twice"),
    ({"upstreams": {"api": {"backends": []}}}, "f.toml: upstreams.api.backends:"),
    ({"upstreams": {"api": {"backends": ["127.0.0.1:1"], "timeouts": {"connect": "3x"}}}},
     "f.toml: upstreams.api.timeouts.connect: must be a duration"),
    ({"upstreams": {"api": {"backends": ["127.0.0.1:1"], "strategy": "nope"}}},
     "f.toml: upstreams.api.strategy: unknown strategy 'nope' (available: "),
    ({"upstreams": {"api": {"backends": ["127.0.0.1:1"], "strategy_options": {"vnodes": 3}}}},
     "f.toml: upstreams.api.strategy_options.vnodes: unknown option"),
    ({"upstreams": {"api": {"backends": ["127.0.0.1:1"], "strategy": "consistent_hash",
                            "strategy_options": {"vnodes": 0}}}},
     "f.toml: upstreams.api.strategy_options.vnodes: must be >= 1"),
    ({"upstreams": {"api": {"backends": ["127.0.0.1:1"], "strategy": "consistent_hash",
                            "strategy_options": {"hash_on": "cookies:x"}}}},
     "f.toml: upstreams.api.strategy_options.hash_on: must be"),
    ({"upstreams": {"api": {"backends": ["127.0.0.1:1"], "strategy": "least_connections",
                            "strategy_options": {"choices": "two"}}}},
     "f.toml: upstreams.api.strategy_options.choices: must be an integer"),
    ({"upstreams": {"api": {"backends": ["127.0.0.1:1"], "strategy": "no.such.mod:X"}}},
     "f.toml: upstreams.api.strategy: cannot import 'no.such.mod'"),
])
def test_problem_is_named_with_key_path(patch: dict[str, object], expected: str) -> None:
    found = problems({**GOOD, **patch})
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_is_reported_at_once() -> None:
    found = problems({"server": {"workrs": 1, "listen": ["nope"]}, "routes": [],
                      "upstreams": {}})
    assert len(found) == 4, found


def test_toml_syntax_error_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value).startswith(f"{bad}: invalid TOML")


def test_shipped_configs_are_valid(tmp_path: Path) -> None:
    examples = sorted((ROOT / "config" / "examples").glob("*.toml"))
    files = [ROOT / "config" / "bascule.toml", *examples]
    assert len(files) > 1
    for file in files:
        if file.name == "tls.toml":
            file = _with_certificates(file, tmp_path)
        elif file.name == "access.toml":
            file = _with_htpasswd(file, tmp_path)
        elif file.name == "balancing.toml":
            key = tmp_path / "sticky.key"
            key.write_text("a-secret-of-at-least-16-bytes\n")
            copy = tmp_path / "balancing.toml"
            copy.write_text(file.read_text().replace("/etc/bascule/sticky.key", str(key)))
            file = copy
        build_runtime(load_config(file), str(file))


def _with_htpasswd(example: Path, directory: Path) -> Path:
    """The access example with the htpasswd file it names."""
    import bcrypt

    users = directory / "staff.htpasswd"
    users.write_text(f"ana:{bcrypt.hashpw(b'pw', bcrypt.gensalt(4)).decode()}\n")
    copy = directory / "access.toml"
    copy.write_text(example.read_text().replace("/etc/bascule/staff.htpasswd", str(users)))
    return copy


def _with_certificates(example: Path, directory: Path) -> Path:
    """The TLS example with the files it names made by a private CA."""
    from tests.tls.pki import Pki

    pki = Pki(directory)
    for stem, names, password in [("example.com", ["example.com"], None),
                                  ("wildcard.example.com", ["*.example.com"], b"pw"),
                                  ("bascule-client", ["bascule.internal"], None)]:
        pki.issue(*names, stem=stem, password=password)
    (directory / "wildcard.pass").write_text("pw\n")
    (directory / "internal-ca.pem").write_bytes(pki.ca_file.read_bytes())
    copy = directory / "tls.toml"
    copy.write_text(example.read_text().replace("/etc/bascule/tls/", f"{directory}/"))
    return copy


def run_check(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "check", *map(str, files)],
                          capture_output=True, text=True, timeout=60)


def test_check_command_ok_and_errors(tmp_path: Path) -> None:
    good = ROOT / "config" / "bascule.toml"
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nlisten = ["127.0.0.1:8080"]\nworkrs = 2\n'
                   '[[routes]]\nupstream = "missing"\n'
                   '[upstreams.api]\nbackends = ["127.0.0.1:1"]\n')
    ok = run_check(good)
    assert ok.returncode == 0 and ok.stdout.strip() == f"ok: {good}"
    res = run_check(good, bad)
    assert res.returncode == 2
    assert res.stdout.splitlines() == [
        f"ok: {good}",
        f"{bad}: server.workrs: unknown key (typo?)",
        f"{bad}: routes[0].upstream: upstream 'missing' is not defined (defined: api)",
    ]


def test_run_with_bad_config_exits_2_naming_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[routes]]\nupstream = "x"\n[upstreams.x]\nbackends = ["h:0"]\n')
    res = subprocess.run([sys.executable, "-m", "proxy", "run", "-c", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert f"{bad}: upstreams.x.backends[0].address: port must be 1-65535" in res.stderr


@pytest.mark.parametrize(("server", "admin", "expected"), [
    (["127.0.0.1:8080"], "127.0.0.1:8080",
     "f.toml: admin.listen: '127.0.0.1:8080' overlaps server.listen[0] ('127.0.0.1:8080'): "
     "the admin listener never shares a port with traffic"),
    (["0.0.0.0:8080"], "127.0.0.1:8080",
     "f.toml: admin.listen: '127.0.0.1:8080' overlaps server.listen[0] ('0.0.0.0:8080'): "
     "the admin listener never shares a port with traffic"),
    (["127.0.0.1:8080", "[::1]:8081"], "[::]:8081",
     "f.toml: admin.listen: '[::]:8081' overlaps server.listen[1] ('[::1]:8081'): "
     "the admin listener never shares a port with traffic"),
    (["127.0.0.1:8080", "127.0.0.1:8080"], "127.0.0.1:9901",
     "f.toml: server.listen[1]: '127.0.0.1:8080' is listed twice"),
])
def test_listen_addresses_never_overlap(server: list[str], admin: str, expected: str) -> None:
    assert problems({**GOOD, "server": {"listen": server}, "admin": {"listen": admin}}) == [
        expected]


def test_admin_on_another_port_of_the_same_host_is_fine() -> None:
    assert problems({**GOOD, "server": {"listen": ["0.0.0.0:8080"]},
                     "admin": {"listen": "127.0.0.1:9901"}}) == []


@pytest.mark.parametrize("prefix", ["/a/../b", "/a//b", "/%61pi", "/a;b", "/a\\b"])
def test_path_prefix_must_be_normalised(prefix: str) -> None:
    [problem] = problems({**GOOD, "routes": [{"upstream": "api", "path_prefix": prefix}]})
    assert problem.startswith("f.toml: routes[0].path_prefix: must be a normalised path")


def test_a_cache_table_beside_a_cache_plugin_entry_is_reported() -> None:
    data = {**GOOD, "cache": {"memory_max_size": "1MiB"},
            "plugins": [{"name": "cache", "use": "cache"}]}
    assert problems(data) == [
        "f.toml: cache: unused: [[plugins]] already defines a plugin named 'cache'"]
