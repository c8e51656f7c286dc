"""What a controller built on kubernetes-asyncio sees: the calls informers and reconcilers make.

Runs against the emulator by default and against a real cluster when RAPPROXY_TEST_KUBECONFIG is
set; the assertions are the documented behaviour of the real API server (fixtures README).
"""

from __future__ import annotations

import asyncio
import datetime
import re
from typing import Any

import pytest
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from rapproxy.testing.apiserver import EmulatedApiServer

from .conftest import Kube, eventually

MERGE = "application/merge-patch+json"
CONTAINER = {"name": "app", "image": "registry.k8s.io/pause:3.9"}


def _cm(name: str, **meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, **meta}, "data": {"a": "1"}}


async def _collect(stream: watch.Watch, func: Any, **kwargs: Any) -> list[tuple[str, str, str]]:
    seen = []
    async for event in stream.stream(func, **kwargs):
        raw = event["raw_object"]
        seen.append(
            (event["type"], raw["metadata"].get("name", ""), raw["metadata"]["resourceVersion"])
        )
    return seen


async def test_watch_from_list_version_sees_exactly_later_changes_then_a_bookmark(
    kube: Kube,
) -> None:
    core = client.CoreV1Api(kube.api)
    await core.create_namespaced_config_map(kube.namespace, _cm("before"))
    listed = await core.list_namespaced_config_map(kube.namespace)
    rv = listed.metadata.resource_version
    task = asyncio.create_task(
        _collect(
            watch.Watch(),
            core.list_namespaced_config_map,
            namespace=kube.namespace,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=3,
        )
    )
    await asyncio.sleep(0.2)  # let the watch connect: a real server has no "connected" signal
    created = await core.create_namespaced_config_map(kube.namespace, _cm("after"))
    await core.patch_namespaced_config_map("after", kube.namespace, {"data": {"a": "2"}})
    await core.delete_namespaced_config_map("after", kube.namespace)
    events = await task
    changes = [(t, n) for t, n, _ in events if t != "BOOKMARK"]
    assert changes == [("ADDED", "after"), ("MODIFIED", "after"), ("DELETED", "after")]
    versions = [int(v) for t, _, v in events if t != "BOOKMARK"]
    assert versions == sorted(versions) and versions[0] == int(created.metadata.resource_version)
    bookmarks = [int(v) for t, _, v in events if t == "BOOKMARK"]
    assert bookmarks and bookmarks[-1] >= versions[-1]


async def test_watch_resumed_from_last_seen_version_loses_nothing(kube: Kube) -> None:
    core = client.CoreV1Api(kube.api)
    first = await core.create_namespaced_config_map(kube.namespace, _cm("one"))
    last_seen = first.metadata.resource_version
    # While "disconnected", two more changes happen.
    await core.create_namespaced_config_map(kube.namespace, _cm("two"))
    await core.delete_namespaced_config_map("one", kube.namespace)
    events = await _collect(
        watch.Watch(),
        core.list_namespaced_config_map,
        namespace=kube.namespace,
        resource_version=last_seen,
        timeout_seconds=1,
    )
    assert [(t, n) for t, n, _ in events] == [("ADDED", "two"), ("DELETED", "one")]


async def test_watch_without_version_starts_with_synthetic_added(kube: Kube) -> None:
    core = client.CoreV1Api(kube.api)
    await core.create_namespaced_config_map(kube.namespace, _cm("x", labels={"k": "v"}))
    await core.create_namespaced_config_map(kube.namespace, _cm("y"))
    events = await _collect(
        watch.Watch(),
        core.list_namespaced_config_map,
        namespace=kube.namespace,
        label_selector="k=v",
        timeout_seconds=1,
    )
    assert [(t, n) for t, n, _ in events] == [("ADDED", "x")]


async def test_expired_version_raises_410_and_a_relist_recovers(
    kube: Kube, emulator: EmulatedApiServer
) -> None:
    assert kube.emulator is not None
    core = client.CoreV1Api(kube.api)
    old = (await core.list_namespaced_config_map(kube.namespace)).metadata.resource_version
    await core.create_namespaced_config_map(kube.namespace, _cm("c1"))
    kube.emulator.compact()
    with pytest.raises(ApiException) as raised:
        await _collect(
            watch.Watch(),
            core.list_namespaced_config_map,
            namespace=kube.namespace,
            resource_version=old,
            timeout_seconds=1,
        )
    assert raised.value.status == 410
    relisted = await core.list_namespaced_config_map(kube.namespace)
    assert [i.metadata.name for i in relisted.items] == ["c1"]
    events = await _collect(
        watch.Watch(),
        core.list_namespaced_config_map,
        namespace=kube.namespace,
        resource_version=relisted.metadata.resource_version,
        timeout_seconds=0.5,
    )
    assert events == []


async def test_patch_kinds_merge_strategic_and_json(kube: Kube) -> None:
    core = client.CoreV1Api(kube.api)
    await core.create_namespaced_config_map(
        kube.namespace,
        {
            "metadata": {"name": "cfg", "labels": {"keep": "1", "drop": "1"}},
            "data": {"a": "1", "b": "2"},
        },
    )
    # kubernetes-asyncio sends a dict body as strategic merge for built-ins by default.
    merged = await core.patch_namespaced_config_map(
        "cfg",
        kube.namespace,
        {"metadata": {"labels": {"drop": None}}, "data": {"b": None}},
        _content_type="application/merge-patch+json",
    )
    assert merged.metadata.labels == {"keep": "1"} and merged.data == {"a": "1"}
    patched = await core.patch_namespaced_config_map(
        "cfg",
        kube.namespace,
        [
            {"op": "replace", "path": "/data/a", "value": "x"},
            {"op": "add", "path": "/metadata/labels/new~1key", "value": "v"},
        ],
        _content_type="application/json-patch+json",
    )
    assert patched.data == {"a": "x"} and patched.metadata.labels["new/key"] == "v"
    with pytest.raises(ApiException) as raised:
        await core.patch_namespaced_config_map(
            "cfg",
            kube.namespace,
            [{"op": "test", "path": "/data/a", "value": "nope"}],
            _content_type="application/json-patch+json",
        )
    assert raised.value.status == 422
    pod = await core.create_namespaced_pod(
        kube.namespace,
        {
            "metadata": {"name": "p"},
            "spec": {"containers": [CONTAINER, {"name": "side", "image": "busybox:1"}]},
        },
    )
    assert pod.spec.node_name is None
    smp = await core.patch_namespaced_pod(
        "p",
        kube.namespace,
        {"spec": {"containers": [{"name": "side", "image": "busybox:2"}]}},
        _content_type="application/strategic-merge-patch+json",
    )
    assert [(c.name, c.image) for c in smp.spec.containers] == [
        ("app", "registry.k8s.io/pause:3.9"),
        ("side", "busybox:2"),
    ]
    with pytest.raises(ApiException) as raised:
        await core.patch_namespaced_pod(
            "p",
            kube.namespace,
            {"spec": {"containers": [{"name": "side", "image": "b:3"}]}},
            _content_type="application/merge-patch+json",
        )
    assert raised.value.status == 422  # the list was replaced: 'app' removed


async def test_update_with_stale_version_conflicts_and_noop_patch_keeps_version(
    kube: Kube,
) -> None:
    core = client.CoreV1Api(kube.api)
    created = await core.create_namespaced_config_map(kube.namespace, _cm("c"))
    created.data = {"a": "2"}
    updated = await core.replace_namespaced_config_map("c", kube.namespace, created)
    assert int(updated.metadata.resource_version) > int(created.metadata.resource_version)
    created.data = {"a": "3"}
    with pytest.raises(ApiException) as raised:
        await core.replace_namespaced_config_map("c", kube.namespace, created)
    assert raised.value.status == 409
    same = await core.patch_namespaced_config_map(
        "c", kube.namespace, {"data": {"a": "2"}}, _content_type="application/merge-patch+json"
    )
    assert same.metadata.resource_version == updated.metadata.resource_version


async def test_generate_name_appends_five_lowercase_alphanumerics(kube: Kube) -> None:
    core = client.CoreV1Api(kube.api)
    made = await core.create_namespaced_config_map(
        kube.namespace, {"metadata": {"generateName": "gen-"}}
    )
    assert re.fullmatch(r"gen-[a-z0-9]{5}", made.metadata.name)


CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.test.rapproxy.io"},
    "spec": {
        "group": "test.rapproxy.io",
        "scope": "Namespaced",
        "names": {
            "plural": "widgets",
            "singular": "widget",
            "kind": "Widget",
            "listKind": "WidgetList",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1},
                                    "color": {"type": "string", "default": "blue"},
                                },
                            },
                            "status": {
                                "type": "object",
                                "properties": {"ready": {"type": "boolean"}},
                            },
                        },
                    }
                },
            }
        ],
    },
}


async def _served_crd(kube: Kube) -> client.CustomObjectsApi:
    ext = client.ApiextensionsV1Api(kube.api)
    try:
        await ext.create_custom_resource_definition(CRD)
    except ApiException as exc:
        if exc.status != 409:
            raise

    async def established() -> bool:
        crd = await ext.read_custom_resource_definition(CRD["metadata"]["name"])
        return any(
            c.type == "Established" and c.status == "True" for c in crd.status.conditions or []
        )

    await eventually(established)
    return client.CustomObjectsApi(kube.api)


async def test_custom_resource_status_subresource_and_generation(kube: Kube) -> None:
    custom = await _served_crd(kube)
    args = ("test.rapproxy.io", "v1", kube.namespace, "widgets")
    made = await custom.create_namespaced_custom_object(
        *args,
        {
            "apiVersion": "test.rapproxy.io/v1",
            "kind": "Widget",
            "metadata": {"name": "w"},
            "spec": {"size": 1, "extra": 1},
            "status": {"ready": True},
        },
    )
    assert made["spec"] == {"size": 1, "color": "blue"}  # pruned and defaulted
    assert "status" not in made and made["metadata"]["generation"] == 1
    status = await custom.patch_namespaced_custom_object_status(
        *args[:3],
        "widgets",
        "w",
        {"status": {"ready": True}, "spec": {"size": 9}},
        _content_type=MERGE,
    )
    assert status["status"] == {"ready": True} and status["spec"]["size"] == 1
    assert status["metadata"]["generation"] == 1
    bumped = await custom.patch_namespaced_custom_object(
        *args[:3], "widgets", "w", {"spec": {"size": 2}}, _content_type=MERGE
    )
    assert bumped["metadata"]["generation"] == 2
    labelled = await custom.patch_namespaced_custom_object(
        *args[:3], "widgets", "w", {"metadata": {"labels": {"a": "b"}}}, _content_type=MERGE
    )
    assert labelled["metadata"]["generation"] == 2
    with pytest.raises(ApiException) as raised:
        await custom.create_namespaced_custom_object(
            *args,
            {
                "apiVersion": "test.rapproxy.io/v1",
                "kind": "Widget",
                "metadata": {"name": "bad"},
                "spec": {"size": 0},
            },
        )
    assert raised.value.status == 422


async def test_background_deletion_collects_dependents(kube: Kube) -> None:
    core = client.CoreV1Api(kube.api)
    owner = await core.create_namespaced_config_map(kube.namespace, _cm("owner"))
    ref = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    await core.create_namespaced_config_map(kube.namespace, _cm("dep", ownerReferences=[ref]))
    await core.delete_namespaced_config_map(
        "owner", kube.namespace, propagation_policy="Background"
    )

    async def dependent_gone() -> bool:
        names = [
            c.metadata.name for c in (await core.list_namespaced_config_map(kube.namespace)).items
        ]
        return "dep" not in names

    await eventually(dependent_gone)


async def test_foreground_deletion_keeps_owner_until_dependents_are_gone(kube: Kube) -> None:
    core = client.CoreV1Api(kube.api)
    owner = await core.create_namespaced_config_map(kube.namespace, _cm("owner"))
    ref = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner.metadata.uid,
        "blockOwnerDeletion": True,
    }
    await core.create_namespaced_config_map(kube.namespace, _cm("dep", ownerReferences=[ref]))
    await core.delete_namespaced_config_map(
        "owner", kube.namespace, body=client.V1DeleteOptions(propagation_policy="Foreground")
    )
    try:
        kept = await core.read_namespaced_config_map("owner", kube.namespace)
        assert kept.metadata.finalizers == ["foregroundDeletion"]
        assert kept.metadata.deletion_timestamp is not None
    except ApiException as exc:  # a real GC may already have finished
        assert exc.status == 404

    async def all_gone() -> bool:
        items = (await core.list_namespaced_config_map(kube.namespace)).items
        return not {"owner", "dep"} & {c.metadata.name for c in items}

    await eventually(all_gone)


async def test_lease_renewal_and_conflicting_takeover(kube: Kube) -> None:
    coord = client.CoordinationV1Api(kube.api)
    now = "2024-05-01T10:00:00.250000Z"
    lease = await coord.create_namespaced_lease(
        kube.namespace,
        {
            "metadata": {"name": "leader"},
            "spec": {
                "holderIdentity": "a",
                "leaseDurationSeconds": 15,
                "renewTime": now,
                "acquireTime": now,
            },
        },
    )
    stale = lease.metadata.resource_version
    # kubernetes-asyncio renders a datetime with isoformat(): with microsecond == 0 it has no
    # fraction and the server (real or emulated) rejects it as MicroTime. Keep them non-zero.
    lease.spec.renew_time = datetime.datetime(2024, 5, 1, 10, 0, 5, 123456, datetime.UTC)
    renewed = await coord.replace_namespaced_lease("leader", kube.namespace, lease)
    assert renewed.metadata.resource_version != stale
    lease.metadata.resource_version = stale
    lease.spec.holder_identity = "b"
    with pytest.raises(ApiException) as raised:
        await coord.replace_namespaced_lease("leader", kube.namespace, lease)
    assert raised.value.status == 409
    current = await coord.read_namespaced_lease("leader", kube.namespace)
    assert current.spec.holder_identity == "a"
