"""Relay counters summed across processes (`merge_snapshots`, `retired`)."""

from __future__ import annotations

from dataclasses import fields

from hypothesis import given
from hypothesis import strategies as st

from rapproxy.dataplane.stats import (
    RelayStats,
    RelayStatsSnapshot,
    ServiceCountersSnapshot,
    merge_snapshots,
    retired,
)

counters = st.builds(
    ServiceCountersSnapshot,
    **{f.name: st.integers(0, 10**6) for f in fields(ServiceCountersSnapshot)},
)
snapshots = st.builds(
    RelayStatsSnapshot,
    services=st.dictionaries(st.sampled_from(["a", "b", "c"]), counters, max_size=3),
    tcp_rejected_by_cap=st.integers(0, 100),
    tcp_unknown_destination=st.integers(0, 100),
    tcp_active=st.integers(0, 100),
)


@given(st.lists(snapshots, max_size=4))
def test_merged_counters_are_the_per_service_sums(parts: list[RelayStatsSnapshot]) -> None:
    merged = merge_snapshots(parts)
    assert merged.tcp_active == sum(p.tcp_active for p in parts)
    assert merged.tcp_rejected_by_cap == sum(p.tcp_rejected_by_cap for p in parts)
    assert set(merged.services) == {key for p in parts for key in p.services}
    for key, total in merged.services.items():
        for field in fields(ServiceCountersSnapshot):
            assert getattr(total, field.name) == sum(
                getattr(p.services[key], field.name) for p in parts if key in p.services
            )


def test_merging_one_process_changes_nothing() -> None:
    stats = RelayStats()
    stats.service("a").tcp_connections_total = 3
    stats.service("a").tcp_active = 1
    stats.tcp_active = 1
    assert merge_snapshots([stats.snapshot()]) == stats.snapshot()


def test_a_retired_process_keeps_its_counts_but_holds_nothing_open() -> None:
    stats = RelayStats()
    live = stats.service("a")
    live.tcp_connections_total, live.tcp_active, live.udp_flows_active = 7, 2, 1
    stats.tcp_active = 2
    stats.tcp_rejected_by_cap = 4
    gone = retired(stats.snapshot())
    assert gone.tcp_active == 0
    assert gone.services["a"].tcp_active == 0 and gone.services["a"].udp_flows_active == 0
    assert gone.services["a"].tcp_connections_total == 7
    assert gone.tcp_rejected_by_cap == 4
