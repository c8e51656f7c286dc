"""REST semantics not covered by the fixture transcripts: CRD and namespace deletion,
pagination, field selectors on pods, the extra served kinds."""

from __future__ import annotations

from typing import Any

import pytest

from rapproxy.testing.apiserver import EmulatedApiServer, Registry, Store
from rapproxy.testing.apiserver.errors import ApiError
from rapproxy.testing.apiserver.registry import DeleteOptions, ListOptions
from rapproxy.testing.apiserver.resources import (
    APPS_TYPES,
    CONFIGMAPS,
    CRDS,
    NAMESPACES,
    PODS,
)

from .conftest import eventually

CRD: dict[str, Any] = {
    "metadata": {"name": "gadgets.t.io"},
    "spec": {
        "group": "t.io",
        "scope": "Namespaced",
        "names": {"plural": "gadgets", "kind": "Gadget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}


def test_deleting_a_crd_deletes_its_objects_and_stops_serving_it() -> None:
    registry = Registry(Store())
    registry.create(CRDS, "", CRD)
    gadgets = registry.store.lookup("t.io", "v1", "gadgets")
    assert gadgets is not None and gadgets.custom
    registry.create(gadgets, "default", {"metadata": {"name": "g"}, "spec": {"x": 1}})
    registry.delete(CRDS, "", "gadgets.t.io", DeleteOptions())
    assert registry.store.lookup("t.io", "v1", "gadgets") is None
    with pytest.raises(ApiError):
        registry.get(CRDS, "", "gadgets.t.io")


async def test_deleting_a_namespace_terminates_then_removes_it_with_its_contents() -> None:
    async with EmulatedApiServer() as api:
        api.registry.create(NAMESPACES, "", {"metadata": {"name": "doomed"}})
        api.registry.create(CONFIGMAPS, "doomed", {"metadata": {"name": "c"}})
        kept = api.registry.delete(NAMESPACES, "", "doomed", DeleteOptions()).body
        assert kept["status"]["phase"] == "Terminating"
        await eventually(lambda: api.store.get(NAMESPACES, "", "doomed") is None)
        assert api.store.list(CONFIGMAPS, "doomed") == []
        with pytest.raises(ApiError) as raised:
            api.registry.create(CONFIGMAPS, "doomed", {"metadata": {"name": "late"}})
        assert raised.value.code == 404


def test_pagination_returns_every_item_once_at_one_revision() -> None:
    registry = Registry(Store())
    for i in range(7):
        registry.create(CONFIGMAPS, "default", {"metadata": {"name": f"c{i}"}})
    names: list[str] = []
    token: str | None = None
    revisions = set()
    while True:
        page = registry.list(CONFIGMAPS, "default", ListOptions(limit=3, continue_token=token))
        names += [i["metadata"]["name"] for i in page["items"]]
        revisions.add(page["metadata"]["resourceVersion"])
        token = page["metadata"].get("continue")
        if not token:
            break
        assert page["metadata"]["remainingItemCount"] == 7 - len(names)
    assert names == [f"c{i}" for i in range(7)] and len(revisions) == 1


def test_pods_can_be_selected_by_node_and_phase() -> None:
    registry = Registry(Store())
    for name, node in (("a", "n1"), ("b", "n2"), ("c", None)):
        spec: dict[str, Any] = {"containers": [{"name": "c", "image": "x"}]}
        if node:
            spec["nodeName"] = node
        registry.create(PODS, "default", {"metadata": {"name": name}, "spec": spec})
    on_n1 = registry.list(PODS, None, ListOptions(field_selector="spec.nodeName=n1"))
    assert [p["metadata"]["name"] for p in on_n1["items"]] == ["a"]
    unbound = registry.list(
        PODS, "default", ListOptions(field_selector="spec.nodeName=,status.phase=Pending")
    )
    assert [p["metadata"]["name"] for p in unbound["items"]] == ["c"]


def test_deployments_are_stored_with_generation_for_manifests_that_need_them() -> None:
    registry = Registry(Store())
    deployments = APPS_TYPES[0]
    made = registry.create(
        deployments,
        "default",
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "d"},
            "spec": {"replicas": 1},
        },
    ).body
    assert made["metadata"]["generation"] == 1
    bumped = registry.patch(
        deployments, "default", "d", "application/merge-patch+json", b'{"spec": {"replicas": 2}}'
    ).body
    assert bumped["metadata"]["generation"] == 2


def test_inject_stores_what_validation_would_refuse_and_watchers_see_it() -> None:
    from rapproxy.testing.apiserver.resources import SERVICES

    registry = Registry(Store())
    sub, _ = registry.store.subscribe(SERVICES, registry.store.revision)
    bad = {"metadata": {"name": "bad"}, "spec": {"ports": [{"port": 70000}]}}
    with pytest.raises(ApiError):
        registry.create(SERVICES, "default", bad)
    stored = registry.inject(SERVICES, bad)
    assert stored["spec"]["ports"][0]["port"] == 70000 and stored["metadata"]["uid"]
    event = sub.queue.get_nowait()
    assert event is not None and event.type == "ADDED"
    assert registry.get(SERVICES, "default", "bad")["kind"] == "Service"
