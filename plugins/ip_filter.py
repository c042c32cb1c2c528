"""`ip_filter`: allow and deny lists of networks, per route.

Evaluated on the client's address as proxy/client_address.py resolves it: the TCP
peer, or what a `server.trusted_proxies` peer's X-Forwarded-For names, so a client
cannot get in by sending its own X-Forwarded-For.

Rule (the order nginx users expect from `deny` before a final `allow`): an address in
`deny` is refused; otherwise, when `allow` is not empty, an address outside it is
refused; everything else passes. IPv4 and IPv6 networks may be mixed; an IPv4-mapped
IPv6 peer (`::ffff:10.0.0.1`) is matched as IPv4. A refusal is `403` with a short
body, before anything else on the route runs (put `ip_filter` first). The lists are
options: a reload rebuilds them.

    [[plugins]]
    name = "office_only"
    use = "ip_filter"
    options = { allow = ["10.0.0.0/8", "2001:db8::/32"], deny = ["10.9.0.0/16"] }
"""

from __future__ import annotations

import ipaddress
from typing import Any

from multidict import CIMultiDict

from proxy.plugin import Handler, ProxyRequest, ProxyResponse, refuse_unknown_options

__all__ = ["IpFilter"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_VERDICTS_MAX = 65_536


def _networks(options: dict[str, Any], key: str) -> tuple[Network, ...]:
    value = options.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key}: must be a list of networks like \"10.0.0.0/8\"")
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{key}: {item!r} is not an IP address or network") from None
    return tuple(networks)


class IpFilter:
    def __init__(self, options: dict[str, Any]) -> None:
        refuse_unknown_options(options, {"allow", "deny", "message"})
        self.allow = _networks(options, "allow")
        self.deny = _networks(options, "deny")
        if not self.allow and not self.deny:
            raise ValueError("allow: give allow or deny (or both)")
        message = options.get("message", "forbidden")
        if not isinstance(message, str):
            raise ValueError("message: must be a string")
        self.body = message.encode() + b"\n"
        # Parsing an address and testing networks costs microseconds: the verdict for
        # an address is kept (bounded; the lists only change with a rebuild).
        self._verdicts: dict[str, bool] = {}

    def admits(self, client: str) -> bool:
        verdict = self._verdicts.get(client)
        if verdict is None:
            verdict = self._judge(client)
            if len(self._verdicts) >= _VERDICTS_MAX:
                self._verdicts.clear()
            self._verdicts[client] = verdict
        return verdict

    def _judge(self, client: str) -> bool:
        try:
            address = ipaddress.ip_address(client.partition("%")[0])
        except ValueError:
            return False  # not an address (a Unix socket peer): nothing to vouch for
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if any(address in network for network in self.deny):
            return False
        return not self.allow or any(address in network for network in self.allow)

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        if self.admits(request.client):
            return await call_next(request)
        return ProxyResponse(403, CIMultiDict({"Content-Type": "text/plain; charset=utf-8"}),
                             self.body, length=len(self.body))
