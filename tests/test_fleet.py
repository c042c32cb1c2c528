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

from tests.helpers import (
    CountingBackend,
    app_config_file,
    eventually,
    poll,
    run_bascule,
    wait_port,
)
from tests.redis_servers import RedisServer

REQUESTS = 45  # per instance


def instance_config(tmp_path: Path, name: str, backends: list[CountingBackend],
                    options: str, redis_url: str) -> tuple[Path, int, int]:
    return app_config_file(
        tmp_path / f"{name}.toml", [b.id for b in backends],
        tables=f'[redis]\nurl = "{redis_url}"\ntimeout = "200ms"',
        upstream=f'strategy = "least_connections"\nstrategy_options = {{ {options} }}')


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


@pytest.mark.slow
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


@pytest.mark.slow
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


class _Balancer:
    def __init__(self, *ids: str) -> None:
        from proxy.models import Backend

        self.backends = [Backend(i, "127.0.0.1", 1) for i in ids]


@pytest.mark.parametrize("kind", ["single", "cluster"])
async def test_members_see_each_others_counts_and_a_silent_member_vanishes(
        kind: str, redis_server: RedisServer, redis_cluster: Any) -> None:
    """The protocol itself, on one Redis and on a Redis Cluster (the keys share the
    upstream's hash tag): each member reads the others' counts, not its own, and a
    member that stops publishing drops out after three intervals."""
    from proxy.config import RedisConfig
    from proxy.fleet import FleetCounts

    config = RedisConfig(url=redis_cluster.url if kind == "cluster" else redis_server.url,
                         cluster=kind == "cluster", timeout="1s")
    one, two = _Balancer("a", "b"), _Balancer("a", "b")
    first = FleetCounts("app", one, config, interval=0.1)
    second = FleetCounts("app", two, config, interval=0.1)
    first.start()  # its background loop publishes every 100 ms
    second.start()
    try:
        one.backends[0].inflight = 3
        two.backends[0].inflight, two.backends[1].inflight = 1, 2

        async def both_see_the_other() -> bool:
            return ([b.fleet_inflight for b in one.backends] == [1, 2]
                    and [b.fleet_inflight for b in two.backends] == [3, 0])
        await eventually(both_see_the_other)
        assert first.shared_now and first.members == 2
        await second.close()  # leaves the member set at once
        second = None

        async def alone() -> bool:
            return [b.fleet_inflight for b in one.backends] == [0, 0] and first.members == 1
        await eventually(alone)
    finally:
        await first.close()
        if second is not None:
            await second.close()
