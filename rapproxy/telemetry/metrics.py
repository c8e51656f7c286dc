"""Prometheus view of telemetry and RAP scores, read at scrape time.

Telemetry changes every interval and scores change per snapshot, so instead of pushing values
into gauges on every update (work on the hot path for numbers nobody may read), a custom
collector reads the current snapshot and the policies' `explain()` output when Prometheus
scrapes. Register it on the daemon's registry:

    registry.register(TelemetryMetrics(tracker.snapshot, explain_services))

`explain_services(now)` returns `{service name: RapPolicy.explain(...) dict}` for the RAP
services (the Balancer owns the policies; see the report for the hook it needs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rapproxy.model.telemetry import TelemetryView

ExplainServices = Callable[[float], Mapping[str, Mapping[str, Any]]]


class TelemetryMetrics(Collector):
    """`rapproxy_node_*` gauges per node and `rapproxy_node_score` per service and node."""

    def __init__(
        self,
        view: Callable[[], TelemetryView],
        explain_services: ExplainServices | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._view = view
        self._explain = explain_services
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        now = self._clock()
        view = self._view()
        age = GaugeMetricFamily(
            "rapproxy_telemetry_age_seconds",
            "Age of the newest figures from each node (on this node's clock)",
            labels=["node"],
        )
        rtt = GaugeMetricFamily(
            "rapproxy_peer_rtt_seconds", "EWMA of telemetry poll round trips", labels=["node"]
        )
        cpu = GaugeMetricFamily(
            "rapproxy_node_cpu_utilization", "Last reported CPU utilization (0-1)", labels=["node"]
        )
        memory = GaugeMetricFamily(
            "rapproxy_node_memory_utilization",
            "Last reported memory utilization (0-1)",
            labels=["node"],
        )
        overloaded = GaugeMetricFamily(
            "rapproxy_node_overloaded",
            "1 while the node is overloaded (with enter/exit hysteresis)",
            labels=["node"],
        )
        fresh = GaugeMetricFamily(
            "rapproxy_telemetry_fresh",
            "1 when the node's figures are usable (recent, last poll succeeded)",
            labels=["node"],
        )
        for name, peer in sorted(view.nodes.items()):
            peer_age = peer.age(now)
            if peer_age is not None and peer.stats is not None:
                age.add_metric([name], peer_age)
                cpu.add_metric([name], peer.stats.cpu)
                memory.add_metric([name], peer.stats.memory)
            if peer.rtt is not None:
                rtt.add_metric([name], peer.rtt)
            overloaded.add_metric([name], 1.0 if peer.overloaded else 0.0)
            fresh.add_metric([name], 1.0 if view.is_fresh(name, now) else 0.0)
        yield from (age, rtt, cpu, memory, overloaded, fresh)

        if self._explain is None:
            return
        score = GaugeMetricFamily(
            "rapproxy_node_score",
            "RAP score of each node with usable endpoints, per service (absent: no score)",
            labels=["service", "node"],
        )
        for service, explained in sorted(self._explain(now).items()):
            for node, info in sorted(explained.get("nodes", {}).items()):
                value = info.get("score")
                if value is not None:
                    score.add_metric([service, node], float(value))
        yield score
