"""The default RAP policy on synthetic signal streams: no sockets, no clock.

Each test plays the relay's part by hand: it opens connections (in-flight counts), reports dial
times and first-response times as the relay would, and checks where new connections go.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

from rapproxy.balancer.balancer import Balancer, key_of
from rapproxy.balancer.categorize import Locality
from rapproxy.balancer.policy import Choice, Placement, SelectionContext
from rapproxy.balancer.rap import UtilizationRapPolicy, rap_policy_factory
from rapproxy.balancer.rap_cost import CostRapPolicy, RegimeChange
from rapproxy.balancer.signals import EndpointSignals
from rapproxy.model.endpoints import Endpoint
from rapproxy.model.service import LbPolicy, ServicePort, ServicePortName
from rapproxy.model.table import ServiceEntry, ServiceTable
from rapproxy.model.telemetry import NodeStats, RapSettings, TelemetryTracker, TelemetryView

LOCAL = "n0"
NAME = ServicePortName("default", "web", "http")
NOW = 1000.0
MS = 0.001


def endpoint(node: str, index: int = 1) -> Endpoint:
    return Endpoint(f"10.0.{node[1:]}.{index}", 8080, node_name=node)


class Node:
    """One proxy's world: its telemetry, its measured signals and its connections in flight."""

    def __init__(self, settings: RapSettings | None = None, seed: int = 1) -> None:
        self.settings = settings or RapSettings()
        self.tracker = TelemetryTracker(LOCAL, self.settings)
        self.signals = EndpointSignals(
            self.settings.latency_rise, self.settings.latency_fall, self.settings.signal_hold
        )
        self.active: Counter[Endpoint] = Counter()
        # When an endpoint with requests awaiting an answer last answered one (see stalled_for).
        self.progress_at: dict[Endpoint, float] = {}
        self.policy = CostRapPolicy(self.view, self.settings, random.Random(seed))

    def view(self) -> TelemetryView:
        return self.tracker.snapshot()

    def telemetry(self, node: str, cpu: float, rtt: float = 20 * MS, at: float = NOW) -> Node:
        stats = NodeStats(node, cpu, 0.1, at)
        if node == LOCAL:
            self.tracker.record_local(stats)
        else:
            self.tracker.record_peer(node, stats, rtt)
        return self

    def measure(
        self, target: Endpoint, rtt: float, service: float, now: float = NOW, times: int = 20
    ) -> Node:
        """`times` responses from `target` with no queue: connect `rtt`, first byte after
        `rtt + service`, one connection in flight."""
        for _ in range(times):
            self.signals.connected(key_of(target), rtt, now)
            self.signals.responded(key_of(target), rtt, rtt + service, 1, now)
        return self

    def context(self, now: float = NOW) -> SelectionContext:
        return SelectionContext(
            NAME,
            "192.0.2.1",
            now,
            Locality(LOCAL),
            lambda e: self.active[e],
            self.signals,
            stalled_for=self.stalled_for,
        )

    def stalled_for(self, endpoint: Endpoint, now: float) -> float:
        since = self.progress_at.get(endpoint)
        return 0.0 if since is None or not self.active[endpoint] else max(0.0, now - since)

    def choose(self, candidates: Sequence[Endpoint], now: float = NOW) -> Choice:
        choice = self.policy.choose(candidates, self.context(now))
        assert choice is not None
        return choice

    def open(self, candidates: Sequence[Endpoint], count: int, now: float = NOW) -> list[Choice]:
        """`count` new connections that stay open (nothing completes meanwhile)."""
        choices = []
        for _ in range(count):
            choice = self.choose(candidates, now)
            self.active[choice.endpoint] += 1
            choices.append(choice)
        return choices


def placements(choices: Sequence[Choice]) -> Counter[Placement]:
    return Counter(c.placement for c in choices)


LOCAL_EP = endpoint(LOCAL)
NEAR = endpoint("n1")
FAR = endpoint("n2")
ALL = (LOCAL_EP, NEAR, FAR)


def edge(local_cpu: float = 0.9) -> Node:
    """Local pod measured at 4 ms per request on an overloaded node (by default); n1 is 20 ms
    away, n2 40 ms."""
    node = Node()
    node.telemetry(LOCAL, local_cpu).telemetry("n1", 0.3, 20 * MS).telemetry("n2", 0.3, 40 * MS)
    return node.measure(LOCAL_EP, 0.1 * MS, 4 * MS)


# -- local first, and what "overloaded" means -------------------------------------------------


def test_a_busy_local_pod_that_keeps_up_stays_local_whatever_its_cpu_figure() -> None:
    # Telemetry says 99 % CPU (the utilization variants would spill), but two connections at a
    # time never queue long enough to cost a 20 ms round trip: every one stays local.
    node = edge(local_cpu=0.99)
    assert node.view().nodes[LOCAL].overloaded
    for _ in range(200):
        [choice] = node.open(ALL, 1)
        assert choice.placement is Placement.LOCAL
        node.active[choice.endpoint] -= 1  # completes before the next one
    assert node.policy.regime_changes == 0


def test_a_queue_on_a_node_with_cpu_to_spare_stays_local() -> None:
    # 40 connections queue on the local pod (160 ms against a 44 ms remote), but telemetry says
    # the node has CPU to spare: the queue is the clients' own concurrency, and a remote pod
    # would only queue it a round trip further. Nothing spills, and no remote is even priced.
    node = edge(local_cpu=0.3)
    assert not node.view().nodes[LOCAL].overloaded
    choices = node.open(ALL, 40)
    assert all(c.placement is Placement.LOCAL for c in choices)
    assert not node.policy.spilling
    assert {math.isnan(entry[5]) for entry in node.policy._recent} == {True}


def test_the_same_queue_spills_when_the_switch_is_off() -> None:
    node = Node(RapSettings(spill_needs_overload=False))
    node.telemetry(LOCAL, 0.3).telemetry("n1", 0.3, 20 * MS).telemetry("n2", 0.3, 40 * MS)
    node.measure(LOCAL_EP, 0.1 * MS, 4 * MS)
    assert placements(node.open(ALL, 40))[Placement.REMOTE] > 0


def test_without_local_telemetry_the_queue_alone_decides() -> None:
    # Nothing fresh known of the local node (its collector is failing): the queue is all there
    # is to go by, so it spills as if the gate were off.
    node = Node()
    node.telemetry("n1", 0.3, 20 * MS).telemetry("n2", 0.3, 40 * MS)
    node.measure(LOCAL_EP, 0.1 * MS, 4 * MS)
    assert placements(node.open(ALL, 40))[Placement.REMOTE] > 0


def test_spilling_stops_at_once_when_the_local_node_is_no_longer_overloaded() -> None:
    node = edge()
    node.open(ALL, 40)
    assert node.policy.spilling
    later = NOW + 1.0
    node.telemetry(LOCAL, 0.5, at=later)  # below the exit threshold: healthy again
    node.telemetry("n1", 0.3, 20 * MS, at=later).telemetry("n2", 0.3, 40 * MS, at=later)
    choice = node.choose(ALL, later)  # the queue is still there: 40 in flight
    assert choice.placement is Placement.LOCAL
    assert not node.policy.spilling and node.policy.last_change is RegimeChange.RETURN


def test_a_stalled_local_pod_loses_new_connections_once_the_stall_costs_a_round_trip() -> None:
    # The local pod answers in 4 ms and has two requests of ours in flight. It stops answering
    # (a CPU quota spent): for a while nothing says so but the time since its last answer.
    node = edge()
    node.measure(NEAR, 20 * MS, 4 * MS).measure(FAR, 40 * MS, 4 * MS)
    node.active[LOCAL_EP] = 2
    node.progress_at[LOCAL_EP] = NOW
    assert node.choose(ALL, NOW + 5 * MS).placement is Placement.LOCAL  # a short gap: normal
    # 60 ms without an answer: the new connection would wait that out at least, which costs
    # more than n1's two 20 ms round trips and its 4 ms pod.
    late = node.choose(ALL, NOW + 60 * MS)
    assert late.placement is Placement.REMOTE and late.endpoint == NEAR
    # The pod answers again: the stall is over, and its curve prices it once more.
    node.progress_at[LOCAL_EP] = NOW + 61 * MS
    assert node.choose(ALL, NOW + 62 * MS).placement is Placement.LOCAL


def test_a_pod_known_to_stall_loses_connections_early_in_a_silence_and_keeps_them_late() -> None:
    # The local pod's history: answers 1 ms apart, and an 85 ms silence every 100 ms (its CPU
    # quota). n1's pod costs two 20 ms round trips and 4 ms.
    node = edge()
    node.measure(NEAR, 20 * MS, 4 * MS).measure(FAR, 40 * MS, 4 * MS)
    for _ in range(3):
        for _ in range(15):
            node.signals.silence_ended(key_of(LOCAL_EP), 1 * MS)
        node.signals.silence_ended(key_of(LOCAL_EP), 85 * MS)
    node.active[LOCAL_EP] = 2
    node.progress_at[LOCAL_EP] = NOW
    # 10 ms into a silence: 75 ms more to wait, against 44 ms at n1. Away.
    assert node.choose(ALL, NOW + 10 * MS).placement is Placement.REMOTE
    # 80 ms in: the quota is about to come back, 5 ms to go. Local again.
    assert node.choose(ALL, NOW + 80 * MS).placement is Placement.LOCAL


def test_the_same_busy_node_spills_under_the_utilization_variants() -> None:
    node = edge(local_cpu=0.99)
    for _ in range(3):  # three overloaded samples: the gradual share is down to about a third
        node.telemetry(LOCAL, 0.99)
    aimd = UtilizationRapPolicy(node.view, node.settings, random.Random(1))
    remote = sum(
        1
        for _ in range(200)
        if (c := aimd.choose(ALL, node.context())) is not None and c.placement is Placement.REMOTE
    )
    assert remote > 100  # what the queue-aware policy exists to avoid


def test_spills_once_the_local_queue_costs_more_than_a_remote_round_trip() -> None:
    node = edge()
    choices = node.open(ALL, 40)
    # 2 x 20 ms + 4 ms for n1 against 4 ms x (queue + 1) locally, with the 25 % margin: about
    # 13 connections queue locally before the first spills. Spilling, each connection goes
    # where it is cheaper: the local queue stays about 10 longer than n1's (its 40 ms round
    # trip), n2 (80 ms) gets what is left.
    first_remote = next(i for i, c in enumerate(choices) if c.placement is Placement.REMOTE)
    assert 12 <= first_remote <= 14
    assert node.policy.spilling
    assert node.active[LOCAL_EP] - node.active[NEAR] in range(8, 12)
    assert node.active[NEAR] > node.active[FAR] >= 1


def test_while_spilling_local_and_remote_costs_stay_balanced() -> None:
    node = edge()
    node.open(ALL, 60)
    costs = node.policy.explain(ALL, NOW, LOCAL, node.context())["endpoints"]
    local = costs[LOCAL_EP.address]["expected_cost_seconds"]
    near = costs[NEAR.address]["expected_cost_seconds"]
    far = costs[FAR.address]["expected_cost_seconds"]
    assert abs(local - near) <= 0.25 * near  # water-filled, within the margin
    assert abs(near - far) <= 0.25 * far


def test_no_local_endpoint_goes_remote_to_the_cheaper_of_two() -> None:
    node = edge()
    choices = node.open((NEAR, FAR), 20)
    assert all(c.placement is Placement.REMOTE for c in choices)
    assert node.active[NEAR] > node.active[FAR]


def test_no_remote_endpoint_always_local() -> None:
    node = edge()
    assert all(c.placement is Placement.LOCAL for c in node.open((LOCAL_EP,), 100))


# -- hysteresis -------------------------------------------------------------------------------


def flapping_stream(settings: RapSettings, queue: int, decisions: int = 2000) -> CostRapPolicy:
    """Local cost wobbling around the spill threshold, decision by decision, with `queue`
    connections in flight locally (0: the queue drains between decisions)."""
    node = Node(settings)
    node.telemetry(LOCAL, 0.9).telemetry("n1", 0.3, 20 * MS)
    rng = random.Random(5)
    node.active[LOCAL_EP] = queue
    for _ in range(decisions):
        # Remote cost 2 x 20 + 4 = 44 ms; the local one between 0.9x and 1.5x that.
        local = 44 * MS * rng.uniform(0.9, 1.5)
        node.signals = EndpointSignals(1.0, 1.0)  # take each sample as it is
        node.signals.responded(key_of(LOCAL_EP), 0.0, local, queue + 1, NOW)
        node.signals.connected(key_of(NEAR), 20 * MS, NOW)
        node.signals.responded(key_of(NEAR), 20 * MS, 24 * MS, 1, NOW)
        node.choose((LOCAL_EP, NEAR))
    return node.policy


def test_hysteresis_keeps_a_noisy_boundary_from_flapping() -> None:
    # While a local queue persists, the policy spills once and stays spilling however the
    # local cost wobbles across the threshold.
    policy = flapping_stream(RapSettings(spill_margin=0.25), queue=10)
    assert policy.spilling
    assert policy.regime_changes == 1


def test_the_regime_count_does_see_flapping() -> None:
    # The measure above can fail: with no queue to drain and no margin, the same noise moves
    # the policy in and out of spilling all the time.
    policy = flapping_stream(RapSettings(spill_margin=0.0), queue=0)
    assert policy.regime_changes > 100


# -- recovery ---------------------------------------------------------------------------------


def test_returns_to_local_once_the_queue_drains() -> None:
    node = edge()
    node.open(ALL, 40)
    assert node.policy.spilling
    node.active.clear()  # every connection completed
    node.measure(LOCAL_EP, 0.1 * MS, 4 * MS, times=5)
    choices = [node.choose(ALL) for _ in range(50)]
    assert not node.policy.spilling
    assert all(c.placement is Placement.LOCAL for c in choices)


def test_a_stalled_local_pod_is_tried_again_once_its_figures_go_stale() -> None:
    node = edge()
    node.measure(LOCAL_EP, 0.1 * MS, 500 * MS)  # stalled: every connection now goes remote
    node.measure(NEAR, 20 * MS, 4 * MS)
    assert all(c.placement is Placement.REMOTE for c in [node.choose(ALL) for _ in range(20)])
    # No more local samples (no local traffic). After signal_hold the stale figure slides back
    # to the baseline (the fastest fresh service time), so local traffic resumes by itself.
    hold = node.settings.signal_hold
    later = NOW + 6 * hold
    node.measure(NEAR, 20 * MS, 4 * MS, now=later)
    node.telemetry(LOCAL, 0.9, at=later).telemetry("n1", 0.3, 20 * MS, at=later)
    node.telemetry("n2", 0.3, 40 * MS, at=later)
    choices = [node.choose(ALL, later) for _ in range(20)]
    assert Counter(c.placement for c in choices)[Placement.LOCAL] == 20


def test_a_remote_measured_slow_on_an_overloaded_node_is_not_forgiven_by_time_alone() -> None:
    node = edge()
    node.active[LOCAL_EP] = 50  # the local pod queues: everything new spills
    node.measure(NEAR, 20 * MS, 90 * MS)  # n1's pod stalls ...
    node.measure(FAR, 40 * MS, 4 * MS)
    later = NOW + 6 * node.settings.signal_hold  # ... and nothing has been heard of it since
    node.measure(FAR, 40 * MS, 4 * MS, now=later)
    node.telemetry(LOCAL, 0.9, at=later).telemetry("n2", 0.3, 40 * MS, at=later)

    still_overloaded = node.telemetry("n1", 0.99, 20 * MS, at=later)
    landed = Counter(c.endpoint for c in still_overloaded.open(ALL, 10, now=later))
    assert landed[NEAR] == 0, landed

    # The same history with n1's telemetry back to normal: its stale figure slides back to the
    # prior and n1, the nearer node, is tried again.
    node.active.clear()
    node.active[LOCAL_EP] = 50
    node.telemetry("n1", 0.3, 20 * MS, at=later)
    landed = Counter(c.endpoint for c in node.open(ALL, 10, now=later))
    assert landed[NEAR] > 0, landed


# -- herding ----------------------------------------------------------------------------------


def herd(policy_kind: LbPolicy, proxies: int = 10, each: int = 30) -> Counter[str | None]:
    """`proxies` proxies with the same stale view each spill `each` connections at once."""
    remotes = [endpoint(f"n{i}") for i in range(1, 4)]
    local_ep = endpoint(LOCAL)
    candidates = (local_ep, *remotes)
    landed: Counter[str | None] = Counter()
    for seed in range(proxies):
        node = Node(seed=seed)
        node.telemetry(LOCAL, 0.95)
        for i, remote in enumerate(remotes):
            node.telemetry(remote.node_name or "", 0.2, (20 + i) * MS)  # n1 looks best
        node.measure(local_ep, 0.1 * MS, 4 * MS)
        node.active[local_ep] = 50  # the local pod is queueing: everything new spills
        factory = rap_policy_factory(node.view, node.settings, random.Random(seed))
        policy = factory(policy_kind)
        for _ in range(each):
            choice = policy.choose(candidates, node.context())
            assert choice is not None
            node.active[choice.endpoint] += 1
            landed[choice.endpoint.node_name] += 1
    return landed


def test_proxies_with_the_same_stale_view_do_not_herd_onto_one_remote() -> None:
    landed = herd(LbPolicy.RAP)
    spilled = sum(n for node, n in landed.items() if node != LOCAL)
    assert spilled >= 0.9 * 300
    assert max(n for node, n in landed.items() if node != LOCAL) <= 0.45 * spilled


def test_the_papers_switch_herds_where_rap_does_not() -> None:
    # The bound above is a real property: the switch sends every proxy's spill to one node.
    landed = herd(LbPolicy.RAP_SWITCH)
    assert landed["n1"] == 300


# -- stale or missing telemetry ---------------------------------------------------------------


def test_no_telemetry_and_nothing_measured_is_plain_round_robin() -> None:
    node = Node()
    choices = [node.choose(ALL) for _ in range(9)]
    assert Counter(c.endpoint for c in choices) == Counter(dict.fromkeys(ALL, 3))
    assert all("round-robin" in c.reason for c in choices)


def test_without_telemetry_own_measurements_still_decide() -> None:
    # Peer polling off (no token): only the relay's figures. A fast local pod keeps the traffic.
    node = Node()
    node.measure(LOCAL_EP, 0.1 * MS, 1 * MS)
    assert all(c.placement is Placement.LOCAL for c in [node.choose(ALL) for _ in range(50)])


def test_a_remote_with_stale_telemetry_ranks_below_a_fresh_one() -> None:
    node = edge()
    node.telemetry("n2", 0.3, 5 * MS, at=NOW - 60)  # closest, but its figures are a minute old
    node.active[LOCAL_EP] = 50
    choices = node.open((LOCAL_EP, NEAR, FAR), 20)
    assert Counter(c.endpoint for c in choices)[NEAR] > Counter(c.endpoint for c in choices)[FAR]
    prior = node.policy.explain(ALL, NOW, LOCAL, node.context())["endpoints"][FAR.address]
    assert prior["prior_rtt_from"] == "unknown"


def test_a_remote_measured_slow_is_avoided_even_when_telemetry_calls_it_idle() -> None:
    node = edge()
    node.telemetry("n1", 0.05, 20 * MS)  # idle by its CPU figure ...
    node.measure(NEAR, 20 * MS, 80 * MS)  # ... but its pod answers after 80 ms
    node.measure(FAR, 40 * MS, 4 * MS)
    node.active[LOCAL_EP] = 50
    choices = node.open(ALL, 20)
    landed = Counter(c.endpoint for c in choices)
    assert landed[FAR] > landed[NEAR]


# -- explainability and wiring ----------------------------------------------------------------


def test_explain_shows_each_endpoints_signals_and_why_the_last_choices_went_there() -> None:
    node = edge()
    node.open(ALL, 30)
    state = node.policy.explain(ALL, NOW, LOCAL, node.context())
    assert state["policy"] == "rap" and state["decision"] == "spilling"
    local = state["endpoints"][LOCAL_EP.address]
    assert local["local"] and local["measured"]["server_seconds_by_in_flight"]
    assert local["in_flight"] == node.active[LOCAL_EP]
    assert len(state["recent"]) == 16
    last = state["recent"][0]
    assert last["reason"].startswith("rap:") and last["local_cost_seconds"] is not None
    assert sum(state["reasons"].values()) == 30


def test_within_the_balancer_the_relays_reports_steer_the_policy() -> None:
    settings = RapSettings()
    tracker = TelemetryTracker(LOCAL, settings)
    tracker.record_local(NodeStats(LOCAL, 0.9, 0.1, NOW))
    tracker.record_peer("n1", NodeStats("n1", 0.3, 0.1, NOW), 20 * MS)
    balancer = Balancer(
        Locality(LOCAL), policy_factory=rap_policy_factory(tracker.snapshot, settings)
    )
    port = ServicePort(NAME, 80, 8080, cluster_ips=("10.96.0.10",), lb_policy=LbPolicy.RAP)
    balancer.update(ServiceTable({NAME: ServiceEntry(port, (LOCAL_EP, NEAR))}))
    placements_seen = []
    unanswered: dict[Endpoint, list[float]] = {LOCAL_EP: [], NEAR: []}  # connect time of each
    for n in range(40):
        # Requests arrive twice as fast as the pods answer them: a queue builds wherever they
        # go, and each answer takes 4 ms per request queued.
        choice = balancer.choose(NAME, "192.0.2.1", NOW)
        assert choice is not None
        connect = 0.0001 if choice.endpoint == LOCAL_EP else 0.02
        balancer.connection_opened(key_of(choice.endpoint), connect, NOW)
        unanswered[choice.endpoint].append(connect)
        placements_seen.append(choice.placement)
        if n % 2:
            for endpoint, waiting in unanswered.items():
                if waiting:
                    queued = balancer.requests_in_flight(endpoint)
                    oldest = waiting.pop(0)
                    balancer.first_response(key_of(endpoint), oldest, oldest + 0.004 * queued, NOW)
    assert Placement.LOCAL in placements_seen and Placement.REMOTE in placements_seen
    state = balancer.describe(NOW)["services"][str(NAME)]["decision"]
    assert state["endpoints"][LOCAL_EP.address]["measured"]["service_samples"] > 0
    assert state["decision"] == "spilling"


def test_a_sequential_client_stays_local_while_its_answered_connections_close() -> None:
    # One request at a time on a pod that takes 20 ms, a peer 1 ms away. Each connection is
    # answered, and the client's next one arrives before the pod's FIN has closed the last:
    # priced by open connections, the local pod would look one deep in queue (40 ms against
    # 22 ms) and the client would spill to the peer.
    settings = RapSettings()
    tracker = TelemetryTracker(LOCAL, settings)
    tracker.record_local(NodeStats(LOCAL, 0.9, 0.1, NOW))
    tracker.record_peer("n1", NodeStats("n1", 0.3, 0.1, NOW), 1 * MS)
    balancer = Balancer(
        Locality(LOCAL), policy_factory=rap_policy_factory(tracker.snapshot, settings)
    )
    port = ServicePort(NAME, 80, 8080, cluster_ips=("10.96.0.10",), lb_policy=LbPolicy.RAP)
    balancer.update(ServiceTable({NAME: ServiceEntry(port, (LOCAL_EP, NEAR))}))
    # The pod's unloaded time is known before the client starts (the plan prices the unmeasured
    # peer from it): one earlier connection, answered and closed.
    warm_up = key_of(LOCAL_EP)
    balancer.connection_opened(warm_up, 0.0001, NOW)
    balancer.first_response(warm_up, 0.0001, 0.0201, NOW)
    balancer.connection_closed(warm_up, awaiting=False)
    closing: tuple[int, int] | None = None
    placements = []
    for _ in range(40):
        choice = balancer.choose(NAME, "192.0.2.1", NOW)
        assert choice is not None
        placements.append(choice.placement)
        if closing is not None:
            balancer.connection_closed(closing, awaiting=False)  # the last one's FIN, late
        key = key_of(choice.endpoint)
        connect = 0.0001 if choice.endpoint == LOCAL_EP else 0.001
        balancer.connection_opened(key, connect, NOW)
        balancer.first_response(key, connect, connect + 0.02, NOW)
        closing = key
    assert placements == [Placement.LOCAL] * 40


def test_the_spill_pool_ranks_nodes_by_what_was_measured_of_them() -> None:
    # With room for one node, the pool takes n2 (farther, but measured fast) over n1 (nearer by
    # telemetry, measured slow); with nothing measured it would take n1.
    settings = RapSettings(top_k=1)
    node = Node(settings)
    node.telemetry(LOCAL, 0.9).telemetry("n1", 0.3, 20 * MS).telemetry("n2", 0.3, 40 * MS)
    node.measure(LOCAL_EP, 0.1 * MS, 4 * MS)
    node.active[LOCAL_EP] = 50
    unmeasured = {c.endpoint for c in node.open(ALL, 10)}
    assert unmeasured == {NEAR}
    node = Node(settings)
    node.telemetry(LOCAL, 0.9).telemetry("n1", 0.3, 20 * MS).telemetry("n2", 0.3, 40 * MS)
    node.measure(LOCAL_EP, 0.1 * MS, 4 * MS)
    node.measure(NEAR, 20 * MS, 200 * MS).measure(FAR, 40 * MS, 4 * MS)
    node.active[LOCAL_EP] = 50
    measured = {c.endpoint for c in node.open(ALL, 10)}
    assert measured == {FAR}
