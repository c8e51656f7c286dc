"""Discovery documents follow the served types, including CRDs and version priority."""

from __future__ import annotations

from rapproxy.testing.apiserver import Registry, Store
from rapproxy.testing.apiserver.discovery import (
    aggregated,
    aggregated_version,
    api_group,
    group_list,
    resource_list,
)
from rapproxy.testing.apiserver.resources import CRDS, PODS


def _crd(versions: list[str]) -> dict[str, object]:
    return {
        "metadata": {"name": "things.t.io"},
        "spec": {
            "group": "t.io",
            "scope": "Cluster",
            "names": {"plural": "things", "kind": "Thing"},
            "versions": [{"name": v, "served": True, "storage": v == "v1"} for v in versions],
        },
    }


def test_a_crd_adds_its_group_with_the_stable_version_preferred() -> None:
    store = Store()
    Registry(store).create(CRDS, "", _crd(["v1alpha1", "v1", "v2beta1"]))
    group = api_group("t.io", store.types())
    assert group is not None
    assert [v["version"] for v in group["versions"]] == ["v1", "v2beta1", "v1alpha1"]
    assert group["preferredVersion"]["version"] == "v1"
    assert "t.io" in [g["name"] for g in group_list(store.types())["groups"]]
    things = [t for t in store.types() if t.group == "t.io" and t.version == "v1"]
    listed = resource_list("t.io/v1", things)
    assert listed["apiVersion"] == "v1" and listed["resources"][0]["namespaced"] is False


def test_core_documents_and_subresources_have_the_real_quirks() -> None:
    listed = resource_list("v1", [PODS])
    assert "apiVersion" not in listed
    names = {r["name"]: r for r in listed["resources"]}
    assert names["pods/status"]["singularName"] == ""
    assert names["pods/binding"]["kind"] == "Binding"
    core = aggregated([PODS], core=True, version="v2")
    assert core["apiVersion"] == "apidiscovery.k8s.io/v2"
    assert (
        core["items"][0]["versions"][0]["resources"][0]["subresources"][0]["subresource"]
        == "status"
    )


def test_aggregated_discovery_is_chosen_from_the_accept_header() -> None:
    kubectl = (
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,"
        "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,"
        "application/json"
    )
    assert aggregated_version(kubectl) == "v2"
    assert aggregated_version("application/json") is None
