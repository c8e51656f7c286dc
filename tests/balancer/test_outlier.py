"""Passive outlier detection: ejection after consecutive dial failures, growing, capped, panic."""

from __future__ import annotations

from rapproxy.balancer.outlier import OutlierDetector, OutlierSettings
from rapproxy.model.endpoints import Endpoint

A = ("10.0.0.1", 8080)
B = ("10.0.0.2", 8080)
SETTINGS = OutlierSettings(
    consecutive_failures=3, base_ejection_seconds=10, max_ejection_seconds=25
)


def fail(detector: OutlierDetector, key: tuple[str, int], times: int, now: float) -> list[bool]:
    return [detector.record_failure(key, now) for _ in range(times)]


def test_endpoint_is_ejected_on_the_nth_consecutive_failure() -> None:
    detector = OutlierDetector(SETTINGS)
    assert fail(detector, A, 3, 0.0) == [False, False, True]
    assert detector.is_ejected(A, 0.0)
    assert detector.ejected(0.0) == [A]
    assert not detector.is_ejected(B, 0.0)


def test_success_resets_the_failure_streak() -> None:
    detector = OutlierDetector(SETTINGS)
    fail(detector, A, 2, 0.0)
    detector.record_success(A)
    assert fail(detector, A, 2, 0.0) == [False, False]
    assert not detector.is_ejected(A, 0.0)


def test_ejection_ends_after_the_base_time() -> None:
    detector = OutlierDetector(SETTINGS)
    fail(detector, A, 3, 100.0)
    assert detector.is_ejected(A, 109.9)
    assert not detector.is_ejected(A, 110.0)
    assert detector.ejected(110.0) == []


def test_each_new_ejection_lasts_longer_up_to_the_cap() -> None:
    detector = OutlierDetector(SETTINGS)
    now = 0.0
    durations = []
    for _ in range(4):
        fail(detector, A, 3, now)
        start = now
        while detector.is_ejected(A, now):
            now += 1.0
        durations.append(now - start)
    assert durations == [10.0, 20.0, 25.0, 25.0]


def test_failures_while_ejected_do_not_extend_the_ejection() -> None:
    detector = OutlierDetector(SETTINGS)
    fail(detector, A, 3, 0.0)
    assert fail(detector, A, 5, 5.0) == [False] * 5
    assert not detector.is_ejected(A, 10.0)


def test_filter_removes_ejected_endpoints() -> None:
    detector = OutlierDetector(SETTINGS)
    a, b = Endpoint(*A), Endpoint(*B)
    assert detector.filter([a, b], 0.0) == [a, b]
    fail(detector, A, 3, 0.0)
    assert list(detector.filter([a, b], 1.0)) == [b]
    assert list(detector.filter([a, b], 11.0)) == [a, b]


def test_panic_mode_uses_every_candidate_when_all_are_ejected() -> None:
    detector = OutlierDetector(SETTINGS)
    a, b = Endpoint(*A), Endpoint(*B)
    fail(detector, A, 3, 0.0)
    fail(detector, B, 3, 0.0)
    assert list(detector.filter([a, b], 1.0)) == [a, b]


def test_retain_forgets_endpoints_that_left_the_table() -> None:
    detector = OutlierDetector(SETTINGS)
    fail(detector, A, 3, 0.0)
    fail(detector, B, 3, 0.0)
    detector.retain({B})
    assert detector.ejected(1.0) == [B]


def test_default_settings_eject_after_three_failures_for_ten_seconds() -> None:
    detector = OutlierDetector()
    assert fail(detector, A, 3, 0.0) == [False, False, True]
    assert detector.is_ejected(A, 9.9)
    assert not detector.is_ejected(A, 10.0)
