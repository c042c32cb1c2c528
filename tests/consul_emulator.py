"""An emulator of the parts of Consul's HTTP API that Bascule uses, for tests (Consul
itself cannot be installed on these machines).

Followed: https://developer.hashicorp.com/consul/api-docs/health (List Service
Instances for Service: `passing`, `tag` (repeatable), `dc`; entry shape Node /
Service / Checks), .../api-docs/features/blocking (X-Consul-Index, `index`, `wait`
defaulting to 5m and capped at 10m, up to wait/16 of added jitter, early return on
change), .../api-docs/features/consistency (`stale`, `consistent`;
X-Consul-KnownLeader, X-Consul-LastContact in ms), .../api-docs/agent/service
(register / deregister), maintenance checks `_node_maintenance` and
`_service_maintenance:<id>` (.../commands/maint), and ACL tokens in the
X-Consul-Token header (403 "Permission denied" otherwise).

Test controls (plain methods): add or remove instances, set check states and
maintenance, move the index backwards, make answers fail, hang, or be malformed,
report a stale LastContact, and stop/start the listener on the same port.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["ConsulEmulator"]

_DURATION = re.compile(r"^(\d+)(ms|s|m|h)?$")


def _parse_wait(text: str | None) -> float:
    if not text:
        return 300.0
    match = _DURATION.match(text)
    if not match:
        raise ValueError(text)
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    return min(float(match.group(1)) * scale, 600.0)


@dataclass
class Instance:
    node: str
    service: dict[str, Any]
    status: str = "passing"
    maintenance: bool = False


@dataclass
class Node:
    name: str
    address: str
    tagged: dict[str, str] = field(default_factory=dict)
    maintenance: bool = False


class ConsulEmulator:
    def __init__(self, *, datacenter: str = "dc1", token: str | None = None) -> None:
        self.datacenter = datacenter
        self.token = token
        self.index = 10
        self.nodes: dict[str, Node] = {"agent": Node("agent", "127.0.0.1")}
        self.instances: dict[tuple[str, str], Instance] = {}
        self.service_index: dict[str, int] = {}
        self.resets = 0
        self.requests: list[tuple[str, dict[str, list[str]], dict[str, str]]] = []
        self.fail_status: int | None = None
        self.malformed = False
        self.hang = False
        self.last_contact_ms = 0
        self.known_leader = True
        self._changed = asyncio.Condition()
        self.port = 0
        self.scheme = "http"
        self._runner: web.AppRunner | None = None

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, port: int = 0, ssl_context: Any = None) -> None:
        app = web.Application()
        app.router.add_get("/v1/health/service/{service}", self._health_service)
        app.router.add_put("/v1/agent/service/register", self._register)
        app.router.add_put("/v1/agent/service/deregister/{service_id}", self._deregister)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        self.scheme = "https" if ssl_context is not None else "http"
        site = web.TCPSite(self._runner, "127.0.0.1", port or self.port, reuse_address=True,
                           ssl_context=ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def address(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    # -- test controls ----------------------------------------------------------------

    async def _bump(self, *services: str) -> None:
        """A write: the raft index moves on, and so does the index of every service
        it touched (deregistrations included, as Consul's tombstones do)."""
        self.index += 1
        for service in services:
            self.service_index[service] = self.index
        async with self._changed:
            self._changed.notify_all()

    def add_node(self, name: str, address: str, tagged: dict[str, str] | None = None) -> None:
        self.nodes[name] = Node(name, address, tagged or {})

    async def add(self, service: str, service_id: str, port: int, *, node: str = "agent",
                  address: str = "", tags: list[str] | None = None,
                  weights: dict[str, int] | None = None, status: str = "passing",
                  tagged: dict[str, dict[str, Any]] | None = None) -> None:
        self.instances[(node, service_id)] = Instance(node, {
            "ID": service_id, "Service": service, "Tags": tags or [], "Address": address,
            "Port": port, "Weights": weights or {"Passing": 1, "Warning": 1},
            "TaggedAddresses": tagged or {}, "Meta": {},
        }, status)
        await self._bump(service)

    async def remove(self, service_id: str, node: str = "agent") -> None:
        instance = self.instances.pop((node, service_id), None)
        await self._bump(*([instance.service["Service"]] if instance else []))

    async def set_status(self, service_id: str, status: str, node: str = "agent") -> None:
        instance = self.instances[(node, service_id)]
        instance.status = status
        await self._bump(instance.service["Service"])

    async def set_maintenance(self, *, service_id: str | None = None, node: str = "agent",
                              enabled: bool = True) -> None:
        if service_id is None:
            self.nodes[node].maintenance = enabled
        else:
            self.instances[(node, service_id)].maintenance = enabled
        await self._bump(*{i.service["Service"] for k, i in self.instances.items()
                           if k[0] == node})

    async def reset_index(self, value: int) -> None:
        """What a snapshot restore or leader change can do: the index goes backwards."""
        self.index = value
        self.resets += 1
        for service in self.service_index:
            self.service_index[service] = value
        async with self._changed:
            self._changed.notify_all()

    def health_queries(self, service: str) -> list[dict[str, list[str]]]:
        return [q for path, q, _ in self.requests if path == f"/v1/health/service/{service}"]

    # -- the API ----------------------------------------------------------------------

    def _authorised(self, request: web.Request) -> bool:
        return self.token is None or request.headers.get("X-Consul-Token") == self.token

    def _service_index(self, service: str) -> int:
        return self.service_index.get(service, self.index)

    def _entries(self, service: str, tags: list[str], passing: bool) -> list[dict[str, Any]]:
        entries = []
        for (node_name, service_id), inst in sorted(self.instances.items()):
            svc = inst.service
            if svc["Service"] != service or not set(tags) <= set(svc["Tags"]):
                continue
            node = self.nodes[node_name]
            checks = [{"Node": node_name, "CheckID": "serfHealth", "Name": "Serf Health Status",
                       "Status": "passing", "ServiceID": "", "ServiceName": "",
                       "ServiceTags": []},
                      {"Node": node_name, "CheckID": f"service:{service_id}",
                       "Name": f"Service '{service}' check", "Status": inst.status,
                       "ServiceID": service_id, "ServiceName": service,
                       "ServiceTags": svc["Tags"]}]
            if node.maintenance:
                checks.append({"Node": node_name, "CheckID": "_node_maintenance",
                               "Name": "Node Maintenance Mode", "Status": "critical",
                               "ServiceID": "", "ServiceName": "", "ServiceTags": []})
            if inst.maintenance:
                checks.append({"Node": node_name,
                               "CheckID": f"_service_maintenance:{service_id}",
                               "Name": "Service Maintenance Mode", "Status": "critical",
                               "ServiceID": service_id, "ServiceName": service,
                               "ServiceTags": svc["Tags"]})
            if passing and any(c["Status"] != "passing" for c in checks):
                continue
            entries.append({
                "Node": {"ID": "", "Node": node_name, "Address": node.address,
                         "Datacenter": self.datacenter, "TaggedAddresses": node.tagged,
                         "Meta": {}},
                "Service": copy.deepcopy(svc),
                "Checks": checks,
            })
        return entries

    async def _health_service(self, request: web.Request) -> web.StreamResponse:
        query = {k: request.query.getall(k) for k in request.query}
        self.requests.append((request.path, query, dict(request.headers)))
        if not self._authorised(request):
            return web.Response(status=403, text="Permission denied")
        dc = request.query.get("dc")
        if dc and dc != self.datacenter:
            return web.Response(status=500, text="No path to datacenter")
        service = request.match_info["service"]
        try:
            wait = _parse_wait(request.query.get("wait"))
            index = int(request.query.get("index", "0"))
        except ValueError:
            return web.Response(status=400, text="Invalid wait or index")
        if self.hang:
            await asyncio.sleep(3600)
        if index > 0 and self._service_index(service) <= index:
            deadline = asyncio.get_running_loop().time() + wait + random.random() * wait / 16
            resets = self.resets
            async with self._changed:
                while (self._service_index(service) <= index and not self.hang
                       and self.resets == resets):
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        break
                    try:
                        await asyncio.wait_for(self._changed.wait(), remaining)
                    except TimeoutError:
                        break
            if self.hang:
                await asyncio.sleep(3600)
        if self.fail_status:
            return web.Response(status=self.fail_status, text="rpc error: no leader")
        headers = {
            "X-Consul-Index": str(self._service_index(service)),
            "X-Consul-KnownLeader": "true" if self.known_leader else "false",
            "X-Consul-LastContact": str(self.last_contact_ms),
            "Content-Type": "application/json",
        }
        if self.malformed:
            return web.Response(text='{"not": "a list"', headers=headers)
        body = self._entries(service, request.query.getall("tag", []),
                             "passing" in request.query)
        return web.Response(text=json.dumps(body), headers=headers)

    async def _register(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.path, {}, dict(request.headers)))
        if not self._authorised(request):
            return web.Response(status=403, text="Permission denied")
        body = await request.json()
        service_id = body.get("ID") or body["Name"]
        self.instances[("agent", service_id)] = Instance("agent", {
            "ID": service_id, "Service": body["Name"], "Tags": body.get("Tags") or [],
            "Address": body.get("Address", ""), "Port": body.get("Port", 0),
            "Weights": body.get("Weights") or {"Passing": 1, "Warning": 1},
            "TaggedAddresses": {}, "Meta": {}, "Check": body.get("Check"),
        }, "critical")  # Consul starts an HTTP check critical until it passes
        await self._bump(body["Name"])
        return web.Response()

    async def _deregister(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.path, {}, dict(request.headers)))
        if not self._authorised(request):
            return web.Response(status=403, text="Permission denied")
        service_id = request.match_info["service_id"]
        if ("agent", service_id) not in self.instances:
            return web.Response(status=404, text=f'Unknown service ID "{service_id}"')
        await self.remove(service_id)
        return web.Response()
