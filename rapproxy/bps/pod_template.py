"""Pod manifests for a BackupPodSet: the user's template plus what makes a pod one of ours.

Pure: the caller passes everything that varies (role, node hint, the cold pod's activation token,
how to invoke the waiter), so a manifest can be checked byte for byte in a test.

Every pod gets `generateName: <set>-`, a controller ownerReference to its set (so the garbage
collector removes it with the set) and the labels `rapproxy.io/bps` and `rapproxy.io/role`.
A cold backup also gets the `bps-wait` init container, placed *last* among the init containers:
everything the pod can do before its main containers start (scheduling, image pulls, IP, the
user's own init containers) is done while it waits, so activation only has the main containers'
start left. Its token travels in an annotation and reaches the waiter through a downward-API
environment variable (see `rapproxy.model.bps` for why not a Secret or a downward-API file).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rapproxy.model.bps import (
    ANNOTATION_ACTIVATION_TOKEN,
    API_VERSION,
    ENV_ACTIVATION_TOKEN,
    ENV_POD_IP,
    KIND,
    LABEL_BPS,
    LABEL_ROLE,
    WAITER_CONTAINER,
    BackupPodSet,
    Role,
)

DEFAULT_WAITER_COMMAND = ("rapproxy", "bps-wait")
NODE_HINT_WEIGHT = 100


def selector_labels(bps_name: str, role: Role | None = None) -> dict[str, str]:
    """The labels that identify a set's pods (and, with `role`, one role of it)."""
    labels = {LABEL_BPS: bps_name}
    if role is not None:
        labels[LABEL_ROLE] = str(role)
    return labels


def build_pod(
    bps: BackupPodSet,
    role: Role,
    *,
    node_hint: str | None = None,
    bind_to_node: bool = False,
    activation_token: str | None = None,
    waiter_command: Sequence[str] = DEFAULT_WAITER_COMMAND,
) -> dict[str, Any]:
    """A v1 Pod manifest for a new pod of `bps` in `role`.

    `node_hint`: with `bind_to_node` the pod is bound directly (`spec.nodeName`, no scheduler
    round trip); otherwise it becomes a preferred node affinity the scheduler may overrule. A
    template that pins `nodeName` itself wins. Cold backups need `activation_token`.
    """
    if role is Role.COLD_BACKUP and not activation_token:
        raise ValueError("a cold backup needs an activation token")
    template = bps.spec.template
    template_meta = template.get("metadata") or {}
    spec: dict[str, Any] = template["spec"]
    labels = dict(template_meta.get("labels") or {})
    labels.update(selector_labels(bps.name, role))
    annotations = dict(template_meta.get("annotations") or {})
    if role is Role.COLD_BACKUP:
        assert activation_token is not None
        annotations[ANNOTATION_ACTIVATION_TOKEN] = activation_token
        spec["initContainers"] = [
            *(spec.get("initContainers") or []),
            _waiter_container(bps, spec, waiter_command),
        ]
    if node_hint is not None and not spec.get("nodeName"):
        if bind_to_node:
            spec["nodeName"] = node_hint
        else:
            _prefer_node(spec, node_hint)
    metadata: dict[str, Any] = {
        "generateName": f"{bps.name}-",
        "namespace": bps.namespace,
        "labels": labels,
        "ownerReferences": [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": bps.name,
                "uid": bps.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    if annotations:
        metadata["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def _waiter_container(
    bps: BackupPodSet, spec: dict[str, Any], waiter_command: Sequence[str]
) -> dict[str, Any]:
    activation = bps.spec.activation
    image = activation.image or spec["containers"][0]["image"]
    return {
        "name": WAITER_CONTAINER,
        "image": image,
        "command": [*waiter_command, "--port", str(activation.port)],
        "env": [
            {"name": ENV_POD_IP, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {
                "name": ENV_ACTIVATION_TOKEN,
                "valueFrom": {
                    "fieldRef": {
                        "fieldPath": f"metadata.annotations['{ANNOTATION_ACTIVATION_TOKEN}']"
                    }
                },
            },
        ],
        "ports": [{"name": "bps-activate", "containerPort": activation.port, "protocol": "TCP"}],
    }


def _prefer_node(spec: dict[str, Any], node: str) -> None:
    # matchFields on metadata.name targets the Node object itself, as the DaemonSet controller
    # does; the hostname label can differ from the node name.
    term = {
        "weight": NODE_HINT_WEIGHT,
        "preference": {
            "matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]
        },
    }
    affinity = spec.setdefault("affinity", {})
    node_affinity = affinity.setdefault("nodeAffinity", {})
    preferred = node_affinity.setdefault("preferredDuringSchedulingIgnoredDuringExecution", [])
    preferred.append(term)
