"""An emulated Kubernetes API server (plus a tiny control plane) for tests, benchmarks, the demo.

kubernetes-asyncio and kubectl talk to it unmodified over plain HTTP on loopback. Its behaviour
is checked against transcripts of a real kube-apiserver v1.28 (../shared/fixtures/kube-api-v1.28).
Start here: `EmulatedApiServer`.
"""

from rapproxy.testing.apiserver.controlplane import (
    ControlPlane,
    EndpointSliceController,
    Kubelet,
    KubeletConfig,
    PodHandle,
    PodReport,
    PodRuntime,
    Scheduler,
    StandInRuntime,
)
from rapproxy.testing.apiserver.errors import ApiError
from rapproxy.testing.apiserver.registry import DeleteOptions, ListOptions, Registry
from rapproxy.testing.apiserver.resources import ResourceType
from rapproxy.testing.apiserver.server import EmulatedApiServer
from rapproxy.testing.apiserver.store import Store, WatchEvent

__all__ = [
    "ApiError",
    "ControlPlane",
    "DeleteOptions",
    "EmulatedApiServer",
    "EndpointSliceController",
    "Kubelet",
    "KubeletConfig",
    "ListOptions",
    "PodHandle",
    "PodReport",
    "PodRuntime",
    "Registry",
    "ResourceType",
    "Scheduler",
    "StandInRuntime",
    "Store",
    "WatchEvent",
]
