"""EndpointSlice (and legacy Endpoints) controller, as kube-controller-manager runs it.

For each Service with a selector it keeps one slice (`generateName: <svc>-`, controller
ownerReference to the Service, labels `kubernetes.io/service-name` and
`endpointslice.kubernetes.io/managed-by` plus the Service's own labels) listing the matching pods
that have an IP: `ready` = pod Ready and not terminating, `serving` = pod Ready,
`terminating` = pod has a deletionTimestamp, with `nodeName`, `zone` (from the node label) and
named targetPorts resolved against the pod's container ports. With no endpoints, `endpoints`
and `ports` are null. The Endpoints object lists ready pods under `addresses`, not-ready ones
under `notReadyAddresses` and omits terminating ones.

Changes are recorded by a synchronous store listener (a set of dirty Services, with a label
index of pods so selector matching does not scan every pod) and applied by one coalescing task.
Limitation: one slice per Service; if pods resolve a named port differently, the first pod's
resolution is used for the slice's ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from rapproxy.testing.apiserver import defaults
from rapproxy.testing.apiserver.errors import ApiError
from rapproxy.testing.apiserver.registry import DeleteOptions, Registry
from rapproxy.testing.apiserver.resources import (
    ENDPOINT_SLICES,
    ENDPOINTS,
    NODES,
    PODS,
    SERVICES,
    ResourceType,
)
from rapproxy.testing.apiserver.store import WatchEvent

JsonObject = dict[str, Any]
ServiceKey = tuple[str, str]
log = logging.getLogger(__name__)

MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
CONTROLLER_NAME = "endpointslice-controller.k8s.io"
SERVICE_NAME = "kubernetes.io/service-name"
ZONE_LABEL = "topology.kubernetes.io/zone"


def pod_condition(pod: JsonObject, kind: str) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions)


def resolve_port(pod: JsonObject, target: Any, protocol: str) -> int | None:
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == target and port.get("protocol", "TCP") == protocol:
                return int(port["containerPort"])
    return None


def desired_ports(service: JsonObject, pods: list[JsonObject]) -> list[JsonObject] | None:
    if not pods:
        return None
    ports = []
    for sp in (service.get("spec") or {}).get("ports") or []:
        protocol = sp.get("protocol", "TCP")
        resolved = resolve_port(pods[0], sp.get("targetPort", sp.get("port")), protocol)
        if resolved is None:
            continue
        ports.append({"name": sp.get("name", ""), "protocol": protocol, "port": resolved})
    return ports


def desired_endpoints(pods: list[JsonObject], zones: dict[str, str]) -> list[JsonObject] | None:
    endpoints = []
    for pod in pods:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        serving = pod_condition(pod, "Ready")
        terminating = bool(meta.get("deletionTimestamp"))
        endpoint: JsonObject = {
            "addresses": [pod["status"]["podIP"]],
            "conditions": {
                "ready": serving and not terminating,
                "serving": serving,
                "terminating": terminating,
            },
            "targetRef": {
                "kind": "Pod",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
            },
        }
        node = spec.get("nodeName")
        if node:
            endpoint["nodeName"] = node
            if node in zones:
                endpoint["zone"] = zones[node]
        endpoints.append(endpoint)
    return endpoints or None


class EndpointSliceController:
    """Owns one reconcile task; start()/stop()."""

    def __init__(self, registry: Registry, *, legacy_endpoints: bool = True) -> None:
        self.registry = registry
        self.store = registry.store
        self.legacy_endpoints = legacy_endpoints
        self._dirty: set[ServiceKey] = set()
        self._labels: dict[tuple[str, str, str], set[str]] = {}  # (ns, key, value) → pods
        # (ns, key, value) → Services whose selector has that pair; (ns, service) → slices.
        self._selectors: dict[tuple[str, str, str], set[str]] = {}
        self._slices: dict[ServiceKey, set[str]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is not None:
            return
        self._labels.clear()
        self._selectors.clear()
        self._slices.clear()
        for pod in self.store.list(PODS):
            self._index_pod(pod, add=True)
        for svc in self.store.list(SERVICES):
            self._index_service(svc, add=True)
            self._dirty.add((svc["metadata"]["namespace"], svc["metadata"]["name"]))
        for eps in self.store.list(ENDPOINT_SLICES):
            self._index_slice(eps, add=True)
        self.store.add_listener(self._on_event)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="endpointslices")
        self._wake.set()

    async def stop(self) -> None:
        self.store.remove_listener(self._on_event)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- change tracking (synchronous) ----------------------------------------------------
    def _index_pod(self, pod: JsonObject, *, add: bool) -> None:
        meta = pod["metadata"]
        for key, value in (meta.get("labels") or {}).items():
            names = self._labels.setdefault((meta["namespace"], key, value), set())
            if add:
                names.add(meta["name"])
            else:
                names.discard(meta["name"])

    def _index_service(self, svc: JsonObject, *, add: bool) -> None:
        meta = svc["metadata"]
        for key, value in ((svc.get("spec") or {}).get("selector") or {}).items():
            names = self._selectors.setdefault((meta["namespace"], key, value), set())
            if add:
                names.add(meta["name"])
            else:
                names.discard(meta["name"])

    def _index_slice(self, eps: JsonObject, *, add: bool) -> None:
        meta = eps["metadata"]
        labels = meta.get("labels") or {}
        if labels.get(MANAGED_BY) != CONTROLLER_NAME or SERVICE_NAME not in labels:
            return
        names = self._slices.setdefault((meta["namespace"], labels[SERVICE_NAME]), set())
        if add:
            names.add(meta["name"])
        else:
            names.discard(meta["name"])

    def _on_event(self, rt: ResourceType, event: WatchEvent) -> None:
        if rt is ENDPOINT_SLICES:
            if event.previous is not None:
                self._index_slice(event.previous, add=False)
            if event.type != "DELETED":
                self._index_slice(event.object, add=True)
            return
        if rt is SERVICES:
            if event.previous is not None:
                self._index_service(event.previous, add=False)
            if event.type != "DELETED":
                self._index_service(event.object, add=True)
            meta = event.object["metadata"]
            self._dirty.add((meta["namespace"], meta["name"]))
        elif rt is PODS:
            if event.previous is not None:
                self._index_pod(event.previous, add=False)
            if event.type != "DELETED":
                self._index_pod(event.object, add=True)
            for pod in (event.previous, event.object):
                if pod is not None:
                    self._mark_services_of(pod)
        elif rt is NODES:
            before = ((event.previous or {}).get("metadata") or {}).get("labels") or {}
            after = (event.object.get("metadata") or {}).get("labels") or {}
            if before.get(ZONE_LABEL) != after.get(ZONE_LABEL):
                for svc in self.store.list(SERVICES):
                    self._dirty.add((svc["metadata"]["namespace"], svc["metadata"]["name"]))
        else:
            return
        self._wake.set()

    def _mark_services_of(self, pod: JsonObject) -> None:
        namespace = pod["metadata"]["namespace"]
        labels = pod["metadata"].get("labels") or {}
        candidates: set[str] = set()
        for key, value in labels.items():
            candidates |= self._selectors.get((namespace, key, value), set())
        for name in candidates:
            svc = self.store.get(SERVICES, namespace, name)
            selector = ((svc or {}).get("spec") or {}).get("selector") or {}
            if selector and all(labels.get(k) == v for k, v in selector.items()):
                self._dirty.add((namespace, name))

    # -- reconcile ------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._dirty = self._dirty, set()
            for key in sorted(batch):
                try:
                    self.reconcile(*key)
                except ApiError as err:
                    log.debug("endpointslice %s/%s: %s; retrying", key[0], key[1], err)
                    self._dirty.add(key)
                    self._wake.set()
                except Exception:
                    log.exception("endpointslice controller failed on %s/%s", *key)
            await asyncio.sleep(0)

    def _matching_pods(self, namespace: str, selector: dict[str, str]) -> list[JsonObject]:
        names: set[str] | None = None
        for key, value in selector.items():
            found = self._labels.get((namespace, key, value), set())
            names = set(found) if names is None else names & found
        pods = []
        for name in sorted(names or ()):
            pod = self.store.get(PODS, namespace, name)
            if pod is None:
                continue
            status = pod.get("status") or {}
            if not status.get("podIP") or status.get("phase") in ("Succeeded", "Failed"):
                continue
            pods.append(pod)
        return pods

    def reconcile(self, namespace: str, name: str) -> None:
        service = self.store.get(SERVICES, namespace, name)
        slices = [
            found
            for slice_name in sorted(self._slices.get((namespace, name), ()))
            if (found := self.store.get(ENDPOINT_SLICES, namespace, slice_name)) is not None
        ]
        if service is None:
            if self.legacy_endpoints and self.store.get(ENDPOINTS, namespace, name) is not None:
                self.registry.delete(ENDPOINTS, namespace, name, DeleteOptions())
            return  # slices go with the Service through their ownerReference (GC)
        selector = (service.get("spec") or {}).get("selector") or {}
        if not selector:
            return
        pods = self._matching_pods(namespace, selector)
        zones = {
            n["metadata"]["name"]: (n["metadata"].get("labels") or {})[ZONE_LABEL]
            for n in self.store.list(NODES)
            if ZONE_LABEL in (n["metadata"].get("labels") or {})
        }
        endpoints = desired_endpoints(pods, zones)
        ports = desired_ports(service, pods)
        labels = dict(service["metadata"].get("labels") or {})
        labels.update({MANAGED_BY: CONTROLLER_NAME, SERVICE_NAME: name})
        if not slices:
            owner = {
                "apiVersion": "v1",
                "kind": "Service",
                "name": name,
                "uid": service["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
            self.registry.create(
                ENDPOINT_SLICES,
                namespace,
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "generateName": f"{name}-",
                        "labels": labels,
                        "annotations": {
                            "endpoints.kubernetes.io/last-change-trigger-time": defaults.now_rfc3339()
                        },
                        "ownerReferences": [owner],
                    },
                    "addressType": "IPv4",
                    "endpoints": endpoints,
                    "ports": ports,
                },
            )
        else:
            first, extra = slices[0], slices[1:]

            def update(s: JsonObject) -> None:
                if s.get("endpoints") != endpoints or s.get("ports") != ports:
                    s["metadata"].pop("annotations", None)
                s["metadata"]["labels"] = labels
                s["endpoints"] = endpoints
                s["ports"] = ports

            self.registry.mutate(ENDPOINT_SLICES, namespace, first["metadata"]["name"], update)
            for s in extra:
                self.registry.delete(
                    ENDPOINT_SLICES, namespace, s["metadata"]["name"], DeleteOptions()
                )
        if self.legacy_endpoints:
            self._reconcile_endpoints(service, pods, ports)

    def _reconcile_endpoints(
        self, service: JsonObject, pods: list[JsonObject], ports: list[JsonObject] | None
    ) -> None:
        meta = service["metadata"]
        ready: list[JsonObject] = []
        not_ready: list[JsonObject] = []
        for pod in pods:
            if pod["metadata"].get("deletionTimestamp"):
                continue
            address: JsonObject = {"ip": pod["status"]["podIP"]}
            node = (pod.get("spec") or {}).get("nodeName")
            if node:
                address["nodeName"] = node
            address["targetRef"] = {
                "kind": "Pod",
                "namespace": meta["namespace"],
                "name": pod["metadata"]["name"],
                "uid": pod["metadata"]["uid"],
            }
            (ready if pod_condition(pod, "Ready") else not_ready).append(address)
        subset: JsonObject = {}
        if ready:
            subset["addresses"] = ready
        if not_ready:
            subset["notReadyAddresses"] = not_ready
        if subset:
            subset["ports"] = [
                {"name": p["name"], "port": p["port"], "protocol": p["protocol"]}
                for p in ports or []
            ]
        body: JsonObject = {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {"name": meta["name"], "labels": dict(meta.get("labels") or {})},
        }
        if subset:
            body["subsets"] = [subset]
        existing = self.store.get(ENDPOINTS, meta["namespace"], meta["name"])
        if existing is None:
            self.registry.create(ENDPOINTS, meta["namespace"], body)
            return

        def update(e: JsonObject) -> None:
            e["metadata"]["labels"] = body["metadata"]["labels"]
            if subset:
                e["subsets"] = [subset]
            else:
                e.pop("subsets", None)

        self.registry.mutate(ENDPOINTS, meta["namespace"], meta["name"], update)
