"""Header rewriting between client and backend (pure functions, bytes in, bytes out).

Hop-by-hop headers, RFC 9110 §7.6.1: "Connection" and every field it names, plus the
fields that are hop-by-hop by definition (Keep-Alive, Proxy-Connection, TE, Trailer,
Transfer-Encoding, Upgrade) and the proxy-credential fields (Proxy-Authenticate,
Proxy-Authorization) are removed before forwarding. Only *then* are the
X-Forwarded-* and Via fields added, so `Connection: X-Forwarded-For` cannot delete
what the proxy adds. Message framing (Content-Length / Transfer-Encoding) and Host
are always rebuilt by the proxy, never taken from a Connection-nominated list.

Fields that claim something about the client or the original request — who it is
(`X-Real-IP`, `Forwarded`, `True-Client-IP`, …), which URL it asked for
(`X-Original-URL`, `X-Rewrite-URL`, `X-Forwarded-Prefix`, …) or how it came
(`X-Forwarded-Scheme`, `X-Forwarded-Port`, …) — are only believed from a peer in
`trusted_proxies`; from anyone else they are removed (`CLIENT_ASSERTED`), because
backends and frameworks act on them and a cache does not key on them (poisoning).
Field names with an underscore are dropped unless `underscores_in_headers` is on
(nginx's default): `X_Forwarded_For` is `X-Forwarded-For` to CGI-style backends.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "CLIENT_ASSERTED",
    "HOP_BY_HOP",
    "HeaderPolicy",
    "IPNetwork",
    "ResponseHeaderFilter",
    "build_request_head",
    "is_trusted",
    "response_head_block",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})
# Rebuilt by the proxy for every request: framing, Host, and Expect (Bascule answers
# 100-continue itself, like nginx, so the backend never waits for it).
_REBUILT = frozenset({b"content-length", b"host", b"expect"})
_FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
# Believed only from trusted_proxies (see the module docstring); the README lists them.
CLIENT_ASSERTED = frozenset({
    b"forwarded", b"x-real-ip", b"x-client-ip", b"x-cluster-client-ip", b"true-client-ip",
    b"x-original-forwarded-for", b"x-original-url", b"x-rewrite-url", b"x-original-uri",
    b"x-forwarded-uri", b"x-forwarded-prefix", b"x-forwarded-path", b"x-forwarded-scheme",
    b"x-forwarded-port", b"x-forwarded-server", b"x-forwarded-ssl", b"x-url-scheme",
    b"x-original-host", b"x-host", b"front-end-https",
})
_DROP_REQUEST = HOP_BY_HOP | _REBUILT | _FORWARDED | {b"via"}
_DROP_UNTRUSTED = _DROP_REQUEST | CLIENT_ASSERTED
# Rebuilt by us when enabled, even from trusted peers (a trusted peer's value is kept
# in them: Forwarded is extended, X-Real-IP passed on).
_DROP_TRUSTED = _DROP_REQUEST | {b"forwarded", b"x-real-ip"}
_DROP_RESPONSE = HOP_BY_HOP | {b"via", b"content-length"}
_VIA = b"1.1 bascule"


@lru_cache(maxsize=4096)
def _parse_ip(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(peer)
    except ValueError:
        return None


def is_trusted(peer: str | None, networks: Sequence[IPNetwork]) -> bool:
    if not networks or not peer:
        return False
    ip = _parse_ip(peer)
    return ip is not None and any(ip in net for net in networks)


@dataclass(frozen=True, slots=True)
class HeaderPolicy:
    """What the proxy adds and tolerates in forwarded requests (from [server])."""

    forwarded: bool = False  # add RFC 7239 Forwarded
    x_real_ip: bool = False  # add X-Real-IP
    underscores: bool = False  # pass field names with "_"


_DEFAULT_POLICY = HeaderPolicy()
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                   b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _forwarded_value(value: bytes) -> bytes:
    """RFC 7239 §4: a token, or a quoted-string (IPv6 in brackets, host:port)."""
    if value and all(c in _TOKEN for c in value):
        return value
    if b":" in value and not value.startswith(b"[") and value.count(b":") > 1:
        value = b"[" + value + b"]"  # an IPv6 address (§6)
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def build_request_head(
    raw_headers: Sequence[tuple[bytes, bytes]],
    *,
    peer: str,
    trusted_peer: bool,
    proto: bytes = b"http",
    framing: bytes = b"",
    request_id: bytes = b"",
    authority: bytes = b"",
    policy: HeaderPolicy = _DEFAULT_POLICY,
) -> tuple[bytes, bytes, int]:
    """The forwarded header block (without request line and Host), the Host value
    to forward and the size of the client's header block. `framing` is the
    Content-Length/Transfer-Encoding line to send; a non-empty `request_id` replaces
    any X-Request-Id the client sent; a non-empty `authority` (absolute-form target)
    replaces the client's Host (RFC 9112 §3.2.2)."""
    kept: list[tuple[bytes, bytes]] = []
    nominated: set[bytes] | None = None
    host = b""
    client_xff = client_proto = client_xfh = b""
    client_forwarded = client_real_ip = b""
    via = b""
    size = 0
    drop = _DROP_TRUSTED if trusted_peer else _DROP_UNTRUSTED
    underscores = policy.underscores
    for name, value in raw_headers:
        size += len(name) + len(value) + 4
        lname = name.lower()
        if lname not in drop:
            if not (request_id and lname == b"x-request-id") and (
                    underscores or b"_" not in lname):
                kept.append((lname, name + b": " + value + b"\r\n"))
        elif lname == b"host":
            host = value
        elif lname == b"connection":
            if nominated is None:
                nominated = set()
            nominated.update(t.strip().lower() for t in value.split(b","))
        elif lname == b"via":
            via = via + b", " + value if via else value
        elif not trusted_peer:
            continue  # the client's own claims: dropped
        elif lname == b"x-forwarded-for":
            client_xff = client_xff + b", " + value if client_xff else value
        elif lname == b"x-forwarded-proto":
            client_proto = value
        elif lname == b"x-forwarded-host":
            client_xfh = value
        elif lname == b"forwarded":
            client_forwarded = client_forwarded + b", " + value if client_forwarded else value
        elif lname == b"x-real-ip":
            client_real_ip = value
    if authority:
        host = authority
    if nominated:
        lines = [line for lname, line in kept if lname not in nominated]
        # A client may nominate its own forwarding fields; they are then not trusted.
        if b"x-forwarded-for" in nominated:
            client_xff = b""
        if b"x-forwarded-proto" in nominated:
            client_proto = b""
        if b"x-forwarded-host" in nominated:
            client_xfh = b""
        if b"via" in nominated:
            via = b""
        if b"forwarded" in nominated:
            client_forwarded = b""
        if b"x-real-ip" in nominated:
            client_real_ip = b""
    else:
        lines = [line for _, line in kept]
    peer_b = peer.encode("ascii", "replace")
    xff = client_xff + b", " + peer_b if client_xff else peer_b
    if not client_proto:
        client_proto = proto
    if not client_xfh:
        client_xfh = host
    lines.append(b"X-Forwarded-For: " + xff + b"\r\n")
    lines.append(b"X-Forwarded-Proto: " + client_proto + b"\r\n")
    if client_xfh:
        lines.append(b"X-Forwarded-Host: " + client_xfh + b"\r\n")
    if policy.forwarded:
        element = b"for=" + _forwarded_value(peer_b)
        if host:
            element += b";host=" + _forwarded_value(host)
        element += b";proto=" + proto
        lines.append(b"Forwarded: " + (client_forwarded + b", " + element
                                       if client_forwarded else element) + b"\r\n")
    if policy.x_real_ip:
        lines.append(b"X-Real-IP: " + (client_real_ip or peer_b) + b"\r\n")
    lines.append(b"Via: " + (via + b", " + _VIA if via else _VIA) + b"\r\n")
    if request_id:
        lines.append(b"X-Request-Id: " + request_id + b"\r\n")
    if framing:
        lines.append(framing)
    lines.append(b"\r\n")
    return b"".join(lines), host, size


class ResponseHeaderFilter:
    """Filters a backend's response header fields one at a time, as the parser
    delivers them, so the response head needs no second pass: keeps end-to-end
    fields as ready-to-send lines, and notes framing, Date, Via and the head's size
    and field count (checked against the upstream's limits once the head is parsed)."""

    __slots__ = ("dropped", "dropped_size", "has_date", "kept", "length", "nominated", "te",
                 "via")

    def __init__(self) -> None:
        self.kept: list[tuple[bytes, bytes]] = []
        self.nominated: set[bytes] | None = None
        self.via = b""
        self.length: int | None = None
        self.te = b""  # every Transfer-Encoding field's value, joined in order
        self.has_date = False
        # Fields not kept, for the head limits (kept ones are measured from `kept` only
        # when a limit could be at stake: nothing extra per kept field).
        self.dropped = 0
        self.dropped_size = 0

    def add(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname not in _DROP_RESPONSE:
            self.kept.append((lname, name + b": " + value + b"\r\n"))
            if lname == b"date":
                self.has_date = True
            return
        self.dropped += 1
        self.dropped_size += len(name) + len(value) + 4
        if lname == b"content-length":
            if value.strip().isdigit():
                self.length = int(value)
        elif lname == b"transfer-encoding":
            self.te = self.te + b", " + value if self.te else value
        elif lname == b"connection":
            if self.nominated is None:
                self.nominated = set()
            self.nominated.update(t.strip().lower() for t in value.split(b","))
        elif lname == b"via":
            self.via = self.via + b", " + value if self.via else value

    @property
    def count(self) -> int:
        return len(self.kept) + self.dropped

    @property
    def size(self) -> int:
        """Bytes of the field lines as received (names, values, ": " and CRLF)."""
        return sum(len(line) for _, line in self.kept) + self.dropped_size

    @property
    def chunked(self) -> bool:
        """RFC 9112 §6.3 rule 4: the body is chunked only when chunked is the final
        transfer coding."""
        te = self.te
        return bool(te) and te.rpartition(b",")[2].strip().lower() == b"chunked"

    @property
    def codings(self) -> bytes:
        """Transfer codings other than a final chunked (e.g. b"gzip"): they belong to
        the message and must reach the client with it, or the body cannot be read."""
        te = self.te
        if not te:
            return b""
        if self.chunked:
            return te.rpartition(b",")[0].strip()
        return te

    @property
    def delimited(self) -> bool:
        """True when the body is framed by Content-Length or chunked coding. A
        Transfer-Encoding whose final coding is not chunked means the body runs until
        the connection closes (RFC 9112 §6.3 rule 4), whatever Content-Length says."""
        if self.te:
            return self.chunked
        return self.length is not None

    @property
    def body_length(self) -> int | None:
        # RFC 9112 §6.3: Transfer-Encoding overrides Content-Length.
        return None if self.te else self.length

    def items(self) -> list[tuple[str, str]]:
        """The client-bound fields as (name, value) strings, Via appended."""
        nominated = self.nominated
        via = b"" if nominated and b"via" in nominated else self.via
        out = []
        for lname, line in self.kept:
            if nominated and lname in nominated:
                continue
            name, _, value = line[:-2].partition(b": ")
            out.append((name.decode("latin-1"), value.decode("latin-1")))
        out.append(("Via", (via + b", " + _VIA if via else _VIA).decode("latin-1")))
        return out

    def block(self) -> bytes:
        """The client-bound header lines, Via appended."""
        nominated = self.nominated
        via = self.via
        if nominated:
            lines = [line for lname, line in self.kept if lname not in nominated]
            if b"via" in nominated:
                via = b""
        else:
            lines = [line for _, line in self.kept]
        lines.append(b"Via: " + (via + b", " + _VIA if via else _VIA) + b"\r\n")
        return b"".join(lines)


def response_head_block(raw: Sequence[tuple[bytes, bytes]]) -> tuple[bytes, int | None, bool]:
    """Client-bound header lines (hop-by-hop and framing removed, Via appended),
    the backend's Content-Length if the body is length-delimited, and whether the
    backend sent a Date. Framing is re-applied by the writer, never copied blindly."""
    fields = ResponseHeaderFilter()
    for name, value in raw:
        fields.add(name, value)
    return fields.block(), fields.body_length, fields.has_date
