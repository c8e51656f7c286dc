"""The EndpointSlice controller: Services + pods → slices with ready/serving/terminating."""

from __future__ import annotations

from typing import Any

from rapproxy.testing.apiserver import EmulatedApiServer
from rapproxy.testing.apiserver.controlplane import StandInRuntime
from rapproxy.testing.apiserver.registry import DeleteOptions
from rapproxy.testing.apiserver.resources import ENDPOINT_SLICES, PODS, SERVICES

from ..conftest import eventually

SERVICE = {
    "metadata": {"name": "web", "labels": {"team": "a"}},
    "spec": {
        "selector": {"app": "web"},
        "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
    },
}


def _pod(name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {
            "containers": [
                {"name": "c", "image": "x", "ports": [{"name": "http", "containerPort": 8080}]}
            ]
        },
    }


def _slice(api: EmulatedApiServer) -> dict[str, Any] | None:
    slices = [
        s
        for s in api.store.list(ENDPOINT_SLICES, "default")
        if s["metadata"]["labels"].get("kubernetes.io/service-name") == "web"
    ]
    assert len(slices) <= 1
    return slices[0] if slices else None


async def test_service_with_running_pods_gets_a_slice_of_ready_endpoints() -> None:
    async with EmulatedApiServer(nodes=["node-a", "node-b"]) as api:
        service = api.registry.create(SERVICES, "default", SERVICE).body
        empty = await eventually(lambda: _slice(api))
        assert empty["endpoints"] is None and empty["ports"] is None
        assert empty["metadata"]["ownerReferences"][0]["uid"] == service["metadata"]["uid"]
        assert empty["metadata"]["labels"]["team"] == "a"
        for name in ("web-1", "web-2"):
            api.registry.create(PODS, "default", _pod(name))

        def two_ready() -> dict[str, Any] | None:
            current = _slice(api)
            endpoints = (current or {}).get("endpoints") or []
            ok = len(endpoints) == 2 and all(e["conditions"]["ready"] for e in endpoints)
            return current if ok else None

        full = await eventually(two_ready)
        assert full["ports"] == [{"name": "http", "protocol": "TCP", "port": 8080}]
        assert {e["nodeName"] for e in full["endpoints"]} == {"node-a", "node-b"}
        assert {e["zone"] for e in full["endpoints"]} == {"zone-a", "zone-b"}
        assert all(e["addresses"][0].startswith("10.244.") for e in full["endpoints"])
        assert full["metadata"]["generation"] > empty["metadata"]["generation"]


async def test_deleted_pod_is_terminating_then_removed_and_service_delete_removes_slice() -> None:
    async with EmulatedApiServer(nodes=["node-a"]) as api:
        api.control_plane.kubelets[0].runtime = StandInRuntime(termination_delay=0.5)  # type: ignore[union-attr]
        api.registry.create(SERVICES, "default", SERVICE)
        api.registry.create(PODS, "default", _pod("web-1"))
        await eventually(
            lambda: (
                ((_slice(api) or {}).get("endpoints") or [{}])[0].get("conditions", {}).get("ready")
            )
        )
        api.registry.delete(PODS, "default", "web-1", DeleteOptions())

        def terminating() -> bool:
            endpoints = (_slice(api) or {}).get("endpoints") or []
            return bool(endpoints) and endpoints[0]["conditions"] == {
                "ready": False,
                "serving": True,
                "terminating": True,
            }

        await eventually(terminating)
        await eventually(lambda: (_slice(api) or {"endpoints": 1}).get("endpoints") is None)
        api.registry.delete(SERVICES, "default", "web", DeleteOptions())
        await eventually(lambda: _slice(api) is None)
