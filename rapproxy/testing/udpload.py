"""An open-loop UDP load that says which datagrams were answered, by whom, and which were lost.

Why: a rolling update hands the UDP service sockets over to the successor while the old process
still holds its per-client sessions (issue 14). Whether datagrams are lost across that is only
seen by a client that keeps sending on a fixed schedule whatever happens and matches every reply
to its request, which no stock tool here does for UDP.

Datagrams go out at `rate` per second, spread round-robin over `flows` client sockets (each flow
is one client address:port, so one proxy session). Each carries its own id after a pad that
`rapproxy.testing.backend`'s echo overwrites with its name (`b1:`), so the reply names both the
request and the backend. A datagram not answered within `reply_timeout` is lost.

The sockets come from a factory, so the load runs in any event loop on sockets made inside a
network namespace (`Namespace.socket`) without a worker process of its own. Counting is pure.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

ANSWERED = "answered"
LOST = "lost"
_PAD = b"................"  # 16 bytes the echo may overwrite with its "name:" prefix
_SEPARATOR = b"#"


class InvalidUdpLoadSpec(ValueError):
    """A UdpLoadSpec field is out of range; the message names it."""


@dataclass(frozen=True, slots=True)
class UdpLoadSpec:
    host: str
    port: int
    rate: float
    """Datagrams sent per second, over all flows (open loop)."""
    seconds: float
    flows: int = 8
    reply_timeout: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise InvalidUdpLoadSpec(f"port: {self.port} is not a port")
        if not self.rate > 0 or not self.seconds > 0:
            raise InvalidUdpLoadSpec(f"rate and seconds must be positive: {self.rate}")
        if self.rate * self.seconds > 1_000_000:
            raise InvalidUdpLoadSpec("rate * seconds: more than a million datagrams")
        if self.flows < 1 or self.reply_timeout <= 0:
            raise InvalidUdpLoadSpec("flows must be >= 1 and reply_timeout positive")


@dataclass(frozen=True, slots=True)
class Datagram:
    sent: float  # wall clock (time.time())
    flow: int
    outcome: str  # ANSWERED or LOST
    seconds: float  # send to reply; the timeout for a lost one
    backend: str = ""


@dataclass(frozen=True, slots=True)
class UdpLoadReport:
    spec: UdpLoadSpec
    started: float
    ended: float
    datagrams: tuple[Datagram, ...]

    def counts(self, since: float = float("-inf"), until: float = float("inf")) -> Counter[str]:
        """Outcomes among the datagrams sent in [since, until)."""
        return Counter(d.outcome for d in self.datagrams if since <= d.sent < until)

    def summary(self) -> dict[str, Any]:
        counts = self.counts()
        return {
            "datagrams": len(self.datagrams),
            "rate_asked": self.spec.rate,
            "flows": self.spec.flows,
            "answered": counts.get(ANSWERED, 0),
            "lost": counts.get(LOST, 0),
            "by_backend": dict(
                sorted(Counter(d.backend for d in self.datagrams if d.backend).items())
            ),
        }


def payload(index: int) -> bytes:
    return _PAD + _SEPARATOR + str(index).encode()


def parse_reply(data: bytes) -> tuple[int, str] | None:
    """(request index, backend name) from an echo reply; None for anything else."""
    head, separator, tail = data.rpartition(_SEPARATOR)
    if not separator or not tail.isdigit():
        return None
    name, colon, _ = head.partition(b":")
    return int(tail), name.decode(errors="replace") if colon else ""


def outcomes(
    sent: Iterable[tuple[int, float, float, int]],
    replies: dict[int, tuple[float, str]],
    reply_timeout: float,
) -> list[Datagram]:
    """Pair each sent (index, wall time, loop time, flow) with its reply, if one came in time."""
    out = []
    for index, wall, at, flow in sent:
        reply = replies.get(index)
        if reply is not None and reply[0] - at <= reply_timeout:
            out.append(Datagram(wall, flow, ANSWERED, reply[0] - at, reply[1]))
        else:
            out.append(Datagram(wall, flow, LOST, reply_timeout))
    return out


class _Flow(asyncio.DatagramProtocol):
    def __init__(self, replies: dict[int, tuple[float, str]]) -> None:
        self.replies = replies
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        parsed = parse_reply(data)
        if parsed is not None and parsed[0] not in self.replies:
            self.replies[parsed[0]] = (asyncio.get_running_loop().time(), parsed[1])

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error (port unreachable while nothing listens): the datagram is lost


async def run_udp_load(
    spec: UdpLoadSpec, socket_factory: Callable[[], socket.socket] | None = None
) -> UdpLoadReport:
    """Send the load; `socket_factory()` makes each flow's UDP socket (default: a plain one)."""
    loop = asyncio.get_running_loop()
    make = socket_factory or (lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    replies: dict[int, tuple[float, str]] = {}
    transports: list[asyncio.DatagramTransport] = []
    try:
        for _ in range(spec.flows):
            sock = make()
            sock.setblocking(False)
            transport, _protocol = await loop.create_datagram_endpoint(
                lambda: _Flow(replies), sock=sock
            )
            transports.append(transport)
        started = time.time()
        origin = loop.time()
        sent: list[tuple[int, float, float, int]] = []
        for index in range(int(spec.rate * spec.seconds)):
            delay = origin + index / spec.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # the open loop's schedule
            flow = index % spec.flows
            sent.append((index, time.time(), loop.time(), flow))
            transports[flow].sendto(payload(index), (spec.host, spec.port))
        await asyncio.sleep(spec.reply_timeout)  # the last datagrams' time to be answered
    finally:
        for transport in transports:
            transport.close()
    return UdpLoadReport(
        spec, started, time.time(), tuple(outcomes(sent, replies, spec.reply_timeout))
    )
