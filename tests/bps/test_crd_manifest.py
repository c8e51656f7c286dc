"""The BackupPodSet CRD and the example: valid Kubernetes, a schema that validates, defaults that
match the model's, pruning that keeps the template's labels, and an example the model accepts."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from rapproxy.bps.pod_template import build_pod, selector_labels
from rapproxy.model.bps import (
    DEFAULT_ACTIVATION_PORT,
    DEFAULT_ACTIVATION_TIMEOUT_SECONDS,
    PLURAL,
    Role,
    parse_backup_pod_set,
)

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "manifests" / "crd-backuppodset.yaml"
EXAMPLE_PATH = REPO / "manifests" / "examples" / "bps-web.yaml"


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    return loaded


@pytest.fixture(scope="module")
def schema(crd: dict[str, Any]) -> dict[str, Any]:
    version = crd["spec"]["versions"][0]
    result: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return result


@pytest.fixture(scope="module")
def example() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(EXAMPLE_PATH.read_text())}


def validate(obj: dict[str, Any], schema: dict[str, Any]) -> None:
    # OpenAPI v3.0 schemas are JSON Schema draft 4 plus x-kubernetes-* keywords (ignored here).
    jsonschema.Draft4Validator(schema).validate(obj)


def apply_defaults(obj: Any, schema: dict[str, Any]) -> Any:
    """Default like the API server: absent properties with a default get it, recursively."""
    if isinstance(obj, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                apply_defaults(obj[name], sub)
    return obj


def prune(obj: Any, schema: dict[str, Any], root: bool = True) -> Any:
    """Drop unknown fields like the API server's structural pruning does (which leaves the
    object's own metadata to the generic ObjectMeta handling)."""
    if root:
        pruned = prune(obj, schema, root=False)
        pruned["metadata"] = obj["metadata"]
        return pruned
    if isinstance(obj, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        if "properties" in schema:
            return {
                k: prune(v, schema["properties"][k], False)
                for k, v in obj.items()
                if k in schema["properties"]
            }
        if "additionalProperties" in schema:
            return {k: prune(v, schema["additionalProperties"], False) for k, v in obj.items()}
        return {}
    if isinstance(obj, list) and "items" in schema:
        return [prune(item, schema["items"], False) for item in obj]
    return obj


def test_crd_is_a_valid_kubernetes_1_28_object(crd: dict[str, Any]) -> None:
    kubernetes_validate.validate(crd, "1.28", strict=True)


def test_crd_names_scope_and_subresources(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{PLURAL}.rapproxy.io"
    assert (spec["group"], spec["scope"]) == ("rapproxy.io", "Namespaced")
    assert spec["names"]["kind"] == "BackupPodSet"
    assert spec["names"]["plural"] == PLURAL
    assert spec["names"]["shortNames"] == ["bps"]
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Primaries": ".spec.replicas",
        "Ready": ".status.readyReplicas",
        "Hot": ".status.hotBackups",
        "Cold": ".status.coldBackups",
        "Age": ".metadata.creationTimestamp",
    }


def test_schema_requires_a_template_and_keeps_its_metadata_and_spec(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["template"]
    template = spec["properties"]["template"]
    assert set(template["properties"]["metadata"]["properties"]) == {"labels", "annotations"}
    assert template["properties"]["spec"]["x-kubernetes-preserve-unknown-fields"] is True
    for count in ("replicas", "hotBackups", "coldBackups"):
        assert spec["properties"][count]["minimum"] == 0


def test_example_objects_validate_against_the_schema(
    schema: dict[str, Any], example: dict[str, dict[str, Any]]
) -> None:
    validate(example["BackupPodSet"], schema)
    kubernetes_validate.validate(example["Service"], "1.28", strict=True)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "hotBackups"), -1),
        (("spec", "replicas"), "2"),
        (("spec", "activation", "port"), 70000),
        (("spec", "activation", "timeoutSeconds"), 0),
        (("spec", "template", "metadata", "labels", "app"), 1),
        (("spec", "placement", "spreadRoles"), "yes"),
    ],
)
def test_schema_rejects_invalid_values(
    schema: dict[str, Any], example: dict[str, dict[str, Any]], path: tuple[str, ...], value: object
) -> None:
    obj = copy.deepcopy(example["BackupPodSet"])
    target = obj
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validate(obj, schema)


def test_schema_rejects_a_set_without_a_template(
    schema: dict[str, Any], example: dict[str, dict[str, Any]]
) -> None:
    obj = copy.deepcopy(example["BackupPodSet"])
    del obj["spec"]["template"]
    with pytest.raises(jsonschema.ValidationError, match="'template' is a required property"):
        validate(obj, schema)


def test_crd_defaults_are_the_models_defaults(schema: dict[str, Any]) -> None:
    minimal = {
        "apiVersion": "rapproxy.io/v1alpha1",
        "kind": "BackupPodSet",
        "metadata": {"name": "tiny", "namespace": "default"},
        "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "busybox"}]}}},
    }
    defaulted = apply_defaults(copy.deepcopy(minimal), schema)
    validate(defaulted, schema)
    assert parse_backup_pod_set(defaulted) == parse_backup_pod_set(minimal)
    spec = parse_backup_pod_set(defaulted).spec
    assert (spec.replicas, spec.hot_backups, spec.cold_backups) == (1, 0, 0)
    assert spec.activation.port == DEFAULT_ACTIVATION_PORT
    assert spec.activation.timeout_seconds == DEFAULT_ACTIVATION_TIMEOUT_SECONDS
    assert spec.placement.spread_roles is True


def test_pruning_keeps_the_template_labels_and_the_whole_pod_spec(
    schema: dict[str, Any], example: dict[str, dict[str, Any]]
) -> None:
    obj = copy.deepcopy(example["BackupPodSet"])
    obj["spec"]["unknownField"] = 1
    obj["spec"]["template"]["metadata"]["finalizers"] = ["x"]
    pruned = prune(obj, schema)
    assert "unknownField" not in pruned["spec"]
    assert "finalizers" not in pruned["spec"]["template"]["metadata"]
    assert pruned["spec"]["template"]["metadata"]["labels"] == {"app": "web"}
    assert pruned["spec"]["template"]["spec"] == example["BackupPodSet"]["spec"]["template"]["spec"]


def test_a_status_as_the_controller_writes_it_validates(schema: dict[str, Any]) -> None:
    obj = {
        "apiVersion": "rapproxy.io/v1alpha1",
        "kind": "BackupPodSet",
        "metadata": {"name": "web"},
        "spec": {"template": {"spec": {}}},
        "status": {
            "observedGeneration": 2,
            "replicas": 2,
            "readyReplicas": 2,
            "hotBackups": 2,
            "readyHotBackups": 2,
            "coldBackups": 2,
            "pods": {"primary": ["web-a"], "hotBackup": ["web-b"], "coldBackup": ["web-c"]},
            "conditions": [
                {
                    "type": "Available",
                    "status": "True",
                    "reason": "PrimariesReady",
                    "message": "2 of 2 primaries ready",
                    "lastTransitionTime": "2026-11-22T14:00:00Z",
                    "observedGeneration": 2,
                }
            ],
            "lastFailover": {
                "failedPod": "web-x",
                "reason": "terminating",
                "node": "n1",
                "promotedPod": "web-b",
                "detectedAt": "2026-11-22T14:00:00.000Z",
                "promotedAt": "2026-11-22T14:00:00.011Z",
                "activatedAt": "2026-11-22T14:00:00.052Z",
                "replacementCreatedAt": "2026-11-22T14:00:00.020Z",
                "restoredAt": "2026-11-22T14:00:01.200Z",
                "durations": {"promoted": 0.011, "activated": 0.052, "restored": 1.2},
                "handlingSeconds": 0.018,
            },
        },
    }
    validate(obj, schema)
    assert prune(obj, schema) == obj  # nothing the controller writes is pruned away


def test_the_example_service_selects_exactly_the_primaries(
    example: dict[str, dict[str, Any]],
) -> None:
    bps = parse_backup_pod_set(example["BackupPodSet"])
    selector = example["Service"]["spec"]["selector"]
    assert selector == selector_labels(bps.name, Role.PRIMARY)
    for role in Role:
        labels = build_pod(bps, role, activation_token="t")["metadata"]["labels"]
        selected = all(labels.get(k) == v for k, v in selector.items())
        assert selected is (role is Role.PRIMARY)


def test_the_model_accepts_the_example(example: dict[str, dict[str, Any]]) -> None:
    bps = parse_backup_pod_set(example["BackupPodSet"])
    assert (bps.spec.replicas, bps.spec.hot_backups, bps.spec.cold_backups) == (2, 2, 2)
    assert bps.spec.activation.image == "registry.invalid/rapproxy:0.1.0"
    cold = build_pod(bps, Role.COLD_BACKUP, activation_token="t")
    assert cold["spec"]["initContainers"][-1]["image"] == "registry.invalid/rapproxy:0.1.0"
    # The pods the controller builds from the example are valid v1 Pods.
    for role in Role:
        pod = build_pod(bps, role, activation_token="t", node_hint="n1")
        pod["metadata"]["name"] = "web-x"
        kubernetes_validate.validate(pod, "1.28", strict=True)
