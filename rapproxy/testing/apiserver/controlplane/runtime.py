"""The contract between the emulated kubelet and whatever runs its pods.

The kubelet owns the pod's API object, its IP and its lifecycle; a `PodRuntime` owns what runs
(nothing but timers and a stand-in waiter in `StandInRuntime`, real processes in the edge
emulation's `ProcessRuntime`). The runtime tells the kubelet what happened through a
`StatusReport` callback with `PodReport`s; the kubelet turns those into the status a real kubelet
would write. Types only, so both sides import them without importing each other.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from rapproxy.testing.apiserver.controlplane.podstatus import PodReport

JsonObject = dict[str, Any]
StatusReport = Callable[[PodReport], Awaitable[None]]


class PodHandle(Protocol):
    """Whatever a runtime needs to find its pod again (a process group, a netns, ...)."""


class PodRuntime(Protocol):
    """How pods on a node are run. Implementations must be cancellation-safe."""

    async def start_pod(self, pod: JsonObject, pod_ip: str, report: StatusReport) -> PodHandle:
        """Start the pod (init containers first, in order) and report progress via `report`."""
        ...

    async def stop_pod(self, handle: PodHandle, grace_seconds: float) -> None:
        """Stop the pod: SIGTERM, wait up to `grace_seconds`, then kill."""
        ...
