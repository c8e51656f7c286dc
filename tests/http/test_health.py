"""Health verdicts follow kube-proxy's /healthz and /livez semantics."""

from __future__ import annotations

from rapproxy.http.health import HealthState


def test_unhealthy_before_the_first_sync() -> None:
    status, body = HealthState(sync_period=30).verdict(1000.0, check_node=True)
    assert status == 503 and body["lastUpdated"] is None


def test_healthy_after_sync_with_nothing_pending() -> None:
    state = HealthState(sync_period=30, last_applied=990.0)
    assert state.verdict(1000.0, check_node=True)[0] == 200


def test_unhealthy_when_a_change_waits_longer_than_two_sync_periods() -> None:
    state = HealthState(sync_period=30, last_applied=900.0, oldest_pending=941.0)
    assert state.verdict(1000.0, check_node=True)[0] == 200  # waiting 59 s < 2 x 30 s
    state.oldest_pending = 939.0
    assert state.verdict(1000.0, check_node=True)[0] == 503  # waiting 61 s


def test_node_being_deleted_fails_healthz_but_not_livez() -> None:
    state = HealthState(sync_period=30, last_applied=999.0, node_deleting=True)
    assert state.verdict(1000.0, check_node=True)[0] == 503
    assert state.verdict(1000.0, check_node=False)[0] == 200
