"""BackupPodSets and their pods, as the planner sees them.

The BPS controller decides from two snapshots: the desired set (a `BackupPodSet` spec) and the
observed pods. Both are parsed here, once, at the edge, into frozen values, so the planner is a pure
function that a test can drive with hand-written data and replay exactly.

A pod's role is a label (`rapproxy.io/role`), so a failover is a label patch on a running pod, never
a restart. A cold backup is a pod whose main container has not started: its first init container,
`bps-wait`, blocks until the controller sends an authenticated `POST /activate`. The waiter's state
is read from the pod's `initContainerStatuses`.

Activation tokens: each cold pod gets its own random token in the annotation
`rapproxy.io/activation-token`; the waiter reads it through a downward-API environment variable
(resolved once at container start, unlike downward-API volume files, which the kubelet refreshes
too slowly to be useful). The controller reads it back from the pod it already caches, so no
Secret and no extra RBAC are needed; a pod's token is exactly as readable as the pod itself.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rapproxy.model.errors import InvalidObject

GROUP = "rapproxy.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "BackupPodSet"
PLURAL = "backuppodsets"

LABEL_BPS = "rapproxy.io/bps"
LABEL_ROLE = "rapproxy.io/role"
ANNOTATION_ACTIVATION_TOKEN = "rapproxy.io/activation-token"
WAITER_CONTAINER = "bps-wait"
ENV_ACTIVATION_TOKEN = "RAPPROXY_ACTIVATION_TOKEN"
ENV_POD_IP = "RAPPROXY_POD_IP"

DEFAULT_ACTIVATION_PORT = 9901
DEFAULT_ACTIVATION_TIMEOUT_SECONDS = 5.0
CONTROLLER_LABELS = (LABEL_BPS, LABEL_ROLE)


class InvalidBackupPodSet(InvalidObject):
    """A BackupPodSet the controller cannot act on; `str()` names the object and the field."""

    def __init__(self, key: str, field: str, reason: str) -> None:
        super().__init__(KIND, key, field, reason)


class Role(enum.StrEnum):
    """The value of the `rapproxy.io/role` label; only primaries are selected by the Service."""

    PRIMARY = "primary"
    HOT_BACKUP = "hot-backup"
    COLD_BACKUP = "cold-backup"


RESTART_POLICIES = ("Always", "Never")


class PodPhase(enum.StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    UNKNOWN = "Unknown"


class WaiterState(enum.StrEnum):
    """Where a pod's `bps-wait` init container is; decides whether it can be activated."""

    ABSENT = "absent"  # no waiter in the spec: the pod was created hot
    PENDING = "pending"  # declared, not started yet (unscheduled, pulling, waiting to restart)
    RUNNING = "running"  # started: it listens (or is about to) for POST /activate
    DONE = "done"  # exited 0: activated, the main containers start or have started
    CRASHED = "crashed"  # exited non-zero; the kubelet restarts it (restartPolicy Always)


@dataclass(frozen=True, slots=True)
class ActivationSpec:
    port: int = DEFAULT_ACTIVATION_PORT
    timeout_seconds: float = DEFAULT_ACTIVATION_TIMEOUT_SECONDS
    image: str | None = None  # the waiter's image; None: the first container's image


@dataclass(frozen=True, slots=True)
class PlacementSpec:
    spread_roles: bool = True


@dataclass(frozen=True, slots=True)
class BackupPodSetSpec:
    replicas: int
    hot_backups: int
    cold_backups: int
    template_json: str  # canonical JSON of spec.template: immutable, hashable, comparable
    activation: ActivationSpec = field(default_factory=ActivationSpec)
    placement: PlacementSpec = field(default_factory=PlacementSpec)

    @property
    def template(self) -> dict[str, Any]:
        """A fresh, mutable copy of the pod template (callers may edit it freely)."""
        value: dict[str, Any] = json.loads(self.template_json)
        return value

    def desired(self, role: Role) -> int:
        return {
            Role.PRIMARY: self.replicas,
            Role.HOT_BACKUP: self.hot_backups,
            Role.COLD_BACKUP: self.cold_backups,
        }[role]

    @property
    def total(self) -> int:
        return self.replicas + self.hot_backups + self.cold_backups


@dataclass(frozen=True, slots=True)
class BackupPodSet:
    namespace: str
    name: str
    uid: str
    generation: int
    resource_version: str
    spec: BackupPodSetSpec
    deleting: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ObservedPod:
    """One pod of a set, reduced to what placement, ranking and failure detection need.

    Times are seconds since the epoch (from the API's RFC 3339 stamps); None when absent.
    `role` is None when the role label is missing or not one of ours.
    """

    name: str
    namespace: str = "default"
    uid: str = ""
    resource_version: str = ""
    role: Role | None = Role.PRIMARY
    phase: PodPhase = PodPhase.RUNNING
    ready: bool = True
    ready_since: float | None = None  # Ready=True lastTransitionTime
    not_ready_since: float | None = None  # Ready=False lastTransitionTime
    node_name: str | None = None
    ip: str | None = None
    deleting: bool = False  # metadata.deletionTimestamp is set
    created: float = 0.0
    running_since: float | None = None  # the latest main container's state.running.startedAt
    restarts: int = 0
    waiter: WaiterState = WaiterState.ABSENT
    activation_token: str | None = None
    owner_uid: str | None = None  # uid of the controller ownerReference, if any


def parse_backup_pod_set(obj: Mapping[str, Any]) -> BackupPodSet:
    """Parse a BackupPodSet, applying the CRD's defaults; raise InvalidBackupPodSet on misuse."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        raise InvalidBackupPodSet("<unnamed>", "metadata.name", "required")
    namespace = meta.get("namespace") or "default"
    key = f"{namespace}/{meta['name']}"
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise InvalidBackupPodSet(key, "spec", "required and must be an object")
    counts = [
        _count(spec, name, default, key)
        for name, default in (("replicas", 1), ("hotBackups", 0), ("coldBackups", 0))
    ]
    generation = meta.get("generation", 0)
    return BackupPodSet(
        namespace=str(namespace),
        name=meta["name"],
        uid=str(meta.get("uid", "")),
        generation=generation if isinstance(generation, int) else 0,
        resource_version=str(meta.get("resourceVersion", "")),
        spec=BackupPodSetSpec(
            replicas=counts[0],
            hot_backups=counts[1],
            cold_backups=counts[2],
            template_json=_template_json(spec.get("template"), key),
            activation=_activation(spec.get("activation"), key),
            placement=_placement(spec.get("placement"), key),
        ),
        deleting=meta.get("deletionTimestamp") is not None,
    )


def _count(spec: Mapping[str, Any], name: str, default: int, key: str) -> int:
    value = spec.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidBackupPodSet(key, f"spec.{name}", f"{value!r} is not an integer")
    if value < 0:
        raise InvalidBackupPodSet(key, f"spec.{name}", f"{value} must be >= 0")
    return value


def _template_json(template: object, key: str) -> str:
    if not isinstance(template, Mapping):
        raise InvalidBackupPodSet(key, "spec.template", "required and must be an object")
    meta = template.get("metadata") or {}
    if not isinstance(meta, Mapping):
        raise InvalidBackupPodSet(key, "spec.template.metadata", "must be an object")
    for section in ("labels", "annotations"):
        values = meta.get(section) or {}
        if not isinstance(values, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in values.items()
        ):
            raise InvalidBackupPodSet(
                key, f"spec.template.metadata.{section}", "must map strings to strings"
            )
    labels = meta.get("labels") or {}
    for reserved in CONTROLLER_LABELS:
        if reserved in labels:
            raise InvalidBackupPodSet(
                key, f"spec.template.metadata.labels.{reserved}", "is set by the controller"
            )
    pod_spec = template.get("spec")
    if not isinstance(pod_spec, Mapping):
        raise InvalidBackupPodSet(key, "spec.template.spec", "required and must be an object")
    containers = pod_spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise InvalidBackupPodSet(key, "spec.template.spec.containers", "needs at least one")
    for i, container in enumerate(containers):
        where = f"spec.template.spec.containers[{i}]"
        if not isinstance(container, Mapping):
            raise InvalidBackupPodSet(key, where, "must be an object")
        for required in ("name", "image"):
            if not isinstance(container.get(required), str) or not container[required]:
                raise InvalidBackupPodSet(key, f"{where}.{required}", "required")
    init_containers = pod_spec.get("initContainers") or []
    if not isinstance(init_containers, list):
        raise InvalidBackupPodSet(key, "spec.template.spec.initContainers", "must be a list")
    for i, container in enumerate(init_containers):
        if isinstance(container, Mapping) and container.get("name") == WAITER_CONTAINER:
            raise InvalidBackupPodSet(
                key,
                f"spec.template.spec.initContainers[{i}].name",
                f"{WAITER_CONTAINER!r} is reserved for the cold-backup waiter",
            )
    restart_policy = pod_spec.get("restartPolicy", "Always")
    if restart_policy not in RESTART_POLICIES:
        # Always: a crashed container restarts in place (with back-off), as in a ReplicaSet, and
        # the set fails over only if the pod stays not Ready past the grace. Never: a crash
        # fails the pod, and the set fails over to a hot backup at once instead of waiting for a
        # restart. OnFailure mixes the two (exit 0 ends a "primary") and fits no role.
        raise InvalidBackupPodSet(
            key,
            "spec.template.spec.restartPolicy",
            f"{restart_policy!r}: only 'Always' or 'Never' is allowed",
        )
    return json.dumps(template, sort_keys=True, separators=(",", ":"))


def _activation(raw: object, key: str) -> ActivationSpec:
    if raw is None:
        return ActivationSpec()
    if not isinstance(raw, Mapping):
        raise InvalidBackupPodSet(key, "spec.activation", "must be an object")
    port = raw.get("port", DEFAULT_ACTIVATION_PORT)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidBackupPodSet(key, "spec.activation.port", f"{port!r} is not a port")
    timeout = raw.get("timeoutSeconds", DEFAULT_ACTIVATION_TIMEOUT_SECONDS)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0.1:
        raise InvalidBackupPodSet(
            key, "spec.activation.timeoutSeconds", f"{timeout!r} must be a number >= 0.1"
        )
    image = raw.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise InvalidBackupPodSet(key, "spec.activation.image", "must be a non-empty string")
    return ActivationSpec(port=port, timeout_seconds=float(timeout), image=image)


def _placement(raw: object, key: str) -> PlacementSpec:
    if raw is None:
        return PlacementSpec()
    if not isinstance(raw, Mapping):
        raise InvalidBackupPodSet(key, "spec.placement", "must be an object")
    spread = raw.get("spreadRoles", True)
    if not isinstance(spread, bool):
        raise InvalidBackupPodSet(key, "spec.placement.spreadRoles", f"{spread!r} is not a bool")
    return PlacementSpec(spread_roles=spread)


def parse_pod(obj: Mapping[str, Any]) -> ObservedPod:
    """Reduce a v1 Pod to an ObservedPod. Lenient: a pod the API accepted is never rejected."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    try:
        role: Role | None = Role(labels.get(LABEL_ROLE, ""))
    except ValueError:
        role = None
    try:
        phase = PodPhase(status.get("phase", "Pending"))
    except ValueError:
        phase = PodPhase.UNKNOWN
    ready = False
    ready_since: float | None = None
    not_ready_since: float | None = None
    for condition in status.get("conditions") or []:
        if isinstance(condition, Mapping) and condition.get("type") == "Ready":
            ready = condition.get("status") == "True"
            changed = parse_time(condition.get("lastTransitionTime"))
            if ready:
                ready_since = changed
            else:
                not_ready_since = changed
    owner_uid = None
    for ref in meta.get("ownerReferences") or []:
        if isinstance(ref, Mapping) and ref.get("controller") is True:
            owner_uid = str(ref.get("uid", ""))
    restarts = sum(
        int(s.get("restartCount", 0))
        for s in status.get("containerStatuses") or []
        if isinstance(s, Mapping)
    )
    token = annotations.get(ANNOTATION_ACTIVATION_TOKEN)
    started = [
        parse_time(((s.get("state") or {}).get("running") or {}).get("startedAt"))
        for s in status.get("containerStatuses") or []
        if isinstance(s, Mapping) and isinstance(s.get("state"), Mapping)
    ]
    running_since = max((t for t in started if t is not None), default=None)
    return ObservedPod(
        name=str(meta.get("name", "")),
        namespace=str(meta.get("namespace") or "default"),
        uid=str(meta.get("uid", "")),
        resource_version=str(meta.get("resourceVersion", "")),
        role=role,
        phase=phase,
        ready=ready,
        ready_since=ready_since,
        not_ready_since=not_ready_since,
        node_name=spec.get("nodeName") or None,
        ip=status.get("podIP") or None,
        deleting=meta.get("deletionTimestamp") is not None,
        created=parse_time(meta.get("creationTimestamp")) or 0.0,
        running_since=running_since,
        restarts=restarts,
        waiter=_waiter_state(spec, status),
        activation_token=token if isinstance(token, str) and token else None,
        owner_uid=owner_uid,
    )


def _waiter_state(spec: Mapping[str, Any], status: Mapping[str, Any]) -> WaiterState:
    declared = any(
        isinstance(c, Mapping) and c.get("name") == WAITER_CONTAINER
        for c in spec.get("initContainers") or []
    )
    if not declared:
        return WaiterState.ABSENT
    for container in status.get("initContainerStatuses") or []:
        if not isinstance(container, Mapping) or container.get("name") != WAITER_CONTAINER:
            continue
        state = container.get("state") or {}
        if "running" in state:
            return WaiterState.RUNNING
        if "terminated" in state:
            exit_code = (state["terminated"] or {}).get("exitCode")
            return WaiterState.DONE if exit_code == 0 else WaiterState.CRASHED
        last = (container.get("lastState") or {}).get("terminated")
        if last is not None and last.get("exitCode") not in (None, 0):
            return WaiterState.CRASHED
        return WaiterState.PENDING
    # The main containers are already running: the waiter finished even if its status is gone.
    if status.get("phase") == PodPhase.RUNNING:
        return WaiterState.DONE
    return WaiterState.PENDING


def parse_time(value: object) -> float | None:
    """RFC 3339 (`2026-11-22T14:03:26Z`, optionally with fractions) to epoch seconds."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
