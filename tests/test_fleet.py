"""Fleet-wide least connections (`shared = "redis"`): three Bascule instances and one
slow backend. With local counts only, each instance (one client each, so it never
sees more than its own request in flight) spreads evenly and the slow backend keeps
a third of the requests; with the fleet's counts, an instance sees the others'
requests piling up on the slow backend and sends elsewhere. Redis going away falls
back to local counts (shown in /status) and coming back restores the fleet's."""

from __future__ import annotations

import http.client
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import CountingBackend, free_port, poll, run_bascule, wait_port
from tests.redis_servers import RedisServer

pytestmark = pytest.mark.slow
REQUESTS = 45  # per instance


def instance_config(tmp_path: Path, name: str, backends: list[CountingBackend],
                    options: str, redis_url: str) -> tuple[Path, int, int]:
    port, admin = free_port(), free_port()
    ids = ", ".join(f'"{b.id}"' for b in backends)
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
workers = 1
access_log = "off"
[admin]
listen = "127.0.0.1:{admin}"
[redis]
url = "{redis_url}"
timeout = "200ms"
[[routes]]
upstream = "app"
[upstreams.app]
backends = [{ids}]
strategy = "least_connections"
strategy_options = {{ {options} }}
""")
    return path, port, admin


def run_fleet(tmp_path: Path, procs: list[Any], backends: list[CountingBackend],
              options: str, redis_url: str, label: str) -> float:
    """The slow backend's share of 3 x REQUESTS requests, one client per instance."""
    instances = []
    for i in range(3):
        path, port, admin = instance_config(tmp_path, f"{label}{i}", backends, options,
                                            redis_url)
        proc = run_bascule(path)
        procs.append(proc)
        instances.append((proc, port, admin))
    try:
        for _, port, admin in instances:
            wait_port(port)
            wait_port(admin)
        for backend in backends:
            backend.hits.clear()
        failures: list[str] = []

        def client(port: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            for _ in range(REQUESTS):
                conn.request("GET", "/")
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    failures.append(str(response.status))
            conn.close()

        threads = [threading.Thread(target=client, args=(port,)) for _, port, _ in instances]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert failures == []
        total = sum(b.hits["/"] for b in backends)
        assert total == 3 * REQUESTS
        return backends[0].hits["/"] / total
    finally:
        for proc, _, _ in instances:
            proc.terminate()
        for proc, _, _ in instances:
            proc.wait(15)


def status(admin: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
    conn.request("GET", "/status")
    document: dict[str, Any] = json.loads(conn.getresponse().read())
    conn.close()
    return document


def test_the_slow_backend_gets_less_with_the_fleets_counts(
        tmp_path: Path, procs: list[Any], redis_server: RedisServer) -> None:
    backends = [CountingBackend("slow", delay=0.2), CountingBackend("fast1"),
                CountingBackend("fast2")]
    try:
        local = run_fleet(tmp_path, procs, backends, "", redis_server.url, "local")
        fleet = run_fleet(tmp_path, procs, backends,
                          'shared = "redis", shared_interval = "50ms"', redis_server.url,
                          "fleet")
    finally:
        for backend in backends:
            backend.stop()
    print(f"slow backend's share: local counts {local:.1%}, fleet counts {fleet:.1%}")
    assert 0.25 <= local <= 0.42  # even spread: each instance sees only itself
    assert fleet < local * 0.7, (local, fleet)


def test_redis_down_falls_back_to_local_counts_and_recovers(
        tmp_path: Path, procs: list[Any], redis_server: RedisServer) -> None:
    backends = [CountingBackend("a"), CountingBackend("b")]
    try:
        path, port, admin = instance_config(tmp_path, "one", backends,
                                            'shared = "redis", shared_interval = "50ms"',
                                            redis_server.url)
        proc = run_bascule(path)
        procs.append(proc)
        wait_port(port)
        wait_port(admin)

        def fleet_state() -> str:
            return str(status(admin)["upstreams"]["app"]["fleet"]["state"])
        assert poll(lambda: fleet_state() == "fleet", 10)
        redis_server.kill()
        assert poll(lambda: fleet_state() == "local", 10)
        assert status(admin)["upstreams"]["app"]["fleet"]["error"]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for _ in range(10):  # still served, on local counts
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
        conn.close()
        redis_server.start()
        assert poll(lambda: fleet_state() == "fleet", 10)
        proc.terminate()
        proc.wait(15)
        output = proc.stdout.read().decode() if proc.stdout else ""
        assert output.count("cannot share in-flight counts through Redis") == 1, output
        assert "fleet counts from Redis again" in output
    finally:
        for backend in backends:
            backend.stop()
