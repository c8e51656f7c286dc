"""Counters the relays keep, per service, for the metrics exporter to read.

The data plane must not depend on prometheus-client (it is an I/O shell with one job), so it keeps
plain integers in mutable per-service records that only the event loop thread writes. The exporter
reads `RelayStats.snapshot()` — immutable copies — at scrape time. Counters only ever grow, except
the two gauges (`tcp_active`, `udp_flows_active`).

Byte counters are updated per chunk read, not per connection close, so a long-lived connection's
traffic is visible while it lasts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields, replace


@dataclass(slots=True)
class ServiceCounters:
    """Mutable counters for one service; written only by the relays on the loop thread."""

    tcp_connections_total: int = 0
    tcp_active: int = 0
    dial_failures: int = 0
    tcp_dial_exhausted: int = 0
    """Clients closed because no backend could be dialled (none left, or all failed)."""
    tcp_idle_closed: int = 0
    bytes_from_clients: int = 0
    bytes_to_clients: int = 0
    udp_flows_total: int = 0
    udp_flows_active: int = 0
    udp_flows_rejected_by_cap: int = 0
    udp_flows_no_backend: int = 0
    udp_datagrams_from_clients: int = 0
    udp_datagrams_to_clients: int = 0
    udp_datagrams_dropped: int = 0
    """Datagrams dropped: no backend, flow cap, queue full while the flow was being set up."""

    def frozen(self) -> ServiceCountersSnapshot:
        return ServiceCountersSnapshot(**{f.name: getattr(self, f.name) for f in fields(self)})


@dataclass(frozen=True, slots=True)
class ServiceCountersSnapshot:
    """An immutable copy of `ServiceCounters`, safe to hand to another layer."""

    tcp_connections_total: int
    tcp_active: int
    dial_failures: int
    tcp_dial_exhausted: int
    tcp_idle_closed: int
    bytes_from_clients: int
    bytes_to_clients: int
    udp_flows_total: int
    udp_flows_active: int
    udp_flows_rejected_by_cap: int
    udp_flows_no_backend: int
    udp_datagrams_from_clients: int
    udp_datagrams_to_clients: int
    udp_datagrams_dropped: int


@dataclass(frozen=True, slots=True)
class RelayStatsSnapshot:
    """Everything the relays counted, at one instant."""

    services: dict[str, ServiceCountersSnapshot]
    tcp_rejected_by_cap: int
    """New TCP clients closed at once because the global connection cap was reached."""
    tcp_unknown_destination: int
    """Clients whose original destination was missing or belonged to no service."""
    tcp_active: int


class RelayStats:
    """All relay counters of one process, keyed by service.

    Connections rejected before their service is known (cap reached, no original destination)
    are counted globally, not per service: finding the service costs a syscall that a
    rejected-under-load path should not pay.
    """

    __slots__ = ("_services", "tcp_active", "tcp_rejected_by_cap", "tcp_unknown_destination")

    def __init__(self) -> None:
        self._services: dict[str, ServiceCounters] = {}
        self.tcp_rejected_by_cap = 0
        self.tcp_unknown_destination = 0
        self.tcp_active = 0

    def service(self, key: str) -> ServiceCounters:
        """The live counters of `key`, created on first use."""
        counters = self._services.get(key)
        if counters is None:
            counters = self._services[key] = ServiceCounters()
        return counters

    def forget(self, key: str) -> None:
        """Drop a deleted service's counters (its live relays keep their own reference)."""
        self._services.pop(key, None)

    def snapshot(self) -> RelayStatsSnapshot:
        return RelayStatsSnapshot(
            services={key: c.frozen() for key, c in self._services.items()},
            tcp_rejected_by_cap=self.tcp_rejected_by_cap,
            tcp_unknown_destination=self.tcp_unknown_destination,
            tcp_active=self.tcp_active,
        )


def merge_snapshots(snapshots: Iterable[RelayStatsSnapshot]) -> RelayStatsSnapshot:
    """The sum of several processes' counters (workers sharing one listener): what the node did.

    Pure, so the metrics of N workers add up exactly as one process's would.
    """
    services: dict[str, dict[str, int]] = {}
    rejected = unknown = active = 0
    for snapshot in snapshots:
        rejected += snapshot.tcp_rejected_by_cap
        unknown += snapshot.tcp_unknown_destination
        active += snapshot.tcp_active
        for key, counters in snapshot.services.items():
            total = services.setdefault(key, dict.fromkeys(_COUNTER_NAMES, 0))
            for name in _COUNTER_NAMES:
                total[name] += getattr(counters, name)
    return RelayStatsSnapshot(
        services={key: ServiceCountersSnapshot(**values) for key, values in services.items()},
        tcp_rejected_by_cap=rejected,
        tcp_unknown_destination=unknown,
        tcp_active=active,
    )


def retired(snapshot: RelayStatsSnapshot) -> RelayStatsSnapshot:
    """What a process that ended leaves behind: its counters, with nothing active any more.

    Kept and added to the live ones, so a restarted worker's counters never run backwards.
    """
    return RelayStatsSnapshot(
        services={
            key: replace(counters, tcp_active=0, udp_flows_active=0)
            for key, counters in snapshot.services.items()
        },
        tcp_rejected_by_cap=snapshot.tcp_rejected_by_cap,
        tcp_unknown_destination=snapshot.tcp_unknown_destination,
        tcp_active=0,
    )


_COUNTER_NAMES = tuple(f.name for f in fields(ServiceCountersSnapshot))
