"""Recover the destination a client meant to reach before iptables REDIRECTed it to us.

With `-j REDIRECT`, the kernel rewrites the destination to the proxy's own listener and keeps the
original in the connection's conntrack entry; `getsockopt(SO_ORIGINAL_DST)` reads it back. That is
what lets one listening socket per address family serve every Service, instead of kube-proxy
userspace mode's one allocated port per service port.

The option returns a raw `struct sockaddr_in` (IPv4, level SOL_IP) or `struct sockaddr_in6`
(IPv6, level SOL_IPV6, option IP6T_SO_ORIGINAL_DST — same number, 80). A connection that was not
NATed (no conntrack entry, e.g. a client that dialled the listener directly) fails with ENOENT.
"""

from __future__ import annotations

import errno
import socket
from typing import Protocol

SO_ORIGINAL_DST = 80
"""From <linux/netfilter_ipv4.h>."""
IP6T_SO_ORIGINAL_DST = 80
"""From <linux/netfilter_ipv6/ip6_tables.h>."""
SOL_IPV6 = 41
"""Same as IPPROTO_IPV6; the socket module's stubs do not declare socket.SOL_IPV6."""

_SOCKADDR_IN_SIZE = 16
_SOCKADDR_IN6_SIZE = 28


class NoOriginalDestination(OSError):
    """The socket has no NAT-recorded original destination (not REDIRECTed, or not IPv4/IPv6)."""


class SocketLike(Protocol):
    """The part of a socket this module needs; asyncio's and uvloop's transport sockets fit."""

    @property
    def family(self) -> int: ...

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


def original_destination(sock: SocketLike) -> tuple[str, int]:
    """The (ip, port) the client originally connected to, before REDIRECT.

    Raises NoOriginalDestination when the kernel has no NAT record for the connection.
    """
    family = sock.family
    try:
        if family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_SIZE)
            return parse_sockaddr_in(raw)
        if family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_SIZE)
            return parse_sockaddr_in6(raw)
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
            raise NoOriginalDestination(
                error.errno, f"no original destination recorded for this socket: {error.strerror}"
            ) from error
        raise
    raise NoOriginalDestination(
        errno.EAFNOSUPPORT, f"SO_ORIGINAL_DST needs an IPv4 or IPv6 socket, not family {family}"
    )


def parse_sockaddr_in(raw: bytes) -> tuple[str, int]:
    """(ip, port) from a raw `struct sockaddr_in`: family(2, host order) port(2, BE) addr(4)."""
    if len(raw) < 8:
        raise ValueError(f"sockaddr_in: expected at least 8 bytes, got {len(raw)}")
    port = int.from_bytes(raw[2:4], "big")
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


def parse_sockaddr_in6(raw: bytes) -> tuple[str, int]:
    """(ip, port) from a raw `struct sockaddr_in6`: family port(BE) flowinfo(4) addr(16) scope."""
    if len(raw) < 24:
        raise ValueError(f"sockaddr_in6: expected at least 24 bytes, got {len(raw)}")
    port = int.from_bytes(raw[2:4], "big")
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
