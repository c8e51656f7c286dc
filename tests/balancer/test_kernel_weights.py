"""Kernel-mode weights: RAP's per-connection split, turned into per-endpoint shares (pure)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rapproxy.balancer.kernel_weights import (
    KernelWeights,
    blend,
    kernel_weights,
    layout_of,
    node_slots,
    observed_split,
    relabel,
    shares_moved,
    slot_shares,
    slot_shares_moved,
    split_weights,
    uniform_weights,
    weights_moved,
)
from rapproxy.model.endpoints import Endpoint
from rapproxy.model.telemetry import EMPTY_VIEW, NodeStats, RapSettings, TelemetryTracker

LOCAL = "n0"
NOW = 1000.0
SETTINGS = RapSettings()  # rap-aimd's defaults: backoff 0.7 per overloaded sample


def endpoints(nodes: Sequence[str], per_node: int = 2) -> tuple[Endpoint, ...]:
    return tuple(
        Endpoint(f"10.0.{i}.{j + 1}", 8080, node_name=node)
        for i, node in enumerate(nodes)
        for j in range(per_node)
    )


def tracker(
    local_load: float, peers: dict[str, tuple[float, float]], samples: int = 1
) -> TelemetryTracker:
    """A tracker that saw `samples` local samples at `local_load`; peers: node → (cpu, rtt)."""
    t = TelemetryTracker(LOCAL, SETTINGS)
    for _ in range(samples):
        t.record_local(NodeStats(LOCAL, local_load, 0.2, NOW))
    for node, (cpu, rtt) in peers.items():
        t.record_peer(node, NodeStats(node, cpu, 0.2, NOW), rtt)
    return t


def by_node(weights: KernelWeights) -> dict[str | None, float]:
    out: dict[str | None, float] = {}
    for share in weights.shares:
        out[share.node] = out.get(share.node, 0.0) + share.share
    return out


def test_a_local_node_that_copes_keeps_every_new_connection_spread_over_its_endpoints() -> None:
    view = tracker(0.3, {"n1": (0.1, 0.001), "n2": (0.1, 0.001)}).snapshot()
    weights = kernel_weights(endpoints([LOCAL, "n1", "n2"]), view, LOCAL, NOW, SETTINGS)
    assert by_node(weights) == {LOCAL: 1.0, "n1": 0.0, "n2": 0.0}
    assert [s.share for s in weights.shares[:2]] == [0.5, 0.5]
    assert weights.decision == "local"


def test_an_overloaded_node_keeps_its_shrinking_local_share_and_spills_the_rest() -> None:
    candidates = endpoints([LOCAL, "n1", "n2"])
    once = kernel_weights(
        candidates, tracker(0.95, {"n1": (0.1, 0.001)}).snapshot(), LOCAL, NOW, SETTINGS
    )
    twice = kernel_weights(
        candidates, tracker(0.95, {"n1": (0.1, 0.001)}, 2).snapshot(), LOCAL, NOW, SETTINGS
    )
    assert by_node(once)[LOCAL] == pytest.approx(0.7)  # TelemetryTracker.local_share
    assert by_node(twice)[LOCAL] == pytest.approx(0.49)
    assert once.local_share == pytest.approx(0.7)


def test_spilled_share_goes_to_the_best_scored_nodes_in_proportion_never_all_to_one() -> None:
    # n1 is closer and idler than n2; n3 is overloaded and gets nothing.
    view = tracker(0.95, {"n1": (0.1, 0.001), "n2": (0.5, 0.004), "n3": (0.95, 0.001)}).snapshot()
    weights = kernel_weights(endpoints([LOCAL, "n1", "n2", "n3"]), view, LOCAL, NOW, SETTINGS)
    nodes = by_node(weights)
    assert nodes["n3"] == 0.0
    assert nodes["n1"] > nodes["n2"] > 0.0
    assert nodes["n1"] + nodes["n2"] == pytest.approx(0.3)


def test_no_telemetry_means_kube_proxys_even_split() -> None:
    candidates = endpoints([LOCAL, "n1"], per_node=3)
    weights = kernel_weights(candidates, EMPTY_VIEW, LOCAL, NOW, SETTINGS)
    assert [s.share for s in weights.shares] == pytest.approx([1 / 6] * 6)


def test_without_local_endpoints_everything_is_split_over_remote_nodes() -> None:
    view = tracker(0.3, {"n1": (0.1, 0.001), "n2": (0.1, 0.001)}).snapshot()
    weights = kernel_weights(endpoints(["n1", "n2"]), view, LOCAL, NOW, SETTINGS)
    assert by_node(weights) == pytest.approx({"n1": 0.5, "n2": 0.5})


def test_no_candidates_have_no_weights() -> None:
    assert kernel_weights((), EMPTY_VIEW, LOCAL, NOW, SETTINGS).shares == ()
    assert uniform_weights((), "x").shares == ()


def test_weights_moved_only_beyond_the_threshold_or_when_endpoints_change() -> None:
    a = uniform_weights(endpoints([LOCAL, "n1"], 1), "even")
    view = tracker(0.95, {"n1": (0.1, 0.001)}).snapshot()
    b = kernel_weights(endpoints([LOCAL, "n1"], 1), view, LOCAL, NOW, SETTINGS)  # 0.7 / 0.3
    assert weights_moved(None, a, 0.5)
    assert not weights_moved(a, a, 0.0)
    assert weights_moved(a, b, 0.1)
    assert not weights_moved(a, b, 0.25)
    assert weights_moved(a, uniform_weights(endpoints([LOCAL], 2), "even"), 1.0)


@given(
    local_load=st.floats(0.0, 1.0),
    samples=st.integers(1, 6),
    peer_loads=st.lists(st.floats(0.0, 1.0), min_size=0, max_size=5),
    per_node=st.integers(1, 3),
    with_local=st.booleans(),
)
def test_shares_are_a_distribution_over_the_candidates(
    local_load: float, samples: int, peer_loads: list[float], per_node: int, with_local: bool
) -> None:
    peers = {f"n{i + 1}": (load, 0.001 * (i + 1)) for i, load in enumerate(peer_loads)}
    nodes = ([LOCAL] if with_local else []) + list(peers)
    candidates = endpoints(nodes, per_node)
    weights = kernel_weights(
        candidates, tracker(local_load, peers, samples).snapshot(), LOCAL, NOW, SETTINGS
    )
    assert len(weights.shares) == len(candidates)
    if candidates:
        assert sum(s.share for s in weights.shares) == pytest.approx(1.0)
        assert all(s.share >= 0 for s in weights.shares)


@given(
    nodes=st.lists(st.sampled_from([LOCAL, "n1", "n2", "n3"]), min_size=1, max_size=4),
    per_node=st.integers(1, 3),
    local_load=st.floats(0.0, 1.0),
    samples=st.integers(1, 4),
)
def test_weights_of_one_layout_relabelled_equal_the_weights_computed_for_the_endpoints(
    nodes: list[str], per_node: int, local_load: float, samples: int
) -> None:
    # Why the proxier may compute once per layout: only the nodes matter, not the addresses.
    view = tracker(local_load, {"n1": (0.2, 0.002), "n2": (0.5, 0.01)}, samples).snapshot()
    mine = endpoints(nodes, per_node)
    other = tuple(Endpoint(f"10.9.{i}.9", 9090, node_name=e.node_name) for i, e in enumerate(mine))
    assert layout_of(mine) == layout_of(other)
    computed_for_other = kernel_weights(other, view, LOCAL, NOW, SETTINGS)
    assert relabel(computed_for_other, mine) == kernel_weights(mine, view, LOCAL, NOW, SETTINGS)


def test_shares_moved_compares_by_position_against_the_threshold() -> None:
    view = tracker(0.95, {"n1": (0.1, 0.001)}, samples=1).snapshot()
    old = kernel_weights(endpoints([LOCAL, "n1"]), view, LOCAL, NOW, SETTINGS)
    assert not shares_moved(old, old, 0.0)
    assert shares_moved(None, old, 0.5)
    moved = kernel_weights(
        endpoints([LOCAL, "n1"]),
        tracker(0.95, {"n1": (0.1, 0.001)}, 2).snapshot(),
        LOCAL,
        NOW,
        SETTINGS,
    )
    assert shares_moved(old, moved, 0.05)  # local 0.35 each -> 0.245 each
    assert not shares_moved(old, moved, 0.2)
    with pytest.raises(ValueError, match="2 shares for 3 candidates"):
        relabel(uniform_weights(endpoints([LOCAL], 2), "even"), endpoints([LOCAL], 3))


# -- the sampled split: the proxy's decisions on a sample become the weights ----------------------


def test_a_split_is_observed_only_from_enough_decisions() -> None:
    assert observed_split({"n0": 3, "n1": 4}) is None  # 7 < MIN_SAMPLES
    assert observed_split({"n0": 6, "n1": 2, "n2": 0}) == {"n0": 0.75, "n1": 0.25}


def test_blend_moves_half_way_to_what_was_observed_and_stays_normalized() -> None:
    previous = {"n0": 1.0}
    mixed = blend(previous, {"n0": 0.2, "n1": 0.8}, 0.5)
    assert mixed == pytest.approx({"n0": 0.6, "n1": 0.4})
    assert blend(None, {"n1": 1.0}, 0.5) == {"n1": 1.0}
    assert blend({"n0": 0.0}, {"n0": 0.0}, 0.5) == {}


def test_split_weights_spread_a_nodes_share_over_its_endpoints_and_drop_gone_nodes() -> None:
    candidates = endpoints(["n0", "n1"])  # two endpoints each
    weights = split_weights(candidates, {"n0": 0.6, "n1": 0.2, "n9": 0.2}, LOCAL, "sampled")
    assert weights is not None
    # n9 has no candidate any more: the others keep their proportions, 0.75 / 0.25.
    assert [s.share for s in weights.shares] == pytest.approx([0.375, 0.375, 0.125, 0.125])
    assert weights.local_share == pytest.approx(0.75)
    assert weights.decision == "sampled"
    assert split_weights(candidates, {"n9": 1.0}, LOCAL, "sampled") is None


def test_a_layout_names_its_nodes_by_first_appearance_and_sums_their_shares() -> None:
    layout = ("b", "a", "b", None)
    assert node_slots(layout) == (("b", "a", None), (1, 2, 1, 3))
    weights = split_weights(endpoints(["b", "a"], per_node=1), {"a": 0.3, "b": 0.7}, "a", "x")
    assert weights is not None
    assert slot_shares(weights, (1, 2)) == pytest.approx((0.7, 0.3))
    with pytest.raises(ValueError, match="2 shares for 3 candidates"):
        slot_shares(weights, (1, 2, 2))


def test_a_node_split_moved_beyond_the_threshold_or_with_another_node_count() -> None:
    assert not slot_shares_moved((0.5, 0.5), (0.54, 0.46), 0.05)
    assert slot_shares_moved((0.5, 0.5), (0.56, 0.44), 0.05)
    assert slot_shares_moved((0.5, 0.5), (0.5, 0.5, 0.0), 0.05)
