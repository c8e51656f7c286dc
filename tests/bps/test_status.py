"""The status the controller writes: counts, pod names, conditions, the failover record."""

from __future__ import annotations

import json

from rapproxy.bps.plan import plan
from rapproxy.bps.status import (
    FailoverRecord,
    build_status,
    invalid_status,
    merge_patch,
    rfc3339,
)
from rapproxy.model.bps import BackupPodSet, BackupPodSetSpec, ObservedPod, Role

TEMPLATE = json.dumps({"spec": {"containers": [{"name": "a", "image": "i"}]}})
SET = BackupPodSet("default", "web", "uid-1", 3, "7", BackupPodSetSpec(2, 1, 0, TEMPLATE))
NOW = 1_800_000_000.0


def pods(*spec: tuple[str, Role, bool]) -> list[ObservedPod]:
    return [
        ObservedPod(name, role=role, ready=ready, node_name="n", created=NOW)
        for name, role, ready in spec
    ]


def test_counts_pod_names_and_conditions_of_a_ready_set() -> None:
    result = plan(
        SET.spec,
        pods(("p1", Role.PRIMARY, True), ("p2", Role.PRIMARY, True), ("h", Role.HOT_BACKUP, True)),
        None,
        NOW,
    )
    status = build_status(SET, result, {}, None, NOW)
    assert status["observedGeneration"] == 3
    assert (status["replicas"], status["readyReplicas"], status["hotBackups"]) == (2, 2, 1)
    assert status["pods"] == {"primary": ["p1", "p2"], "hotBackup": ["h"], "coldBackup": []}
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert conditions == {
        "Available": ("True", "PrimariesReady"),
        "Progressing": ("False", "Converged"),
        "InvalidSpec": ("False", "Valid"),
    }


def test_a_starting_primary_keeps_the_set_progressing_and_unavailable() -> None:
    result = plan(
        SET.spec,
        pods(("p1", Role.PRIMARY, True), ("p2", Role.PRIMARY, False), ("h", Role.HOT_BACKUP, True)),
        None,
        NOW,
    )
    status = build_status(SET, result, {}, None, NOW)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Available"]["status"] == "False"
    assert conditions["Progressing"]["status"] == "True"
    assert "primary 1/2 ready" in conditions["Progressing"]["message"]


def test_transition_times_change_only_when_a_condition_flips() -> None:
    result = plan(SET.spec, pods(("p1", Role.PRIMARY, True)), None, NOW)
    first = build_status(SET, result, {}, None, NOW)
    later = build_status(SET, result, first, None, NOW + 3600)
    assert later == first  # nothing changed: identical status, so no write


def test_invalid_spec_keeps_the_counts_and_names_the_field() -> None:
    previous = {"replicas": 2, "conditions": [{"type": "Available", "status": "True"}]}
    status = invalid_status(previous, 4, "spec.template.spec.containers", "needs at least one", NOW)
    assert status["replicas"] == 2 and status["observedGeneration"] == 4
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["InvalidSpec"]["status"] == "True"
    assert (
        conditions["InvalidSpec"]["message"] == "spec.template.spec.containers: needs at least one"
    )
    assert conditions["Available"]["status"] == "True"


def test_failover_record_renders_stage_offsets_from_detection() -> None:
    record = FailoverRecord("p1", "terminating", "node-a", detected=NOW, promoted_pod="h")
    record.promoted = NOW + 0.012
    record.restored = NOW + 0.5
    record.handling_seconds = 0.0125
    out = record.to_status()
    assert out["durations"] == {"promoted": 0.012, "restored": 0.5}
    assert out["detectedAt"] == "2027-01-15T08:00:00.000Z"
    assert out["promotedAt"] == "2027-01-15T08:00:00.012Z"
    assert "activatedAt" not in out
    assert rfc3339(NOW) == "2027-01-15T08:00:00Z"


def test_status_patch_nulls_what_the_new_status_no_longer_has() -> None:
    old_failover = {"failedPod": "web-a", "detectedAt": "t1", "restoredAt": "t2"}
    new_failover = {"failedPod": "web-b", "detectedAt": "t3"}
    current = {"replicas": 3, "lastFailover": old_failover, "stale": 1}
    wanted = {"replicas": 3, "lastFailover": new_failover}
    patch = merge_patch(current, wanted)
    assert patch == {
        "stale": None,
        "lastFailover": {"failedPod": "web-b", "detectedAt": "t3", "restoredAt": None},
    }


def test_status_patch_is_empty_when_nothing_changed() -> None:
    status = {"replicas": 3, "pods": {"primary": ["a"]}, "lastFailover": {"failedPod": "a"}}
    assert merge_patch(status, json.loads(json.dumps(status))) == {}
