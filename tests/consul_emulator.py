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

Catalog-wide reads, both blocking: .../api-docs/health#list-checks-in-state
(`/v1/health/state/any`: every check with Node, CheckID, Status, ServiceID,
ServiceName, ServiceTags, CreateIndex/ModifyIndex; its index moves when any check
changes) and .../api-docs/catalog#list-services (`/v1/catalog/services`: name ->
tags; its index moves when any registration changes, checks aside).

Connection limit: like the agent's `limits.http_max_conns_per_client` (agent config
docs; 200 by default since Consul PR #7289), connections from one client IP past
`max_conns_per_client` get hashicorp/go-connlimit's answer — `429 Too Many
Requests`, "Your IP is issuing too many concurrent connections, please rate limit
your calls" — and are closed. Current and peak connections per IP are counted.

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
    modify_index: int = 0  # of its service check


@dataclass
class Node:
    name: str
    address: str
    tagged: dict[str, str] = field(default_factory=dict)
    maintenance: bool = False
    modify_index: int = 0  # of its maintenance check


_TOO_MANY = (b"Your IP is issuing too many concurrent connections, please rate limit "
             b"your calls\n")


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted per client IP and refused past
    the limit as go-connlimit does."""

    def __init__(self, inner: Any, emulator: ConsulEmulator) -> None:
        self.inner = inner
        self.emulator = emulator
        self.ip = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        emulator = self.emulator
        ip = str(transport.get_extra_info("peername")[0])
        if emulator.connections.get(ip, 0) >= emulator.max_conns_per_client:
            emulator.refused += 1
            transport.write(  # type: ignore[attr-defined]
                b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (len(_TOO_MANY), _TOO_MANY))
            transport.close()
            return
        self.ip = ip
        emulator.connections[ip] = emulator.connections.get(ip, 0) + 1
        emulator.peak_connections[ip] = max(emulator.peak_connections.get(ip, 0),
                                            emulator.connections[ip])
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.ip:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.ip else None  # type: ignore[no-any-return]

    def pause_writing(self) -> None:
        if self.ip:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.ip:
            self.inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.ip:
            self.emulator.connections[self.ip] -= 1
            self.inner.connection_lost(exc)


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
        self._server: asyncio.Server | None = None
        self.checks_index = self.index  # health/state: any check changed
        self.catalog_index = self.index  # catalog/services: any registration changed
        self.by_service: dict[str, set[tuple[str, str]]] = {}
        self.max_conns_per_client = 200
        self.connections: dict[str, int] = {}
        self.peak_connections: dict[str, int] = {}
        self.refused = 0

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, port: int = 0, ssl_context: Any = None) -> None:
        app = web.Application()
        app.router.add_get("/v1/health/service/{service}", self._health_service)
        app.router.add_get("/v1/health/state/{state}", self._health_state)
        app.router.add_get("/v1/catalog/services", self._catalog_services)
        app.router.add_put("/v1/agent/service/register", self._register)
        app.router.add_put("/v1/agent/service/deregister/{service_id}", self._deregister)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        self.scheme = "https" if ssl_context is not None else "http"
        # Our own listener (not web.TCPSite) so that every connection is counted.
        self._server = await asyncio.get_running_loop().create_server(
            self._protocol, "127.0.0.1", port or self.port, reuse_address=True,
            ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]

    def _protocol(self) -> asyncio.Protocol:
        assert self._runner is not None and self._runner.server is not None
        return _Counted(self._runner.server(), self)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def held(self, ip: str = "127.0.0.1") -> int:
        """Connections the client at `ip` holds now."""
        return self.connections.get(ip, 0)

    @property
    def address(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    # -- test controls ----------------------------------------------------------------

    async def _bump(self, *services: str, checks: bool = True, catalog: bool = False) -> None:
        """A write: the raft index moves on, and so does the index of every service
        it touched (deregistrations included, as Consul's tombstones do), of the
        checks table when checks changed and of the services table when
        registrations did."""
        self.index += 1
        for service in services:
            self.service_index[service] = self.index
        if checks:
            self.checks_index = self.index
        if catalog:
            self.catalog_index = self.index
        async with self._changed:
            self._changed.notify_all()

    def _index_instance(self, key: tuple[str, str], service: str, present: bool) -> None:
        keys = self.by_service.setdefault(service, set())
        if present:
            keys.add(key)
        else:
            keys.discard(key)

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
        }, status, modify_index=self.index + 1)
        self._index_instance((node, service_id), service, True)
        await self._bump(service, catalog=True)

    async def remove(self, service_id: str, node: str = "agent") -> None:
        instance = self.instances.pop((node, service_id), None)
        if instance is not None:
            self._index_instance((node, service_id), instance.service["Service"], False)
        await self._bump(*([instance.service["Service"]] if instance else []), catalog=True)

    async def set_status(self, service_id: str, status: str, node: str = "agent") -> None:
        instance = self.instances[(node, service_id)]
        instance.status = status
        instance.modify_index = self.index + 1
        await self._bump(instance.service["Service"])

    async def set_port(self, service_id: str, port: int, node: str = "agent") -> None:
        """A re-registration that changes only the port: the services table moves,
        the checks table does not (its checks are the same)."""
        instance = self.instances[(node, service_id)]
        instance.service["Port"] = port
        await self._bump(instance.service["Service"], checks=False, catalog=True)

    async def set_maintenance(self, *, service_id: str | None = None, node: str = "agent",
                              enabled: bool = True) -> None:
        if service_id is None:
            self.nodes[node].maintenance = enabled
            self.nodes[node].modify_index = self.index + 1
        else:
            self.instances[(node, service_id)].maintenance = enabled
            self.instances[(node, service_id)].modify_index = self.index + 1
        await self._bump(*{i.service["Service"] for k, i in self.instances.items()
                           if k[0] == node})

    async def reset_index(self, value: int) -> None:
        """What a snapshot restore or leader change can do: the index goes backwards."""
        self.index = value
        self.checks_index = self.catalog_index = value
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

    def _node_checks(self, node_name: str) -> list[dict[str, Any]]:
        node = self.nodes[node_name]
        checks = [{"Node": node_name, "CheckID": "serfHealth", "Name": "Serf Health Status",
                   "Status": "passing", "ServiceID": "", "ServiceName": "", "ServiceTags": [],
                   "CreateIndex": 1, "ModifyIndex": 1}]
        if node.maintenance:
            checks.append({"Node": node_name, "CheckID": "_node_maintenance",
                           "Name": "Node Maintenance Mode", "Status": "critical",
                           "ServiceID": "", "ServiceName": "", "ServiceTags": [],
                           "CreateIndex": node.modify_index,
                           "ModifyIndex": node.modify_index})
        return checks

    def _service_checks(self, node_name: str, service_id: str,
                        inst: Instance) -> list[dict[str, Any]]:
        svc = inst.service
        checks = [{"Node": node_name, "CheckID": f"service:{service_id}",
                   "Name": f"Service '{svc['Service']}' check", "Status": inst.status,
                   "ServiceID": service_id, "ServiceName": svc["Service"],
                   "ServiceTags": svc["Tags"], "CreateIndex": inst.modify_index,
                   "ModifyIndex": inst.modify_index}]
        if inst.maintenance:
            checks.append({"Node": node_name,
                           "CheckID": f"_service_maintenance:{service_id}",
                           "Name": "Service Maintenance Mode", "Status": "critical",
                           "ServiceID": service_id, "ServiceName": svc["Service"],
                           "ServiceTags": svc["Tags"], "CreateIndex": inst.modify_index,
                           "ModifyIndex": inst.modify_index})
        return checks

    def _entries(self, service: str, tags: list[str], passing: bool) -> list[dict[str, Any]]:
        entries = []
        for node_name, service_id in sorted(self.by_service.get(service, ())):
            inst = self.instances[(node_name, service_id)]
            svc = inst.service
            if not set(tags) <= set(svc["Tags"]):
                continue
            node = self.nodes[node_name]
            checks = self._node_checks(node_name) + self._service_checks(
                node_name, service_id, inst)
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

    async def _block(self, current: Any, request: web.Request) -> web.StreamResponse | None:
        """The blocking-query wait shared by every read endpoint: None when the
        answer may be given, or an error response."""
        try:
            wait = _parse_wait(request.query.get("wait"))
            index = int(request.query.get("index", "0"))
        except ValueError:
            return web.Response(status=400, text="Invalid wait or index")
        if self.hang:
            await asyncio.sleep(3600)
        if index > 0 and current() <= index:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait + random.random() * wait / 16
            resets = self.resets
            async with self._changed:
                while current() <= index and not self.hang and self.resets == resets:
                    remaining = deadline - loop.time()
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
        return None

    def _headers(self, index: int) -> dict[str, str]:
        return {"X-Consul-Index": str(index),
                "X-Consul-KnownLeader": "true" if self.known_leader else "false",
                "X-Consul-LastContact": str(self.last_contact_ms),
                "Content-Type": "application/json"}

    async def _health_state(self, request: web.Request) -> web.StreamResponse:
        query = {k: request.query.getall(k) for k in request.query}
        self.requests.append((request.path, query, dict(request.headers)))
        if not self._authorised(request):
            return web.Response(status=403, text="Permission denied")
        refused = await self._block(lambda: self.checks_index, request)
        if refused is not None:
            return refused
        state = request.match_info["state"]
        checks = [c for node in sorted(self.nodes) for c in self._node_checks(node)]
        for node_name, service_id in sorted(self.instances):
            checks += self._service_checks(node_name, service_id,
                                           self.instances[(node_name, service_id)])
        if state != "any":
            checks = [c for c in checks if c["Status"] == state]
        return web.Response(text=json.dumps(checks), headers=self._headers(self.checks_index))

    async def _catalog_services(self, request: web.Request) -> web.StreamResponse:
        query = {k: request.query.getall(k) for k in request.query}
        self.requests.append((request.path, query, dict(request.headers)))
        if not self._authorised(request):
            return web.Response(status=403, text="Permission denied")
        refused = await self._block(lambda: self.catalog_index, request)
        if refused is not None:
            return refused
        services: dict[str, set[str]] = {}
        for inst in self.instances.values():
            services.setdefault(inst.service["Service"], set()).update(inst.service["Tags"])
        body = {name: sorted(tags) for name, tags in sorted(services.items())}
        return web.Response(text=json.dumps(body), headers=self._headers(self.catalog_index))

    async def _health_service(self, request: web.Request) -> web.StreamResponse:
        query = {k: request.query.getall(k) for k in request.query}
        self.requests.append((request.path, query, dict(request.headers)))
        if not self._authorised(request):
            return web.Response(status=403, text="Permission denied")
        dc = request.query.get("dc")
        if dc and dc != self.datacenter:
            return web.Response(status=500, text="No path to datacenter")
        service = request.match_info["service"]
        refused = await self._block(lambda: self._service_index(service), request)
        if refused is not None:
            return refused
        headers = self._headers(self._service_index(service))
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
        }, "critical", modify_index=self.index + 1)  # HTTP checks start critical
        self._index_instance(("agent", service_id), body["Name"], True)
        await self._bump(body["Name"], catalog=True)
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
