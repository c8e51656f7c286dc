"""The planner: the paper's conversion order, ReplicaSet-like ranking, failure handling, placement,
expectations — and, as properties, convergence, no open primary gap, no over-creation."""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from collections.abc import Iterable, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from rapproxy.bps.plan import (
    Action,
    Activate,
    CreatePod,
    DeletePod,
    Demote,
    FailureReason,
    InFlight,
    Plan,
    Promote,
    detect_failure,
    plan,
)
from rapproxy.model.bps import (
    BackupPodSetSpec,
    ObservedPod,
    PlacementSpec,
    PodPhase,
    Role,
    WaiterState,
)

NOW = 1_000_000.0
P, HB, CB = Role.PRIMARY, Role.HOT_BACKUP, Role.COLD_BACKUP
TEMPLATE = '{"spec":{"containers":[{"image":"busybox","name":"web"}]}}'


@dataclasses.dataclass(frozen=True)
class Node:
    name: str
    ready: bool = True
    unschedulable: bool = False


NODES = (Node("n1"), Node("n2"), Node("n3"))


def spec(replicas: int, hot: int, cold: int, spread: bool = True) -> BackupPodSetSpec:
    return BackupPodSetSpec(replicas, hot, cold, TEMPLATE, placement=PlacementSpec(spread))


def running(name: str, role: Role | None, node: str = "n1", **changes: object) -> ObservedPod:
    """A started, Ready pod (a primary or hot backup, or a cold one already activated)."""
    pod = ObservedPod(
        name=name,
        role=role,
        phase=PodPhase.RUNNING,
        ready=True,
        ready_since=NOW - 100,
        node_name=node,
        ip=f"10.0.0.{sum(map(ord, name)) % 250}",
        created=NOW - 200,
    )
    return dataclasses.replace(pod, **changes)  # type: ignore[arg-type]


def cold(name: str, node: str = "n1", **changes: object) -> ObservedPod:
    """A cold backup whose waiter is listening."""
    pod = ObservedPod(
        name=name,
        role=CB,
        phase=PodPhase.PENDING,
        ready=False,
        node_name=node,
        ip=f"10.0.1.{sum(map(ord, name)) % 250}",
        created=NOW - 200,
        waiter=WaiterState.RUNNING,
        activation_token=f"token-{name}",
    )
    return dataclasses.replace(pod, **changes)  # type: ignore[arg-type]


def set_222() -> list[ObservedPod]:
    return [
        running("p1", P, "n1"),
        running("p2", P, "n2"),
        running("h1", HB, "n3"),
        running("h2", HB, "n1"),
        cold("c1", "n3"),
        cold("c2", "n2"),
    ]


def summary(actions: Iterable[Action]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for action in actions:
        match action:
            case Promote(pod, from_role, to_role) | Demote(pod, from_role, to_role):
                out.append((type(action).__name__, pod.name, str(from_role), str(to_role)))
            case Activate(pod, role):
                out.append(("Activate", pod.name, str(role)))
            case CreatePod(role, node):
                out.append(("Create", str(role), str(node)))
            case DeletePod(pod, reason, _):
                out.append(("Delete", pod.name, str(reason)))
    return out


# --- examples ----------------------------------------------------------------------------------


def test_creates_2_2_2_from_empty_primaries_first_spread_over_nodes() -> None:
    result = plan(spec(2, 2, 2), [], NODES, NOW)
    assert summary(result.actions) == [
        ("Create", "primary", "n1"),
        ("Create", "primary", "n2"),
        ("Create", "hot-backup", "n3"),
        ("Create", "hot-backup", "n1"),
        ("Create", "cold-backup", "n3"),
        ("Create", "cold-backup", "n2"),
    ]
    assert not result.converged


def test_without_spread_roles_only_total_pods_per_node_count() -> None:
    result = plan(spec(2, 1, 0, spread=False), [], NODES, NOW)
    assert [a.node_hint for a in result.actions if isinstance(a, CreatePod)] == ["n1", "n2", "n3"]


def test_a_converged_set_plans_nothing() -> None:
    result = plan(spec(2, 2, 2), set_222(), NODES, NOW)
    assert result.actions == ()
    assert result.converged
    assert result.pods_by_role == {P: ("p1", "p2"), HB: ("h1", "h2"), CB: ("c1", "c2")}


def test_scaling_2_2_2_to_3_3_3_makes_exactly_the_papers_conversions() -> None:
    result = plan(spec(3, 3, 3), set_222(), NODES, NOW)
    assert summary(result.actions) == [
        ("Promote", "h1", "hot-backup", "primary"),
        ("Promote", "c1", "cold-backup", "hot-backup"),
        ("Activate", "c1", "hot-backup"),
        ("Promote", "c2", "cold-backup", "hot-backup"),
        ("Activate", "c2", "hot-backup"),
        ("Create", "cold-backup", "n1"),
        ("Create", "cold-backup", "n2"),
        ("Create", "cold-backup", "n3"),
    ]


def test_deleted_primary_promotes_hot_activates_cold_and_creates_cold() -> None:
    pods = set_222()
    pods[0] = dataclasses.replace(pods[0], deleting=True)  # p1 on n1 is going away
    result = plan(spec(2, 2, 2), pods, NODES, NOW)
    # h2 shares n1 with the failed primary, so h1 (n3) is promoted.
    assert summary(result.actions) == [
        ("Promote", "h1", "hot-backup", "primary"),
        ("Promote", "c1", "cold-backup", "hot-backup"),
        ("Activate", "c1", "hot-backup"),
        ("Create", "cold-backup", "n1"),
    ]
    assert [(f.pod.name, f.reason) for f in result.failures] == [("p1", FailureReason.TERMINATING)]


def test_promotes_the_hot_backup_off_the_failed_primarys_node_even_if_it_sorts_later() -> None:
    pods = [
        running("p1", P, "n1", phase=PodPhase.FAILED),
        running("a-hot", HB, "n1"),
        running("z-hot", HB, "n2"),
    ]
    result = plan(spec(1, 1, 0), pods, NODES, NOW)
    assert summary(result.actions)[0] == ("Promote", "z-hot", "hot-backup", "primary")
    assert ("Delete", "p1", "failed") in summary(result.actions)


def test_a_ready_hot_backup_is_promoted_before_a_starting_one() -> None:
    pods = [running("h1", HB, "n2", ready=False, ready_since=None), running("h2", HB, "n2")]
    result = plan(spec(1, 1, 0), pods, NODES, NOW)
    assert summary(result.actions)[0] == ("Promote", "h2", "hot-backup", "primary")


def test_missing_primary_without_hot_backups_activates_a_cold_one() -> None:
    result = plan(spec(1, 0, 1), [cold("c1", "n2")], NODES, NOW)
    assert summary(result.actions) == [
        ("Promote", "c1", "cold-backup", "primary"),
        ("Activate", "c1", "primary"),
        ("Create", "cold-backup", "n1"),
    ]


def test_a_cold_backup_still_starting_is_not_converted_a_primary_is_created() -> None:
    starting = cold("c1", "n2", waiter=WaiterState.PENDING)
    result = plan(spec(1, 0, 1), [starting], NODES, NOW)
    assert summary(result.actions) == [("Create", "primary", "n1")]


def test_an_activated_cold_backup_is_relabelled_without_another_activation() -> None:
    done = cold("c1", "n2", waiter=WaiterState.DONE, phase=PodPhase.RUNNING, ready=True)
    result = plan(spec(0, 1, 0), [done], NODES, NOW)
    assert summary(result.actions) == [("Promote", "c1", "cold-backup", "hot-backup")]


def test_resumes_activation_of_a_relabelled_pod_whose_waiter_still_runs() -> None:
    half_done = cold("c1", "n2", role=HB)
    result = plan(spec(0, 1, 0), [half_done], NODES, NOW)
    assert summary(result.actions) == [("Activate", "c1", "hot-backup")]
    in_flight = InFlight(activations=frozenset({"c1"}))
    assert plan(spec(0, 1, 0), [half_done], NODES, NOW, in_flight).actions == ()


def test_a_failed_activation_replaces_the_pod() -> None:
    half_done = cold("c1", "n2", role=HB)
    in_flight = InFlight(failed_activations=frozenset({"c1"}))
    result = plan(spec(0, 1, 0), [half_done], NODES, NOW, in_flight)
    assert summary(result.actions) == [
        ("Create", "hot-backup", "n1"),
        ("Delete", "c1", "failed"),
    ]
    assert result.failures[0].reason is FailureReason.ACTIVATION_FAILED


def test_a_failed_activation_whose_waiter_finished_anyway_is_kept() -> None:
    finished = cold(
        "c1", "n2", role=HB, waiter=WaiterState.DONE, phase=PodPhase.RUNNING, ready=True
    )
    in_flight = InFlight(failed_activations=frozenset({"c1"}))
    assert plan(spec(0, 1, 0), [finished], NODES, NOW, in_flight).actions == ()


def test_surplus_primaries_are_demoted_when_hot_backups_are_short() -> None:
    pods = [
        running("p1", P, "n1"),
        running("p2", P, "n2"),
        running("p3", P, "n3", created=NOW - 10),
    ]
    result = plan(spec(2, 1, 0), pods, NODES, NOW)
    assert summary(result.actions) == [("Demote", "p3", "primary", "hot-backup")]


def test_scale_down_deletes_the_least_valuable_first() -> None:
    pods = [
        running("ready-old", HB, "n1", created=NOW - 500, ready_since=NOW - 400),
        running("ready-recently", HB, "n2", ready_since=NOW - 5),
        running("restarting", HB, "n2", restarts=3),
        running("not-ready", HB, "n3", ready=False, ready_since=None, created=NOW - 1),
        running("pending", HB, "n1", phase=PodPhase.PENDING, ready=False),
        running("unscheduled", HB, None, phase=PodPhase.PENDING, ready=False, ip=None),  # type: ignore[arg-type]
    ]
    result = plan(spec(0, 1, 0), pods, NODES, NOW)
    assert summary(result.actions) == [
        ("Delete", "unscheduled", "surplus"),
        ("Delete", "pending", "surplus"),
        ("Delete", "not-ready", "surplus"),
        ("Delete", "ready-recently", "surplus"),
        ("Delete", "restarting", "surplus"),
    ]


def test_scale_down_prefers_pods_doubled_up_on_a_node() -> None:
    pods = [running("a", CB, "n1"), running("b", CB, "n1"), running("c", CB, "n2")]
    result = plan(spec(0, 0, 2), pods, NODES, NOW)
    assert summary(result.actions) == [("Delete", "a", "surplus")]  # not c, alone on n2


def test_failed_succeeded_and_unknown_pods_are_deleted_and_replaced() -> None:
    pods = [
        running("p1", P, "n1", phase=PodPhase.FAILED),
        running("h1", HB, "n2", phase=PodPhase.SUCCEEDED),
        running("h2", HB, "n3", phase=PodPhase.UNKNOWN),
    ]
    result = plan(spec(1, 1, 0), pods, NODES, NOW)
    assert summary(result.actions) == [
        ("Create", "primary", "n1"),
        ("Create", "hot-backup", "n2"),
        ("Delete", "h1", "failed"),
        ("Delete", "h2", "failed"),
        ("Delete", "p1", "failed"),
    ]


def test_pods_on_a_not_ready_node_fail_and_new_pods_avoid_it() -> None:
    nodes = (Node("n1", ready=False), Node("n2"), Node("n3", unschedulable=True))
    pods = [running("p1", P, "n1"), running("h1", HB, "n2")]
    result = plan(spec(1, 1, 0), pods, nodes, NOW)
    assert summary(result.actions) == [
        ("Promote", "h1", "hot-backup", "primary"),
        ("Create", "hot-backup", "n2"),
        ("Delete", "p1", "failed"),
    ]
    assert result.failures[0].reason is FailureReason.NODE_NOT_READY


def test_not_ready_past_the_grace_is_a_failure_and_before_it_a_recheck() -> None:
    wobbly = running("p1", P, "n1", ready=False, ready_since=None, not_ready_since=NOW - 4)
    early = plan(spec(1, 0, 0), [wobbly], NODES, NOW, not_ready_grace=5.0)
    assert early.actions == ()
    assert early.recheck_at == NOW + 1
    late = plan(spec(1, 0, 0), [wobbly], NODES, NOW + 1, not_ready_grace=5.0)
    assert summary(late.actions) == [("Create", "primary", "n1"), ("Delete", "p1", "failed")]


def test_an_activated_cold_backup_gets_its_start_up_grace_from_its_containers_start() -> None:
    # Created 200 s ago, Pending (and not Ready) all that time, activated and started 3 s ago:
    # still starting, not failed. Counted from creation it was failed as soon as it ran.
    activated = running(
        "h1",
        HB,
        "n1",
        ready=False,
        ready_since=None,
        not_ready_since=NOW - 200,
        running_since=NOW - 3,
    )
    early = plan(spec(0, 1, 0), [activated], NODES, NOW, not_ready_grace=5.0)
    assert early.failures == ()
    assert early.recheck_at == NOW + 2
    late = plan(spec(0, 1, 0), [activated], NODES, NOW + 2, not_ready_grace=5.0)
    assert [f.reason for f in late.failures] == [FailureReason.NOT_READY]


def test_cold_backups_are_never_failed_for_not_being_ready() -> None:
    assert detect_failure(cold("c1"), {n.name: n for n in NODES}, NOW + 10_000) is None


def test_a_cold_backup_without_a_token_is_replaced() -> None:
    failure = detect_failure(cold("c1", activation_token=None), None, NOW)
    assert failure is not None and failure.reason is FailureReason.NO_ACTIVATION_TOKEN


def test_a_pod_on_an_unknown_node_fails_but_unknown_node_health_does_not() -> None:
    lost = running("p1", P, "gone")
    failure = detect_failure(lost, {n.name: n for n in NODES}, NOW)
    assert failure is not None and failure.reason is FailureReason.NODE_MISSING
    assert detect_failure(lost, None, NOW) is None


def test_a_pod_without_a_role_is_deleted() -> None:
    result = plan(spec(0, 0, 0), [running("x", None)], NODES, NOW)
    assert summary(result.actions) == [("Delete", "x", "no-role")]


def test_in_flight_creates_count_and_are_not_repeated() -> None:
    in_flight = InFlight(creates={P: 2, HB: 1})
    result = plan(spec(2, 2, 0), [], NODES, NOW, in_flight)
    assert [(a.role) for a in result.actions if isinstance(a, CreatePod)] == [HB]
    assert not result.converged


def test_in_flight_deletes_count_as_gone_and_are_not_repeated() -> None:
    pods = [running("p1", P, "n1"), running("p2", P, "n2")]
    result = plan(spec(2, 0, 0), pods, NODES, NOW, InFlight(deletes=frozenset({"p1"})))
    assert summary(result.actions) == [("Create", "primary", "n1")]


def test_an_unobserved_role_patch_is_not_promoted_twice() -> None:
    pods = [running("p1", P, "n1", deleting=True), running("h1", HB, "n2"), running("h2", HB, "n3")]
    first = plan(spec(1, 1, 0), pods, NODES, NOW)
    assert summary(first.actions) == [("Promote", "h1", "hot-backup", "primary")]
    # The cache still shows h1 as a hot backup; the controller reports its patch as in flight.
    again = plan(spec(1, 1, 0), pods, NODES, NOW, InFlight(roles={"h1": P}))
    assert again.actions == ()


# --- properties --------------------------------------------------------------------------------

NODE_NAMES = ("n1", "n2", "n3")
# Strategies are built once: constructing them inside every draw dominated the run time.
ROLES_S = st.sampled_from([P, HB, CB, CB, None])
PHASES_S = st.sampled_from(
    [PodPhase.RUNNING] * 4
    + [PodPhase.PENDING, PodPhase.FAILED, PodPhase.SUCCEEDED, PodPhase.UNKNOWN]
)
POD_NODES_S = st.sampled_from([*NODE_NAMES, "n1", "n2", "gone", None])
COLD_WAITERS_S = st.sampled_from([WaiterState.RUNNING] * 3 + list(WaiterState))
OTHER_WAITERS_S = st.sampled_from([WaiterState.ABSENT] * 3 + list(WaiterState))
TOKENS_S = st.sampled_from(["t", "t", None])
AGES_S = st.integers(0, 1000)
COUNTS_S = st.integers(0, 4)
IN_FLIGHT_CREATES_S = st.integers(0, 2)
NODE_READY_S = st.sampled_from([True, True, False])


@st.composite
def observed_pod(draw: st.DrawFn) -> ObservedPod:
    role = draw(ROLES_S)
    phase = draw(PHASES_S)
    node = draw(POD_NODES_S)
    ready = phase is PodPhase.RUNNING and draw(st.booleans())
    return ObservedPod(
        name="",
        role=role,
        phase=phase,
        ready=ready,
        ready_since=NOW - draw(AGES_S) / 10 if ready else None,
        not_ready_since=None if ready else NOW - draw(AGES_S) / 30,
        node_name=node,
        ip=None if node is None else "10.0.0.1",
        deleting=draw(st.integers(0, 3)) == 0,
        created=NOW - draw(AGES_S),
        restarts=draw(st.integers(0, 3)),
        waiter=draw(COLD_WAITERS_S if role is CB else OTHER_WAITERS_S),
        activation_token=draw(TOKENS_S),
    )


POD_LISTS_S = st.lists(observed_pod(), max_size=10)


@st.composite
def situation(
    draw: st.DrawFn,
) -> tuple[BackupPodSetSpec, list[ObservedPod], tuple[Node, ...], InFlight]:
    counts = [draw(COUNTS_S) for _ in range(3)]
    pods = [
        dataclasses.replace(pod, name=f"pod-{i:02d}") for i, pod in enumerate(draw(POD_LISTS_S))
    ]
    nodes = tuple(Node(name, ready=draw(NODE_READY_S)) for name in NODE_NAMES)
    names = [p.name for p in pods]
    some_names = (
        st.frozensets(st.sampled_from(names), max_size=3) if names else st.just(frozenset())
    )
    in_flight = InFlight(
        creates={role: draw(IN_FLIGHT_CREATES_S) for role in (P, HB, CB)},
        deletes=draw(some_names),
        roles=draw(
            st.dictionaries(st.sampled_from(names), st.sampled_from([P, HB, CB]), max_size=3)
        )
        if names
        else {},
        activations=draw(some_names),
    )
    spread = draw(st.booleans())
    return spec(counts[0], counts[1], counts[2], spread=spread), pods, nodes, in_flight


def created(result: Plan) -> Counter[Role]:
    return Counter(a.role for a in result.actions if isinstance(a, CreatePod))


def deleted(result: Plan) -> set[str]:
    return {a.pod.name for a in result.actions if isinstance(a, DeletePod)}


@settings(max_examples=300, deadline=None)
@given(situation(), st.randoms(use_true_random=False))
def test_plans_are_deterministic_and_independent_of_pod_order(
    case: tuple[BackupPodSetSpec, list[ObservedPod], tuple[Node, ...], InFlight],
    random: object,
) -> None:
    desired, pods, nodes, in_flight = case
    shuffled = list(pods)
    random.shuffle(shuffled)  # type: ignore[attr-defined]
    assert plan(desired, pods, nodes, NOW, in_flight) == plan(
        desired, shuffled, nodes, NOW, in_flight
    )


@settings(max_examples=500, deadline=None)
@given(situation())
def test_no_primary_gap_is_left_open_while_a_hot_backup_exists(
    case: tuple[BackupPodSetSpec, list[ObservedPod], tuple[Node, ...], InFlight],
) -> None:
    desired, pods, nodes, in_flight = case
    result = plan(desired, pods, nodes, NOW, in_flight)
    counts = result.counts
    gap = desired.replicas - counts[P].alive - counts[P].in_flight
    hot_to_primary = [
        a for a in result.actions if isinstance(a, Promote) and a.from_role is HB and a.to_role is P
    ]
    assert len(hot_to_primary) == max(0, min(gap, counts[HB].alive))
    # ...and only the activations of the promoted pods themselves may come between them.
    if hot_to_primary:
        last = result.actions.index(hot_to_primary[-1])
        promoted = {a.pod.name for a in hot_to_primary}
        for action in result.actions[:last]:
            assert action in hot_to_primary or (
                isinstance(action, Activate) and action.pod.name in promoted
            )


@settings(max_examples=500, deadline=None)
@given(situation())
def test_never_plans_more_pods_than_desired_plus_in_flight(
    case: tuple[BackupPodSetSpec, list[ObservedPod], tuple[Node, ...], InFlight],
) -> None:
    desired, pods, nodes, in_flight = case
    result = plan(desired, pods, nodes, NOW, in_flight)
    gone = deleted(result)
    new = created(result)
    for role in (P, HB, CB):
        kept = [name for name in result.pods_by_role[role] if name not in gone]
        flying = in_flight.creates.get(role, 0)
        assert len(kept) + new[role] <= desired.desired(role), role
        if new[role]:
            assert len(kept) + new[role] + flying == desired.desired(role)


@settings(max_examples=500, deadline=None)
@given(situation())
def test_failed_pods_are_deleted_once_and_never_given_a_role(
    case: tuple[BackupPodSetSpec, list[ObservedPod], tuple[Node, ...], InFlight],
) -> None:
    desired, pods, nodes, in_flight = case
    result = plan(desired, pods, nodes, NOW, in_flight)
    failed = {f.pod.name for f in result.failures}
    deletes = [a.pod.name for a in result.actions if isinstance(a, DeletePod)]
    assert len(deletes) == len(set(deletes))
    assert {f.pod.name for f in result.failures if not f.pod.deleting} <= set(deletes)
    assert not set(deletes) & in_flight.deletes
    for action in result.actions:
        if isinstance(action, Promote | Demote | Activate):
            assert action.pod.name not in failed
            assert action.pod.name not in deletes
        if isinstance(action, Activate):
            assert action.pod.waiter is WaiterState.RUNNING and action.pod.ip is not None
            assert action.pod.name not in in_flight.activations


# A tiny world the planner's actions are applied to. Creates land one round later (the cache lag
# the expectations exist for); everything else is applied at once.


def apply(
    pods: Sequence[ObservedPod], actions: Iterable[Action], serial: Iterable[int]
) -> tuple[list[ObservedPod], list[ObservedPod]]:
    by_name = {p.name: p for p in pods}
    landing: list[ObservedPod] = []
    for action in actions:
        match action:
            case Promote(pod, _, to_role) | Demote(pod, _, to_role):
                by_name[pod.name] = dataclasses.replace(by_name[pod.name], role=to_role)
            case Activate(pod, _):
                by_name[pod.name] = dataclasses.replace(
                    by_name[pod.name],
                    waiter=WaiterState.DONE,
                    phase=PodPhase.RUNNING,
                    ready=True,
                    ready_since=NOW,
                )
            case CreatePod(role, node):
                name = f"new-{next(iter(serial)):03d}"
                if role is CB:
                    landing.append(cold(name, node or "n1", created=NOW))
                else:
                    landing.append(running(name, role, node or "n1", created=NOW))
            case DeletePod(pod, _, _):
                del by_name[pod.name]
    return list(by_name.values()), landing


@settings(max_examples=300, deadline=None)
@given(situation())
def test_applying_plans_converges_to_the_desired_counts_within_three_rounds(
    case: tuple[BackupPodSetSpec, list[ObservedPod], tuple[Node, ...], InFlight],
) -> None:
    desired, pods, _, _ = case
    node_map = {n.name: n for n in NODES}
    serial = itertools.count()
    # Terminating pods vanish on their own; the world starts from whatever else was drawn.
    world = [p for p in pods if not p.deleting]
    landing: list[ObservedPod] = []
    rounds = 0
    while True:
        in_flight = InFlight(creates=Counter(p.role for p in landing if p.role is not None))
        result = plan(desired, world, NODES, NOW, in_flight)
        if not result.actions and not landing:
            break
        rounds += 1
        assert rounds <= 3, summary(result.actions)
        world, new = apply(world, result.actions, serial)
        world += landing
        landing = new
        # Never more pods than desired + in flight once a round has trimmed the surplus.
        alive = [p for p in world if detect_failure(p, node_map, NOW) is None]
        assert len(alive) + len(landing) <= desired.total
    assert result.converged
    for role in (P, HB, CB):
        assert result.counts[role].alive == desired.desired(role)


@settings(max_examples=200, deadline=None)
@given(situation(), st.booleans())
def test_failed_activations_are_replaced_and_the_set_still_converges(
    case: tuple[BackupPodSetSpec, list[ObservedPod], tuple[Node, ...], InFlight],
    first_round_fails: bool,
) -> None:
    desired, pods, _, _ = case
    serial = itertools.count()
    world = [p for p in pods if not p.deleting]
    failed: frozenset[str] = frozenset()
    for round_number in range(4):
        result = plan(desired, world, NODES, NOW, InFlight(failed_activations=failed))
        if not result.actions:
            break
        activations = [a for a in result.actions if isinstance(a, Activate)]
        assert not {a.pod.name for a in activations} & failed  # a failed pod is not retried
        if round_number == 0 and first_round_fails and activations:
            # Every waiter refuses: the role patches land, the waiters keep waiting.
            failed = frozenset(a.pod.name for a in activations)
            kept = [a for a in result.actions if not isinstance(a, Activate)]
            world, landing = apply(world, kept, serial)
        else:
            world, landing = apply(world, result.actions, serial)
            failed = frozenset(name for name in failed if any(p.name == name for p in world))
        world += landing
        assert {p.name for p in world}.isdisjoint(
            {a.pod.name for a in result.actions if isinstance(a, DeletePod)}
        )
    else:
        raise AssertionError(f"not converged after 4 rounds: {summary(result.actions)}")
    assert result.converged
