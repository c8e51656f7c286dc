"""The emulated etcd + watch cache: objects, one global revision, per-resource event history.

Owns every persisted object of the emulated cluster. All writes go through `persist` / `remove`,
which give the object the next global revision (decimal string `metadata.resourceVersion`, one
counter for all resources like etcd), append a watch event to the resource's bounded history and
fan it out to subscribers. Stored objects are never mutated after publication: a write stores a
new dict, so events and list results can share them safely.

Two "too old" notions exist, as in the real server:
- the **watch cache window**: each resource keeps its last `history_size` events; a watch from a
  resourceVersion older than the window gets 410 Expired (as an ERROR event);
- the **etcd compaction** revision: a LIST with `resourceVersionMatch=Exact` below it gets 410.
`compact()` moves both forward (fault injection); `compact_etcd()` only the latter.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rapproxy.testing.apiserver.errors import ApiError, expired, status_failure
from rapproxy.testing.apiserver.resources import BUILTIN_TYPES, ResourceType

JsonObject = dict[str, Any]
ObjectKey = tuple[str, str]  # (namespace or "", name)

DEFAULT_HISTORY_SIZE = 1000
log = logging.getLogger(__name__)


def json_copy(obj: JsonObject) -> JsonObject:
    """A deep copy of a JSON object (faster than copy.deepcopy for plain JSON)."""
    copied: JsonObject = json.loads(json.dumps(obj))
    return copied


def object_key(obj: JsonObject) -> ObjectKey:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name") or "")


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change to one object. `object` is shared and must never be mutated."""

    type: str  # ADDED | MODIFIED | DELETED
    object: JsonObject
    resource_version: int
    previous: JsonObject | None  # state before the change (None for ADDED)


@dataclass(slots=True)
class History:
    """A resource's watch cache: the newest events and the revision they are complete from."""

    events: deque[WatchEvent]
    floor: int  # watches from a revision >= floor can be served
    latest: int = 0  # newest revision seen for this resource

    def since(self, revision: int) -> builtins.list[WatchEvent]:
        return [e for e in self.events if e.resource_version > revision]


@dataclass(eq=False)
class Subscription:
    """A live watch on one resource: events matching `accepts` arrive on `queue`.

    `None` on the queue means the server closed the watch (dropped or shutting down).
    """

    resource: ResourceType
    accepts: Callable[[JsonObject], bool]
    namespace: str | None
    queue: asyncio.Queue[WatchEvent | None] = field(default_factory=asyncio.Queue)
    closed: bool = False

    def wants(self, event: WatchEvent) -> bool:
        obj = event.object
        if self.namespace is not None and object_key(obj)[0] != self.namespace:
            return False
        if self.accepts(obj):
            return True
        # An object that stops matching is reported as deleted by a selector-filtered watch;
        # one that starts matching as added. Both need the previous state.
        prev = event.previous
        return prev is not None and self.accepts(prev)

    def translate(self, event: WatchEvent) -> WatchEvent:
        if event.type != "MODIFIED" or event.previous is None:
            return event
        now, before = self.accepts(event.object), self.accepts(event.previous)
        if now and not before:
            return WatchEvent("ADDED", event.object, event.resource_version, event.previous)
        if before and not now:
            return WatchEvent("DELETED", event.object, event.resource_version, event.previous)
        return event

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put_nowait(None)


class Store:
    """In-memory objects of every served resource, with revisions, history and subscribers."""

    def __init__(self, history_size: int = DEFAULT_HISTORY_SIZE) -> None:
        self.history_size = history_size
        self.revision = 1  # etcd starts above 0; "1" is the oldest meaningful revision
        self.compacted = 0
        self._types: dict[str, ResourceType] = {}
        self._objects: dict[str, dict[ObjectKey, JsonObject]] = {}
        self._history: dict[str, History] = {}
        self._subscribers: dict[str, set[Subscription]] = {}
        self._listeners: list[Callable[[ResourceType, WatchEvent], None]] = []
        # JSON of current objects, encoded once and shared by every list and watch:
        # id(obj) → (obj, full encoding, encoding without kind/apiVersion).
        self._encoded: dict[int, tuple[JsonObject, bytes, bytes | None]] = {}
        for rt in BUILTIN_TYPES:
            self.register(rt, window_from_now=False)

    # -- resource types -------------------------------------------------------------------
    def register(self, rt: ResourceType, *, window_from_now: bool = True) -> None:
        """Serve `rt`. A type registered later (a CRD) has a watch cache starting now."""
        if rt.key in self._types:
            self._types[rt.key] = rt
            return
        self._types[rt.key] = rt
        self._objects[rt.key] = {}
        floor = self.revision if window_from_now else 0
        self._history[rt.key] = History(deque(maxlen=self.history_size), floor, floor)
        self._subscribers[rt.key] = set()

    def unregister(self, rt: ResourceType) -> None:
        for sub in list(self._subscribers.get(rt.key, ())):
            sub.close()
        for mapping in (self._types, self._objects, self._history, self._subscribers):
            mapping.pop(rt.key, None)

    def types(self) -> builtins.list[ResourceType]:
        return list(self._types.values())

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        api_version = f"{group}/{version}" if group else version
        return self._types.get(f"{api_version}/{plural}")

    def type_for_key(self, key: str) -> ResourceType | None:
        return self._types.get(key)

    def lookup_kind(self, api_version: str, kind: str) -> ResourceType | None:
        for rt in self._types.values():
            if rt.api_version == api_version and rt.kind == kind:
                return rt
        return None

    # -- reads ----------------------------------------------------------------------------
    def get(self, rt: ResourceType, namespace: str, name: str) -> JsonObject | None:
        return self._objects[rt.key].get((namespace if rt.namespaced else "", name))

    def list(self, rt: ResourceType, namespace: str | None = None) -> builtins.list[JsonObject]:
        items = self._objects[rt.key]
        keys = sorted(k for k in items if namespace is None or k[0] == namespace)
        return [items[k] for k in keys]

    def iter_all(self) -> Iterator[tuple[ResourceType, JsonObject]]:
        for key, items in list(self._objects.items()):
            rt = self._types[key]
            for obj in list(items.values()):
                yield rt, obj

    def list_at(
        self, rt: ResourceType, namespace: str | None, revision: int
    ) -> builtins.list[JsonObject]:
        """The resource's objects as they were at `revision` (LIST resourceVersionMatch=Exact)."""
        if revision < self.compacted:
            raise expired("The resourceVersion for the provided list is too old.")
        if revision >= self.revision:
            return self.list(rt, namespace)
        history = self._history[rt.key]
        if revision < history.floor:
            raise expired("The resourceVersion for the provided list is too old.")
        state = dict(self._objects[rt.key])
        for event in reversed(history.since(revision)):
            key = object_key(event.object)
            if event.previous is None:
                state.pop(key, None)
            else:
                state[key] = event.previous
        keys = sorted(k for k in state if namespace is None or k[0] == namespace)
        return [state[k] for k in keys]

    def latest_revision(self, rt: ResourceType) -> int:
        """The newest revision the watch cache has seen for `rt` (what a BOOKMARK carries)."""
        return self._history[rt.key].latest

    # -- writes ---------------------------------------------------------------------------
    def next_revision(self) -> int:
        self.revision += 1
        return self.revision

    def persist(self, rt: ResourceType, obj: JsonObject) -> JsonObject:
        """Store `obj` (a fresh dict the caller no longer touches) at a new revision."""
        key = object_key(obj)
        if not rt.namespaced:
            key = ("", key[1])
        previous = self._objects[rt.key].get(key)
        revision = self.next_revision()
        obj["metadata"]["resourceVersion"] = str(revision)
        self._objects[rt.key][key] = obj
        if previous is not None:
            self._encoded.pop(id(previous), None)
        self._publish(
            rt, WatchEvent("ADDED" if previous is None else "MODIFIED", obj, revision, previous)
        )
        return obj

    def remove(self, rt: ResourceType, namespace: str, name: str) -> JsonObject:
        """Delete the object; its DELETED event carries the deletion's new revision."""
        key = (namespace if rt.namespaced else "", name)
        previous = self._objects[rt.key].pop(key)
        self._encoded.pop(id(previous), None)
        revision = self.next_revision()
        final = dict(previous)
        final["metadata"] = dict(previous["metadata"], resourceVersion=str(revision))
        self._publish(rt, WatchEvent("DELETED", final, revision, previous))
        return final

    def _publish(self, rt: ResourceType, event: WatchEvent) -> None:
        history = self._history[rt.key]
        if len(history.events) == history.events.maxlen:
            history.floor = history.events[0].resource_version
        history.events.append(event)
        history.latest = event.resource_version
        for sub in list(self._subscribers[rt.key]):
            if not sub.closed and sub.wants(event):
                sub.queue.put_nowait(sub.translate(event))
        for listener in list(self._listeners):
            try:
                listener(rt, event)
            except Exception:  # a broken controller must not fail the client's write
                log.exception("store listener %r failed on %s %s", listener, event.type, rt.key)

    # -- encoding -------------------------------------------------------------------------
    def encode(self, obj: JsonObject) -> bytes:
        """`obj` as compact JSON; cached while `obj` is a current (stored) object."""
        cached = self._encoded.get(id(obj))
        if cached is not None and cached[0] is obj:
            return cached[1]
        data = json.dumps(obj, separators=(",", ":")).encode()
        if self._is_current(obj):
            self._encoded[id(obj)] = (obj, data, None)
        return data

    def encode_item(self, obj: JsonObject) -> bytes:
        """`obj` without kind/apiVersion, as built-in list items are rendered."""
        cached = self._encoded.get(id(obj))
        if cached is not None and cached[0] is obj and cached[2] is not None:
            return cached[2]
        stripped = {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}
        data = json.dumps(stripped, separators=(",", ":")).encode()
        if self._is_current(obj):
            full = cached[1] if cached is not None and cached[0] is obj else self.encode(obj)
            self._encoded[id(obj)] = (obj, full, data)
        return data

    def _is_current(self, obj: JsonObject) -> bool:
        rt = self.lookup_kind(obj.get("apiVersion", ""), obj.get("kind", ""))
        if rt is None:
            return False
        namespace, name = object_key(obj)
        return self._objects[rt.key].get((namespace if rt.namespaced else "", name)) is obj

    # -- watches --------------------------------------------------------------------------
    def subscribe(
        self,
        rt: ResourceType,
        since: int | None,
        accepts: Callable[[JsonObject], bool] = lambda _o: True,
        namespace: str | None = None,
    ) -> tuple[Subscription, builtins.list[WatchEvent]]:
        """Open a watch: returns the subscription and the events to replay first.

        `since=None` (or 0) replays the current state as synthetic ADDED events; otherwise the
        history after `since`, or raises ApiError 410 if `since` is older than the window.
        """
        sub = Subscription(rt, accepts, namespace)
        if since is None or since == 0:
            replay = [
                WatchEvent("ADDED", obj, int(obj["metadata"]["resourceVersion"]), None)
                for obj in self.list(rt, namespace)
                if accepts(obj)
            ]
        else:
            history = self._history[rt.key]
            if since < history.floor:
                raise ApiError(
                    status_failure(
                        410, "Expired", f"too old resource version: {since} ({history.floor})"
                    )
                )
            replay = [sub.translate(e) for e in history.since(since) if sub.wants(e)]
        self._subscribers[rt.key].add(sub)
        return sub, replay

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.get(sub.resource.key, set()).discard(sub)
        sub.closed = True

    def add_listener(self, listener: Callable[[ResourceType, WatchEvent], None]) -> None:
        """Call `listener` synchronously for every event of every resource (controllers)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[ResourceType, WatchEvent], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def drop_watches(self) -> int:
        """Close every open watch (clients see the stream end). Returns how many."""
        count = 0
        for subs in self._subscribers.values():
            for sub in list(subs):
                sub.close()
                count += 1
            subs.clear()
        return count

    def compact(self) -> None:
        """Forget all history: every watch or exact list older than now gets 410."""
        self.compacted = self.revision
        for history in self._history.values():
            history.events.clear()
            history.floor = self.revision
            history.latest = max(history.latest, self.revision)

    def compact_etcd(self, revision: int) -> None:
        """Like etcd compaction: only exact LISTs below `revision` expire; watches continue."""
        self.compacted = max(self.compacted, revision)
