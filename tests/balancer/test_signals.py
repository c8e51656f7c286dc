"""The relay's per-endpoint measurements: averages, the latency-against-load curve, pruning."""

from __future__ import annotations

import math

import pytest

from rapproxy.balancer.balancer import Balancer
from rapproxy.balancer.categorize import Locality
from rapproxy.balancer.signals import GAPS, EndpointSignals, level_of
from rapproxy.model.endpoints import Endpoint
from rapproxy.model.service import ServicePort, ServicePortName
from rapproxy.model.table import ServiceEntry, ServiceTable

KEY = ("10.0.0.1", 8080)
MS = 0.001


def test_levels_double_in_width() -> None:
    assert [level_of(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 16, 17, 64, 65, 10_000)] == [
        0,
        0,
        1,
        2,
        2,
        3,
        3,
        4,
        4,
        5,
        6,
        7,
        7,
    ]


def test_rise_and_fall_weigh_samples_above_and_below_the_average() -> None:
    signals = EndpointSignals(rise=0.5, fall=0.1)
    signals.connected(KEY, 0.010, 0.0)
    signals.connected(KEY, 0.030, 0.0)  # above: halfway
    record = signals.get(KEY)
    assert record is not None and record.connect == pytest.approx(0.020)
    signals.connected(KEY, 0.010, 0.0)  # below: a tenth of the way
    assert record.connect == pytest.approx(0.019)


def stalled_pod_average(signals: EndpointSignals) -> float:
    """The level-1 average over the last cycles of a pod stalled by its quota: six responses
    in 6 ms, then one after a 90 ms stall (mean 18 ms), a millisecond apart."""
    now = 0.0
    seen = []
    for cycle in range(300):
        for served in (6, 6, 6, 6, 6, 6, 96):
            now += 0.001
            signals.responded(KEY, 0.0, served * MS, 1, now)
            record = signals.get(KEY)
            assert record is not None
            if cycle >= 200:
                seen.append(record.server_time(1))
    return sum(seen) / len(seen)


def test_equal_weights_settle_at_the_mean_where_a_rising_bias_settles_above_it() -> None:
    assert stalled_pod_average(EndpointSignals()) == pytest.approx(18 * MS, rel=0.05)
    assert stalled_pod_average(EndpointSignals(rise=0.1, fall=0.05)) > 24 * MS


def test_a_figure_not_sampled_for_a_while_mostly_takes_the_next_sample() -> None:
    signals = EndpointSignals(rise=0.05, fall=0.05, memory=0.5)
    signals.connected(KEY, 0.040, 0.0)
    signals.connected(KEY, 0.010, 1.0)  # two time constants later: 86 % of the way
    record = signals.get(KEY)
    assert record is not None
    assert record.connect == pytest.approx(0.040 - 0.030 * (1 - math.exp(-2)))
    signals.connected(KEY, 0.040, 1.0)  # no time since: the plain weight
    assert record.connect == pytest.approx(0.040 - 0.030 * (1 - math.exp(-2)) * 0.95 + 0.0)


def test_server_time_excludes_the_connections_own_round_trip() -> None:
    signals = EndpointSignals()
    signals.responded(KEY, 0.020, 0.025, 1, 0.0)
    record = signals.get(KEY)
    assert record is not None and record.server_time(1) == pytest.approx(0.005)


def test_a_pod_serving_in_line_has_a_straight_curve() -> None:
    signals = EndpointSignals(rise=1.0, fall=1.0)
    for n in (1, 2, 4, 8, 16):
        signals.responded(KEY, 0.0, 2 * MS * n, n, 0.0)
    record = signals.get(KEY)
    assert record is not None
    assert record.server_time(12) == pytest.approx(24 * MS)  # interpolated
    assert record.server_time(40) == pytest.approx(80 * MS)  # extrapolated through the origin


def test_a_pod_stalled_by_its_quota_has_a_flat_curve() -> None:
    # Everyone waits for the stall: what a fixed "time per request x queue" model mispredicts.
    signals = EndpointSignals(rise=1.0, fall=1.0)
    for n in (1, 2, 4, 8):
        signals.responded(KEY, 0.0, 60 * MS + 0.5 * MS * n, n, 0.0)
    record = signals.get(KEY)
    assert record is not None
    assert record.server_time(1) == pytest.approx(60.5 * MS)
    assert record.server_time(6) == pytest.approx(63 * MS)


def test_levels_not_measured_within_hold_leave_the_curve() -> None:
    signals = EndpointSignals(rise=1.0, fall=1.0, hold=2.0)
    signals.responded(KEY, 0.0, 80 * MS, 8, 0.0)  # once under a queue of 8 ...
    signals.responded(KEY, 0.0, 2 * MS, 1, 5.0)  # ... long ago; now unloaded
    record = signals.get(KEY)
    assert record is not None and record.curve == ((1.0, 2 * MS),)
    assert record.server_time(8) == pytest.approx(16 * MS)


def test_describe_is_plain_data() -> None:
    signals = EndpointSignals()
    assert signals.describe(KEY, 0.0) is None
    signals.connected(KEY, 0.01, 0.0)
    signals.responded(KEY, 0.01, 0.02, 3, 0.5)
    described = signals.describe(KEY, 1.0)
    assert described is not None
    assert described["connect_age_seconds"] == 1.0
    assert described["server_seconds_by_in_flight"] == [{"in_flight": 3.0, "server_seconds": 0.01}]


def test_the_balancer_drops_signals_of_endpoints_no_service_holds() -> None:
    name = ServicePortName("default", "web", "http")
    port = ServicePort(name, 80, 8080, cluster_ips=("10.96.0.10",))
    a = Endpoint("10.0.0.1", 8080, node_name="n0")
    b = Endpoint("10.0.0.2", 8080, node_name="n0")
    balancer = Balancer(Locality("n0"))
    first = ServiceTable({name: ServiceEntry(port, (a, b))})
    balancer.update(first)
    for endpoint in (a, b):
        key = (endpoint.ip, endpoint.port)
        balancer.connection_opened(key, 0.001, 0.0)
        balancer.first_response(key, 0.001, 0.002, 0.0)
    assert len(balancer.signals) == 2
    balancer.update(ServiceTable({name: ServiceEntry(port, (a,))}), [name])
    assert balancer.signals.get(("10.0.0.2", 8080)) is None
    assert balancer.signals.get(("10.0.0.1", 8080)) is not None
    # A late report about the removed endpoint (a connection that outlived it) is not kept.
    balancer.first_response(("10.0.0.2", 8080), 0.001, 0.002, 1.0)
    assert balancer.signals.get(("10.0.0.2", 8080)) is None


def throttled_pod(signals: EndpointSignals, periods: int = 3) -> None:
    """A pod throttled by its CPU quota: per 100 ms, fifteen answers 1 ms apart, then an
    85 ms silence."""
    for _ in range(periods):
        for _ in range(15):
            signals.silence_ended(KEY, 1 * MS)
        signals.silence_ended(KEY, 85 * MS)


def test_a_silence_is_long_to_go_when_it_begins_and_short_when_nearly_over() -> None:
    signals = EndpointSignals()
    throttled_pod(signals)
    record = signals.get(KEY)
    assert record is not None
    # Just after an answer most silences end within a millisecond; one in sixteen lasts 85 ms.
    assert record.residual(0.0) == pytest.approx((15 * 1 + 85) / 16 * MS)
    # 5 ms into a silence it can only be a stall: 80 ms to go.
    assert record.residual(5 * MS) == pytest.approx(80 * MS)
    # 75 ms in, nearly over.
    assert record.residual(75 * MS) == pytest.approx(10 * MS)


def test_a_silence_longer_than_any_seen_is_expected_to_last_as_long_again() -> None:
    signals = EndpointSignals()
    throttled_pod(signals)
    record = signals.get(KEY)
    assert record is not None and record.residual(120 * MS) == pytest.approx(120 * MS)


def test_only_the_latest_silences_count() -> None:
    signals = EndpointSignals()
    throttled_pod(signals, periods=2)
    for _ in range(GAPS):  # the pod is no longer throttled
        signals.silence_ended(KEY, 1 * MS)
    record = signals.get(KEY)
    assert record is not None
    assert len(record.gaps_sorted) == GAPS and max(record.gaps_sorted) == 1 * MS
    assert record.residual(5 * MS) == pytest.approx(5 * MS)  # no stall on record any more
