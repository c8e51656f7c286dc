"""StaticSource: manifests become objects; edits are picked up; broken files keep old content."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rapproxy.cluster.static import ManifestError, Objects, StaticSource, parse_manifests

SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
"""
SLICE = """
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.1.0.1]}]
"""


def test_multi_document_file_is_split_by_kind_and_defaults_namespace() -> None:
    text = (
        SERVICE
        + "---\n"
        + SLICE
        + "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n"
    )
    objects = parse_manifests(text, "f.yaml")
    assert [o["metadata"]["name"] for o in objects.services] == ["web"]
    assert objects.services[0]["metadata"]["namespace"] == "default"
    assert [o["metadata"]["name"] for o in objects.slices] == ["web-a"]


def test_list_kind_is_unpacked() -> None:
    text = "kind: List\nitems:\n- kind: Service\n  metadata: {name: a}\n- kind: Service\n  metadata: {name: b}\n"
    assert len(parse_manifests(text, "f").services) == 2


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("a: [", "not valid YAML"),
        ("- just\n- a list\n", "f.yaml#0"),
        ("kind: List\nitems: 3\n", "items"),
    ],
)
def test_bad_manifests_name_the_file_and_document(text: str, fragment: str) -> None:
    with pytest.raises(ManifestError, match=r"f\.yaml") as error:
        parse_manifests(text, "f.yaml")
    assert fragment in str(error.value)


def test_reload_on_change_and_keep_previous_content_when_broken(tmp_path: Path) -> None:
    path = tmp_path / "objects.yaml"
    path.write_text(SERVICE)
    seen: list[Objects] = []
    source = StaticSource([path], seen.append)
    source.load_changed()
    assert len(seen) == 1 and len(seen[0].services) == 1

    assert source.load_changed() is False  # unchanged file: nothing applied
    assert len(seen) == 1

    path.write_text(SERVICE + "---\n" + SLICE)
    os.utime(path, ns=(1, 1))  # make sure the stamp differs even within one mtime tick
    assert source.load_changed() is True
    assert len(seen[-1].slices) == 1

    path.write_text("kind: [")
    source.load_changed()
    assert path in source.errors
    assert len(seen) == 2, "a broken file must not be applied"

    path.unlink()
    source.load_changed()
    assert source.errors[path] == "file does not exist"
