"""Endpoint categorization: kube-proxy's CategorizeEndpoints (pkg/proxy/topology.go), case by case."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rapproxy.balancer.categorize import Locality, categorize, usable_endpoints
from rapproxy.model.endpoints import Endpoint

HERE = Locality("node-a", "zone-a")


def ep(
    last_octet: int,
    node: str | None = "node-b",
    *,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    zones: tuple[str, ...] = (),
    nodes: tuple[str, ...] = (),
) -> Endpoint:
    return Endpoint(
        ip=f"10.0.0.{last_octet}",
        port=8080,
        node_name=node,
        zone=None,
        ready=ready,
        serving=ready if serving is None else serving,
        terminating=terminating,
        zone_hints=frozenset(zones),
        node_hints=frozenset(nodes),
    )


def terminating(last_octet: int, node: str | None = "node-b", **kw: object) -> Endpoint:
    return ep(last_octet, node, ready=False, serving=True, terminating=True, **kw)  # type: ignore[arg-type]


def not_ready(last_octet: int, node: str | None = "node-b") -> Endpoint:
    return ep(last_octet, node, ready=False)


def ips(endpoints: tuple[Endpoint, ...]) -> list[str]:
    return [e.ip for e in endpoints]


def test_only_ready_endpoints_are_used_when_some_are_ready() -> None:
    result = categorize([ep(1), not_ready(2), terminating(3)], HERE)
    assert ips(result.cluster) == ["10.0.0.1"]
    assert result.any_endpoints


def test_serving_terminating_endpoints_are_used_when_none_is_ready() -> None:
    result = categorize([not_ready(1), terminating(2), terminating(3)], HERE)
    assert ips(result.cluster) == ["10.0.0.2", "10.0.0.3"]
    assert result.any_endpoints


def test_terminating_endpoints_that_stopped_serving_are_never_used() -> None:
    gone = ep(1, ready=False, serving=False, terminating=True)
    result = categorize([gone, not_ready(2)], HERE)
    assert result.cluster == ()
    assert result.local == ()
    assert not result.any_endpoints


def test_no_endpoints_at_all() -> None:
    result = categorize([], HERE)
    assert (result.cluster, result.local, result.any_endpoints) == ((), (), False)


def test_usable_endpoints_prefers_ready_then_serving_terminating() -> None:
    assert ips(usable_endpoints([ep(1), terminating(2)])) == ["10.0.0.1"]
    assert ips(usable_endpoints([not_ready(1), terminating(2)])) == ["10.0.0.2"]


def test_local_endpoints_are_the_usable_ones_on_this_node() -> None:
    result = categorize([ep(1, "node-a"), ep(2, "node-b"), not_ready(3, "node-a")], HERE)
    assert ips(result.local) == ["10.0.0.1"]
    assert ips(result.for_traffic(local_only=True)) == ["10.0.0.1"]
    assert ips(result.for_traffic(local_only=False)) == ["10.0.0.1", "10.0.0.2"]


def test_endpoint_without_node_name_is_never_local() -> None:
    assert categorize([ep(1, None)], HERE).local == ()


def test_local_policy_has_no_remote_fallback_but_service_still_has_endpoints() -> None:
    result = categorize([ep(1, "node-b")], HERE)
    assert result.local == ()
    assert result.any_endpoints  # kube-proxy drops (not rejects) such traffic


def test_local_serving_terminating_endpoint_is_used_while_remote_ones_are_ready() -> None:
    # KEP-1669: with traffic policy Local, a node whose own pods are all terminating keeps sending
    # its clients to them rather than dropping the traffic, even if other nodes have ready pods.
    result = categorize([terminating(1, "node-a"), ep(2, "node-b")], HERE)
    assert ips(result.local) == ["10.0.0.1"]
    assert ips(result.cluster) == ["10.0.0.2"]


def test_local_ready_endpoints_win_over_local_terminating_ones() -> None:
    result = categorize([terminating(1, "node-a"), ep(2, "node-a")], HERE)
    assert ips(result.local) == ["10.0.0.2"]


def test_zone_hints_narrow_to_this_zone_when_every_ready_endpoint_has_hints() -> None:
    result = categorize(
        [ep(1, zones=("zone-a",)), ep(2, zones=("zone-b",)), ep(3, zones=("zone-a", "zone-c"))],
        HERE,
    )
    assert ips(result.cluster) == ["10.0.0.1", "10.0.0.3"]


def test_zone_hints_are_ignored_when_one_ready_endpoint_lacks_them() -> None:
    result = categorize([ep(1, zones=("zone-a",)), ep(2)], HERE)
    assert ips(result.cluster) == ["10.0.0.1", "10.0.0.2"]


def test_zone_hints_of_not_ready_endpoints_do_not_matter() -> None:
    result = categorize([ep(1, zones=("zone-a",)), ep(2, zones=("zone-b",)), not_ready(3)], HERE)
    assert ips(result.cluster) == ["10.0.0.1"]


def test_zone_hints_are_ignored_when_none_matches_this_zone() -> None:
    result = categorize([ep(1, zones=("zone-b",)), ep(2, zones=("zone-c",))], HERE)
    assert ips(result.cluster) == ["10.0.0.1", "10.0.0.2"]


def test_zone_hints_are_ignored_when_this_node_has_no_zone() -> None:
    result = categorize([ep(1, zones=("zone-a",)), ep(2, zones=("zone-b",))], Locality("node-a"))
    assert ips(result.cluster) == ["10.0.0.1", "10.0.0.2"]


def test_node_hints_narrow_to_this_node_and_take_precedence_over_zone_hints() -> None:
    result = categorize(
        [
            ep(1, zones=("zone-a",), nodes=("node-x",)),
            ep(2, zones=("zone-b",), nodes=("node-a",)),
        ],
        HERE,
    )
    assert ips(result.cluster) == ["10.0.0.2"]


def test_node_hints_apply_even_when_this_node_has_no_zone() -> None:
    result = categorize([ep(1, nodes=("node-a",)), ep(2, nodes=("node-x",))], Locality("node-a"))
    assert ips(result.cluster) == ["10.0.0.1"]


def test_zone_hints_apply_when_node_hints_do_not_match_this_node() -> None:
    result = categorize(
        [ep(1, zones=("zone-a",), nodes=("node-x",)), ep(2, zones=("zone-b",), nodes=("node-y",))],
        HERE,
    )
    assert ips(result.cluster) == ["10.0.0.1"]


def test_zone_hints_apply_when_only_some_endpoints_have_node_hints() -> None:
    result = categorize(
        [ep(1, zones=("zone-a",), nodes=("node-x",)), ep(2, zones=("zone-b",))], HERE
    )
    assert ips(result.cluster) == ["10.0.0.1"]


def test_topology_is_not_applied_to_the_serving_terminating_fallback() -> None:
    result = categorize(
        [terminating(1, zones=("zone-a",)), terminating(2, zones=("zone-b",))], HERE
    )
    assert ips(result.cluster) == ["10.0.0.1", "10.0.0.2"]


def test_topology_does_not_narrow_the_local_set() -> None:
    result = categorize(
        [ep(1, "node-a", zones=("zone-b",)), ep(2, "node-b", zones=("zone-a",))], HERE
    )
    assert ips(result.cluster) == ["10.0.0.2"]
    assert ips(result.local) == ["10.0.0.1"]


endpoints_strategy = st.lists(
    st.builds(
        lambda i, node, ready, serving, term, zones, nodes: ep(
            i, node, ready=ready, serving=serving, terminating=term, zones=zones, nodes=nodes
        ),
        st.integers(1, 250),
        st.sampled_from(["node-a", "node-b", "node-c", None]),
        st.booleans(),
        st.booleans(),
        st.booleans(),
        st.lists(st.sampled_from(["zone-a", "zone-b"]), max_size=2, unique=True).map(tuple),
        st.lists(st.sampled_from(["node-a", "node-b"]), max_size=2, unique=True).map(tuple),
    ),
    max_size=10,
)


@settings(max_examples=100, deadline=None)
@given(
    endpoints_strategy, st.sampled_from([HERE, Locality("node-a"), Locality("node-z", "zone-b")])
)
def test_categorized_sets_are_usable_subsets_and_never_empty_without_reason(
    endpoints: list[Endpoint], where: Locality
) -> None:
    result = categorize(endpoints, where)
    usable = usable_endpoints(endpoints)
    st_ = [e for e in endpoints if e.serving and e.terminating]
    assert set(result.cluster) <= set(usable)
    assert all(e.node_name == where.node_name for e in result.local)
    assert all(e.ready or (e.serving and e.terminating) for e in result.local)
    assert result.any_endpoints == bool(usable)
    assert bool(result.cluster) == bool(usable)
    locals_usable = [e for e in endpoints if e.node_name == where.node_name]
    assert bool(result.local) == any(e.ready or e in st_ for e in locals_usable)
