"""Consul health entries → backends (pure; table-driven)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.discovery.consul_entries import ConsulEntryError, backends_from_entries


def entry(service_id: str = "web-1", *, node_address: str = "10.0.0.1",
          service_address: str = "", port: int = 8080, status: str = "passing",
          weights: dict[str, int] | None = None, extra_checks: list[dict[str, Any]] = (),  # type: ignore[assignment]
          tagged: dict[str, Any] | None = None,
          node_tagged: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "Node": {"Node": "node-a", "Address": node_address,
                 "TaggedAddresses": node_tagged or {}},
        "Service": {"ID": service_id, "Service": "web", "Address": service_address,
                    "Port": port, "Weights": weights or {"Passing": 1, "Warning": 1},
                    "TaggedAddresses": tagged or {}},
        "Checks": [{"CheckID": "serfHealth", "Status": "passing"},
                   {"CheckID": f"service:{service_id}", "Status": status}, *extra_checks],
    }


def addresses(entries: list[dict[str, Any]], **kw: Any) -> list[tuple[str, str, int, int]]:
    return [(b.id, b.host, b.port, b.weight) for b in backends_from_entries(entries, **kw)]


def test_service_address_falls_back_to_node_address() -> None:
    assert addresses([entry()]) == [("node-a/web-1", "10.0.0.1", 8080, 1)]
    assert addresses([entry(service_address="10.9.9.9")]) == [
        ("node-a/web-1", "10.9.9.9", 8080, 1)]


@pytest.mark.parametrize(("policy", "host", "port"), [
    ("service", "10.9.9.9", 8080),
    ("node", "10.0.0.1", 8080),
    ("lan_ipv4", "192.168.1.5", 9090),       # the service's tagged address, with its port
    ("wan", "203.0.113.7", 8080),             # the node's tagged address
    ("wan_ipv6", "10.9.9.9", 8080),           # unknown tag: as "service"
])
def test_address_policies(policy: str, host: str, port: int) -> None:
    e = entry(service_address="10.9.9.9",
              tagged={"lan_ipv4": {"Address": "192.168.1.5", "Port": 9090}},
              node_tagged={"wan": "203.0.113.7"})
    assert addresses([e], address=policy) == [("node-a/web-1", host, port, 1)]


@pytest.mark.parametrize(("status", "passing_only", "expected"), [
    ("passing", True, [("node-a/web-1", "10.0.0.1", 8080, 5)]),
    ("warning", True, []),
    ("warning", False, [("node-a/web-1", "10.0.0.1", 8080, 2)]),
    ("critical", False, []),
    ("bogus", False, []),
])
def test_status_and_weights(status: str, passing_only: bool,
                            expected: list[tuple[str, str, int, int]]) -> None:
    e = entry(status=status, weights={"Passing": 5, "Warning": 2})
    assert addresses([e], passing_only=passing_only) == expected


@pytest.mark.parametrize("check_id", ["_node_maintenance", "_service_maintenance:web-1"])
def test_maintenance_is_excluded(check_id: str) -> None:
    e = entry(extra_checks=[{"CheckID": check_id, "Status": "critical"}])
    assert addresses([e], passing_only=False) == []


def test_zero_weight_gets_no_traffic_and_order_is_stable() -> None:
    entries = [entry("web-2"), entry("web-1"), entry("web-3", weights={"Passing": 0})]
    assert [a[0] for a in addresses(entries)] == ["node-a/web-1", "node-a/web-2"]


@pytest.mark.parametrize("bad", [
    {"not": "a list"}, [1], [{"Node": {}}], [entry(port=0)],
    [entry(node_address="")],
])
def test_malformed_answers_raise(bad: Any) -> None:
    with pytest.raises(ConsulEntryError):
        backends_from_entries(bad)
