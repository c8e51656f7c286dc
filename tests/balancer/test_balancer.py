"""The Balancer: the whole decision for a new connection, and the state it keeps between them."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rapproxy.balancer.balancer import Balancer, key_of
from rapproxy.balancer.categorize import Locality, categorize
from rapproxy.balancer.outlier import OutlierSettings
from rapproxy.balancer.policy import Placement
from rapproxy.balancer.rap import rap_policy_factory
from rapproxy.model.endpoints import Endpoint
from rapproxy.model.service import LbPolicy, ServicePort, ServicePortName
from rapproxy.model.table import ServiceEntry, ServiceTable
from rapproxy.model.telemetry import NodeStats, RapSettings, TelemetryTracker

HERE = Locality("node-a", "zone-a")
WEB = ServicePortName("default", "web", "http")
API = ServicePortName("default", "api", "http")
CLIENT = "192.168.0.9"


def ep(i: int, node: str = "node-b", *, ready: bool = True, term: bool = False) -> Endpoint:
    return Endpoint(
        f"10.0.0.{i}", 8080, node_name=node, ready=ready, serving=ready or term, terminating=term
    )


def port(name: ServicePortName = WEB, **changes: object) -> ServicePort:
    base = ServicePort(name=name, port=80, target_port=8080, cluster_ips=("10.96.0.10",))
    return replace(base, **changes)  # type: ignore[arg-type]


def table(*entries: tuple[ServicePort, tuple[Endpoint, ...]]) -> ServiceTable:
    return ServiceTable({p.name: ServiceEntry(p, eps) for p, eps in entries})


def balancer(*entries: tuple[ServicePort, tuple[Endpoint, ...]], **kw: object) -> Balancer:
    b = Balancer(HERE, rng=random.Random(5), **kw)  # type: ignore[arg-type]
    b.update(table(*entries))
    return b


def chosen(
    b: Balancer,
    n: int = 1,
    name: ServicePortName = WEB,
    *,
    client: str = CLIENT,
    now: float = 0.0,
    external: bool = False,
    tried: frozenset[tuple[str, int]] = frozenset(),
) -> list[str | None]:
    """The endpoint IPs of `n` consecutive choices with the same inputs."""
    out: list[str | None] = []
    for _ in range(n):
        choice = b.choose(name, client, now, external=external, tried=tried)
        out.append(choice.endpoint.ip if choice is not None else None)
    return out


# -- categorization and traffic policy -----------------------------------------------------------


def test_unknown_service_has_no_choice() -> None:
    b = balancer()
    assert b.choose(WEB, CLIENT, 0.0) is None
    assert not b.has_endpoints(WEB)


def test_service_without_usable_endpoints_has_no_choice() -> None:
    b = balancer((port(), (ep(1, ready=False),)))
    assert b.choose(WEB, CLIENT, 0.0) is None
    assert not b.has_endpoints(WEB)


def test_round_robin_over_ready_endpoints_by_default() -> None:
    b = balancer((port(), (ep(1), ep(2), ep(3, ready=False))))
    assert chosen(b, 4) == ["10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.2"]
    assert b.has_endpoints(WEB)


def test_serving_terminating_endpoints_take_traffic_when_nothing_is_ready() -> None:
    b = balancer((port(), (ep(1, ready=False, term=True), ep(2, ready=False))))
    assert chosen(b, 2) == ["10.0.0.1", "10.0.0.1"]


def test_internal_traffic_policy_local_restricts_internal_connections_only() -> None:
    b = balancer((port(internal_traffic_local=True), (ep(1, "node-a"), ep(2, "node-b"))))
    assert set(chosen(b, 4)) == {"10.0.0.1"}
    assert set(chosen(b, 4, external=True)) == {"10.0.0.1", "10.0.0.2"}


def test_external_traffic_policy_local_restricts_external_connections_only() -> None:
    b = balancer((port(external_traffic_local=True), (ep(1, "node-a"), ep(2, "node-b"))))
    assert set(chosen(b, 4, external=True)) == {"10.0.0.1"}
    assert set(chosen(b, 4)) == {"10.0.0.1", "10.0.0.2"}


def test_traffic_policy_local_without_local_endpoints_drops_rather_than_go_remote() -> None:
    b = balancer((port(external_traffic_local=True), (ep(2, "node-b"),)))
    assert b.choose(WEB, CLIENT, 0.0, external=True) is None
    assert b.choose(WEB, CLIENT, 0.0) is not None


def test_tried_endpoints_are_excluded() -> None:
    b = balancer((port(), (ep(1), ep(2), ep(3))))
    tried = frozenset({key_of(ep(1)), key_of(ep(2))})
    assert set(chosen(b, 5, tried=tried)) == {"10.0.0.3"}
    assert b.choose(WEB, CLIENT, 0.0, tried=tried | {key_of(ep(3))}) is None


# -- policy selection ----------------------------------------------------------------------------


def test_lb_policy_annotation_overrides_the_default() -> None:
    b = balancer((port(lb_policy=LbPolicy.RANDOM), (ep(1), ep(2))))
    assert b.describe(0.0)["services"][str(WEB)]["policy"] == "random"


def test_custom_policy_factory_is_asked_for_the_configured_kind() -> None:
    asked: list[LbPolicy] = []

    def factory(kind: LbPolicy) -> object:
        asked.append(kind)
        from rapproxy.balancer.policy import RoundRobin

        return RoundRobin()

    balancer((port(), (ep(1),)), default_policy=LbPolicy.RAP, policy_factory=factory)
    assert asked == [LbPolicy.RAP]


# -- session affinity ----------------------------------------------------------------------------

STICKY = port(affinity_timeout_seconds=60)
THREE = (ep(1), ep(2), ep(3))


def test_client_ip_affinity_sticks_to_the_first_choice() -> None:
    b = balancer((STICKY, THREE))
    first = chosen(b, 1, client="192.168.0.1")
    assert chosen(b, 5, client="192.168.0.1") == first * 5
    other = b.choose(WEB, "192.168.0.2", 0.0)
    assert other is not None and other.endpoint.ip != first[0]  # round-robin moved on
    choice = b.choose(WEB, "192.168.0.1", 1.0)
    assert choice is not None and choice.reason == "session affinity (ClientIP)"


def test_affinity_slides_with_each_connection_and_expires_after_idle_timeout() -> None:
    b = balancer((STICKY, THREE))
    (first,) = chosen(b, 1, now=0.0)
    for now in (50.0, 100.0, 150.0):
        assert chosen(b, 1, now=now) == [first]
    chosen(b, 1, client="192.168.0.2", now=150.0)  # moves the round-robin cursor
    assert chosen(b, 1, now=211.0) != [first]


def test_affinity_resets_when_a_dial_to_the_endpoint_fails() -> None:
    b = balancer((STICKY, THREE))
    (first,) = chosen(b, 1)
    b.dial_failed(WEB, (first, 8080), CLIENT, 0.0)
    (second,) = chosen(b, 1, tried=frozenset({(first, 8080)}))
    assert second != first
    assert chosen(b, 3) == [second] * 3


def test_affinity_is_not_honoured_for_an_endpoint_already_tried() -> None:
    b = balancer((STICKY, THREE))
    (first,) = chosen(b, 1)
    (second,) = chosen(b, 1, tried=frozenset({(first, 8080)}))
    assert second != first


def test_affinity_resets_when_the_endpoint_disappears() -> None:
    b = balancer((STICKY, THREE))
    (first,) = chosen(b, 1)
    remaining = tuple(e for e in THREE if e.ip != first)
    b.update(table((STICKY, remaining)))
    (now_on,) = chosen(b, 1)
    assert now_on != first
    b.update(table((STICKY, THREE)))
    assert chosen(b, 3) == [now_on] * 3
    assert b.describe(0.0)["services"][str(WEB)]["affinity_clients"] == 1


def test_affinity_survives_an_unrelated_endpoint_change() -> None:
    b = balancer((STICKY, THREE))
    (first,) = chosen(b, 1)
    b.update(table((STICKY, (*THREE, ep(4)))))
    assert chosen(b, 3) == [first] * 3


def test_affinity_is_not_honoured_when_the_sticky_endpoint_is_ejected() -> None:
    b = balancer((STICKY, THREE), outliers=OutlierSettings(consecutive_failures=1))
    (first,) = chosen(b, 1)
    b.dial_failed(WEB, (first, 8080), "192.168.0.77", 0.0)  # another client's failed dial
    assert chosen(b, 1, now=1.0) != [first]


def test_expire_affinity_counts_dropped_clients() -> None:
    b = balancer((STICKY, THREE))
    chosen(b, 1, client="192.168.0.1", now=0.0)
    chosen(b, 1, client="192.168.0.2", now=50.0)
    assert b.expire_affinity(100.0) == 1


def test_turning_affinity_off_drops_it() -> None:
    b = balancer((STICKY, THREE))
    chosen(b, 1)
    b.update(table((port(), THREE)))
    assert b.describe(0.0)["services"][str(WEB)]["affinity_clients"] is None
    assert len(set(chosen(b, 3))) == 3


# -- outlier detection ---------------------------------------------------------------------------


def test_endpoint_is_skipped_after_consecutive_dial_failures_then_returns() -> None:
    b = balancer((port(), (ep(1), ep(2))), outliers=OutlierSettings(3, 10.0, 100.0))
    for _ in range(3):
        b.dial_failed(WEB, key_of(ep(1)), CLIENT, 0.0)
    assert set(chosen(b, 4, now=1.0)) == {"10.0.0.2"}
    assert b.describe(1.0)["ejected"] == ["10.0.0.1:8080"]
    assert set(chosen(b, 4, now=11.0)) == {"10.0.0.1", "10.0.0.2"}


def test_all_ejected_is_panic_mode_not_an_outage() -> None:
    b = balancer((port(), (ep(1), ep(2))), outliers=OutlierSettings(1, 10.0, 100.0))
    b.dial_failed(WEB, key_of(ep(1)), CLIENT, 0.0)
    b.dial_failed(WEB, key_of(ep(2)), CLIENT, 0.0)
    assert set(chosen(b, 4, now=1.0)) == {"10.0.0.1", "10.0.0.2"}


def test_successful_connection_resets_the_failure_streak() -> None:
    b = balancer((port(), (ep(1), ep(2))), outliers=OutlierSettings(2, 10.0, 100.0))
    b.dial_failed(WEB, key_of(ep(1)), CLIENT, 0.0)
    b.connection_opened(key_of(ep(1)))
    b.dial_failed(WEB, key_of(ep(1)), CLIENT, 0.0)
    assert b.describe(0.0)["ejected"] == []


def test_outlier_state_of_removed_endpoints_is_forgotten() -> None:
    b = balancer((port(), (ep(1), ep(2))), outliers=OutlierSettings(1, 10.0, 100.0))
    b.dial_failed(WEB, key_of(ep(1)), CLIENT, 0.0)
    b.update(table((port(), (ep(2),))))
    assert b.describe(0.0)["ejected"] == []


def test_outlier_record_lives_until_the_last_service_listing_the_endpoint_drops_it() -> None:
    # Incremental updates (only the changed ports) prune as the whole-table update does.
    b = balancer(
        (port(), (ep(1), ep(2))), (port(API), (ep(1),)), outliers=OutlierSettings(1, 10.0, 100.0)
    )
    b.dial_failed(WEB, key_of(ep(1)), CLIENT, 0.0)
    first = table((port(), (ep(2),)), (port(API), (ep(1),)))
    b.update(first, {WEB})
    assert b.describe(0.0)["ejected"] == ["10.0.0.1:8080"]  # api still has it: still ejected
    second = table((port(), (ep(2),)))
    b.update(second, {API})
    assert b.describe(0.0)["ejected"] == []
    b.update(table((port(), (ep(1), ep(2)))), {WEB})
    assert chosen(b, 2) == ["10.0.0.1", "10.0.0.2"]  # back with a clean record


def test_endpoint_moving_between_services_in_one_update_keeps_its_record() -> None:
    b = balancer((port(), (ep(1), ep(2))), outliers=OutlierSettings(1, 10.0, 100.0))
    b.dial_failed(WEB, key_of(ep(1)), CLIENT, 0.0)
    b.update(table((port(), (ep(2),)), (port(API), (ep(1),))), {WEB, API})
    assert b.describe(0.0)["ejected"] == ["10.0.0.1:8080"]


def test_failed_dial_to_an_endpoint_no_service_lists_leaves_no_record() -> None:
    # The relay may report a dial it started before a sync removed the endpoint.
    b = balancer((port(), (ep(1), ep(2))), outliers=OutlierSettings(1, 10.0, 100.0))
    b.update(table((port(), (ep(2),))), {WEB})
    b.dial_failed(WEB, key_of(ep(1)), CLIENT, 0.0)
    b.update(table((port(), (ep(1), ep(2)))), {WEB})
    assert b.describe(0.0)["ejected"] == []


# -- state across snapshots ----------------------------------------------------------------------


def test_unchanged_service_keeps_its_round_robin_position_across_updates() -> None:
    entries = ((port(), (ep(1), ep(2), ep(3))), (port(API), (ep(9),)))
    b = balancer(*entries)
    assert chosen(b, 1) == ["10.0.0.1"]
    b.update(table(entries[0], (port(API), (ep(8), ep(9)))))
    assert chosen(b, 2) == ["10.0.0.2", "10.0.0.3"]


def test_changed_service_is_recategorized_and_keeps_its_cursor() -> None:
    b = balancer((port(), (ep(1), ep(2), ep(3))), default_policy=LbPolicy.RAP)
    assert chosen(b, 1) == ["10.0.0.1"]
    b.update(table((port(), (ep(1), ep(2), ep(3, ready=False), ep(4)))))
    assert chosen(b, 3) == ["10.0.0.2", "10.0.0.4", "10.0.0.1"]


def test_changing_the_policy_annotation_replaces_the_policy() -> None:
    b = balancer((port(), (ep(1), ep(2))))
    b.update(table((port(lb_policy=LbPolicy.LEAST_CONN), (ep(1), ep(2)))))
    assert b.describe(0.0)["services"][str(WEB)]["policy"] == "least-conn"


def test_removed_service_is_forgotten() -> None:
    b = balancer((port(), (ep(1),)), (port(API), (ep(2),)))
    b.update(table((port(API), (ep(2),))))
    assert b.choose(WEB, CLIENT, 0.0) is None
    assert list(b.describe(0.0)["services"]) == [str(API)]


# -- accounting and explainability ---------------------------------------------------------------


def test_active_connections_are_counted_per_endpoint() -> None:
    b = balancer((port(), (ep(1), ep(2))))
    b.connection_opened(key_of(ep(1)))
    b.connection_opened(key_of(ep(1)))
    assert b.active_connections(ep(1)) == 2
    b.connection_closed(key_of(ep(1)))
    assert b.active_connections(ep(1)) == 1
    b.connection_closed(key_of(ep(1)))
    b.connection_closed(key_of(ep(1)))  # an extra close never goes negative
    assert b.active_connections(ep(1)) == 0
    assert b.describe(0.0)["active_connections"] == {}


def test_requests_in_flight_count_connections_awaiting_an_answer_not_open_ones() -> None:
    b = balancer((port(), (ep(1), ep(2))))
    one = key_of(ep(1))
    b.connection_opened(one, 0.001, 1.0)
    b.connection_opened(one, 0.001, 1.0)
    assert b.requests_in_flight(ep(1)) == 2 and b.active_connections(ep(1)) == 2
    # Answered but not yet closed (the pod's FIN still on its way): open, not queued.
    b.first_response(one, 0.001, 0.02, 1.0)
    assert b.requests_in_flight(ep(1)) == 1 and b.active_connections(ep(1)) == 2
    # The latency sample is filed at the requests in flight when it came, itself included.
    assert b.signals.records[one].curve[0][0] == 2.0
    # Keep-alive: the answered connection's next request, and its (untimed) answer.
    b.request_started(one, 1.0)
    assert b.requests_in_flight(ep(1)) == 2
    b.response_started(one, 1.0)
    b.connection_closed(one, awaiting=False)
    assert b.requests_in_flight(ep(1)) == 1 and b.active_connections(ep(1)) == 1
    b.connection_closed(one)  # closed unanswered: its request ends with it
    b.connection_closed(one)  # an extra close never goes negative
    assert b.requests_in_flight(ep(1)) == 0 and b.active_connections(ep(1)) == 0
    assert b.describe(0.0)["requests_in_flight"] == {}


def test_every_answer_ends_a_silence_of_the_endpoint() -> None:
    b = balancer((port(), (ep(1), ep(2))))
    one = key_of(ep(1))
    b.connection_opened(one, 0.001, 1.0)  # handed work while idle: the silence starts here
    b.connection_opened(one, 0.001, 1.01)
    b.first_response(one, 0.001, 0.05, 1.05)
    b.first_response(one, 0.001, 0.09, 1.08)
    b.connection_opened(one, 0.001, 2.0)
    b.connection_closed(one)  # closed unanswered: no answer, no silence measured
    record = b.signals.records[one]
    assert list(record.gaps) == [pytest.approx(0.05), pytest.approx(0.03)]


def test_a_latency_sample_is_filed_under_the_queue_its_request_joined() -> None:
    b = balancer((port(), (ep(1), ep(2))))
    one = key_of(ep(1))
    assert b.connection_opened(one, 0.001, 1.0) == 1
    assert b.connection_opened(one, 0.001, 1.0) == 2  # joins a queue of one: two in flight
    # The second is answered first (no FIFO promised); each is filed where it joined, not at
    # the in-flight count when the answer came.
    b.first_response(one, 0.001, 0.030, 1.1, queued=2)
    b.first_response(one, 0.001, 0.090, 1.2, queued=1)
    curve = dict(b.signals.records[one].curve)
    assert curve == {1.0: pytest.approx(0.089), 2.0: pytest.approx(0.029)}


def test_stalled_for_counts_from_the_last_answer_while_requests_await_one() -> None:
    b = balancer((port(), (ep(1), ep(2))))
    one = key_of(ep(1))
    assert b.stalled_for(ep(1), 5.0) == 0.0  # nothing asked of it: not stalled, however long
    b.connection_opened(one, 0.001, 1.0)
    b.connection_opened(one, 0.001, 1.5)
    # Work since 1.0 and no answer: stalled from when it was handed work while idle.
    assert b.stalled_for(ep(1), 1.75) == 0.75
    b.first_response(one, 0.001, 0.9, 1.9)
    assert b.stalled_for(ep(1), 2.0) == pytest.approx(0.1)  # one answered: progress at 1.9
    b.first_response(one, 0.001, 0.5, 2.0)
    assert b.stalled_for(ep(1), 9.0) == 0.0  # idle again
    # Keep-alive: an answered connection's next request starts the clock again.
    b.request_started(one, 10.0)
    assert b.stalled_for(ep(1), 10.25) == 0.25
    b.connection_closed(one)  # closed unanswered: no request awaits, so no stall
    assert b.stalled_for(ep(1), 11.0) == 0.0
    assert b.stalled_for(ep(2), 11.0) == 0.0


def test_least_connections_uses_the_balancers_active_counts() -> None:
    b = balancer((port(lb_policy=LbPolicy.LEAST_CONN), (ep(1), ep(2))))
    for _ in range(3):
        b.connection_opened(key_of(ep(1)))
    assert set(chosen(b, 10)) == {"10.0.0.2"}


def test_selections_are_counted_by_placement() -> None:
    b = balancer((STICKY, (ep(1, "node-a"), ep(2, "node-b"))))
    chosen(b, 3, client="192.168.0.1")  # first choice, then two affinity hits
    chosen(b, 1, client="192.168.0.2")
    assert b.selections == Counter({Placement.LOCAL: 3, Placement.REMOTE: 1})


def test_describe_is_json_serialisable_and_explains_the_state() -> None:
    b = balancer(
        (STICKY, (ep(1, "node-a"), ep(2), ep(3, ready=False))),
        (port(API, lb_policy=LbPolicy.RANDOM), (Endpoint("fd00::1", 80, node_name="node-a"),)),
        outliers=OutlierSettings(1, 10.0, 100.0),
    )
    chosen(b, 1)
    b.connection_opened(key_of(ep(2)))
    b.dial_failed(WEB, key_of(ep(2)), CLIENT, 0.0)
    state = json.loads(json.dumps(b.describe(0.0)))
    assert state["node"] == "node-a"
    assert state["zone"] == "zone-a"
    assert state["services"][str(WEB)] == {
        "policy": "round-robin",
        "endpoints": ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"],
        "usable": ["10.0.0.1:8080", "10.0.0.2:8080"],
        "local": ["10.0.0.1:8080"],
        "affinity_clients": 0,
    }
    assert state["services"][str(API)]["endpoints"] == ["[fd00::1]:80"]
    assert state["ejected"] == ["10.0.0.2:8080"]
    assert state["active_connections"] == {"10.0.0.2:8080": 1}
    assert state["selections"] == {"local": 1}


# -- the invariant ---------------------------------------------------------------------------------

NODES = ("node-a", "node-b", "node-c")
# Figures go stale after 3 s and every step below advances the clock by 0.5 s, so a run sees fresh,
# stale, failed and missing telemetry for each node, and RAP's cached plan expiring by time alone.
RAP_SETTINGS = RapSettings(top_k=2, telemetry_interval=1.0, stale_after_periods=3.0)


@dataclass(frozen=True, slots=True)
class Report:
    """A telemetry sample for `node` arriving now, `age` seconds old (stale on arrival if > 3)."""

    node: str
    cpu: float
    memory: float
    age: float
    rtt: float


@dataclass(frozen=True, slots=True)
class PollFailed:
    """A failed poll of `node` (unreachable or garbage): its figures are unusable from now on."""

    node: str


# Few distinct addresses, so `tried`, dial failures and connection counts hit real endpoints.
endpoint_rows = st.lists(
    st.tuples(
        st.integers(1, 10),
        st.sampled_from(NODES),
        st.booleans(),
        st.booleans(),
    ),
    min_size=1,
    max_size=8,
    unique_by=lambda row: row[0],
)
# Mostly idle, sometimes inside or above the 0.7/0.8 hysteresis band; mostly fresh on arrival.
utilization = st.sampled_from([0.0, 0.3, 0.3, 0.75, 0.85, 1.0])


def telemetry_for(node: str) -> st.SearchStrategy[Report | PollFailed]:
    report = st.builds(
        Report,
        st.just(node),
        utilization,
        utilization,
        st.sampled_from([0.0, 0.0, 1.0, 5.0]),
        st.sampled_from([0.0, 0.0005, 0.02]),
    )
    # `one_of` would weigh every leaf alike; three reports for each failed poll.
    return st.sampled_from([True, True, True, False]).flatmap(
        lambda ok: report if ok else st.just(PollFailed(node))
    )


telemetry = st.sampled_from(NODES).flatmap(telemetry_for)
# What is known when traffic starts: per node, nothing, figures (fresh or stale), or a failed poll.
initial_telemetry = st.tuples(*(st.one_of(st.none(), telemetry_for(node)) for node in NODES))


def step_of(kind: str) -> st.SearchStrategy[tuple[str, str, bool, int] | Report | PollFailed]:
    if kind == "telemetry":
        return telemetry
    return st.tuples(
        st.just(kind),
        st.sampled_from(["192.168.0.1", "192.168.0.2"]),
        st.booleans(),
        st.integers(0, 10),
    )


actions = st.lists(
    st.sampled_from(["choose"] * 4 + ["fail", "open", "close"] + ["telemetry"] * 2).flatmap(
        step_of
    ),
    min_size=8,
    max_size=40,
)

service_options = st.tuples(st.booleans(), st.booleans(), st.sampled_from([None, 30]))


# One parameter per policy so each gets the full example budget (RAP's paths need the most).
@pytest.mark.parametrize(
    "policy",
    [
        LbPolicy.ROUND_ROBIN,
        LbPolicy.RANDOM,
        LbPolicy.LEAST_CONN,
        LbPolicy.RAP,
        LbPolicy.RAP_AIMD,
        LbPolicy.RAP_SWITCH,
    ],
)
@settings(max_examples=100, deadline=None)
@given(endpoint_rows, service_options, initial_telemetry, actions)
def test_choose_only_ever_returns_an_endpoint_usable_for_that_traffic(
    policy: LbPolicy,
    rows: list[tuple[int, str, bool, bool]],
    options: tuple[bool, bool, int | None],
    initial: tuple[Report | PollFailed | None, ...],
    steps: list[tuple[str, str, bool, int] | Report | PollFailed],
) -> None:
    internal_local, external_local, affinity = options
    endpoints = tuple(ep(i, node, ready=ready, term=term) for i, node, ready, term in rows)
    svc = port(
        internal_traffic_local=internal_local,
        external_traffic_local=external_local,
        affinity_timeout_seconds=affinity,
        lb_policy=policy,
    )
    # Wired as the daemon wires it: one real tracker, RAP reading its snapshots through the factory.
    tracker = TelemetryTracker(HERE.node_name, RAP_SETTINGS)
    factory = rap_policy_factory(tracker.snapshot, RAP_SETTINGS, random.Random(7))
    b = balancer((svc, endpoints), outliers=OutlierSettings(2, 5.0, 20.0), policy_factory=factory)
    assert b.describe(0.0)["services"][str(WEB)]["policy"] == policy.value
    categorized = categorize(endpoints, HERE)

    def feed(event: Report | PollFailed, now: float) -> None:
        if isinstance(event, PollFailed):
            tracker.record_failure(event.node, "connection refused")
            return
        stats = NodeStats(event.node, event.cpu, event.memory, now - event.age)
        if event.node == HERE.node_name:
            tracker.record_local(stats)
        else:
            tracker.record_peer(event.node, stats, event.rtt)

    now = 0.0
    for event in initial:
        if event is not None:
            feed(event, now)
    for step in steps:
        now += 0.5
        if isinstance(step, Report | PollFailed):
            feed(step, now)
            continue
        action, client, external, pick = step
        if action == "choose":
            tried = frozenset({(f"10.0.0.{pick}", 8080)})
            choice = b.choose(WEB, client, now, external=external, tried=tried)
            allowed = categorized.for_traffic(external_local if external else internal_local)
            allowed = tuple(e for e in allowed if key_of(e) not in tried)
            if choice is None:
                assert not allowed
            else:
                assert choice.endpoint in allowed
                if choice.placement is Placement.FALLBACK:
                    # only the utilization variants fall back, to any candidate
                    assert policy in (LbPolicy.RAP_AIMD, LbPolicy.RAP_SWITCH)
                else:
                    on_this_node = choice.endpoint.node_name == HERE.node_name
                    assert choice.placement is (
                        Placement.LOCAL if on_this_node else Placement.REMOTE
                    )
        elif action == "fail":
            b.dial_failed(WEB, (f"10.0.0.{pick}", 8080), client, now)
        elif action == "open":
            b.connection_opened((f"10.0.0.{pick}", 8080), 0.001 * pick, now)
            b.first_response((f"10.0.0.{pick}", 8080), 0.001 * pick, 0.003 * pick, now)
        else:
            b.connection_closed((f"10.0.0.{pick}", 8080))
    json.dumps(b.describe(now))


# -- decision counts (the kernel fast path's sample) ----------------------------------------------


def test_choices_are_counted_per_node_only_for_services_asked_for() -> None:
    b = balancer(
        (port(), (ep(1, "node-a"), ep(2, "node-b"), ep(3, "node-b"))),
        (port(API), (ep(4, "node-a"),)),
    )
    assert b.take_tally(WEB) == {}  # not counted until asked
    b.count_choices(WEB)
    chosen(b, 6)  # round-robin: a, b, b, a, b, b
    chosen(b, 2, API)
    assert b.take_tally(WEB) == {"node-a": 2, "node-b": 4}
    assert b.take_tally(API) == {}
    assert b.take_tally(WEB) == {}  # taken: counting starts again from zero
    chosen(b, 3)
    assert b.take_tally(WEB) == {"node-a": 1, "node-b": 2}
    b.stop_counting(WEB)
    chosen(b, 3)
    assert b.take_tally(WEB) == {}
