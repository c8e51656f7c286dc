"""A status-only kubelet per node (like KWOK), with a hook to run pods for real.

For its node, the kubelet keeps the Node object registered and Ready (and its Lease in
`kube-node-lease` renewed), and drives every pod bound to it: Pending → init containers completed
in order → Running with Ready=True and a pod IP from the node's pod CIDR (e.g. 10.244.1.0/24) —
then, when the pod gets a deletionTimestamp, stops it and finishes the delete with grace 0.

What "running a pod" means is delegated to a `PodRuntime`. The default `InstantRuntime` does
nothing and reports success at once; a later runtime can start real processes in a network
namespace and report readiness and exits through the `StatusReport` callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from rapproxy.testing.apiserver import defaults
from rapproxy.testing.apiserver.errors import ApiError
from rapproxy.testing.apiserver.registry import DeleteOptions, Registry
from rapproxy.testing.apiserver.resources import LEASES, NODES, PODS, ResourceType
from rapproxy.testing.apiserver.store import WatchEvent

JsonObject = dict[str, Any]
PodKey = tuple[str, str]
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PodReport:
    """What a runtime says about a pod: phase, readiness, init progress, exit."""

    phase: str  # Pending | Running | Succeeded | Failed
    ready: bool
    init_containers_done: int = 0
    restart_count: int = 0
    exit_code: int | None = None
    message: str = ""


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


@dataclass(frozen=True, slots=True)
class InstantHandle:
    namespace: str
    name: str


class InstantRuntime:
    """The KWOK-like default: init containers complete and the pod is Ready immediately.

    `termination_delay` (capped by the pod's grace period) keeps a deleted pod around in its
    terminating state for a while, so watchers can observe it.
    """

    def __init__(self, termination_delay: float = 0.0) -> None:
        self.termination_delay = termination_delay

    async def start_pod(self, pod: JsonObject, pod_ip: str, report: StatusReport) -> PodHandle:
        inits = len((pod.get("spec") or {}).get("initContainers") or [])
        await report(PodReport("Running", ready=True, init_containers_done=inits))
        return InstantHandle(pod["metadata"]["namespace"], pod["metadata"]["name"])

    async def stop_pod(self, handle: PodHandle, grace_seconds: float) -> None:
        delay = min(self.termination_delay, grace_seconds)
        if delay > 0:
            await asyncio.sleep(delay)


def _container_statuses(pod: JsonObject, report: PodReport, now: str) -> JsonObject:
    spec = pod.get("spec") or {}
    inits = spec.get("initContainers") or []
    init_statuses = []
    for i, c in enumerate(inits):
        done = i < report.init_containers_done
        state: JsonObject = (
            {
                "terminated": {
                    "exitCode": 0,
                    "reason": "Completed",
                    "startedAt": now,
                    "finishedAt": now,
                }
            }
            if done
            else (
                {"running": {"startedAt": now}}
                if i == report.init_containers_done
                else {"waiting": {"reason": "PodInitializing"}}
            )
        )
        init_statuses.append(
            {
                "name": c["name"],
                "state": state,
                "lastState": {},
                "ready": done,
                "restartCount": 0,
                "image": c.get("image", ""),
                "imageID": "",
                "started": not done and i == report.init_containers_done,
            }
        )
    initialized = report.init_containers_done >= len(inits)
    statuses = []
    for c in spec.get("containers") or []:
        if report.phase in ("Succeeded", "Failed"):
            code = (
                report.exit_code
                if report.exit_code is not None
                else (0 if report.phase == "Succeeded" else 1)
            )
            state = {
                "terminated": {
                    "exitCode": code,
                    "reason": "Completed" if code == 0 else "Error",
                    "startedAt": now,
                    "finishedAt": now,
                }
            }
        elif initialized and report.phase == "Running":
            state = {"running": {"startedAt": now}}
        else:
            state = {"waiting": {"reason": "PodInitializing"}}
        statuses.append(
            {
                "name": c["name"],
                "state": state,
                "lastState": {},
                "ready": report.ready,
                "restartCount": report.restart_count,
                "image": c.get("image", ""),
                "imageID": "",
                "started": "running" in state,
            }
        )
    out: JsonObject = {"containerStatuses": statuses}
    if inits:
        out["initContainerStatuses"] = init_statuses
    return out


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
        self.runtime: PodRuntime = runtime or InstantRuntime()
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
        cfg = self.config

        def apply(pod: JsonObject) -> None:
            if pod["metadata"]["uid"] != uid:
                return
            status = pod.setdefault("status", {})
            inits = len((pod.get("spec") or {}).get("initContainers") or [])
            initialized = report.init_containers_done >= inits
            status["phase"] = report.phase
            status["hostIP"] = cfg.node_ip
            status["hostIPs"] = [{"ip": cfg.node_ip}]
            status.setdefault("startTime", now)
            if report.phase != "Pending" or initialized:
                status["podIP"] = ip
                status["podIPs"] = [{"ip": ip}]
            ready = report.ready and report.phase == "Running"
            wanted = {
                "Initialized": initialized,
                "Ready": ready,
                "ContainersReady": ready,
                "PodScheduled": True,
            }
            conditions = {c["type"]: c for c in status.get("conditions") or []}
            for kind, value in wanted.items():
                text = "True" if value else "False"
                current = conditions.get(kind)
                if current is None or current.get("status") != text:
                    conditions[kind] = {
                        "type": kind,
                        "status": text,
                        "lastProbeTime": None,
                        "lastTransitionTime": now,
                    }
            status["conditions"] = [
                conditions[k] for k in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
            ]
            previous = {c["name"]: c for c in status.get("containerStatuses") or []}
            fresh = _container_statuses(pod, report, now)
            for c in fresh["containerStatuses"]:
                old = previous.get(c["name"])
                if old is not None and set(old.get("state", {})) == set(c["state"]):
                    c["state"] = old["state"]  # keep startedAt stable
            status.update(fresh)

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
