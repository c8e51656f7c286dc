"""A kubelet per node that drives pod status (like KWOK), with a hook to run pods for real.

For its node, the kubelet keeps the Node object registered and Ready (and its Lease in
`kube-node-lease` renewed), and drives every pod bound to it as a v1.28 kubelet would: Pending
with a pod IP from the node's pod CIDR (e.g. 10.244.1.0/24) as soon as the "sandbox" exists →
init containers one at a time, each holding the pod in `Init:i/n` until it exits 0 → Running,
Ready once the runtime says so — then, when the pod gets a deletionTimestamp, stops it and
finishes the delete with grace 0. The status shapes are `podstatus.render_status`'s.

What "running a pod" means is delegated to a `PodRuntime`. The default `StandInRuntime`
(`standin.py`) starts no processes: init containers complete at once, except a cold backup's
`bps-wait`, which it stands in for with the real waiter, so the pod stays Pending until someone
activates it. The process runtime (`rapproxy.testing.edge.runtime`) starts real processes in a
network namespace and reports readiness and exits through the same `StatusReport` callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any

from rapproxy.testing.apiserver import defaults
from rapproxy.testing.apiserver.controlplane.podstatus import PodReport, render_status
from rapproxy.testing.apiserver.controlplane.runtime import PodHandle, PodRuntime
from rapproxy.testing.apiserver.controlplane.standin import StandInRuntime
from rapproxy.testing.apiserver.errors import ApiError
from rapproxy.testing.apiserver.registry import DeleteOptions, Registry
from rapproxy.testing.apiserver.resources import LEASES, NODES, PODS, ResourceType
from rapproxy.testing.apiserver.store import WatchEvent

JsonObject = dict[str, Any]
PodKey = tuple[str, str]
log = logging.getLogger(__name__)


@dataclass(slots=True)
class _PodState:
    ip: str
    uid: str
    handle: PodHandle | None = None
    stopping: bool = False
    task: asyncio.Task[None] | None = None


@dataclass(slots=True)
class KubeletConfig:
    node_name: str
    pod_cidr: str
    node_ip: str
    zone: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    heartbeat_interval: float = 10.0


class Kubelet:
    """Owns its node's Node object, Lease, pod IPs and per-pod tasks; start()/stop()."""

    def __init__(
        self, registry: Registry, config: KubeletConfig, runtime: PodRuntime | None = None
    ) -> None:
        self.registry = registry
        self.store = registry.store
        self.config = config
        self.runtime: PodRuntime = runtime or StandInRuntime()
        network = ipaddress.ip_network(config.pod_cidr)
        self._free_ips = [str(ip) for ip in list(network.hosts())[1:]]
        self._pods: dict[PodKey, _PodState] = {}
        self._queue: asyncio.Queue[PodKey] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def node_name(self) -> str:
        return self.config.node_name

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self._tasks:
            return
        self.register_node()
        self.store.add_listener(self._on_event)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._sync_loop(), name=f"kubelet-{self.node_name}"),
            loop.create_task(self._heartbeat_loop(), name=f"kubelet-hb-{self.node_name}"),
        ]
        for pod in self.store.list(PODS):
            if (pod.get("spec") or {}).get("nodeName") == self.node_name:
                self._queue.put_nowait(_pod_key(pod))

    async def stop(self) -> None:
        self.store.remove_listener(self._on_event)
        tasks = self._tasks + [s.task for s in self._pods.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def register_node(self) -> None:
        cfg = self.config
        labels = {
            "kubernetes.io/hostname": cfg.node_name,
            "kubernetes.io/os": "linux",
            **cfg.labels,
        }
        if cfg.zone:
            labels["topology.kubernetes.io/zone"] = cfg.zone
        if self.store.get(NODES, "", cfg.node_name) is None:
            self.registry.create(
                NODES,
                "",
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": cfg.node_name, "labels": labels},
                    "spec": {"podCIDR": cfg.pod_cidr, "podCIDRs": [cfg.pod_cidr]},
                },
            )
        now = defaults.now_rfc3339()

        def schedulable(node: JsonObject) -> None:
            node["metadata"].setdefault("labels", {}).update(labels)
            spec = node.setdefault("spec", {})
            spec["podCIDR"], spec["podCIDRs"] = cfg.pod_cidr, [cfg.pod_cidr]
            taints = [
                t
                for t in spec.get("taints") or []
                if t.get("key") != "node.kubernetes.io/not-ready"
            ]
            if taints:
                spec["taints"] = taints
            else:
                spec.pop("taints", None)

        def ready(node: JsonObject) -> None:
            status = node.setdefault("status", {})
            conditions = [c for c in status.get("conditions") or [] if c.get("type") != "Ready"]
            previous = next(
                (
                    c
                    for c in status.get("conditions") or []
                    if c.get("type") == "Ready" and c.get("status") == "True"
                ),
                None,
            )
            conditions.append(
                previous
                or {
                    "type": "Ready",
                    "status": "True",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status (emulated)",
                }
            )
            status["conditions"] = conditions
            status["addresses"] = [
                {"type": "InternalIP", "address": cfg.node_ip},
                {"type": "Hostname", "address": cfg.node_name},
            ]
            status.setdefault("allocatable", {"cpu": "8", "memory": "16Gi", "pods": "250"})
            status.setdefault("capacity", {"cpu": "8", "memory": "16Gi", "pods": "250"})
            status["nodeInfo"] = {
                **(status.get("nodeInfo") or {}),
                "kubeletVersion": "v1.28.7",
                "operatingSystem": "linux",
                "architecture": "amd64",
            }

        self.registry.mutate(NODES, "", cfg.node_name, ready, subresource="status")
        self.registry.mutate(NODES, "", cfg.node_name, schedulable)

    async def _heartbeat_loop(self) -> None:
        """Renew the node Lease like a real kubelet (node status only changes on change)."""
        while True:
            try:
                self._renew_lease()
                if self.store.get(NODES, "", self.node_name) is None:
                    self.register_node()
            except ApiError as err:
                log.debug("kubelet %s heartbeat: %s", self.node_name, err)
            await asyncio.sleep(self.config.heartbeat_interval)

    def _renew_lease(self) -> None:
        now = defaults.now_micro()
        if self.store.get(LEASES, "kube-node-lease", self.node_name) is None:
            self.registry.create(
                LEASES,
                "kube-node-lease",
                {
                    "metadata": {"name": self.node_name},
                    "spec": {
                        "holderIdentity": self.node_name,
                        "leaseDurationSeconds": 40,
                        "renewTime": now,
                    },
                },
            )
            return
        self.registry.mutate(
            LEASES,
            "kube-node-lease",
            self.node_name,
            lambda lease: lease["spec"].__setitem__("renewTime", now),
        )

    # -- pods -----------------------------------------------------------------------------
    def _on_event(self, rt: ResourceType, event: WatchEvent) -> None:
        if rt is not PODS:
            return
        for pod in (event.object, event.previous):
            if pod is not None and (pod.get("spec") or {}).get("nodeName") == self.node_name:
                self._queue.put_nowait(_pod_key(pod))
                return

    async def _sync_loop(self) -> None:
        while True:
            key = await self._queue.get()
            try:
                await self._sync(key)
            except Exception:
                log.exception("kubelet %s failed syncing pod %s/%s", self.node_name, *key)

    async def _sync(self, key: PodKey) -> None:
        pod = self.store.get(PODS, *key)
        state = self._pods.get(key)
        if pod is None or (pod.get("spec") or {}).get("nodeName") != self.node_name:
            if state is not None:
                await self._teardown(key, state, 0.0)
            return
        if state is not None and state.uid != pod["metadata"]["uid"]:
            await self._teardown(key, state, 0.0)  # same name, new pod
            state = None
        if pod["metadata"].get("deletionTimestamp"):
            if state is None or not state.stopping:
                grace = float(pod["metadata"].get("deletionGracePeriodSeconds") or 0)
                state = state or self._new_state(key, pod["metadata"]["uid"])
                if state is None:
                    self._finish_delete(key, pod)
                    return
                state.stopping = True
                if state.task is not None:
                    state.task.cancel()
                state.task = asyncio.get_running_loop().create_task(
                    self._stop_and_delete(key, pod, state, grace)
                )
            return
        if state is None:
            state = self._new_state(key, pod["metadata"]["uid"])
            if state is None:
                log.warning("kubelet %s: pod CIDR exhausted", self.node_name)
                return
            state.task = asyncio.get_running_loop().create_task(self._start(key, pod, state))

    def _new_state(self, key: PodKey, uid: str) -> _PodState | None:
        if not self._free_ips:
            return None
        state = _PodState(self._free_ips.pop(0), uid)
        self._pods[key] = state
        return state

    async def _start(self, key: PodKey, pod: JsonObject, state: _PodState) -> None:
        uid = pod["metadata"]["uid"]

        async def report(r: PodReport) -> None:
            self._write_status(key, uid, state.ip, r)

        self._write_status(key, uid, state.ip, PodReport("Pending", ready=False))
        state.handle = await self.runtime.start_pod(pod, state.ip, report)

    def _write_status(self, key: PodKey, uid: str, ip: str, report: PodReport) -> None:
        now = defaults.now_rfc3339()

        def apply(pod: JsonObject) -> None:
            if pod["metadata"]["uid"] != uid:
                return
            pod["status"] = render_status(
                pod, report, pod_ip=ip, host_ip=self.config.node_ip, now=now
            )

        try:
            self.registry.mutate(PODS, key[0], key[1], apply, subresource="status")
        except ApiError as err:
            log.debug("kubelet %s status of %s/%s: %s", self.node_name, *key, err)

    async def _stop_and_delete(
        self, key: PodKey, pod: JsonObject, state: _PodState, grace: float
    ) -> None:
        if state.handle is not None:
            await self.runtime.stop_pod(state.handle, grace)
        self._release(key)
        self._finish_delete(key, pod)

    def _finish_delete(self, key: PodKey, pod: JsonObject) -> None:
        current = self.store.get(PODS, *key)
        if current is None or current["metadata"]["uid"] != pod["metadata"]["uid"]:
            return
        try:
            self.registry.delete(
                PODS,
                key[0],
                key[1],
                DeleteOptions(grace_period_seconds=0, precondition_uid=pod["metadata"]["uid"]),
            )
        except ApiError as err:
            log.debug("kubelet %s delete %s/%s: %s", self.node_name, *key, err)

    async def _teardown(self, key: PodKey, state: _PodState, grace: float) -> None:
        if state.task is not None and not state.task.done():
            state.task.cancel()
        if state.handle is not None:
            await self.runtime.stop_pod(state.handle, grace)
        self._release(key)

    def _release(self, key: PodKey) -> None:
        state = self._pods.pop(key, None)
        if state is not None:
            self._free_ips.append(state.ip)


def _pod_key(pod: JsonObject) -> PodKey:
    return (pod["metadata"]["namespace"], pod["metadata"]["name"])
