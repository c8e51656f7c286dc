"""The status-only kubelet: node Ready, pods Running with IPs, init containers, deletion."""

from __future__ import annotations

import ipaddress
from typing import Any

from rapproxy.testing.apiserver import EmulatedApiServer
from rapproxy.testing.apiserver.controlplane import (
    KubeletConfig,
    PodReport,
    StandInRuntime,
    StatusReport,
)
from rapproxy.testing.apiserver.registry import DeleteOptions
from rapproxy.testing.apiserver.resources import NODES, PODS

from ..conftest import eventually


async def test_node_is_registered_ready_without_the_not_ready_taint() -> None:
    async with EmulatedApiServer(nodes=["node-a"]) as api:
        node = api.store.get(NODES, "", "node-a")
        assert node is not None
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready[0]["status"] == "True"
        assert not node["spec"].get("taints")
        assert node["metadata"]["labels"]["topology.kubernetes.io/zone"] == "zone-a"


async def test_pods_run_with_an_ip_from_the_node_cidr_after_init_containers() -> None:
    async with EmulatedApiServer(nodes=["node-a", "node-b"]) as api:
        api.registry.create(
            PODS,
            "default",
            {
                "metadata": {"name": "p"},
                "spec": {
                    "nodeName": "node-b",
                    "initContainers": [{"name": "i1", "image": "x"}, {"name": "i2", "image": "x"}],
                    "containers": [{"name": "c", "image": "x"}],
                },
            },
        )

        def running() -> dict[str, Any] | None:
            pod = api.store.get(PODS, "default", "p")
            return pod if pod and pod["status"].get("phase") == "Running" else None

        pod = await eventually(running)
        status = pod["status"]
        assert ipaddress.ip_address(status["podIP"]) in ipaddress.ip_network("10.244.1.0/24")
        assert not ipaddress.ip_address(status["podIP"]).is_loopback
        assert status["hostIP"] == "10.250.0.2"
        conditions = {c["type"]: c["status"] for c in status["conditions"]}
        assert conditions == {
            "Initialized": "True",
            "Ready": "True",
            "ContainersReady": "True",
            "PodScheduled": "True",
        }
        assert [s["name"] for s in status["initContainerStatuses"]] == ["i1", "i2"]
        assert all("terminated" in s["state"] for s in status["initContainerStatuses"])
        assert status["containerStatuses"][0]["ready"] is True


async def test_graceful_delete_is_finished_by_the_kubelet_after_the_pod_stops() -> None:
    runtime = StandInRuntime(termination_delay=0.3)
    async with EmulatedApiServer(nodes=["node-a"]) as api:
        assert api.control_plane is not None
        api.control_plane.kubelets[0].runtime = runtime
        api.registry.create(
            PODS,
            "default",
            {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x"}]}},
        )
        await eventually(
            lambda: (api.store.get(PODS, "default", "p") or {}).get("status", {}).get("podIP")
        )
        kept = api.registry.delete(PODS, "default", "p", DeleteOptions()).body
        assert kept["metadata"]["deletionGracePeriodSeconds"] == 30
        assert api.store.get(PODS, "default", "p") is not None  # terminating for a while
        await eventually(lambda: api.store.get(PODS, "default", "p") is None)


class RecordingRuntime:
    """A runtime hook as a real-process runtime would use it: report readiness later."""

    def __init__(self) -> None:
        self.reports: dict[str, StatusReport] = {}
        self.stopped: list[str] = []

    async def start_pod(self, pod: dict[str, Any], pod_ip: str, report: StatusReport) -> str:
        self.reports[pod["metadata"]["name"]] = report
        await report(PodReport("Running", ready=False))
        return str(pod["metadata"]["name"])

    async def stop_pod(self, handle: object, grace_seconds: float) -> None:
        self.stopped.append(str(handle))


async def test_runtime_hook_controls_readiness_and_is_told_to_stop() -> None:
    runtime = RecordingRuntime()
    node = KubeletConfig("edge-1", pod_cidr="10.244.7.0/24", node_ip="10.250.0.77")
    async with EmulatedApiServer(nodes=[node], runtime_factory=lambda _name: runtime) as api:
        api.registry.create(
            PODS,
            "default",
            {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x"}]}},
        )

        def ready() -> str | None:
            pod = api.store.get(PODS, "default", "p") or {}
            conditions = {
                c["type"]: c["status"] for c in pod.get("status", {}).get("conditions") or []
            }
            return conditions.get("Ready")

        assert await eventually(ready) == "False"
        pod = api.store.get(PODS, "default", "p")
        assert pod is not None and pod["status"]["podIP"].startswith("10.244.7.")
        assert pod["spec"]["nodeName"] == "edge-1" and pod["status"]["hostIP"] == "10.250.0.77"
        await runtime.reports["p"](PodReport("Running", ready=True))
        assert await eventually(lambda: ready() == "True")
        api.registry.delete(PODS, "default", "p", DeleteOptions())
        await eventually(lambda: api.store.get(PODS, "default", "p") is None)
        assert runtime.stopped == ["p"]
