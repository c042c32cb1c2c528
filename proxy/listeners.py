"""Listening sockets, and the rule that only the workers of one Bascule share a port.

Every worker listens on its own SO_REUSEPORT socket, so the kernel spreads new
connections over the workers. SO_REUSEPORT would just as happily let a second
Bascule (or anything else of the same user) join the port and take a share of the
traffic, silently. So before any worker socket exists, the supervisor *claims* each
address: a socket bound without SO_REUSEPORT, which the kernel refuses while any
other socket listens on an overlapping address, with or without SO_REUSEPORT; only
then is SO_REUSEPORT set on the claim, so that our own workers can join. The claim
is held, bound but never listening (it takes no connections), for the supervisor's
lifetime, and the workers' listening sockets are made right after it, before any
fork. Two Bascules started within the same few microseconds could still both
claim; anything later is refused with an error that names the port.
"""

from __future__ import annotations

import socket

from proxy.config import parse_hostport

__all__ = ["PortInUse", "claim_port", "listen_socket", "listening_socket"]


class PortInUse(OSError):
    """Another process listens on the address."""


def _new_socket(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # SO_REUSEADDR: restart while connections of the previous run are in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


def claim_port(address: str) -> socket.socket:
    """Bind `address` exclusively, then let our own workers share it (see above)."""
    host, port = parse_hostport(address, default_host="0.0.0.0")
    sock = _new_socket(host)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUse(exc.errno, f"{address} is in use by another process "
                        f"({exc.strerror}); only the workers of one Bascule may share "
                        "a port") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def listen_socket(address: str) -> socket.socket:
    """A bound SO_REUSEPORT socket, so every worker process can listen on the port."""
    host, port = parse_hostport(address, default_host="0.0.0.0")
    sock = _new_socket(host)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def listening_socket(address: str, backlog: int) -> socket.socket:
    """listen_socket(), already listening (made in the supervisor before a fork)."""
    sock = listen_socket(address)
    sock.listen(backlog)
    return sock
