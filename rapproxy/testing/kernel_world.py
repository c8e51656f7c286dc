"""The small world the kernel fast path's namespace tests DNAT into, built one way for all.

    node 10.200.0.1 ── veth ── backends 10.200.0.2 (+ the endpoint addresses)

The node namespace is the client (its own connections go through nat output) and holds the
rules; the service CIDR is routed out of the veth, never a default route. One listener in the
backends namespace accepts for every endpoint address on `port`, so the address a connection
arrived on says which endpoint the kernel chose.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Sequence

from rapproxy.testing.netns import Namespace

MakeNamespace = Callable[..., Awaitable[Namespace]]
ENDPOINTS = ("10.200.0.11", "10.200.0.12", "10.200.0.13")
SERVICE_CIDR = "10.96.0.0/16"


async def endpoint_world(
    make_namespace: MakeNamespace,
    endpoints: Sequence[str] = ENDPOINTS,
    port: int = 8080,
) -> tuple[Namespace, Namespace, socket.socket]:
    """(node, backends, listener): the listener is non-blocking and the caller's to close."""
    node = await make_namespace("node")
    backends = await make_namespace("backends")
    veth = await node.add_veth_peer(backends, "10.200.0.1", "10.200.0.2", 24)
    for ip in endpoints:
        await backends.add_address(veth.peer_ifname, f"{ip}/24")
    await node.add_route(SERVICE_CIDR, dev=veth.ifname)
    listener = backends.socket()
    listener.bind(("0.0.0.0", port))
    listener.listen(512)
    listener.setblocking(False)
    return node, backends, listener
