"""The BackupPodSet planner: desired counts vs observed pods → an ordered list of actions.

Pure: no I/O, no clock reads (callers pass `now`), deterministic (ties broken by name), so every
decision the controller takes can be replayed in a test. The controller applies the actions; it
may run independent writes concurrently, but the order below is the priority when it cannot.

Order (the paper's, made explicit):
1. Missing primaries: promote hot backups (a label patch — nothing slower may delay it), then
   activate cold backups into primaries, then create primaries.
2. Surplus primaries while hot backups are short: demote the least valuable primaries to hot
   backup. A label patch keeps a warm pod instead of deleting one and starting another; the
   demoted pod keeps running and simply leaves the Service. (The original only deleted.)
3. Missing hot backups: activate cold backups, then create hot backups.
4. Missing cold backups: create them.
5. Deletions: failed pods, pods without a valid role, then surplus per role, least valuable first
   (the ReplicaSet controller's ranking).

A cold-to-hot or cold-to-primary conversion is a `Promote` (the label patch) followed by an
`Activate` (the authenticated POST to the pod's `bps-wait`). Relabelling first records the intent
in the API, so a controller that restarts mid-conversion sees a pod whose role is already hot or
primary but whose waiter still runs, and simply activates it again: `Activate` is re-planned for
every such pod that has no activation in flight.

Expectations: the controller's cache may lag its own writes. `InFlight` tells the planner which
creates, deletes, role patches and activations are outstanding; creates count towards their
role, deleted pods count as gone, role patches are applied on top of the observed labels. With
that, a stale cache never makes the planner create more pods than desired + in flight.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from rapproxy.model.bps import BackupPodSetSpec, ObservedPod, PodPhase, Role, WaiterState

DEFAULT_NOT_READY_GRACE_SECONDS = 10.0
ROLES = (Role.PRIMARY, Role.HOT_BACKUP, Role.COLD_BACKUP)


class NodeView(Protocol):
    """What the planner needs of a Node (`rapproxy.model.node.NodeInfo` fits)."""

    @property
    def name(self) -> str: ...

    @property
    def ready(self) -> bool: ...

    @property
    def unschedulable(self) -> bool: ...


class FailureReason(enum.StrEnum):
    TERMINATING = "terminating"
    PHASE_FAILED = "phase-failed"
    PHASE_SUCCEEDED = "phase-succeeded"
    PHASE_UNKNOWN = "phase-unknown"
    NOT_READY = "not-ready"
    NODE_NOT_READY = "node-not-ready"
    NODE_MISSING = "node-missing"
    ACTIVATION_FAILED = "activation-failed"
    NO_ACTIVATION_TOKEN = "no-activation-token"


@dataclass(frozen=True, slots=True)
class Failure:
    pod: ObservedPod
    reason: FailureReason
    detail: str


class DeleteReason(enum.StrEnum):
    FAILED = "failed"
    NO_ROLE = "no-role"
    SURPLUS = "surplus"


@dataclass(frozen=True, slots=True)
class Promote:
    """Relabel a backup into a higher role (hot→primary, cold→primary, cold→hot)."""

    pod: ObservedPod
    from_role: Role
    to_role: Role


@dataclass(frozen=True, slots=True)
class Demote:
    """Relabel a surplus primary into a hot backup (it keeps running, it leaves the Service)."""

    pod: ObservedPod
    from_role: Role
    to_role: Role


@dataclass(frozen=True, slots=True)
class Activate:
    """POST /activate to the pod's waiter; `role` is the role it is being activated into."""

    pod: ObservedPod
    role: Role


@dataclass(frozen=True, slots=True)
class CreatePod:
    role: Role
    node_hint: str | None


@dataclass(frozen=True, slots=True)
class DeletePod:
    pod: ObservedPod
    reason: DeleteReason
    detail: str


Action = Promote | Demote | Activate | CreatePod | DeletePod


@dataclass(frozen=True, slots=True)
class InFlight:
    """The controller's outstanding writes that its cache may not reflect yet."""

    creates: Mapping[Role, int] = field(default_factory=dict)
    deletes: frozenset[str] = frozenset()  # pod names
    roles: Mapping[str, Role] = field(default_factory=dict)  # pod name → role patched to
    activations: frozenset[str] = frozenset()  # pod names with a POST /activate outstanding
    failed_activations: frozenset[str] = frozenset()  # pod names whose activation failed


@dataclass(frozen=True, slots=True)
class RoleCount:
    desired: int
    alive: int  # observed, not failed, not being deleted (before this plan's actions)
    ready: int
    in_flight: int  # creates outstanding


@dataclass(frozen=True, slots=True)
class Plan:
    actions: tuple[Action, ...]
    counts: Mapping[Role, RoleCount]
    failures: tuple[Failure, ...]
    pods_by_role: Mapping[Role, tuple[str, ...]]  # alive pods after this plan's role changes
    recheck_at: float | None  # when a not-ready pod's grace runs out; requeue then

    @property
    def converged(self) -> bool:
        """Nothing to do and nothing outstanding: every role has exactly its desired pods."""
        return not self.actions and all(
            c.alive == c.desired and c.in_flight == 0 for c in self.counts.values()
        )


def detect_failure(
    pod: ObservedPod,
    nodes: Mapping[str, NodeView] | None,
    now: float,
    not_ready_grace: float = DEFAULT_NOT_READY_GRACE_SECONDS,
    failed_activations: frozenset[str] = frozenset(),
) -> Failure | None:
    """Why `pod` can no longer hold its role, or None. `nodes` None: node health unknown."""
    if pod.deleting:
        return Failure(pod, FailureReason.TERMINATING, "deletionTimestamp is set")
    phase_failures = {
        PodPhase.FAILED: FailureReason.PHASE_FAILED,
        PodPhase.SUCCEEDED: FailureReason.PHASE_SUCCEEDED,
        PodPhase.UNKNOWN: FailureReason.PHASE_UNKNOWN,
    }
    if pod.phase in phase_failures:
        return Failure(pod, phase_failures[pod.phase], f"phase is {pod.phase}")
    if nodes is not None and pod.node_name is not None:
        node = nodes.get(pod.node_name)
        if node is None:
            return Failure(pod, FailureReason.NODE_MISSING, f"node {pod.node_name} does not exist")
        if not node.ready:
            return Failure(pod, FailureReason.NODE_NOT_READY, f"node {pod.node_name} is NotReady")
    if pod.name in failed_activations and pod.waiter is not WaiterState.DONE:
        return Failure(pod, FailureReason.ACTIVATION_FAILED, "the waiter did not accept activation")
    if (
        pod.waiter in (WaiterState.PENDING, WaiterState.RUNNING, WaiterState.CRASHED)
        and pod.activation_token is None
    ):
        return Failure(pod, FailureReason.NO_ACTIVATION_TOKEN, "its waiter can never be activated")
    deadline = not_ready_deadline(pod, not_ready_grace)
    if deadline is not None and now >= deadline:
        return Failure(
            pod, FailureReason.NOT_READY, f"not Ready for more than {not_ready_grace:g}s"
        )
    return None


def not_ready_deadline(pod: ObservedPod, not_ready_grace: float) -> float | None:
    """When a running, not-ready pod counts as failed; None if the rule does not apply.

    Only running pods qualify: a cold backup is Pending (never Ready) by design. The grace is
    measured from the latest of the Ready=False transition, the pod's creation and its main
    containers' start, so it is also the start-up allowance of a new pod, and of a cold backup
    that waited Pending for minutes before it was activated: counted from creation, such a pod
    was failed the moment its containers started (then its replacement, and so on, on a machine
    slow enough that no start-up fitted in the grace).
    """
    if pod.phase is not PodPhase.RUNNING or pod.ready:
        return None
    since = max(pod.not_ready_since or 0.0, pod.created, pod.running_since or 0.0)
    return since + not_ready_grace


def plan(
    spec: BackupPodSetSpec,
    pods: Iterable[ObservedPod],
    nodes: Sequence[NodeView] | None,
    now: float,
    in_flight: InFlight | None = None,
    *,
    not_ready_grace: float = DEFAULT_NOT_READY_GRACE_SECONDS,
) -> Plan:
    """Decide the ordered actions that move `pods` towards `spec` (see the module docstring)."""
    flight = in_flight or InFlight()
    node_map = None if nodes is None else {n.name: n for n in nodes}
    board = _Board(spec, node_map, now)
    failures: list[Failure] = []
    deletes: list[DeletePod] = []
    recheck: list[float] = []

    for pod in sorted(pods, key=lambda p: p.name):
        if pod.name in flight.deletes:
            continue
        failure = detect_failure(pod, node_map, now, not_ready_grace, flight.failed_activations)
        if failure is not None:
            failures.append(failure)
            if flight.roles.get(pod.name, pod.role) is Role.PRIMARY and pod.node_name:
                board.failed_primary_nodes.add(pod.node_name)
            if not pod.deleting:
                deletes.append(DeletePod(pod, DeleteReason.FAILED, failure.detail))
            continue
        role = flight.roles.get(pod.name, pod.role)
        if role is None:
            deletes.append(DeletePod(pod, DeleteReason.NO_ROLE, "no valid rapproxy.io/role label"))
            continue
        board.add(pod, role)
        deadline = not_ready_deadline(pod, not_ready_grace)
        if deadline is not None:
            recheck.append(deadline)

    counts = {
        role: RoleCount(
            desired=spec.desired(role),
            alive=len(board.pods[role]),
            ready=sum(1 for p in board.pods[role] if p.ready),
            in_flight=max(0, flight.creates.get(role, 0)),
        )
        for role in ROLES
    }

    def gap(role: Role) -> int:
        return spec.desired(role) - len(board.pods[role]) - counts[role].in_flight

    actions: list[Action] = []
    activated: set[str] = set()

    def convert(pod: ObservedPod, to_role: Role) -> None:
        from_role = board.role_of[pod.name]
        actions.append(Promote(pod, from_role, to_role))
        board.move(pod, to_role)
        if _needs_activation(pod) and pod.name not in flight.activations:
            actions.append(Activate(pod, to_role))
            activated.add(pod.name)

    def resume_activations(role: Role) -> None:
        for pod in board.pods[role]:
            if (
                _needs_activation(pod)
                and pod.name not in activated
                and pod.name not in flight.activations
            ):
                actions.append(Activate(pod, role))
                activated.add(pod.name)

    # 1. Primaries: hot backups first, then cold backups, then new pods.
    missing = gap(Role.PRIMARY)
    if missing > 0:
        for pod in board.rank_for_promotion(Role.HOT_BACKUP, Role.PRIMARY)[:missing]:
            convert(pod, Role.PRIMARY)
    resume_activations(Role.PRIMARY)
    missing = gap(Role.PRIMARY)
    if missing > 0:
        for pod in board.rank_for_promotion(Role.COLD_BACKUP, Role.PRIMARY)[:missing]:
            convert(pod, Role.PRIMARY)
    for _ in range(max(0, gap(Role.PRIMARY))):
        actions.append(CreatePod(Role.PRIMARY, board.reserve(Role.PRIMARY)))

    # 2. Surplus primaries fill a hot-backup shortage by demotion.
    demotions = min(len(board.pods[Role.PRIMARY]) - spec.replicas, gap(Role.HOT_BACKUP))
    if demotions > 0:
        for pod in board.rank_for_deletion(Role.PRIMARY)[:demotions]:
            actions.append(Demote(pod, Role.PRIMARY, Role.HOT_BACKUP))
            board.move(pod, Role.HOT_BACKUP)

    # 3. Hot backups: cold backups first, then new pods.
    resume_activations(Role.HOT_BACKUP)
    missing = gap(Role.HOT_BACKUP)
    if missing > 0:
        for pod in board.rank_for_promotion(Role.COLD_BACKUP, Role.HOT_BACKUP)[:missing]:
            convert(pod, Role.HOT_BACKUP)
    for _ in range(max(0, gap(Role.HOT_BACKUP))):
        actions.append(CreatePod(Role.HOT_BACKUP, board.reserve(Role.HOT_BACKUP)))

    # 4. Cold backups: only new pods (a running pod cannot go back to waiting).
    for _ in range(max(0, gap(Role.COLD_BACKUP))):
        actions.append(CreatePod(Role.COLD_BACKUP, board.reserve(Role.COLD_BACKUP)))

    # 5. Deletions: failed and role-less pods, then surplus, least valuable first. Surplus counts
    # observed pods only: an in-flight create that lands later is trimmed in a later round, so a
    # create that fails never leaves the set short because we deleted in advance.
    for role in ROLES:
        surplus = len(board.pods[role]) - spec.desired(role)
        for pod in board.rank_for_deletion(role)[: max(0, surplus)]:
            detail = f"{role} above {spec.desired(role)}"
            deletes.append(DeletePod(pod, DeleteReason.SURPLUS, detail))
    # A surplus pod may have had its interrupted activation resumed above: not worth finishing.
    doomed = {d.pod.name for d in deletes}
    actions = [a for a in actions if not (isinstance(a, Activate) and a.pod.name in doomed)]
    actions.extend(deletes)

    return Plan(
        actions=tuple(actions),
        counts=counts,
        failures=tuple(failures),
        pods_by_role={role: tuple(sorted(p.name for p in board.pods[role])) for role in ROLES},
        recheck_at=min(recheck) if recheck else None,
    )


def _needs_activation(pod: ObservedPod) -> bool:
    """Its waiter runs and can be reached and authenticated (the ip may still be missing)."""
    return (
        pod.waiter is WaiterState.RUNNING
        and pod.ip is not None
        and pod.activation_token is not None
    )


def _is_activatable(pod: ObservedPod) -> bool:
    """A cold backup that can hold a higher role now: already hot, or its waiter is listening."""
    if pod.waiter in (WaiterState.ABSENT, WaiterState.DONE):
        return True
    return (
        pod.waiter is WaiterState.RUNNING
        and pod.ip is not None
        and pod.activation_token is not None
    )


_PHASE_VALUE = {PodPhase.PENDING: 0, PodPhase.UNKNOWN: 1, PodPhase.RUNNING: 2}
_WAITER_VALUE = {
    WaiterState.PENDING: 0,
    WaiterState.CRASHED: 0,
    WaiterState.RUNNING: 1,
    WaiterState.DONE: 2,
    WaiterState.ABSENT: 2,
}


class _Board:
    """The planner's scratch view of one set: pods by role and per-node counts, updated as the
    plan moves and creates pods. Private and local to one `plan()` call."""

    def __init__(self, spec: BackupPodSetSpec, nodes: Mapping[str, NodeView] | None, now: float):
        self.spec = spec
        self.nodes = nodes
        self.now = now
        self.pods: dict[Role, list[ObservedPod]] = {role: [] for role in ROLES}
        self.role_of: dict[str, Role] = {}
        self.on_node: dict[str, dict[Role, int]] = {}
        self.failed_primary_nodes: set[str] = set()

    def add(self, pod: ObservedPod, role: Role) -> None:
        self.pods[role].append(pod)
        self.role_of[pod.name] = role
        self._count(pod.node_name, role, +1)

    def move(self, pod: ObservedPod, to_role: Role) -> None:
        from_role = self.role_of[pod.name]
        self.pods[from_role].remove(pod)
        self._count(pod.node_name, from_role, -1)
        self.add(pod, to_role)

    def _count(self, node: str | None, role: Role, delta: int) -> None:
        if node is None:
            return
        per_role = self.on_node.setdefault(node, dict.fromkeys(ROLES, 0))
        per_role[role] += delta

    def _placement_key(self, node: str | None, role: Role) -> tuple[int, ...]:
        """Lower is a better home for a pod of `role`. With spreadRoles: few pods of the same role
        (one node failure takes few of any role), then few primaries (a backup should not share a
        node with the primary it would replace), then few pods of the set. Without: few pods."""
        per_role = self.on_node.get(node or "", dict.fromkeys(ROLES, 0))
        total = sum(per_role.values())
        if not self.spec.placement.spread_roles:
            return (total,)
        return (per_role[role], per_role[Role.PRIMARY], total)

    def reserve(self, role: Role) -> str | None:
        """The node for a new pod of `role` (the emptiest ready node), counted as used."""
        if not self.nodes:
            return None
        candidates = [n.name for n in self.nodes.values() if n.ready and not n.unschedulable]
        if not candidates:
            return None
        best = min(candidates, key=lambda name: (self._placement_key(name, role), name))
        self._count(best, role, +1)
        return best

    def rank_for_promotion(self, from_role: Role, to_role: Role) -> list[ObservedPod]:
        """Candidates to move into `to_role`, best first: ready (a not-ready promotion leaves the
        gap open in practice), not on a node that just lost a primary, on a node with few pods
        of the target role, ready longest, oldest, then by name."""
        pods = self.pods[from_role]
        if from_role is Role.COLD_BACKUP:
            pods = [p for p in pods if _is_activatable(p)]

        def key(pod: ObservedPod) -> tuple[object, ...]:
            hot_now = pod.waiter in (WaiterState.ABSENT, WaiterState.DONE)
            ready_for = self.now - pod.ready_since if pod.ready and pod.ready_since else 0.0
            return (
                not pod.ready,
                not hot_now,
                pod.node_name in self.failed_primary_nodes,
                self._placement_key(pod.node_name, to_role),
                -ready_for,
                pod.created,
                pod.name,
            )

        return sorted(pods, key=key)

    def rank_for_deletion(self, role: Role) -> list[ObservedPod]:
        """Least valuable first, as the ReplicaSet controller ranks: unscheduled, then pending <
        unknown < running (a waiting cold pod above one still starting), not ready, doubled up
        on a node with more pods of the set, ready for a shorter time, more restarts, newer."""

        def key(pod: ObservedPod) -> tuple[object, ...]:
            per_role = self.on_node.get(pod.node_name or "", {})
            return (
                pod.node_name is not None,
                _PHASE_VALUE.get(pod.phase, 0),
                _WAITER_VALUE[pod.waiter],
                pod.ready,
                -sum(per_role.values()),
                -(pod.ready_since or 0.0) if pod.ready else 0.0,
                -pod.restarts,
                -pod.created,
                pod.name,
            )

        return sorted(self.pods[role], key=key)
