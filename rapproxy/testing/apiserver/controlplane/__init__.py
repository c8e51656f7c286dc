"""The emulated cluster's control plane: scheduler, EndpointSlice controller, kubelets.

Each component is a separately startable asyncio object that talks to the `Registry` directly
(same semantics as the HTTP API, without the round trip). `ControlPlane` bundles them for the
common case: one scheduler, one EndpointSlice controller and one kubelet per node, node N getting
pod CIDR 10.244.N.0/24 and node IP 10.250.0.N+1. `activation_target` finds a cold backup's
stand-in waiter on whichever node runs it (see `standin.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rapproxy.model.bps import BackupPodSet, ObservedPod
from rapproxy.testing.apiserver.controlplane.endpointslices import EndpointSliceController
from rapproxy.testing.apiserver.controlplane.kubelet import Kubelet, KubeletConfig
from rapproxy.testing.apiserver.controlplane.podstatus import PodReport
from rapproxy.testing.apiserver.controlplane.runtime import PodHandle, PodRuntime, StatusReport
from rapproxy.testing.apiserver.controlplane.scheduler import Scheduler
from rapproxy.testing.apiserver.controlplane.standin import StandInRuntime
from rapproxy.testing.apiserver.registry import Registry

__all__ = [
    "ControlPlane",
    "EndpointSliceController",
    "Kubelet",
    "KubeletConfig",
    "PodHandle",
    "PodReport",
    "PodRuntime",
    "Scheduler",
    "StandInRuntime",
    "StatusReport",
    "node_config",
]


def node_config(name: str, index: int, heartbeat_interval: float = 10.0) -> KubeletConfig:
    """The default addressing of the index-th emulated node (zone-a, zone-b, ... alternate)."""
    return KubeletConfig(
        node_name=name,
        pod_cidr=f"10.244.{index}.0/24",
        node_ip=f"10.250.0.{index + 1}",
        zone=f"zone-{'abc'[index % 3]}",
        heartbeat_interval=heartbeat_interval,
    )


class ControlPlane:
    """Scheduler + EndpointSlice controller + one kubelet per node, started and stopped together."""

    def __init__(
        self,
        registry: Registry,
        *,
        nodes: Sequence[str | KubeletConfig] = (),
        heartbeat_interval: float = 10.0,
        runtime_factory: Callable[[str], PodRuntime] | None = None,
        scheduler: bool = True,
        endpointslices: bool = True,
    ) -> None:
        self.registry = registry
        self.scheduler = Scheduler(registry) if scheduler else None
        self.endpointslices = EndpointSliceController(registry) if endpointslices else None
        configs = [
            node if isinstance(node, KubeletConfig) else node_config(node, i, heartbeat_interval)
            for i, node in enumerate(nodes)
        ]
        self.kubelets = [
            Kubelet(registry, cfg, runtime_factory(cfg.node_name) if runtime_factory else None)
            for cfg in configs
        ]

    def add_node(self, node: str | KubeletConfig, runtime: PodRuntime | None = None) -> Kubelet:
        """A kubelet for another node (start it yourself if the control plane runs)."""
        cfg = node if isinstance(node, KubeletConfig) else node_config(node, len(self.kubelets))
        kubelet = Kubelet(self.registry, cfg, runtime)
        self.kubelets.append(kubelet)
        return kubelet

    def activation_target(self, bps: BackupPodSet, pod: ObservedPod) -> tuple[str, int] | None:
        """Where a cold backup's stand-in waiter listens, on any node (a controller's
        `activation_target`); None if no `StandInRuntime` runs one for it."""
        for kubelet in self.kubelets:
            runtime = kubelet.runtime
            if isinstance(runtime, StandInRuntime):
                found = runtime.target(bps, pod)
                if found is not None:
                    return found
        return None

    async def start(self) -> None:
        for kubelet in self.kubelets:
            await kubelet.start()
        if self.endpointslices is not None:
            self.endpointslices.start()
        if self.scheduler is not None:
            self.scheduler.start()

    async def stop(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.endpointslices is not None:
            await self.endpointslices.stop()
        for kubelet in self.kubelets:
            await kubelet.stop()
