"""Turning Consul `/v1/health/service/<name>` entries into backends (pure).

Follows Consul's documented entry shape (api-docs/health#list-service-instances-for-
service): each entry has `Node` (Node, Address, TaggedAddresses), `Service` (ID,
Service, Tags, Address, Port, Weights, TaggedAddresses) and `Checks`.

- Status: the worst of the entry's checks (critical < warning < passing).
  Critical is excluded; warning only when `passing_only = false`.
- Maintenance: a node or service in maintenance mode carries the critical check
  `_node_maintenance` or `_service_maintenance:<service id>` (agent/maintenance
  docs); such entries are excluded whatever `passing_only` says.
- Weight: `Service.Weights.Passing` or `.Warning` by status (Consul's defaults are 1
  and 1); weight 0 means no traffic.
- Address: `service` = Service.Address, falling back to Node.Address when empty (the
  service inherits its node's address; Traefik #275/#5811 missed this); `node` =
  Node.Address; any other name is a tagged address (`lan_ipv4`, `wan`, ...) looked
  up in Service.TaggedAddresses, then Node.TaggedAddresses, then as `service`.
- Identity: "<node>/<service id>", the same on every Bascule instance, so consistent
  hashing places it the same way everywhere.
- TLS per instance: the tag `proto=https` or the service meta `proto = "https"`
  (fabio's convention) makes Bascule speak HTTPS to that instance, with the
  upstream's `tls` settings (or verification against the system CAs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from proxy.models import Backend

__all__ = ["ConsulEntryError", "backends_from_entries", "same_backends"]

_RANK = {"passing": 0, "warning": 1, "critical": 2, "maintenance": 2}


class ConsulEntryError(ValueError):
    """The answer does not have the documented shape."""


def _status(entry: dict[str, Any], service_id: str) -> str:
    worst = "passing"
    for check in entry.get("Checks") or ():
        if not isinstance(check, dict):
            raise ConsulEntryError("a check is not an object")
        check_id = str(check.get("CheckID", ""))
        if check_id == "_node_maintenance" or check_id == f"_service_maintenance:{service_id}":
            return "maintenance"
        status = str(check.get("Status", "critical"))
        if _RANK.get(status, 2) > _RANK[worst]:
            worst = status if status in _RANK else "critical"
    return worst


def _address(node: dict[str, Any], service: dict[str, Any], policy: str) -> tuple[str, int]:
    port = service.get("Port")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ConsulEntryError(f"service {service.get('ID')!r} has no valid Port")
    node_address = str(node.get("Address") or "")
    service_address = str(service.get("Address") or "") or node_address
    if policy == "service":
        return service_address, port
    if policy == "node":
        return node_address, port
    tagged = (service.get("TaggedAddresses") or {}).get(policy)
    if isinstance(tagged, dict) and tagged.get("Address"):
        tagged_port = tagged.get("Port")
        if isinstance(tagged_port, int) and tagged_port > 0:
            return str(tagged["Address"]), tagged_port
        return str(tagged["Address"]), port
    node_tagged = (node.get("TaggedAddresses") or {}).get(policy)
    if isinstance(node_tagged, str) and node_tagged:
        return node_tagged, port
    return service_address, port


def _wants_tls(service: dict[str, Any]) -> bool:
    meta = service.get("Meta") or {}
    return "proto=https" in (service.get("Tags") or ()) or (
        isinstance(meta, dict) and meta.get("proto") == "https")


def backends_from_entries(entries: Any, *, passing_only: bool = True,
                          address: str = "service") -> tuple[Backend, ...]:
    """Backends for a health/service answer, sorted by identity. Raises
    ConsulEntryError for an answer that is not a list of entries."""
    if not isinstance(entries, list):
        raise ConsulEntryError("expected a JSON list of service entries")
    found: dict[str, Backend] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("Node"), dict) \
                or not isinstance(entry.get("Service"), dict):
            raise ConsulEntryError("entry without Node and Service objects")
        node, service = entry["Node"], entry["Service"]
        service_id = str(service.get("ID") or service.get("Service") or "")
        status = _status(entry, service_id)
        if status == "maintenance" or status == "critical":
            continue
        if status == "warning" and passing_only:
            continue
        weights = service.get("Weights") or {}
        weight = weights.get("Passing" if status == "passing" else "Warning", 1)
        if not isinstance(weight, int) or weight <= 0:
            continue
        host, port = _address(node, service, address)
        if not host:
            raise ConsulEntryError(f"service {service_id!r} has no address")
        identity = f"{node.get('Node', '')}/{service_id}"
        found[identity] = Backend(identity, host, port, weight, tls=_wants_tls(service))
    return tuple(found[k] for k in sorted(found))


def same_backends(a: Sequence[Backend], b: Sequence[Backend]) -> bool:
    return [x.identity for x in a] == [x.identity for x in b]
