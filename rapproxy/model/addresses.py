"""IP address text: the one place the model (and the rules it feeds) parses addresses.

Every address reaches rapproxy as text in API JSON and is looked at several times on its way: when
a Service or EndpointSlice is validated, as the endpoints' sort key, and once per rule when the
rules are rendered. `ipaddress.ip_address` is pure Python (microseconds a call) and was the top
item of the 10k-Service cold start (`benchmarks/scale/`: ~150k calls). Almost every address is
IPv4 in canonical dotted-quad form, and that the C pair `inet_pton`/`inet_ntop` settles in a
fraction of the time: text that survives the round trip unchanged is a canonical IPv4 address,
and is its own canonical form. Anything else — IPv6, leading zeros, garbage — goes through
`ipaddress`, so what is accepted, what is refused and how it is normalized stay exactly
`ipaddress`'s.

There is deliberately no cache: with the fast path a repeated parse costs about what a cache
lookup does, while a cache of every address in a large cluster would cost megabytes of RSS.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Literal

IpFamily = Literal[4, 6]


def parse_ip(text: str) -> tuple[IpFamily, str]:
    """The family (4 or 6) and the canonical text of an IP address; `ValueError` if it is not one.

    Only text is accepted: `ipaddress.ip_address` also takes integers (5 → 0.0.0.5), which the
    API never sends and a field holding one is malformed.
    """
    family, _, canonical = _parse(text)
    return family, canonical


def ip_sort_key(text: str) -> tuple[int, bytes]:
    """(family, packed address): numeric order, IPv4 before IPv6; `ValueError` if not an IP."""
    family, packed, _ = _parse(text)
    return family, packed


def _parse(text: str) -> tuple[IpFamily, bytes, str]:
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not text")
    try:
        packed = socket.inet_pton(socket.AF_INET, text)
    except (OSError, ValueError):  # not dotted-quad IPv4; ValueError: NUL or unencodable text
        pass
    else:
        if socket.inet_ntop(socket.AF_INET, packed) == text:
            return 4, packed, text
    ip = ipaddress.ip_address(text)
    return (4 if ip.version == 4 else 6), ip.packed, str(ip)
