"""Garbage collection by ownerReferences, and namespace termination.

The real work is kube-controller-manager's; here it is a background task of the emulated server.
It listens to every store event (synchronously, so its indexes are never stale), queues the
objects that need attention and handles them right after the triggering request returns —
which reproduces the observable order of the real thing (owner gone first, dependent a moment
later):
- a dependent whose owners (by UID) are all gone is deleted (Background);
- an owner deleted with `foregroundDeletion` has its dependents deleted, and loses the
  finalizer (and so is removed) once no blocking dependent is left;
- an owner deleted with the `orphan` finalizer has its UID removed from its dependents'
  ownerReferences, then loses the finalizer;
- a Terminating namespace has its contents deleted, then is removed itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from rapproxy.testing.apiserver.errors import ApiError
from rapproxy.testing.apiserver.registry import DeleteOptions, Registry
from rapproxy.testing.apiserver.resources import NAMESPACES, ResourceType
from rapproxy.testing.apiserver.store import WatchEvent

JsonObject = dict[str, Any]
Ref = tuple[str, str, str]  # (resource key, namespace, name)
log = logging.getLogger(__name__)


def _owner_uids(obj: JsonObject) -> list[str]:
    return [r["uid"] for r in (obj["metadata"].get("ownerReferences") or []) if r.get("uid")]


class GarbageCollector:
    """Owns one background task; start() / stop() around the server's lifetime."""

    def __init__(self, registry: Registry, delay: float = 0.05) -> None:
        self.registry = registry
        # Like the real controller-manager, act a few tens of milliseconds after the event:
        # clients observe the owner being deleted first (fixture 09: 10-100 ms).
        self.delay = delay
        self.store = registry.store
        self._uids: dict[str, Ref] = {}
        self._dependents: dict[str, set[Ref]] = {}
        self._queue: asyncio.Queue[tuple[float, str, Ref]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is not None:
            return
        self._uids.clear()
        self._dependents.clear()
        for rt, obj in self.store.iter_all():
            self._index(rt, obj)
        self.store.add_listener(self._on_event)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="apiserver-gc")
        for rt, obj in self.store.iter_all():
            self._consider(rt, obj)

    async def stop(self) -> None:
        self.store.remove_listener(self._on_event)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- indexing (synchronous, inside the store's publish) -------------------------------
    def _ref(self, rt: ResourceType, obj: JsonObject) -> Ref:
        meta = obj["metadata"]
        return (rt.key, meta.get("namespace") or "", meta["name"])

    def _index(self, rt: ResourceType, obj: JsonObject) -> None:
        ref = self._ref(rt, obj)
        self._uids[obj["metadata"]["uid"]] = ref
        for uid in _owner_uids(obj):
            self._dependents.setdefault(uid, set()).add(ref)

    def _unindex(self, rt: ResourceType, obj: JsonObject) -> None:
        ref = self._ref(rt, obj)
        if self._uids.get(obj["metadata"]["uid"]) == ref:
            del self._uids[obj["metadata"]["uid"]]
        for uid in _owner_uids(obj):
            deps = self._dependents.get(uid)
            if deps is not None:
                deps.discard(ref)
                if not deps:
                    del self._dependents[uid]

    def _on_event(self, rt: ResourceType, event: WatchEvent) -> None:
        if event.previous is not None:
            self._unindex(rt, event.previous)
        if event.type == "DELETED":
            uid = event.object["metadata"]["uid"]
            for dep in self._dependents.get(uid, set()):
                self._enqueue("dependent", dep)
            for owner_uid in _owner_uids(event.object):
                owner = self._uids.get(owner_uid)
                if owner is not None:
                    self._enqueue("owner", owner)
            if rt.namespaced:
                ns_ref = (NAMESPACES.key, "", event.object["metadata"].get("namespace") or "")
                namespace = self.store.get(NAMESPACES, "", ns_ref[2])
                if namespace is not None and namespace["metadata"].get("deletionTimestamp"):
                    self._enqueue("namespace", ns_ref)
            return
        self._index(rt, event.object)
        self._consider(rt, event.object)

    def _consider(self, rt: ResourceType, obj: JsonObject) -> None:
        meta = obj["metadata"]
        ref = self._ref(rt, obj)
        if meta.get("ownerReferences"):
            self._enqueue("dependent", ref)
        if meta.get("deletionTimestamp"):
            if rt is NAMESPACES:
                self._enqueue("namespace", ref)
            elif {"foregroundDeletion", "orphan"} & set(meta.get("finalizers") or []):
                self._enqueue("owner", ref)

    def _enqueue(self, what: str, ref: Ref) -> None:
        self._queue.put_nowait((time.monotonic() + self.delay, what, ref))

    # -- work -----------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            due, what, ref = await self._queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                if what == "dependent":
                    self._collect_dependent(ref)
                elif what == "owner":
                    self._finish_owner(ref)
                else:
                    self._terminate_namespace(ref)
            except ApiError as err:  # raced with another writer: the next event retries
                log.debug("gc %s %s: %s", what, ref, err)
            except Exception:
                log.exception("garbage collector failed on %s %s", what, ref)

    def _lookup(self, ref: Ref) -> tuple[ResourceType, JsonObject] | None:
        rt = self.store.type_for_key(ref[0])
        if rt is None:
            return None
        obj = self.store.get(rt, ref[1], ref[2])
        return (rt, obj) if obj is not None else None

    def _collect_dependent(self, ref: Ref) -> None:
        found = self._lookup(ref)
        if found is None:
            return
        rt, obj = found
        owners = _owner_uids(obj)
        if not owners or obj["metadata"].get("deletionTimestamp"):
            return
        if all(uid not in self._uids for uid in owners):
            self.registry.delete(rt, ref[1], ref[2], DeleteOptions(propagation_policy="Background"))

    def _finish_owner(self, ref: Ref) -> None:
        found = self._lookup(ref)
        if found is None:
            return
        rt, owner = found
        meta = owner["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if not meta.get("deletionTimestamp"):
            return
        uid = meta["uid"]
        dependents = [
            d
            for d in (self._lookup(r) for r in list(self._dependents.get(uid, ())))
            if d is not None
        ]
        if "orphan" in finalizers:
            for dep_rt, dep in dependents:
                self.registry.mutate(
                    dep_rt,
                    dep["metadata"].get("namespace") or "",
                    dep["metadata"]["name"],
                    lambda o: _drop_owner(o, uid),
                )
            self._remove_finalizer(rt, owner, "orphan")
            return
        if "foregroundDeletion" in finalizers:
            for dep_rt, dep in dependents:
                dep_meta = dep["metadata"]
                if not dep_meta.get("deletionTimestamp"):
                    nested = bool(self._dependents.get(dep_meta["uid"]))
                    self.registry.delete(
                        dep_rt,
                        dep_meta.get("namespace") or "",
                        dep_meta["name"],
                        DeleteOptions(propagation_policy="Foreground" if nested else "Background"),
                    )
            if not any(self._blocks(uid, r) for r in list(self._dependents.get(uid, ()))):
                self._remove_finalizer(rt, owner, "foregroundDeletion")

    def _blocks(self, owner_uid: str, ref: Ref) -> bool:
        found = self._lookup(ref)
        if found is None:
            return False
        refs = found[1]["metadata"].get("ownerReferences") or []
        return any(r.get("uid") == owner_uid and r.get("blockOwnerDeletion") for r in refs)

    def _remove_finalizer(self, rt: ResourceType, obj: JsonObject, finalizer: str) -> None:
        meta = obj["metadata"]

        def drop(o: JsonObject) -> None:
            remaining = [f for f in o["metadata"].get("finalizers") or [] if f != finalizer]
            if remaining:
                o["metadata"]["finalizers"] = remaining
            else:
                o["metadata"].pop("finalizers", None)

        self.registry.mutate(rt, meta.get("namespace") or "", meta["name"], drop)

    def _terminate_namespace(self, ref: Ref) -> None:
        namespace = self.store.get(NAMESPACES, "", ref[2])
        if namespace is None or not namespace["metadata"].get("deletionTimestamp"):
            return
        remaining = 0
        for rt in self.store.types():
            if not rt.namespaced:
                continue
            for obj in self.store.list(rt, ref[2]):
                remaining += 1
                if not obj["metadata"].get("deletionTimestamp"):
                    self.registry.delete(
                        rt, ref[2], obj["metadata"]["name"], DeleteOptions(grace_period_seconds=0)
                    )
                elif not obj["metadata"].get("finalizers"):
                    self.registry.finish_deletion(rt, ref[2], obj["metadata"]["name"])
        if remaining == 0:
            self.registry.finish_deletion(NAMESPACES, "", ref[2])


def _drop_owner(obj: JsonObject, uid: str) -> None:
    refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
    if refs:
        obj["metadata"]["ownerReferences"] = refs
    else:
        obj["metadata"].pop("ownerReferences", None)
