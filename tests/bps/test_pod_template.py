"""Pod manifests: ownership, labels, the cold backup's waiter and token, node hints."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from rapproxy.bps.pod_template import build_pod, selector_labels
from rapproxy.model.bps import (
    ANNOTATION_ACTIVATION_TOKEN,
    ENV_ACTIVATION_TOKEN,
    ENV_POD_IP,
    WAITER_CONTAINER,
    BackupPodSet,
    Role,
    parse_backup_pod_set,
    parse_pod,
)

BPS_OBJECT: dict[str, Any] = {
    "apiVersion": "rapproxy.io/v1alpha1",
    "kind": "BackupPodSet",
    "metadata": {"name": "web", "namespace": "shop", "uid": "uid-web", "generation": 1},
    "spec": {
        "replicas": 1,
        "hotBackups": 1,
        "coldBackups": 1,
        "activation": {"port": 9911},
        "template": {
            "metadata": {"labels": {"app": "web"}, "annotations": {"team": "edge"}},
            "spec": {
                "initContainers": [{"name": "warm-cache", "image": "busybox"}],
                "containers": [{"name": "web", "image": "registry.local/web:1"}],
            },
        },
    },
}


def web(**spec_changes: Any) -> BackupPodSet:
    obj = copy.deepcopy(BPS_OBJECT)
    obj["spec"].update(spec_changes)
    return parse_backup_pod_set(obj)


@pytest.mark.parametrize("role", [Role.PRIMARY, Role.HOT_BACKUP])
def test_hot_pods_carry_ownership_labels_and_the_template_unchanged(role: Role) -> None:
    pod = build_pod(web(), role)
    meta = pod["metadata"]
    assert (pod["apiVersion"], pod["kind"]) == ("v1", "Pod")
    assert meta["generateName"] == "web-"
    assert meta["namespace"] == "shop"
    assert meta["labels"] == {"app": "web", **selector_labels("web", role)}
    assert meta["annotations"] == {"team": "edge"}
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "rapproxy.io/v1alpha1",
            "kind": "BackupPodSet",
            "name": "web",
            "uid": "uid-web",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert pod["spec"] == BPS_OBJECT["spec"]["template"]["spec"]


def test_cold_pods_wait_last_with_their_token_and_the_pod_ip_from_the_downward_api() -> None:
    pod = build_pod(web(), Role.COLD_BACKUP, activation_token="tok")
    assert pod["metadata"]["annotations"][ANNOTATION_ACTIVATION_TOKEN] == "tok"
    assert pod["metadata"]["labels"]["rapproxy.io/role"] == "cold-backup"
    inits = pod["spec"]["initContainers"]
    assert [c["name"] for c in inits] == ["warm-cache", WAITER_CONTAINER]
    waiter = inits[-1]
    assert waiter["image"] == "registry.local/web:1"
    assert waiter["command"] == ["rapproxy", "bps-wait", "--port", "9911"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in waiter["env"]}
    assert env == {
        ENV_POD_IP: "status.podIP",
        ENV_ACTIVATION_TOKEN: f"metadata.annotations['{ANNOTATION_ACTIVATION_TOKEN}']",
    }
    assert waiter["ports"] == [{"name": "bps-activate", "containerPort": 9911, "protocol": "TCP"}]


def test_the_waiter_image_and_command_are_configurable() -> None:
    bps = web(activation={"image": "rapproxy:0.1.0"})
    pod = build_pod(
        bps, Role.COLD_BACKUP, activation_token="t", waiter_command=["python", "-m", "rapproxy"]
    )
    waiter = pod["spec"]["initContainers"][-1]
    assert waiter["image"] == "rapproxy:0.1.0"
    assert waiter["command"] == ["python", "-m", "rapproxy", "--port", "9901"]


def test_a_cold_pod_without_a_token_is_refused() -> None:
    with pytest.raises(ValueError, match="activation token"):
        build_pod(web(), Role.COLD_BACKUP)


def test_a_node_hint_is_a_preference_unless_binding_is_asked_for() -> None:
    preferred = build_pod(web(), Role.PRIMARY, node_hint="n2")
    terms = preferred["spec"]["affinity"]["nodeAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert terms == [
        {
            "weight": 100,
            "preference": {
                "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n2"]}]
            },
        }
    ]
    assert "nodeName" not in preferred["spec"]
    bound = build_pod(web(), Role.PRIMARY, node_hint="n2", bind_to_node=True)
    assert bound["spec"]["nodeName"] == "n2"
    assert "affinity" not in bound["spec"]


def test_a_template_that_pins_a_node_wins_over_the_hint() -> None:
    obj = copy.deepcopy(BPS_OBJECT)
    obj["spec"]["template"]["spec"]["nodeName"] = "n9"
    pod = build_pod(parse_backup_pod_set(obj), Role.PRIMARY, node_hint="n2", bind_to_node=True)
    assert pod["spec"]["nodeName"] == "n9"


def test_building_does_not_leak_into_the_set_or_the_next_pod() -> None:
    bps = web()
    build_pod(bps, Role.COLD_BACKUP, activation_token="t", node_hint="n1")
    again = build_pod(bps, Role.COLD_BACKUP, activation_token="u")
    assert [c["name"] for c in again["spec"]["initContainers"]] == ["warm-cache", WAITER_CONTAINER]
    assert "affinity" not in again["spec"]


def test_a_built_cold_pod_parses_back_as_a_cold_backup_owned_by_its_set() -> None:
    pod = build_pod(web(), Role.COLD_BACKUP, activation_token="tok")
    pod["metadata"]["name"] = "web-x1"
    observed = parse_pod(pod)
    assert observed.role is Role.COLD_BACKUP
    assert observed.activation_token == "tok"
    assert observed.owner_uid == "uid-web"
    assert observed.waiter.value == "pending"
