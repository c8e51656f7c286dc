"""Expectations: the controller's outstanding writes, as the planner must see them."""

from __future__ import annotations

from rapproxy.bps.expectations import Expectations
from rapproxy.model.bps import ObservedPod, Role, WaiterState

KEY = "default/web"


def test_a_create_counts_from_sent_until_the_cache_shows_the_pod() -> None:
    e = Expectations(ttl=30)
    e.create_sent(KEY, Role.COLD_BACKUP)
    assert e.in_flight(KEY, 0).creates == {Role.COLD_BACKUP: 1}
    e.create_answered(KEY, Role.COLD_BACKUP, "web-abc", seen=False, now=0)
    assert e.in_flight(KEY, 1).creates == {Role.COLD_BACKUP: 1}
    e.observe(KEY, ObservedPod("web-abc", role=Role.COLD_BACKUP))
    assert e.in_flight(KEY, 1).creates == {}
    assert e.satisfied(KEY)


def test_a_create_already_in_the_cache_or_failed_is_not_expected() -> None:
    e = Expectations()
    e.create_sent(KEY, Role.PRIMARY)
    e.create_sent(KEY, Role.PRIMARY)
    e.create_answered(KEY, Role.PRIMARY, "web-a", seen=True, now=0)
    e.create_answered(KEY, Role.PRIMARY, None, seen=False, now=0)
    assert e.in_flight(KEY, 0).creates == {}


def test_expectations_expire_after_the_ttl() -> None:
    e = Expectations(ttl=5)
    e.create_sent(KEY, Role.PRIMARY)
    e.create_answered(KEY, Role.PRIMARY, "web-a", seen=False, now=0)
    e.delete_sent(KEY, "web-b", now=0)
    e.role_sent(KEY, "web-c", Role.PRIMARY, now=0)
    assert not e.satisfied(KEY)
    flight = e.in_flight(KEY, 5.0)
    assert (flight.creates, flight.deletes, dict(flight.roles)) == ({}, frozenset(), {})


def test_a_role_patch_holds_until_the_label_is_seen() -> None:
    e = Expectations()
    e.role_sent(KEY, "web-h", Role.PRIMARY, now=0)
    e.observe(KEY, ObservedPod("web-h", role=Role.HOT_BACKUP))  # an older event
    assert e.in_flight(KEY, 1).roles == {"web-h": Role.PRIMARY}
    e.observe(KEY, ObservedPod("web-h", role=Role.PRIMARY))
    assert e.in_flight(KEY, 1).roles == {}


def test_a_delete_holds_until_the_pod_is_terminating_or_gone() -> None:
    e = Expectations()
    e.delete_sent(KEY, "web-a", now=0)
    e.delete_sent(KEY, "web-b", now=0)
    e.observe(KEY, ObservedPod("web-a", deleting=True))
    e.settle_against(KEY, cached={"web-a"})
    assert e.in_flight(KEY, 1).deletes == frozenset()


def test_activation_in_flight_then_done_until_the_waiter_is_seen_finished() -> None:
    e = Expectations()
    e.activation_started(KEY, "web-c")
    assert e.in_flight(KEY, 0).activations == {"web-c"}
    e.activation_finished(KEY, "web-c", ok=True, now=0)
    e.observe(KEY, ObservedPod("web-c", waiter=WaiterState.RUNNING))
    assert e.in_flight(KEY, 1).activations == {"web-c"}
    e.observe(KEY, ObservedPod("web-c", waiter=WaiterState.DONE))
    assert e.in_flight(KEY, 1).activations == frozenset()


def test_a_failed_activation_is_reported_until_the_pod_is_gone() -> None:
    e = Expectations()
    e.activation_started(KEY, "web-c")
    e.activation_finished(KEY, "web-c", ok=False, now=0)
    assert e.in_flight(KEY, 1).failed_activations == {"web-c"}
    e.observe_gone(KEY, "web-c")
    assert e.in_flight(KEY, 1).failed_activations == frozenset()
