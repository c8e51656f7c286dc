"""The userspace L4 data plane: the TCP and UDP relays that carry intercepted Service traffic.

iptables REDIRECTs Service traffic to sockets owned here. The TCP relay recovers the original
destination (SO_ORIGINAL_DST), asks a `BackendSelector` which endpoint to dial, and copies bytes
both ways, in C (`native`, the default) or with asyncio Protocol pairs (`tcp`); the UDP relay
keeps one upstream socket per client. The data plane knows nothing about Kubernetes objects or
balancing policies: everything it needs to decide arrives through the small
`routing.BackendSelector` seam, and everything it observes leaves through plain counters in
`stats.RelayStats`.
"""

from rapproxy.dataplane.native import NativeEngineUnavailable, NativeTcpRelayServer
from rapproxy.dataplane.original_dst import NoOriginalDestination, original_destination
from rapproxy.dataplane.routing import Backend, BackendSelector, L4Protocol
from rapproxy.dataplane.stats import (
    RelayStats,
    RelayStatsSnapshot,
    ServiceCounters,
    ServiceCountersSnapshot,
)
from rapproxy.dataplane.tcp import (
    DestinationResolver,
    InvalidTcpRelaySettings,
    RelayView,
    TcpRelayServer,
    TcpRelaySettings,
    fixed_destination,
    intercepted_destination,
)
from rapproxy.dataplane.udp import InvalidUdpRelaySettings, UdpRelaySettings, UdpServicePort

__all__ = [
    "Backend",
    "BackendSelector",
    "DestinationResolver",
    "InvalidTcpRelaySettings",
    "InvalidUdpRelaySettings",
    "L4Protocol",
    "NativeEngineUnavailable",
    "NativeTcpRelayServer",
    "NoOriginalDestination",
    "RelayStats",
    "RelayStatsSnapshot",
    "RelayView",
    "ServiceCounters",
    "ServiceCountersSnapshot",
    "TcpRelayServer",
    "TcpRelaySettings",
    "UdpRelaySettings",
    "UdpServicePort",
    "fixed_destination",
    "intercepted_destination",
    "original_destination",
]
