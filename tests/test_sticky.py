"""Sticky sessions: a signed cookie pins a client to a backend across workers and
instances sharing the secret; forged and stale cookies are replaced; a pinned
backend going down moves the client and re-pins it."""

from __future__ import annotations

import http.client
import re
from pathlib import Path
from typing import Any

import pytest

from proxy.config import StickyConfig
from proxy.models import Backend
from proxy.sticky import StickySessions
from tests.helpers import CountingBackend, app_config_file, poll, run_bascule, wait_port

SECRET = "s3cret-shared-by-the-fleet-0123456789"


def get(port: int, cookie: str | None = None) -> tuple[str, str | None]:
    """(backend name, the pin cookie's new value or None), on a fresh connection (so
    successive calls reach either worker)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Cookie": f"theme=dark; pin={cookie}"}
                     if cookie else {})
        response = conn.getresponse()
        body = response.read().decode()
        assert response.status == 200, (response.status, body)
        set_cookie = response.getheader("Set-Cookie")
    finally:
        conn.close()
    if set_cookie is None:
        return body, None
    match = re.match(r"pin=([A-Za-z0-9_-]+); ", set_cookie)
    assert match, set_cookie
    return body, match.group(1)


def bascule_config(tmp_path: Path, name: str, backends: list[CountingBackend]
                   ) -> tuple[Path, int, int]:
    secret = tmp_path / "sticky.key"
    secret.write_text(SECRET)
    return app_config_file(tmp_path / f"{name}.toml", [b.id for b in backends], workers=2,
                           upstream=f"""strategy = "least_connections"
sticky = {{ cookie = "pin", secret_file = "{secret}", max_age = "1h" }}
[upstreams.app.health]
path = "/health"
interval = "0.3s"
timeout = "0.5s"
jitter = "0.05s"
fall = 1
rise = 1
""")


@pytest.mark.slow
def test_pins_hold_across_workers_and_instances_and_move_when_the_backend_dies(
        tmp_path: Path, procs: list[Any]) -> None:
    backends = [CountingBackend(f"b{i}") for i in range(3)]
    try:
        ports = []
        for name in ("one", "two"):
            path, port, admin = bascule_config(tmp_path, name, backends)
            procs.append(run_bascule(path))
            ports.append((port, admin))
        for port, admin in ports:
            wait_port(port)
            wait_port(admin)
        one, two = ports[0][0], ports[1][0]

        # the first answer pins; the same cookie then holds in every worker of both
        # instances, and the answers set no new cookie
        pinned_to, pin = get(one)
        assert pin is not None
        for i in range(16):
            assert get(one if i % 2 else two, pin) == (pinned_to, None)

        # a forged value (or one made with another secret) is replaced by a real pin
        served, forged_repin = get(two, "AAAAAAAAAAAAAAAAAAAAAA")
        assert forged_repin is not None and forged_repin != "AAAAAAAAAAAAAAAAAAAAAA"
        assert get(one, forged_repin) == (served, None)  # and that one holds

        # the pinned backend dies: the client moves, gets a new pin, and stays there
        next(b for b in backends if b.name == pinned_to).stop()

        def moved() -> bool:
            body, repin = get(one, pin)
            return body != pinned_to and repin is not None
        assert poll(moved, 10)
        moved_to, new_pin = get(two, pin)
        assert moved_to != pinned_to and new_pin not in (None, pin)
        for i in range(6):
            assert get(one if i % 2 else two, new_pin) == (moved_to, None)

        def counted() -> bool:
            # /metrics sums both workers' files; each worker flushes once a second
            conn = http.client.HTTPConnection("127.0.0.1", ports[0][1], timeout=5)
            conn.request("GET", "/metrics")
            exposition = conn.getresponse().read().decode()
            conn.close()
            return all(f'bascule_sticky_sessions_total{{result="{result}",upstream="app"}}'
                       in exposition for result in ("hit", "repin", "new"))
        assert poll(counted, 5)
    finally:
        for backend in backends:
            backend.stop()


def sticky(**overrides: Any) -> StickySessions:
    return StickySessions(StickyConfig.model_validate(
        {"cookie": "pin", "secret": SECRET, **overrides}))


def test_the_cookie_carries_no_address_and_its_attributes_are_as_configured() -> None:
    pins = sticky(max_age="2h", same_site="Strict")
    backend = Backend("10.0.0.7:8080", "10.0.0.7", 8080)
    pins.update([backend])
    line = pins.answered(None, backend, tls=False).decode()
    assert line.startswith("Set-Cookie: pin=") and line.endswith("\r\n")
    assert "10.0.0.7" not in line and "8080" not in line
    assert "; Path=/; Max-Age=7200; SameSite=Strict; HttpOnly" in line
    assert "Secure" not in line
    assert "; Secure" in pins.answered(None, backend, tls=True).decode()  # secure = "auto"
    assert "Secure" not in sticky(secure=False).answered(None, backend, tls=True).decode()
    # browsers refuse SameSite=None without Secure, so it always has it
    assert "; Secure" in sticky(same_site="None").answered(None, backend, tls=False).decode()
    assert pins.counts == {"hit": 0, "repin": 0, "new": 2}
    token = pins.token_of[backend.id]
    assert pins.answered(token, backend, tls=False) == b"" and pins.counts["hit"] == 1


def test_a_pin_is_the_backend_identity_signed_with_the_secret() -> None:
    # a Consul instance keeps its pin when it moves address: the id is what is signed
    pins = sticky()
    before = Backend("web-1", "10.0.0.1", 8080)
    pins.update([before])
    token = pins.token_of["web-1"]
    moved = Backend("web-1", "10.0.0.9", 9090)
    pins.update([moved])
    assert pins.token_of["web-1"] == token and pins.by_token[token] is moved
    # the same secret gives the same pin everywhere; another secret, another pin
    assert sticky().token("web-1") == token
    assert sticky(secret="another-secret-0123456789").token("web-1") != token


def test_a_sticky_config_needs_one_secret() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="secret_file or secret"):
        StickyConfig.model_validate({"cookie": "pin"})
    with pytest.raises(ValidationError):
        StickyConfig.model_validate({"cookie": "bad name", "secret": SECRET})
