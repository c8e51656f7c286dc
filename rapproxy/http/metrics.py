"""Prometheus metrics: kube-proxy's sync metrics under the `rapproxy_` prefix, plus the relay's.

Sync metrics are pushed by the proxier as it runs. Relay and balancer figures already live in
plain counters owned by the data plane and the balancer; a custom collector reads them at scrape
time instead of mirroring every increment into prometheus-client on the connection path. Labels
carry service names, never client addresses (unbounded cardinality, and personal data).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rapproxy.dataplane.stats import RelayStatsSnapshot

SYNC_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
PROGRAMMING_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class _LiveCollector(Collector):
    """Reads the relay's and the balancer's own counters when Prometheus scrapes."""

    def __init__(
        self,
        relay_stats: Callable[[], RelayStatsSnapshot | None],
        selections: Callable[[], Mapping[str, int]],
    ) -> None:
        self._relay_stats = relay_stats
        self._selections = selections

    def collect(self) -> Iterator[Metric]:
        selections = CounterMetricFamily(
            "rapproxy_backend_selections",
            "Backend choices made for new connections, by where the backend runs.",
            labels=["locality"],
        )
        for locality, count in sorted(self._selections().items()):
            selections.add_metric([locality], count)
        yield selections

        snapshot = self._relay_stats()
        if snapshot is None:
            return
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "connections": CounterMetricFamily(
                "rapproxy_connections", "TCP connections accepted, by service.", labels=["service"]
            ),
            "active": GaugeMetricFamily(
                "rapproxy_connections_active", "TCP connections open now.", labels=["service"]
            ),
            "dial_failures": CounterMetricFamily(
                "rapproxy_dial_failures",
                "Failed dials to an endpoint (each may be retried elsewhere).",
                labels=["service"],
            ),
            "exhausted": CounterMetricFamily(
                "rapproxy_connections_failed",
                "Clients closed because no endpoint could be dialled.",
                labels=["service"],
            ),
            "bytes": CounterMetricFamily(
                "rapproxy_bytes", "Bytes relayed, by direction.", labels=["service", "direction"]
            ),
            "udp_flows": GaugeMetricFamily(
                "rapproxy_udp_flows_active", "UDP client flows open now.", labels=["service"]
            ),
            "udp_datagrams": CounterMetricFamily(
                "rapproxy_udp_datagrams",
                "UDP datagrams relayed or dropped.",
                labels=["service", "direction"],
            ),
        }
        for service, c in sorted(snapshot.services.items()):
            families["connections"].add_metric([service], c.tcp_connections_total)
            families["active"].add_metric([service], c.tcp_active)
            families["dial_failures"].add_metric([service], c.dial_failures)
            families["exhausted"].add_metric([service], c.tcp_dial_exhausted)
            families["bytes"].add_metric([service, "from_client"], c.bytes_from_clients)
            families["bytes"].add_metric([service, "to_client"], c.bytes_to_clients)
            families["udp_flows"].add_metric([service], c.udp_flows_active)
            families["udp_datagrams"].add_metric(
                [service, "from_client"], c.udp_datagrams_from_clients
            )
            families["udp_datagrams"].add_metric([service, "to_client"], c.udp_datagrams_to_clients)
            families["udp_datagrams"].add_metric([service, "dropped"], c.udp_datagrams_dropped)
        yield from families.values()
        rejected = CounterMetricFamily(
            "rapproxy_connections_rejected",
            "TCP clients closed before relaying, by reason.",
            labels=["reason"],
        )
        rejected.add_metric(["connection_cap"], snapshot.tcp_rejected_by_cap)
        rejected.add_metric(["unknown_destination"], snapshot.tcp_unknown_destination)
        yield rejected


KernelWeightRows = Callable[[], Sequence[tuple[str, str, float, float | None]]]


class _KernelCollector(Collector):
    """Kernel-mode weights in force, read from the Proxier on each scrape (no stale labels)."""

    def __init__(self, rows: KernelWeightRows) -> None:
        self._rows = rows

    def collect(self) -> Iterator[Metric]:
        weight = GaugeMetricFamily(
            "rapproxy_kernel_endpoint_weight",
            "Kernel mode: the share of new connections the rules in force give an endpoint.",
            labels=["service", "endpoint"],
        )
        changed = GaugeMetricFamily(
            "rapproxy_kernel_weights_last_change_timestamp_seconds",
            "Kernel mode: Unix time the Service's weights were last written.",
            labels=["service"],
        )
        seen: set[str] = set()
        for service, endpoint, share, changed_at in self._rows():
            weight.add_metric([service, endpoint], share)
            if changed_at is not None and service not in seen:
                seen.add(service)
                changed.add_metric([service], changed_at)
        yield weight
        yield changed


@dataclass
class ProxyMetrics:
    """Every metric the daemon exports, in one registry of its own (no global state)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.sync_duration = Histogram(
            "rapproxy_sync_proxy_rules_duration_seconds",
            "How long one sync of rules and data plane took.",
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.last_sync = Gauge(
            "rapproxy_sync_proxy_rules_last_timestamp_seconds",
            "Unix time of the last successful sync.",
            registry=r,
        )
        self.last_queued = Gauge(
            "rapproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "Unix time at which the oldest change not yet applied was queued.",
            registry=r,
        )
        self.changes_pending = Gauge(
            "rapproxy_sync_proxy_rules_service_changes_pending",
            "Services whose changes are recorded but not yet applied.",
            registry=r,
        )
        self.programming_latency = Histogram(
            "rapproxy_network_programming_duration_seconds",
            "From a change being observed to it being applied to rules and data plane.",
            buckets=PROGRAMMING_BUCKETS,
            registry=r,
        )
        self.sync_failures = Counter(
            "rapproxy_sync_proxy_rules_failures",
            "Syncs that failed and will be retried.",
            registry=r,
        )
        self.rejected_objects = Gauge(
            "rapproxy_rejected_objects",
            "API objects currently skipped as malformed (each logged with the field at fault).",
            ["kind"],
            registry=r,
        )
        self.service_ports = Gauge(
            "rapproxy_service_ports", "Service ports proxied.", ["protocol"], registry=r
        )
        self.kernel_weight_writes = Counter(
            "rapproxy_kernel_weight_writes",
            "Kernel mode: transactions that rewrote only the weighted chains of moved Services.",
            registry=r,
        )
        self.kernel_weight_write_duration = Histogram(
            "rapproxy_kernel_weight_write_duration_seconds",
            "Kernel mode: a weight period that wrote, from reading telemetry to the rules "
            "being in force (compute, render, iptables-restore).",
            buckets=PROGRAMMING_BUCKETS,
            registry=r,
        )

    def watch_live(
        self,
        relay_stats: Callable[[], RelayStatsSnapshot | None],
        selections: Callable[[], Mapping[str, int]],
    ) -> None:
        self.registry.register(_LiveCollector(relay_stats, selections))

    def watch_kernel(self, rows: KernelWeightRows) -> None:
        self.registry.register(_KernelCollector(rows))
