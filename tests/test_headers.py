"""Header rewriting (pure): hop-by-hop removal first, then the proxy's own fields."""

from __future__ import annotations

import ipaddress

from proxy.headers import build_request_head, is_trusted, response_head_block


def lines(block: bytes) -> list[bytes]:
    return [line for line in block.split(b"\r\n") if line]


def test_hop_by_hop_and_nominated_fields_are_removed() -> None:
    block, host, _ = build_request_head([
        (b"Host", b"example.com"), (b"Connection", b"keep-alive, X-Secret, X-Forwarded-For"),
        (b"X-Secret", b"s"), (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"),
        (b"Upgrade", b"h2c"), (b"Proxy-Authorization", b"Basic x"), (b"Trailer", b"X"),
        (b"Proxy-Connection", b"keep-alive"), (b"Transfer-Encoding", b"chunked"),
        (b"X-Forwarded-For", b"6.6.6.6"), (b"Accept", b"*/*"), (b"Expect", b"100-continue"),
        (b"Content-Length", b"5"),
    ], peer="10.1.2.3", trusted_peer=False)
    assert host == b"example.com"
    assert lines(block) == [
        b"Accept: */*",
        # the proxy's fields are added after the removal, so a Connection header
        # naming X-Forwarded-For cannot delete them
        b"X-Forwarded-For: 10.1.2.3",
        b"X-Forwarded-Proto: http",
        b"X-Forwarded-Host: example.com",
        b"Via: 1.1 bascule",
    ]


def test_untrusted_peer_cannot_spoof_forwarding_fields() -> None:
    block, _, _ = build_request_head([
        (b"Host", b"a.test"), (b"X-Forwarded-For", b"1.1.1.1"),
        (b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-Host", b"evil.test"),
    ], peer="192.0.2.9", trusted_peer=False)
    assert lines(block)[:3] == [b"X-Forwarded-For: 192.0.2.9", b"X-Forwarded-Proto: http",
                                b"X-Forwarded-Host: a.test"]


def test_trusted_peer_chain_is_extended() -> None:
    block, _, _ = build_request_head([
        (b"Host", b"a.test"), (b"X-Forwarded-For", b"1.1.1.1, 2.2.2.2"),
        (b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-Host", b"www.a.test"),
        (b"Via", b"1.1 lb"),
    ], peer="10.0.0.5", trusted_peer=True)
    assert lines(block) == [
        b"X-Forwarded-For: 1.1.1.1, 2.2.2.2, 10.0.0.5", b"X-Forwarded-Proto: https",
        b"X-Forwarded-Host: www.a.test", b"Via: 1.1 lb, 1.1 bascule",
    ]


def test_framing_line_is_appended_and_header_size_counted() -> None:
    block, _, size = build_request_head([(b"Host", b"h")], peer="1.2.3.4",
                                        trusted_peer=False,
                                        framing=b"Transfer-Encoding: chunked\r\n")
    assert block.endswith(b"Transfer-Encoding: chunked\r\n\r\n")
    assert size == len(b"Host") + len(b"h") + 4


def test_is_trusted() -> None:
    nets = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert is_trusted("10.9.8.7", nets)
    assert is_trusted("::1", nets)
    assert not is_trusted("11.0.0.1", nets)
    assert not is_trusted("not-an-ip", nets)
    assert not is_trusted("10.0.0.1", ())


def test_response_block() -> None:
    block, length, has_date = response_head_block([
        (b"Content-Type", b"text/plain"), (b"Content-Length", b"12"),
        (b"Connection", b"keep-alive, X-Internal"), (b"X-Internal", b"1"),
        (b"Keep-Alive", b"timeout=5"), (b"Via", b"1.0 origin"), (b"Date", b"x"),
        (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"),
    ])
    assert lines(block) == [b"Content-Type: text/plain", b"Date: x", b"Set-Cookie: a=1",
                            b"Set-Cookie: b=2", b"Via: 1.0 origin, 1.1 bascule"]
    assert length == 12 and has_date


def test_transfer_encoding_overrides_content_length() -> None:
    _, length, has_date = response_head_block([(b"Content-Length", b"12"),
                                               (b"Transfer-Encoding", b"chunked")])
    assert length is None and not has_date
