"""A minimal scheduler: binds pending pods to Ready nodes through the binding subresource.

Picks, among Ready, schedulable nodes whose labels satisfy the pod's `nodeSelector` and whose
NoSchedule taints the pod tolerates, the one whose preferred node affinity terms weigh most (as
kube-scheduler's NodeAffinity score plugin adds the weights of the matching terms; the
BackupPodSet controller expresses its placement this way), then the one with the fewest pods
(ties by name — so a steady stream of pods is spread round-robin). Pods that name a node
already, or another scheduler, are left alone. A pod that fits nowhere waits until a node event
makes room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from rapproxy.testing.apiserver.errors import ApiError
from rapproxy.testing.apiserver.registry import Registry
from rapproxy.testing.apiserver.resources import NODES, PODS, ResourceType
from rapproxy.testing.apiserver.store import WatchEvent

JsonObject = dict[str, Any]
log = logging.getLogger(__name__)


def node_ready(node: JsonObject) -> bool:
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def tolerates(pod: JsonObject, taint: JsonObject) -> bool:
    for tol in (pod.get("spec") or {}).get("tolerations") or []:
        if tol.get("effect") not in (None, "", taint.get("effect")):
            continue
        if tol.get("operator") == "Exists" and tol.get("key") in (None, "", taint.get("key")):
            return True
        if tol.get("key") == taint.get("key") and tol.get("value", "") == taint.get("value", ""):
            return True
    return False


def fits(pod: JsonObject, node: JsonObject) -> bool:
    if not node_ready(node):
        return False
    labels = node["metadata"].get("labels") or {}
    for key, value in ((pod.get("spec") or {}).get("nodeSelector") or {}).items():
        if labels.get(key) != value:
            return False
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") == "NoSchedule" and not tolerates(pod, taint):
            return False
    return True


def _matches(requirement: JsonObject, values: dict[str, str]) -> bool:
    present = requirement.get("key") in values
    value = values.get(str(requirement.get("key")))
    wanted = requirement.get("values") or []
    operator = requirement.get("operator")
    if operator == "In":
        return present and value in wanted
    if operator == "NotIn":
        return not present or value not in wanted
    if operator == "Exists":
        return present
    if operator == "DoesNotExist":
        return not present
    return False  # Gt/Lt and unknown operators: no match, never an error


def preference_weight(pod: JsonObject, node: JsonObject) -> int:
    """Sum of the weights of the pod's preferred node affinity terms that `node` matches.

    A term matches when all its `matchExpressions` (node labels) and `matchFields` (only
    `metadata.name` exists, as in Kubernetes) match.
    """
    affinity = ((pod.get("spec") or {}).get("affinity") or {}).get("nodeAffinity") or {}
    labels = node["metadata"].get("labels") or {}
    fields = {"metadata.name": node["metadata"]["name"]}
    total = 0
    for term in affinity.get("preferredDuringSchedulingIgnoredDuringExecution") or []:
        preference = term.get("preference") or {}
        expressions = preference.get("matchExpressions") or []
        field_terms = preference.get("matchFields") or []
        if not expressions and not field_terms:
            continue  # an empty preference matches nothing (Kubernetes' rule)
        if all(_matches(e, labels) for e in expressions) and all(
            _matches(f, fields) for f in field_terms
        ):
            weight = term.get("weight")
            total += weight if isinstance(weight, int) else 0
    return total


def needs_scheduling(pod: JsonObject) -> bool:
    spec = pod.get("spec") or {}
    return (
        not spec.get("nodeName")
        and not pod["metadata"].get("deletionTimestamp")
        and spec.get("schedulerName", "default-scheduler") == "default-scheduler"
    )


class Scheduler:
    """Owns one task that binds queued pods; start()/stop()."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.store = registry.store
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self.store.add_listener(self._on_event)
            self._task = asyncio.get_running_loop().create_task(self._run(), name="scheduler")
            self._wake.set()

    async def stop(self) -> None:
        self.store.remove_listener(self._on_event)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _on_event(self, rt: ResourceType, event: WatchEvent) -> None:
        if rt is NODES or (
            rt is PODS and event.type != "DELETED" and needs_scheduling(event.object)
        ):
            self._wake.set()
        elif rt is PODS and event.type == "DELETED":
            self._wake.set()  # room on a node

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                self.schedule_pending()
            except Exception:
                log.exception("scheduler pass failed")

    def schedule_pending(self) -> int:
        """Bind every pending pod that fits somewhere; returns how many were bound."""
        pending = [p for p in self.store.list(PODS) if needs_scheduling(p)]
        if not pending:
            return 0
        nodes = self.store.list(NODES)
        load: dict[str, int] = {n["metadata"]["name"]: 0 for n in nodes}
        for pod in self.store.list(PODS):
            node_name = (pod.get("spec") or {}).get("nodeName")
            if node_name in load and (pod.get("status") or {}).get("phase") not in (
                "Succeeded",
                "Failed",
            ):
                load[node_name] += 1
        bound = 0
        for pod in pending:
            candidates = [n for n in nodes if fits(pod, n)]
            if not candidates:
                continue
            best = min(
                candidates,
                key=lambda n: (
                    -preference_weight(pod, n),
                    load[n["metadata"]["name"]],
                    n["metadata"]["name"],
                ),
            )
            name = best["metadata"]["name"]
            meta = pod["metadata"]
            try:
                self.registry.bind(
                    meta["namespace"],
                    meta["name"],
                    {"target": {"apiVersion": "v1", "kind": "Node", "name": name}},
                )
            except ApiError as err:
                log.debug("binding %s/%s failed: %s", meta["namespace"], meta["name"], err)
                continue
            load[name] += 1
            bound += 1
        return bound
