"""Telemetry and RAP scores as Prometheus gauges, read at scrape time."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, generate_latest

from rapproxy.balancer.rap import UtilizationRapPolicy
from rapproxy.model.endpoints import Endpoint
from rapproxy.model.telemetry import NodeStats, TelemetryTracker
from rapproxy.telemetry.metrics import TelemetryMetrics


def test_scrape_exports_ages_rtts_verdicts_and_scores() -> None:
    tracker = TelemetryTracker("n0")
    tracker.record_local(NodeStats("n0", 0.9, 0.2, 10.0))
    tracker.record_peer("n1", NodeStats("n1", 0.2, 0.3, 10.0), 0.004)
    tracker.record_failure("n2", "timeout")
    candidates = (
        Endpoint("10.0.0.1", 80, node_name="n0"),
        Endpoint("10.0.1.1", 80, node_name="n1"),
    )
    policy = UtilizationRapPolicy(tracker.snapshot, rng=random.Random(1))
    registry = CollectorRegistry()
    registry.register(
        TelemetryMetrics(
            tracker.snapshot,
            lambda now: {"default/web:http": policy.explain(candidates, now, "n0")},
            clock=lambda: 10.5,
        )
    )
    text = generate_latest(registry).decode()
    assert 'rapproxy_telemetry_age_seconds{node="n1"} 0.5' in text
    assert 'rapproxy_peer_rtt_seconds{node="n1"} 0.004' in text
    assert 'rapproxy_node_overloaded{node="n0"} 1.0' in text
    assert 'rapproxy_telemetry_fresh{node="n2"} 0.0' in text
    assert 'rapproxy_telemetry_fresh{node="n1"} 1.0' in text
    assert 'rapproxy_node_score{node="n1",service="default/web:http"} 3.0' in text
