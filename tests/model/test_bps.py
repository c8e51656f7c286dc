"""Parsing BackupPodSets and their pods: defaults, rejections that name the field, pod states."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from rapproxy.model.bps import (
    ANNOTATION_ACTIVATION_TOKEN,
    DEFAULT_ACTIVATION_PORT,
    LABEL_BPS,
    LABEL_ROLE,
    WAITER_CONTAINER,
    InvalidBackupPodSet,
    PodPhase,
    Role,
    WaiterState,
    parse_backup_pod_set,
    parse_pod,
    parse_time,
)

BPS: dict[str, Any] = {
    "apiVersion": "rapproxy.io/v1alpha1",
    "kind": "BackupPodSet",
    "metadata": {
        "name": "web",
        "namespace": "shop",
        "uid": "u-1",
        "generation": 3,
        "resourceVersion": "42",
    },
    "spec": {
        "replicas": 2,
        "hotBackups": 2,
        "coldBackups": 2,
        "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "image": "busybox"}]},
        },
    },
}


def bps_with(path: str, value: object) -> dict[str, Any]:
    obj = copy.deepcopy(BPS)
    *parents, last = path.split(".")
    target = obj
    for part in parents:
        target = target.setdefault(part, {})
    target[last] = value
    return obj


def test_parses_counts_identity_and_template() -> None:
    bps = parse_backup_pod_set(BPS)
    assert (bps.namespace, bps.name, bps.uid, bps.generation) == ("shop", "web", "u-1", 3)
    assert (bps.spec.replicas, bps.spec.hot_backups, bps.spec.cold_backups) == (2, 2, 2)
    assert bps.spec.total == 6
    assert bps.spec.desired(Role.HOT_BACKUP) == 2
    assert bps.spec.template["metadata"]["labels"] == {"app": "web"}
    assert bps.spec.activation.port == DEFAULT_ACTIVATION_PORT
    assert bps.spec.placement.spread_roles is True
    assert bps.key == "shop/web"


def test_restart_policy_never_is_accepted_so_a_crash_fails_over_instead_of_restarting() -> None:
    bps = parse_backup_pod_set(bps_with("spec.template.spec.restartPolicy", "Never"))
    assert bps.spec.template["spec"]["restartPolicy"] == "Never"


def test_template_copies_are_independent_and_spec_is_hashable() -> None:
    bps = parse_backup_pod_set(BPS)
    bps.spec.template["spec"]["containers"].clear()
    assert bps.spec.template["spec"]["containers"]
    assert hash(bps.spec) == hash(parse_backup_pod_set(copy.deepcopy(BPS)).spec)


def test_missing_counts_take_the_crd_defaults() -> None:
    obj = copy.deepcopy(BPS)
    for name in ("replicas", "hotBackups", "coldBackups"):
        del obj["spec"][name]
    spec = parse_backup_pod_set(obj).spec
    assert (spec.replicas, spec.hot_backups, spec.cold_backups) == (1, 0, 0)


def test_activation_and_placement_are_parsed() -> None:
    obj = bps_with("spec.activation", {"port": 20000, "timeoutSeconds": 2, "image": "rapproxy"})
    obj["spec"]["placement"] = {"spreadRoles": False}
    spec = parse_backup_pod_set(obj).spec
    assert (spec.activation.port, spec.activation.timeout_seconds) == (20000, 2.0)
    assert spec.activation.image == "rapproxy"
    assert spec.placement.spread_roles is False


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("spec.hotBackups", -1, "spec.hotBackups: -1 must be >= 0"),
        ("spec.replicas", "2", "spec.replicas: '2' is not an integer"),
        ("spec.coldBackups", True, "spec.coldBackups: True is not an integer"),
        ("spec.template", None, "spec.template: required"),
        ("spec.template.spec", None, "spec.template.spec: required"),
        ("spec.template.spec.containers", [], "spec.template.spec.containers: needs at least one"),
        (
            "spec.template.spec.containers",
            [{"name": "web"}],
            "spec.template.spec.containers[0].image: required",
        ),
        (
            "spec.template.metadata.labels",
            {LABEL_ROLE: "primary"},
            f"spec.template.metadata.labels.{LABEL_ROLE}: is set by the controller",
        ),
        (
            "spec.template.metadata.labels",
            {"app": 1},
            "spec.template.metadata.labels: must map strings to strings",
        ),
        (
            "spec.template.spec.restartPolicy",
            "OnFailure",
            "spec.template.spec.restartPolicy: 'OnFailure': only 'Always' or 'Never' is allowed",
        ),
        (
            "spec.template.spec.initContainers",
            [{"name": WAITER_CONTAINER, "image": "x"}],
            "spec.template.spec.initContainers[0].name: 'bps-wait' is reserved",
        ),
        ("spec.activation.port", 0, "spec.activation.port: 0 is not a port"),
        ("spec.activation.timeoutSeconds", 0, "spec.activation.timeoutSeconds: 0 must be"),
        ("spec.placement.spreadRoles", "yes", "spec.placement.spreadRoles: 'yes' is not a bool"),
    ],
)
def test_rejects_invalid_specs_naming_the_field(path: str, value: object, message: str) -> None:
    with pytest.raises(InvalidBackupPodSet) as caught:
        parse_backup_pod_set(bps_with(path, value))
    assert message in str(caught.value)
    assert str(caught.value).startswith("BackupPodSet shop/web: ")
    assert caught.value.field == path or caught.value.field.startswith(path)


def test_rejects_an_object_without_a_spec() -> None:
    with pytest.raises(InvalidBackupPodSet, match="spec: required"):
        parse_backup_pod_set({"metadata": {"name": "x"}})


def pod_object(**overrides: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {
            "name": "web-abc12",
            "namespace": "shop",
            "uid": "p-1",
            "resourceVersion": "7",
            "creationTimestamp": "2026-11-22T14:00:00Z",
            "labels": {LABEL_BPS: "web", LABEL_ROLE: "hot-backup"},
            "ownerReferences": [
                {"kind": "BackupPodSet", "name": "web", "uid": "u-1", "controller": True}
            ],
        },
        "spec": {"nodeName": "node-a", "containers": [{"name": "web", "image": "busybox"}]},
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.5",
            "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-22T14:00:05Z"}
            ],
            "containerStatuses": [{"name": "web", "restartCount": 2}],
        },
    }
    for key, value in overrides.items():
        obj[key].update(value)
    return obj


def test_parses_a_running_ready_hot_backup() -> None:
    pod = parse_pod(pod_object())
    assert pod.role is Role.HOT_BACKUP
    assert (pod.phase, pod.ready, pod.node_name, pod.ip) == (
        PodPhase.RUNNING,
        True,
        "node-a",
        "10.0.0.5",
    )
    assert pod.ready_since == parse_time("2026-11-22T14:00:05Z")
    assert pod.created == parse_time("2026-11-22T14:00:00Z")
    assert (pod.restarts, pod.owner_uid, pod.deleting) == (2, "u-1", False)
    assert pod.waiter is WaiterState.ABSENT


def test_unknown_role_label_parses_as_no_role() -> None:
    obj = pod_object()
    obj["metadata"]["labels"][LABEL_ROLE] = "standby"
    assert parse_pod(obj).role is None


def test_deletion_timestamp_marks_the_pod_deleting() -> None:
    obj = pod_object(metadata={"deletionTimestamp": "2026-11-22T14:01:00Z"})
    assert parse_pod(obj).deleting is True


def test_not_ready_records_the_transition_time() -> None:
    obj = pod_object()
    obj["status"]["conditions"] = [
        {"type": "Ready", "status": "False", "lastTransitionTime": "2026-11-22T14:02:00Z"}
    ]
    pod = parse_pod(obj)
    assert (pod.ready, pod.ready_since) == (False, None)
    assert pod.not_ready_since == parse_time("2026-11-22T14:02:00Z")


def test_running_since_is_the_latest_main_container_start() -> None:
    obj = pod_object()
    obj["status"]["containerStatuses"] = [
        {"name": "a", "state": {"running": {"startedAt": "2026-11-22T14:02:00Z"}}},
        {"name": "b", "state": {"running": {"startedAt": "2026-11-22T14:05:00Z"}}},
        {"name": "c", "state": {"waiting": {"reason": "ContainerCreating"}}},
        {"name": "d", "state": "garbage"},
    ]
    assert parse_pod(obj).running_since == parse_time("2026-11-22T14:05:00Z")


def test_running_since_is_none_before_any_main_container_runs() -> None:
    obj = pod_object()
    obj["status"]["containerStatuses"] = [{"name": "a", "state": {"waiting": {}}}]
    assert parse_pod(obj).running_since is None


def cold_pod(init_status: dict[str, Any] | None, phase: str = "Pending") -> dict[str, Any]:
    obj = pod_object(status={"phase": phase, "conditions": []})
    obj["metadata"]["labels"][LABEL_ROLE] = "cold-backup"
    obj["metadata"]["annotations"] = {ANNOTATION_ACTIVATION_TOKEN: "s3cret"}
    obj["spec"]["initContainers"] = [{"name": WAITER_CONTAINER, "image": "busybox"}]
    if init_status is not None:
        obj["status"]["initContainerStatuses"] = [{"name": WAITER_CONTAINER, **init_status}]
    return obj


@pytest.mark.parametrize(
    ("init_status", "phase", "expected"),
    [
        (None, "Pending", WaiterState.PENDING),
        ({"state": {"waiting": {"reason": "PodInitializing"}}}, "Pending", WaiterState.PENDING),
        ({"state": {"running": {}}}, "Pending", WaiterState.RUNNING),
        ({"state": {"terminated": {"exitCode": 0}}}, "Running", WaiterState.DONE),
        ({"state": {"terminated": {"exitCode": 1}}}, "Pending", WaiterState.CRASHED),
        (
            {"state": {"waiting": {}}, "lastState": {"terminated": {"exitCode": 1}}},
            "Pending",
            WaiterState.CRASHED,
        ),
        (None, "Running", WaiterState.DONE),
    ],
)
def test_waiter_state_comes_from_init_container_status(
    init_status: dict[str, Any] | None, phase: str, expected: WaiterState
) -> None:
    pod = parse_pod(cold_pod(init_status, phase))
    assert pod.waiter is expected
    assert pod.activation_token == "s3cret"
    assert pod.role is Role.COLD_BACKUP


def test_parse_time_accepts_fractions_and_rejects_garbage() -> None:
    assert parse_time("1970-01-01T00:00:01.5Z") == 1.5
    assert parse_time("yesterday") is None
    assert parse_time(None) is None
