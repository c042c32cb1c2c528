"""The client's address as plugins see it: the TCP peer, or, when the peer is one of
`server.trusted_proxies`, the address its X-Forwarded-For names.

nginx's `real_ip_recursive on` rule: walk X-Forwarded-For from the right (the hop
nearest to us), skipping addresses that are trusted proxies themselves; the first
untrusted one is the client. When every hop is trusted, the leftmost is. An entry
that is not an IP address stops the walk at the hop that added it (that hop is the
last address we can vouch for). From an untrusted peer X-Forwarded-For is never read:
a client cannot choose the address an `ip_filter` or a rate limit sees.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from multidict import CIMultiDictProxy, MultiDict

from proxy.headers import IPNetwork, is_trusted

__all__ = ["client_address"]


def client_address(peer: str, headers: CIMultiDictProxy[str] | MultiDict[str],
                   trusted: Sequence[IPNetwork]) -> str:
    if not trusted or not is_trusted(peer, trusted):
        return peer
    values = headers.getall("X-Forwarded-For", [])
    if not values:
        return peer
    hops = [hop.strip() for value in values for hop in value.split(",") if hop.strip()]
    client = peer
    for hop in reversed(hops):
        host = hop
        if host.startswith("[") and "]" in host:  # "[v6]:port"
            host = host[1:host.index("]")]
        elif host.count(":") == 1:  # "v4:port"
            host = host.partition(":")[0]
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return client
        client = host
        if not is_trusted(host, trusted):
            return host
    return client
