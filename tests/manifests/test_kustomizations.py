"""Every manifest an operator can apply renders, and validates against the Kubernetes schemas.

Built-in kinds are checked with kubernetes-validate (offline, bundled schemas) in strict mode, so an
unknown or misspelt field fails, against the oldest API we support (1.28) and the newest bundled.
BackupPodSets are not in those schemas: they are checked against the openAPIV3Schema of our own
CRD, which is what the API server would do.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
OVERLAYS = ("replace-kube-proxy", "beside-kube-proxy")
Render = Callable[[str], list[dict[str, Any]]]
KUBERNETES_VERSIONS = ("1.28", kubernetes_validate.latest_version())
KUSTOMIZATIONS = (
    "",
    "base",
    *(f"overlays/{name}" for name in OVERLAYS),
    "cleanup",
    "kube-proxy-cleanup",
)
CRD_FILE = MANIFESTS / "crd-backuppodset.yaml"
EXAMPLES = MANIFESTS / "examples"


def crd_schemas(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) → openAPIV3Schema, for every CRD among the objects."""
    schemas = {}
    for crd in (o for o in objects if o["kind"] == "CustomResourceDefinition"):
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def our_crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    assert CRD_FILE.exists(), f"{CRD_FILE.relative_to(REPO)} is missing"
    return crd_schemas(list(yaml.safe_load_all(CRD_FILE.read_text(encoding="utf-8"))))


def validate(obj: dict[str, Any], version: str, custom: dict[tuple[str, str], Any]) -> None:
    where = f"{obj['kind']} {obj.get('metadata', {}).get('name')}"
    schema = custom.get((obj["apiVersion"], obj["kind"]))
    if schema is not None:
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=str)
        assert not errors, f"{where}: {errors[0].message} at {list(errors[0].absolute_path)}"
        return
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        pytest.fail(f"{where} is not a valid Kubernetes {version} object: {error.message}")
    except kubernetes_validate.SchemaNotFoundError:
        pytest.fail(f"{where}: no Kubernetes {version} schema and no CRD of ours defines it")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda k: k or "manifests")
def test_kustomization_renders_objects_valid_for_kubernetes(
    render: Render, kustomization: str, version: str
) -> None:
    objects = render(kustomization)
    assert objects, f"kustomize {kustomization!r} rendered nothing"
    custom = crd_schemas(objects)
    for obj in objects:
        validate(obj, version, custom)


def test_top_level_kustomization_installs_the_crd_and_the_safe_mode(render: Render) -> None:
    objects = render("")
    kinds = {o["kind"] for o in objects}
    assert "CustomResourceDefinition" in kinds
    config_maps = [o for o in objects if o["metadata"]["name"].startswith("rapproxy-config")]
    assert len(config_maps) == 1
    # beside-kube-proxy is the default: it handles only the Services labelled for it.
    assert "serviceProxyName: rapproxy" in config_maps[0]["data"]["rapproxy.yaml"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_examples_are_valid_objects(version: str) -> None:
    files = sorted(EXAMPLES.glob("*.yaml")) if EXAMPLES.is_dir() else []
    assert files, f"no examples in {EXAMPLES.relative_to(REPO)}"
    custom = our_crd_schemas()
    for path in files:
        for obj in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if obj and obj.get("kind") != "Kustomization":
                validate(obj, version, custom)


def test_custom_objects_are_checked_against_their_crd_schema() -> None:
    """The CRD branch of `validate` really checks something: a wrong type is caught."""
    crd = {
        "kind": "CustomResourceDefinition",
        "spec": {
            "group": "example.test",
            "names": {"kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {"spec": {"type": "object"}},
                        }
                    },
                }
            ],
        },
    }
    custom = crd_schemas([crd])
    good = {"apiVersion": "example.test/v1", "kind": "Widget", "spec": {}}
    validate(good, "1.28", custom)
    with pytest.raises(AssertionError, match="'oops' is not of type 'object'"):
        validate({**good, "spec": "oops"}, "1.28", custom)


def test_rendering_without_a_telemetry_token_names_the_missing_file(
    kubectl: str, tmp_path: Path
) -> None:
    copy = tmp_path / "manifests"
    subprocess.run(["cp", "-r", str(MANIFESTS), str(copy)], check=True)
    (copy / "base" / "telemetry-token").unlink(missing_ok=True)
    result = subprocess.run(
        [kubectl, "kustomize", str(copy / "base")], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "telemetry-token" in result.stderr


def test_telemetry_token_is_never_committed() -> None:
    if not (REPO / ".git").exists():
        pytest.skip("NOT A GIT CHECKOUT: cannot ask git what is committed")
    tracked = subprocess.run(
        ["git", "ls-files", "manifests/base/telemetry-token"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert tracked == ""
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "manifests/base/telemetry-token"], cwd=REPO, check=False
    )
    assert ignored.returncode == 0, "manifests/base/telemetry-token must be gitignored"


def test_cleanup_runs_rapproxy_cleanup_with_the_daemonsets_privileges_only(render: Render) -> None:
    (daemonset,) = render("cleanup")
    spec = daemonset["spec"]["template"]["spec"]
    assert daemonset["metadata"]["namespace"] == "kube-system", "must not delete a namespace"
    (init,) = spec["initContainers"]
    assert init["args"] == ["rapproxy", "cleanup"]
    assert init["securityContext"]["capabilities"] == {
        "drop": ["ALL"],
        "add": ["NET_ADMIN", "NET_RAW"],
    }
    assert spec["hostNetwork"] is True
    assert spec["tolerations"] == [{"operator": "Exists"}]
