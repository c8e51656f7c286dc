"""The RAP policy, driven with hand-made telemetry snapshots: no sockets, no clock."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rapproxy.balancer.balancer import Balancer
from rapproxy.balancer.categorize import Locality
from rapproxy.balancer.policy import Choice, Placement, SelectionContext
from rapproxy.balancer.rap import RapDecision, UtilizationRapPolicy, rap_policy_factory
from rapproxy.balancer.rap_cost import CostRapPolicy
from rapproxy.model.endpoints import Endpoint
from rapproxy.model.service import LbPolicy, ServicePort, ServicePortName
from rapproxy.model.table import ServiceEntry, ServiceTable
from rapproxy.model.telemetry import NodeStats, RapSettings, TelemetryTracker, TelemetryView

LOCAL = "n0"
NAME = ServicePortName("default", "web", "http")
NOW = 1000.0


def endpoints(nodes: Sequence[str], per_node: int = 2) -> tuple[Endpoint, ...]:
    out = []
    for i, node in enumerate(nodes):
        for j in range(per_node):
            out.append(Endpoint(f"10.0.{i}.{j + 1}", 8080, node_name=node))
    return tuple(out)


# The paper's all-or-nothing switch: one overloaded sample sends every new connection away, one
# below the exit threshold takes them all back. Most tests here are about *where* spilled traffic
# goes, so they use it; the default gradual local share has tests of its own below.
SWITCH = RapSettings(spill_backoff=0.0, spill_recovery=1.0)


class Load:
    """A tracker fed with figures dated `NOW` (fresh) unless told otherwise."""

    def __init__(self, settings: RapSettings | None = None) -> None:
        self.tracker = TelemetryTracker(LOCAL, settings or SWITCH)

    def set(
        self,
        node: str,
        cpu: float,
        memory: float = 0.1,
        rtt: float = 0.001,
        at: float = NOW,
    ) -> Load:
        stats = NodeStats(node, cpu, memory, at)
        if node == LOCAL:
            self.tracker.record_local(stats)
        else:
            self.tracker.record_peer(node, stats, rtt)
        return self

    def view(self) -> TelemetryView:
        return self.tracker.snapshot()


def context(active: dict[Endpoint, int] | None = None, now: float = NOW) -> SelectionContext:
    counts = active or {}
    return SelectionContext(NAME, "192.0.2.1", now, Locality(LOCAL), lambda e: counts.get(e, 0))


def policy(load: Load, seed: int = 1, settings: RapSettings | None = None) -> UtilizationRapPolicy:
    return UtilizationRapPolicy(load.view, settings or load.tracker.settings, random.Random(seed))


def picks(
    p: UtilizationRapPolicy, candidates: Sequence[Endpoint], n: int, now: float = NOW
) -> list[Choice]:
    out = []
    for _ in range(n):
        choice = p.choose(candidates, context(now=now))
        assert choice is not None
        out.append(choice)
    return out


def nodes_of(choices: Sequence[Choice]) -> Counter[str | None]:
    return Counter(c.endpoint.node_name for c in choices)


# -- local first --------------------------------------------------------------------------------


def test_stays_local_while_local_node_is_under_threshold() -> None:
    candidates = endpoints([LOCAL, "n1", "n2"])
    load = Load().set(LOCAL, 0.79, 0.79).set("n1", 0.0).set("n2", 0.0)
    choices = picks(policy(load), candidates, 50)
    assert {c.placement for c in choices} == {Placement.LOCAL}
    assert nodes_of(choices) == Counter({LOCAL: 50})


def test_local_choice_is_least_connections_then_round_robin_on_ties() -> None:
    candidates = endpoints([LOCAL, "n1"], per_node=3)
    a, b, c = candidates[:3]
    load = Load().set(LOCAL, 0.1).set("n1", 0.1)
    p = policy(load)
    busy = {a: 5, b: 1, c: 1}
    got = [p.choose(candidates, context(busy)) for _ in range(4)]
    assert [x.endpoint for x in got if x] == [b, c, b, c]
    idle: dict[Endpoint, int] = {}
    got = [p.choose(candidates, context(idle)) for _ in range(6)]
    assert Counter(x.endpoint for x in got if x) == Counter({a: 2, b: 2, c: 2})


def test_spills_to_remote_when_local_overloaded_and_returns_only_below_exit() -> None:
    candidates = endpoints([LOCAL, "n1"])
    load = Load().set("n1", 0.2)
    p = policy(load)

    def placement() -> Placement:
        choice = p.choose(candidates, context())
        assert choice is not None
        return choice.placement

    load.set(LOCAL, 0.5)
    assert placement() is Placement.LOCAL
    load.set(LOCAL, 0.8)  # reaches the overload threshold
    assert placement() is Placement.REMOTE
    load.set(LOCAL, 0.75)  # between exit and enter: still overloaded (hysteresis)
    assert placement() is Placement.REMOTE
    load.set(LOCAL, 0.5, memory=0.72)  # memory alone keeps it overloaded
    assert placement() is Placement.REMOTE
    load.set(LOCAL, 0.69, memory=0.5)  # both below exit
    assert placement() is Placement.LOCAL
    load.set(LOCAL, 0.75)  # below enter again: stays local
    assert placement() is Placement.LOCAL


def test_busy_node_keeps_a_shrinking_share_and_spills_only_the_rest() -> None:
    candidates = endpoints([LOCAL, "n1"])
    load = Load(RapSettings()).set("n1", 0.2)  # default: backoff 0.7, recovery 0.1
    p = policy(load, seed=7)

    def local_fraction() -> float:
        return nodes_of(picks(p, candidates, 2000))[LOCAL] / 2000

    load.set(LOCAL, 0.5)
    assert local_fraction() == 1.0
    load.set(LOCAL, 0.9)
    assert local_fraction() == pytest.approx(0.7, abs=0.04)
    load.set(LOCAL, 0.95)
    assert local_fraction() == pytest.approx(0.49, abs=0.04)
    load.set(LOCAL, 0.75)  # between the thresholds: the share holds
    assert local_fraction() == pytest.approx(0.49, abs=0.04)
    load.set(LOCAL, 0.5)  # below exit: back step by step, not at once
    assert local_fraction() == pytest.approx(0.59, abs=0.04)
    for _ in range(5):  # 0.49 + 6 x 0.1 >= 1
        load.set(LOCAL, 0.5)
    assert local_fraction() == 1.0


def test_a_node_that_stays_overloaded_ends_up_keeping_nothing() -> None:
    candidates = endpoints([LOCAL, "n1"])
    load = Load(RapSettings()).set("n1", 0.2)
    p = policy(load)
    for _ in range(9):  # 0.7**9 = 0.04: below the smallest share worth keeping
        load.set(LOCAL, 1.0)
    assert load.view().local_share == 0.0
    assert nodes_of(picks(p, candidates, 200)) == Counter({"n1": 200})
    assert p.explain(candidates, NOW)["decision"] == "remote"


def test_memory_alone_overloads_the_local_node() -> None:
    candidates = endpoints([LOCAL, "n1"])
    load = Load().set(LOCAL, 0.1, memory=0.85).set("n1", 0.1)
    assert {c.placement for c in picks(policy(load), candidates, 10)} == {Placement.REMOTE}


def test_hysteresis_is_per_node_and_shared_by_all_services() -> None:
    load = Load().set("n1", 0.2).set(LOCAL, 0.9).set(LOCAL, 0.75)
    web, db = policy(load, 1), policy(load, 2)
    for candidates in (endpoints([LOCAL, "n1"]), endpoints([LOCAL, "n1"], per_node=1)):
        for p in (web, db):
            choice = p.choose(candidates, context())
            assert choice is not None and choice.placement is Placement.REMOTE


def test_custom_thresholds_are_honoured() -> None:
    settings = replace(SWITCH, overload_threshold=0.5, exit_threshold=0.4)
    candidates = endpoints([LOCAL, "n1"])
    load = Load(settings).set("n1", 0.1).set(LOCAL, 0.55)
    assert picks(policy(load), candidates, 1)[0].placement is Placement.REMOTE


# -- best remote --------------------------------------------------------------------------------


def test_best_scored_node_gets_most_spilled_traffic_but_not_all() -> None:
    candidates = endpoints([LOCAL, "n1", "n2", "n3", "n4"])
    load = (
        Load()
        .set(LOCAL, 0.95)
        .set("n1", 0.1, 0.1, rtt=0.001)  # the best: idle and near
        .set("n2", 0.5, 0.5, rtt=0.002)
        .set("n3", 0.6, 0.6, rtt=0.004)
        .set("n4", 0.7, 0.6, rtt=0.008)  # fourth: outside top_k=3
    )
    counts = nodes_of(picks(policy(load, seed=7), candidates, 3000))
    assert counts[LOCAL] == 0
    assert counts["n4"] == 0
    assert counts["n1"] > counts["n2"] > counts["n3"] > 0
    assert counts["n1"] < 3000 * 0.8  # weighted draw, not argmax: no stampede


def test_remote_shares_follow_the_score_ratio() -> None:
    candidates = endpoints([LOCAL, "n1", "n2"])
    load = Load().set(LOCAL, 0.9).set("n1", 0.0, 0.0).set("n2", 0.5, 0.5)
    explained = policy(load).explain(candidates, NOW)
    s1, s2 = explained["nodes"]["n1"]["score"], explained["nodes"]["n2"]["score"]
    assert s1 == pytest.approx(3.0) and s2 == pytest.approx(2.0)
    counts = nodes_of(picks(policy(load, seed=3), candidates, 5000))
    assert counts["n1"] / 5000 == pytest.approx(0.6, abs=0.03)


def test_lower_rtt_attracts_more_traffic() -> None:
    candidates = endpoints([LOCAL, "n1", "n2"])
    load = Load().set(LOCAL, 0.9).set("n1", 0.3, rtt=0.020).set("n2", 0.3, rtt=0.002)
    counts = nodes_of(picks(policy(load, seed=5), candidates, 2000))
    assert counts["n2"] > counts["n1"] * 1.3


def test_rtt_ewma_moves_choices_as_samples_arrive() -> None:
    candidates = endpoints([LOCAL, "n1", "n2"])
    load = Load().set(LOCAL, 0.9).set("n1", 0.3, rtt=0.002).set("n2", 0.3, rtt=0.002)
    p = policy(load, seed=5)
    before = nodes_of(picks(p, candidates, 2000))
    for _ in range(10):
        load.set("n1", 0.3, rtt=0.050)
    after = nodes_of(picks(p, candidates, 2000))
    # The RTT term is at most w_rtt of a 3-term score: 25x the RTT moves n1 from ~1/2 to ~2/5.
    assert after["n1"] < before["n1"] * 0.9
    assert after["n2"] > after["n1"] * 1.3


@pytest.mark.parametrize(
    ("weights", "favoured"),
    [
        ({"w_cpu": 1.0, "w_mem": 0.0, "w_rtt": 0.0}, "n1"),
        ({"w_cpu": 0.0, "w_mem": 1.0, "w_rtt": 0.0}, "n2"),
    ],
)
def test_weights_move_choices_towards_the_weighted_resource(
    weights: dict[str, float], favoured: str
) -> None:
    settings = RapSettings(**weights)
    candidates = endpoints([LOCAL, "n1", "n2"])
    # n1 has spare CPU, n2 has spare memory.
    load = Load(settings).set(LOCAL, 0.9).set("n1", 0.1, 0.6).set("n2", 0.6, 0.1)
    counts = nodes_of(picks(policy(load, seed=9, settings=settings), candidates, 2000))
    other = "n2" if favoured == "n1" else "n1"
    assert counts[favoured] > counts[other] * 1.5


def test_overloaded_remote_nodes_are_not_spilled_to() -> None:
    candidates = endpoints([LOCAL, "n1", "n2"])
    load = Load().set(LOCAL, 0.9).set("n1", 0.85).set("n2", 0.3)
    assert nodes_of(picks(policy(load), candidates, 200)) == Counter({"n2": 200})


def test_remote_when_no_local_endpoints_even_if_local_idle() -> None:
    candidates = endpoints(["n1", "n2"])
    load = Load().set(LOCAL, 0.1).set("n1", 0.2).set("n2", 0.2)
    choices = picks(policy(load), candidates, 100)
    assert {c.placement for c in choices} == {Placement.REMOTE}
    assert set(nodes_of(choices)) == {"n1", "n2"}


def test_fallback_least_connections_when_every_node_is_overloaded() -> None:
    candidates = endpoints([LOCAL, "n1", "n2"], per_node=1)
    load = Load().set(LOCAL, 0.9).set("n1", 0.9).set("n2", 0.95)
    busy = {candidates[0]: 4, candidates[1]: 0, candidates[2]: 2}
    p = policy(load)
    choice = p.choose(candidates, context(busy))
    assert choice is not None
    assert choice.placement is Placement.FALLBACK
    assert choice.endpoint == candidates[1]
    assert p.explain(candidates, NOW)["decision"] == RapDecision.FALLBACK.value


# -- missing and stale data ---------------------------------------------------------------------


def test_no_telemetry_at_all_is_plain_round_robin() -> None:
    candidates = endpoints([LOCAL, "n1", "n2"])
    p = policy(Load())
    choices = picks(p, candidates, 12)
    assert [c.endpoint for c in choices] == list(candidates) * 2
    assert "round-robin" in choices[0].reason


def test_stale_data_degrades_to_round_robin() -> None:
    settings = RapSettings(telemetry_interval=1.0)  # stale after 3 s
    candidates = endpoints([LOCAL, "n1", "n2"], per_node=1)
    load = Load(settings).set(LOCAL, 0.1).set("n1", 0.1).set("n2", 0.1)
    p = policy(load, settings=settings)
    assert {c.placement for c in picks(p, candidates, 5, now=NOW + 2.9)} == {Placement.LOCAL}
    later = picks(p, candidates, 6, now=NOW + 3.5)  # same snapshot, now too old
    assert [c.endpoint for c in later] == list(candidates) * 2


def test_failed_poll_makes_a_node_unknown_and_it_ranks_below_fresh_nodes() -> None:
    settings = RapSettings(top_k=3, unknown_weight=0.25)
    candidates = endpoints([LOCAL, "n1", "n2"])
    load = Load(settings).set(LOCAL, 0.9).set("n1", 0.1).set("n2", 0.1)
    load.tracker.record_failure("n2", "timeout")
    p = policy(load, seed=11, settings=settings)
    counts = nodes_of(picks(p, candidates, 2000))
    assert counts["n1"] > counts["n2"] * 2
    assert counts["n2"] > 0  # unknown, not excluded
    explained = p.explain(candidates, NOW)["nodes"]
    assert explained["n2"]["fresh"] is False and explained["n2"]["last_error"] == "timeout"


def test_unknown_nodes_fill_top_k_only_after_fresh_ones() -> None:
    settings = RapSettings(top_k=2)
    candidates = endpoints([LOCAL, "n1", "n2", "n3"])
    load = Load(settings).set(LOCAL, 0.9).set("n1", 0.5).set("n2", 0.5)  # n3 never polled
    assert nodes_of(picks(policy(load, settings=settings), candidates, 500))["n3"] == 0


def test_stale_local_data_with_fresh_peers_stays_local() -> None:
    candidates = endpoints([LOCAL, "n1"])
    load = Load().set(LOCAL, 0.95, at=NOW - 100).set("n1", 0.1)
    assert {c.placement for c in picks(policy(load), candidates, 10)} == {Placement.LOCAL}


# -- invariants ---------------------------------------------------------------------------------

node_names = st.sampled_from([LOCAL, "n1", "n2", "n3", "n4", None])
utilization = st.floats(min_value=0.0, max_value=1.0)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[tuple[Endpoint, ...], Load, float]:
    nodes = draw(st.lists(node_names, min_size=1, max_size=12))
    candidates = tuple(Endpoint(f"10.1.0.{i + 1}", 80, node_name=n) for i, n in enumerate(nodes))
    load = Load()
    for node in [LOCAL, "n1", "n2", "n3", "n4"]:
        if draw(st.booleans()):
            load.set(
                node,
                draw(utilization),
                draw(utilization),
                rtt=draw(st.floats(min_value=0.0, max_value=0.5)),
                at=NOW - draw(st.floats(min_value=0.0, max_value=10.0)),
            )
        if node != LOCAL and draw(st.booleans()):
            load.tracker.record_failure(node, "refused")
    return candidates, load, NOW


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.integers(min_value=0, max_value=2**32))
def test_always_picks_one_of_the_candidates(
    scenario: tuple[tuple[Endpoint, ...], Load, float], seed: int
) -> None:
    candidates, load, now = scenario
    p = policy(load, seed)
    for _ in range(20):
        choice = p.choose(candidates, context(now=now))
        assert choice is not None
        assert choice.endpoint in candidates
        local = choice.endpoint.node_name == LOCAL
        assert (choice.placement is Placement.LOCAL) == local or (
            choice.placement is Placement.FALLBACK
        )
    assert p.explain(candidates, now)["decision"] in {d.value for d in RapDecision}


def test_empty_candidates_give_no_choice() -> None:
    assert policy(Load().set(LOCAL, 0.1)).choose((), context()) is None


# -- within the Balancer ------------------------------------------------------------------------


def service_table(candidates: tuple[Endpoint, ...], affinity: int | None) -> ServiceTable:
    port = ServicePort(
        NAME,
        80,
        8080,
        cluster_ips=("10.96.0.10",),
        affinity_timeout_seconds=affinity,
        lb_policy=LbPolicy.RAP_AIMD,
    )
    return ServiceTable({NAME: ServiceEntry(port, candidates)})


def test_session_affinity_wins_over_rap() -> None:
    candidates = endpoints([LOCAL, "n1"])
    load = Load().set(LOCAL, 0.1).set("n1", 0.1)
    balancer = Balancer(Locality(LOCAL), policy_factory=rap_policy_factory(load.view))
    balancer.update(service_table(candidates, affinity=10800))
    first = balancer.choose(NAME, "192.0.2.7", NOW)
    assert first is not None and first.placement is Placement.LOCAL
    load.set(LOCAL, 0.95)  # RAP alone would now spill away
    again = balancer.choose(NAME, "192.0.2.7", NOW + 1)
    assert again is not None and again.endpoint == first.endpoint
    assert "affinity" in again.reason
    other = balancer.choose(NAME, "192.0.2.8", NOW + 1)
    assert other is not None and other.placement is Placement.REMOTE


def test_factory_gives_each_rap_variant_and_basic_policies_for_other_annotations() -> None:
    make = rap_policy_factory(Load().view)
    assert isinstance(make(LbPolicy.RAP), CostRapPolicy)
    for variant in (LbPolicy.RAP_AIMD, LbPolicy.RAP_SWITCH):
        made = make(variant)
        assert isinstance(made, UtilizationRapPolicy) and made.name is variant
    for kind in (LbPolicy.ROUND_ROBIN, LbPolicy.LEAST_CONN, LbPolicy.RANDOM, LbPolicy.LOCAL_ONLY):
        assert make(kind).name is kind


def test_balancer_counts_rap_placements() -> None:
    candidates = endpoints([LOCAL, "n1"])
    load = Load().set(LOCAL, 0.95).set("n1", 0.1)
    balancer = Balancer(Locality(LOCAL), policy_factory=rap_policy_factory(load.view))
    balancer.update(service_table(candidates, affinity=None))
    for _ in range(10):
        balancer.choose(NAME, "192.0.2.1", NOW)
    assert balancer.selections[Placement.REMOTE] == 10


def test_scores_are_recomputed_only_when_the_snapshot_changes() -> None:
    candidates = endpoints([LOCAL, "n1", "n2"])
    load = Load().set(LOCAL, 0.9).set("n1", 0.1).set("n2", 0.1)
    p = policy(load)
    p.choose(candidates, context())
    plan = p._plan
    p.choose(candidates, context(now=NOW + 0.5))
    assert p._plan is plan
    load.set("n2", 0.2)
    p.choose(candidates, context(now=NOW + 0.5))
    assert p._plan is not plan


def test_explain_shows_where_traffic_would_spill_while_staying_local() -> None:
    candidates = endpoints([LOCAL, "n1", "n2"])
    load = Load().set(LOCAL, 0.2).set("n1", 0.0, 0.0).set("n2", 0.5, 0.5, at=NOW - 1)
    explained = policy(load).explain(candidates, NOW)
    assert explained["decision"] == "local" and explained["local_overloaded"] is False
    assert explained["nodes"]["n1"]["score"] == pytest.approx(3.0)
    assert explained["nodes"]["n2"]["age_seconds"] == pytest.approx(1.0)
    assert explained["nodes"][LOCAL]["local"] is True
