"""The UDP service socket, which must answer from the address the client's datagram reached.

REDIRECT rewrites a datagram's destination to a local address of the proxy — 127.0.0.1 (or ::1)
for traffic from this host (nat OUTPUT), the receiving interface's address for traffic from pods
(nat PREROUTING). Conntrack un-NATs the reply only if the reply leaves *from that exact address
and port*. A socket bound to the wildcard address lets routing pick the reply's source, which for
host traffic is not 127.0.0.1: the reply then reaches the client from `clusterIP:proxyport`
(wrong port) and a connected client socket drops it. So this socket reads each datagram with
`recvmsg` and `IP_PKTINFO` (`IPV6_RECVPKTINFO`) to learn the address it arrived at, and sends the
reply with that address as `IP_PKTINFO` source. asyncio's datagram transports expose neither, so
this is a small reader on the loop (`add_reader`, which both stock asyncio and uvloop provide).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
MAX_DATAGRAM = 65535
_CMSG_SPACE = socket.CMSG_SPACE(struct.calcsize("I16s"))
_READS_PER_WAKEUP = 64

Received = Callable[[bytes, tuple[Any, ...], str | None], None]


def local_address_of(ancillary: list[tuple[int, int, bytes]], family: int) -> str | None:
    """The destination address a datagram arrived at, from its pktinfo control message."""
    for level, kind, data in ancillary:
        if family == socket.AF_INET and level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
            return socket.inet_ntop(socket.AF_INET, data[8:12])
        if family == socket.AF_INET6 and level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO:
            # struct in6_pktinfo { in6_addr addr; unsigned int ifindex; }
            return socket.inet_ntop(socket.AF_INET6, data[:16])
    return None


class PktinfoDatagramSocket:
    """A non-blocking UDP socket on the loop that reports and reuses each datagram's local address."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        bind: tuple[str, int],
        received: Received,
        *,
        inherited: socket.socket | None = None,
    ):
        """Bind `bind`, or read `inherited` instead: a bound socket a predecessor handed over."""
        self._loop = loop
        self._received = received
        family = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
        self.family = family
        sock = inherited if inherited is not None else socket.socket(family, socket.SOCK_DGRAM)
        try:
            if sock.family != family or sock.type != socket.SOCK_DGRAM:
                raise ValueError(f"inherited socket {sock!r} is not a UDP socket of {bind!r}")
            sock.setblocking(False)
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            if inherited is None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(bind)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._closing = False
        self._reading = True
        loop.add_reader(sock.fileno(), self._readable)

    def fileno(self) -> int:
        return self._sock.fileno()

    def stop_reading(self) -> None:
        """Read no more datagrams (a successor sharing the socket reads them); replies still go."""
        if self._reading and not self._closing:
            self._reading = False
            self._loop.remove_reader(self._sock.fileno())

    def get_extra_info(self, name: str) -> Any:
        if name == "sockname":
            return self._sock.getsockname()
        if name == "socket":
            return self._sock
        return None

    def is_closing(self) -> bool:
        return self._closing

    def get_write_buffer_size(self) -> int:
        return 0  # datagrams that would block are dropped, never buffered

    def _readable(self) -> None:
        for _ in range(_READS_PER_WAKEUP):
            try:
                data, ancillary, _flags, address = self._sock.recvmsg(MAX_DATAGRAM, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                # ICMP errors for replies to clients that went away surface here; not ours to fix.
                log.debug("UDP service socket %s: %r", self._sock.getsockname(), error)
                continue
            try:
                self._received(data, address, local_address_of(ancillary, self.family))
            except Exception:
                log.exception("UDP service socket: handling a datagram from %s failed", address)

    def sendto(self, data: bytes, address: tuple[Any, ...], local: str | None = None) -> bool:
        """Send from `local` (the address the client wrote to); False when the datagram was dropped."""
        if self._closing:
            return False
        ancillary = []
        if local is not None:
            if self.family == socket.AF_INET:
                info = struct.pack("I4s4s", 0, socket.inet_pton(socket.AF_INET, local), bytes(4))
                ancillary.append((socket.IPPROTO_IP, IP_PKTINFO, info))
            else:
                info = struct.pack("16sI", socket.inet_pton(socket.AF_INET6, local), 0)
                ancillary.append((socket.IPPROTO_IPV6, IPV6_PKTINFO, info))
        try:
            self._sock.sendmsg([data], ancillary, 0, address)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as error:
            log.debug("UDP reply to %s failed: %r", address, error)
            return False
        return True

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._reading:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
