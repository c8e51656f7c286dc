"""Telemetry values, the peer document format and the tracker's snapshots and hysteresis."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rapproxy.model.telemetry import (
    RTT_FLOOR_SAMPLES,
    InvalidSettings,
    InvalidTelemetry,
    NodeStats,
    PodStats,
    RapSettings,
    TelemetryTracker,
    next_local_share,
    node_stats_to_json,
    parse_peer_report,
)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"overload_threshold": 1.5}, "overload_threshold"),
        ({"exit_threshold": 0.9}, "exit_threshold"),
        ({"w_cpu": -1.0}, "w_cpu"),
        ({"w_rtt": float("nan")}, "w_rtt"),
        ({"w_cpu": 0.0, "w_mem": 0.0, "w_rtt": 0.0}, "w_cpu"),
        ({"top_k": 0}, "top_k"),
        ({"telemetry_interval": 0.0}, "telemetry_interval"),
        ({"poll_timeout": 2.0}, "poll_timeout"),
        ({"rtt_alpha": 0.0}, "rtt_alpha"),
        ({"unknown_weight": 2.0}, "unknown_weight"),
    ],
)
def test_invalid_settings_name_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(InvalidSettings) as raised:
        RapSettings(**kwargs)  # type: ignore[arg-type]
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}:")


def test_default_settings_follow_the_design() -> None:
    s = RapSettings()
    assert (s.overload_threshold, s.exit_threshold) == (0.8, 0.7)
    assert (s.w_cpu, s.w_mem, s.w_rtt) == (1.0, 1.0, 1.0)
    assert s.telemetry_interval == 1.0 and s.stale_after == 3.0


def test_node_stats_reject_utilization_outside_unit_range() -> None:
    with pytest.raises(InvalidTelemetry, match="cpu"):
        NodeStats("n1", 1.2, 0.1, 0.0)


def test_document_round_trips_and_age_lands_on_receiver_clock() -> None:
    stats = NodeStats("n1", 0.25, 0.5, sampled_at=100.0, pods=(PodStats("u1", 0.5, None, True),))
    doc = node_stats_to_json(stats, now=100.4, active_connections={"10.0.0.1:80": 3})
    assert doc["age"] == pytest.approx(0.4)
    # The receiver's clock is unrelated to the sender's (5000 vs 100).
    report = parse_peer_report(doc, received_at=5000.0)
    assert report.stats.sampled_at == pytest.approx(4999.6)
    assert report.stats.cpu == 0.25 and report.stats.pods[0].cpu_limited
    assert report.active_connections == {"10.0.0.1:80": 3}


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ([], "<document>"),
        ({"cpu": 0.1, "memory": 0.1, "age": 0}, "node"),
        ({"node": "n", "cpu": "x", "memory": 0.1, "age": 0}, "cpu"),
        ({"node": "n", "cpu": 0.1, "memory": 0.1, "age": -1}, "age"),
        ({"node": "n", "cpu": 0.1, "memory": 7, "age": 0}, "memory"),
        ({"node": "n", "cpu": 0.1, "memory": 0.1, "age": 0, "pods": [{}]}, "pods[0]"),
        (
            {"node": "n", "cpu": 0.1, "memory": 0.1, "age": 0, "activeConnections": {"a": "b"}},
            "activeConnections",
        ),
    ],
)
def test_garbage_documents_are_rejected_naming_the_field(doc: object, field: str) -> None:
    with pytest.raises(InvalidTelemetry) as raised:
        parse_peer_report(doc, 0.0)
    assert raised.value.field == field


@given(st.dictionaries(st.text(max_size=5), st.none() | st.integers() | st.text(max_size=3)))
def test_arbitrary_json_objects_never_crash_the_parser(doc: dict[str, object]) -> None:
    with contextlib.suppress(InvalidTelemetry):
        parse_peer_report(doc, 0.0)


def test_rtt_is_an_ewma_of_poll_round_trips() -> None:
    tracker = TelemetryTracker("n0", RapSettings(rtt_alpha=0.5))
    tracker.record_peer("n1", NodeStats("n1", 0.1, 0.1, 0.0), 0.010)
    tracker.record_peer("n1", NodeStats("n1", 0.1, 0.1, 1.0), 0.030)
    assert tracker.snapshot().nodes["n1"].rtt == pytest.approx(0.020)
    assert tracker.snapshot().nodes["n1"].rtt_sample_count == 2


def test_rtt_floor_is_the_smallest_of_the_recent_polls_and_forgets_older_ones() -> None:
    # Polls answered by a busy peer take far longer than the network: the floor keeps the
    # network's part. A floor older than the window gives way, so a path that got slower is
    # believed within RTT_FLOOR_SAMPLES polls.
    tracker = TelemetryTracker("n0")
    samples = [0.003, 0.025, 0.018] + [0.030] * (RTT_FLOOR_SAMPLES - 3)
    for at, sample in enumerate(samples):
        tracker.record_peer("n1", NodeStats("n1", 0.1, 0.1, float(at)), sample)
    peer = tracker.snapshot().nodes["n1"]
    assert peer.rtt_floor == 0.003
    assert peer.rtt is not None and peer.rtt > 0.02
    tracker.record_peer("n1", NodeStats("n1", 0.1, 0.1, 20.0), 0.030)  # 0.003 leaves the window
    assert tracker.snapshot().nodes["n1"].rtt_floor == 0.018
    tracker.record_failure("n1", "timeout")  # a failed poll keeps the window
    assert tracker.snapshot().nodes["n1"].rtt_floor == 0.018


def test_overload_hysteresis_enters_at_threshold_and_leaves_below_exit() -> None:
    tracker = TelemetryTracker("n0")
    verdicts = []
    for cpu in (0.5, 0.79, 0.8, 0.75, 0.7, 0.69, 0.79):
        tracker.record_local(NodeStats("n0", cpu, 0.1, 0.0))
        verdicts.append(tracker.snapshot().nodes["n0"].overloaded)
    assert verdicts == [False, False, True, True, True, False, False]


def test_local_share_shrinks_while_overloaded_holds_between_and_recovers_below_exit() -> None:
    tracker = TelemetryTracker("n0", RapSettings(spill_backoff=0.5, spill_recovery=0.25))
    shares = []
    for cpu in (0.5, 0.9, 0.85, 0.75, 0.6, 0.6, 0.6):
        tracker.record_local(NodeStats("n0", cpu, 0.1, 0.0))
        shares.append(tracker.snapshot().local_share)
    assert shares == [1.0, 0.5, 0.25, 0.25, 0.5, 0.75, 1.0]


@given(
    loads=st.lists(st.floats(0.0, 1.0), max_size=40),
    backoff=st.floats(0.0, 0.99),
    recovery=st.floats(0.01, 1.0),
)
def test_local_share_stays_a_fraction_and_only_overload_lowers_it(
    loads: list[float], backoff: float, recovery: float
) -> None:
    settings = RapSettings(spill_backoff=backoff, spill_recovery=recovery)
    share = 1.0
    for load in loads:
        after = next_local_share(share, NodeStats("n0", load, 0.0, 0.0), settings)
        assert 0.0 <= after <= 1.0
        if after < share:
            assert load >= settings.overload_threshold
        if after > share:
            assert load < settings.exit_threshold
        share = after


def test_snapshot_is_reused_until_something_changes() -> None:
    tracker = TelemetryTracker("n0")
    first = tracker.snapshot()
    assert tracker.snapshot() is first
    tracker.record_local(NodeStats("n0", 0.1, 0.1, 0.0))
    second = tracker.snapshot()
    assert second is not first and second.version > first.version


def test_failure_marks_a_peer_stale_but_keeps_its_last_figures() -> None:
    tracker = TelemetryTracker("n0")
    tracker.record_peer("n1", NodeStats("n1", 0.1, 0.1, 10.0), 0.001)
    assert tracker.snapshot().is_fresh("n1", 10.5)
    tracker.record_failure("n1", "timeout")
    view = tracker.snapshot()
    assert not view.is_fresh("n1", 10.5)
    assert view.nodes["n1"].stats is not None
    assert view.describe(10.5)["nodes"]["n1"]["last_error"] == "timeout"
    tracker.record_peer("n1", NodeStats("n1", 0.1, 0.1, 11.0), 0.001)
    assert tracker.snapshot().is_fresh("n1", 11.0)


def test_figures_older_than_three_periods_are_stale() -> None:
    tracker = TelemetryTracker("n0", RapSettings(telemetry_interval=2.0, poll_timeout=1.0))
    tracker.record_peer("n1", NodeStats("n1", 0.1, 0.1, 10.0), 0.001)
    view = tracker.snapshot()
    assert view.is_fresh("n1", 15.9)
    assert not view.is_fresh("n1", 16.1)
    assert view.fresh_until("n1") == 16.0


def test_retain_forgets_departed_nodes_but_never_itself() -> None:
    tracker = TelemetryTracker("n0")
    tracker.record_local(NodeStats("n0", 0.1, 0.1, 0.0))
    tracker.record_peer("n1", NodeStats("n1", 0.1, 0.1, 0.0), 0.001)
    tracker.retain(["n2"])
    assert set(tracker.snapshot().nodes) == {"n0"}


def test_a_mirror_adopting_an_export_sees_the_same_view_after_a_pickle_round_trip() -> None:
    import pickle

    source = TelemetryTracker("n1")
    source.record_local(NodeStats("n1", 0.9, 0.5, 100.0))
    source.record_peer("n2", NodeStats("n2", 0.2, 0.3, 100.0), 0.004)
    mirror = TelemetryTracker("n1")
    mirror.adopt(*pickle.loads(pickle.dumps(source.export())))
    assert mirror.snapshot() == source.snapshot()
    assert mirror.version == source.version
    before = mirror.snapshot()
    source.record_failure("n2", "timeout")
    mirror.adopt(*source.export())
    assert mirror.snapshot() != before, "adopting replaces the cached snapshot"
    assert mirror.snapshot().nodes["n2"].last_error == "timeout"


def test_every_sample_and_failure_is_announced_to_the_listeners() -> None:
    tracker = TelemetryTracker("a")
    heard: list[int] = []
    tracker.on_change.append(lambda: heard.append(len(heard)))
    tracker.record_local(NodeStats("a", 0.5, 0.5, 1.0))
    tracker.record_peer("b", NodeStats("b", 0.5, 0.5, 1.0), 0.001)
    tracker.record_failure("b", "refused")
    tracker.record_failure("b", "refused")  # nothing new: not announced
    assert heard == [0, 1, 2]
