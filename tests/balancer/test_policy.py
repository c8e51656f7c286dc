"""Balancing policies: round-robin, random, least-connections (p2c) and local-only."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rapproxy.balancer.categorize import Locality
from rapproxy.balancer.policy import (
    LeastConnections,
    LocalOnly,
    Placement,
    RandomChoice,
    RoundRobin,
    SelectionContext,
    placement_of,
)
from rapproxy.model.endpoints import Endpoint
from rapproxy.model.service import LbPolicy, ServicePortName

HERE = Locality("node-a", "zone-a")
SERVICE = ServicePortName("default", "web", "http")


def ep(i: int, node: str = "node-b") -> Endpoint:
    return Endpoint(f"10.0.0.{i}", 8080, node_name=node)


def context(load: dict[Endpoint, int] | None = None) -> SelectionContext:
    counts = load or {}
    return SelectionContext(SERVICE, "192.168.0.9", 100.0, HERE, lambda e: counts.get(e, 0))


def picks(policy: object, candidates: list[Endpoint], n: int, ctx: SelectionContext) -> list[str]:
    out = []
    for _ in range(n):
        choice = policy.choose(candidates, ctx)  # type: ignore[attr-defined]
        assert choice is not None
        out.append(choice.endpoint.ip)
    return out


def test_policies_name_themselves() -> None:
    rng = random.Random(1)
    assert RoundRobin().name is LbPolicy.ROUND_ROBIN
    assert RandomChoice(rng).name is LbPolicy.RANDOM
    assert LeastConnections(rng).name is LbPolicy.LEAST_CONN
    assert LocalOnly().name is LbPolicy.LOCAL_ONLY


@pytest.mark.parametrize(
    "policy",
    [RoundRobin(), RandomChoice(random.Random(1)), LeastConnections(random.Random(1)), LocalOnly()],
)
def test_no_candidates_means_no_choice(policy: object) -> None:
    assert policy.choose([], context()) is None  # type: ignore[attr-defined]


def test_placement_is_local_only_for_endpoints_on_this_node() -> None:
    assert placement_of(ep(1, "node-a"), HERE) is Placement.LOCAL
    assert placement_of(ep(1, "node-b"), HERE) is Placement.REMOTE


def test_round_robin_cycles_through_the_candidates_in_order() -> None:
    candidates = [ep(1), ep(2), ep(3)]
    assert picks(RoundRobin(), candidates, 7, context()) == [
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
        "10.0.0.1",
    ]


def test_round_robin_continues_from_its_position_when_the_list_grows() -> None:
    rr = RoundRobin()
    assert picks(rr, [ep(1), ep(2), ep(3)], 2, context()) == ["10.0.0.1", "10.0.0.2"]
    assert picks(rr, [ep(1), ep(2), ep(3), ep(4)], 3, context()) == [
        "10.0.0.3",
        "10.0.0.4",
        "10.0.0.1",
    ]


def test_round_robin_wraps_when_the_list_shrinks_below_its_position() -> None:
    rr = RoundRobin()
    picks(rr, [ep(1), ep(2), ep(3), ep(4)], 3, context())
    assert picks(rr, [ep(1), ep(2)], 3, context()) == ["10.0.0.2", "10.0.0.1", "10.0.0.2"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=20))
def test_round_robin_spreads_evenly_whatever_the_list_changes(sizes: list[int]) -> None:
    rr = RoundRobin()
    for size in sizes:
        candidates = [ep(i) for i in range(1, size + 1)]
        counts = Counter(picks(rr, candidates, size * 3, context()))
        assert set(counts.values()) == {3}


def test_round_robin_reports_placement() -> None:
    choice = RoundRobin().choose([ep(1, "node-a")], context())
    assert choice is not None
    assert choice.placement is Placement.LOCAL
    assert choice.reason == "round-robin"


def test_random_uses_every_candidate() -> None:
    candidates = [ep(i) for i in range(1, 6)]
    counts = Counter(picks(RandomChoice(random.Random(7)), candidates, 1000, context()))
    assert set(counts) == {e.ip for e in candidates}
    assert min(counts.values()) > 120  # 200 expected each


def test_random_is_reproducible_with_a_seeded_source() -> None:
    candidates = [ep(i) for i in range(1, 6)]
    a = picks(RandomChoice(random.Random(3)), candidates, 20, context())
    b = picks(RandomChoice(random.Random(3)), candidates, 20, context())
    assert a == b


def test_least_connections_picks_the_idle_one_of_two() -> None:
    busy, idle = ep(1), ep(2)
    ctx = context({busy: 5, idle: 0})
    assert set(picks(LeastConnections(random.Random(1)), [busy, idle], 50, ctx)) == {"10.0.0.2"}


def test_least_connections_with_one_candidate_picks_it() -> None:
    choice = LeastConnections(random.Random(1)).choose([ep(1)], context())
    assert choice is not None and choice.endpoint == ep(1)


def test_least_connections_samples_every_endpoint_when_loads_are_equal() -> None:
    candidates = [ep(i) for i in range(1, 5)]
    counts = Counter(picks(LeastConnections(random.Random(2)), candidates, 400, context()))
    assert set(counts) == {e.ip for e in candidates}


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 20), min_size=2, max_size=8),
    st.integers(0, 2**32),
)
def test_least_connections_never_picks_the_strictly_most_loaded(
    loads: list[int], seed: int
) -> None:
    candidates = [ep(i) for i in range(1, len(loads) + 1)]
    load = dict(zip(candidates, loads, strict=True))
    choice = LeastConnections(random.Random(seed)).choose(candidates, context(load))
    assert choice is not None
    most = max(loads)
    if loads.count(most) == 1:
        assert load[choice.endpoint] < most


def test_local_only_picks_only_local_endpoints_round_robin() -> None:
    candidates = [ep(1, "node-a"), ep(2, "node-b"), ep(3, "node-a")]
    result = picks(LocalOnly(), candidates, 4, context())
    assert result == ["10.0.0.1", "10.0.0.3", "10.0.0.1", "10.0.0.3"]


def test_local_only_without_local_endpoints_chooses_nothing() -> None:
    assert LocalOnly().choose([ep(1, "node-b")], context()) is None
