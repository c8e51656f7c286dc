"""Change trackers: where informer events land, and how a new ServiceTable is built from them.

This is kube-proxy's `ServiceChangeTracker` / `EndpointsChangeTracker` idea. Event handlers only
*record* what changed (cheap, never blocks the watch); the sync runner later asks for a new
snapshot, and only the services that changed since the last snapshot are rebuilt — the rest of the
previous snapshot's entries are reused as they are, so the work per sync follows the size of the
change, not of the cluster.

Parsing happens here, at record time, so a malformed object is reported once, with the field that
is wrong, when it arrives. A Service that turns invalid keeps its last valid form (traffic keeps
flowing; the error is visible in `/debug/state` and metrics) — a broken update must never take a
working Service away, and never the others with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rapproxy.model.endpoints import EndpointSliceInfo, endpoints_for_port, parse_endpoint_slice
from rapproxy.model.errors import InvalidObject
from rapproxy.model.service import ParsedService, ServicePortName, is_proxied_by, parse_service
from rapproxy.model.table import ServiceEntry, ServiceTable

log = logging.getLogger(__name__)

ServiceKey = str  # "namespace/name"


@dataclass(frozen=True, slots=True)
class TableChange:
    """One step from `previous` to `table`: the services touched and every port name whose
    entry may differ (added, removed or replaced); ports not named are the same objects."""

    table: ServiceTable
    previous: ServiceTable
    services: frozenset[ServiceKey]
    ports: frozenset[ServicePortName]


@dataclass(frozen=True, slots=True)
class ObjectError:
    """A rejected object, kept for `/debug/state` until the object is fixed or deleted."""

    kind: str
    key: str
    message: str
    at: float


class ChangeTracker:
    """Records Service and EndpointSlice events; builds ServiceTable snapshots on demand.

    Not thread-safe by design: everything runs on the one event loop.
    """

    def __init__(
        self,
        service_proxy_name: str = "",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.service_proxy_name = service_proxy_name
        self._clock = clock or (lambda: 0.0)
        self._services: dict[ServiceKey, ParsedService] = {}
        self._slices: dict[ServiceKey, dict[str, EndpointSliceInfo]] = {}
        self._slice_owner: dict[str, ServiceKey] = {}  # "ns/slice-name" → service key
        self._dirty: set[ServiceKey] = set()
        self._first_pending_at: float | None = None
        self._entries: dict[ServiceKey, dict[ServicePortName, ServiceEntry]] = {}
        self._table = ServiceTable()
        self.errors: dict[tuple[str, str], ObjectError] = {}
        self.rejected_total = 0

    # -- recording ----------------------------------------------------------------------------

    def _mark(self, key: ServiceKey) -> None:
        if not self._dirty:
            self._first_pending_at = self._clock()
        self._dirty.add(key)

    def _reject(self, kind: str, key: str, error: InvalidObject | str) -> None:
        message = str(error)
        self.rejected_total += 1
        previous = self.errors.get((kind, key))
        if previous is None or previous.message != message:
            log.warning("skipping invalid %s: %s", kind, message)
        self.errors[(kind, key)] = ObjectError(kind, key, message, self._clock())

    def service_updated(self, obj: Mapping[str, Any]) -> None:
        key = _key(obj)
        labels = _labels(obj)
        if not is_proxied_by(labels, self.service_proxy_name):
            # Headless, or owned by another proxy (or not ours when running beside kube-proxy):
            # the same as a delete from our point of view.
            self.service_deleted(obj)
            return
        try:
            parsed = parse_service(obj)
        except InvalidObject as error:
            self._reject("Service", key, error)
            return
        self.errors.pop(("Service", key), None)
        for note in parsed.notes:
            log.info("service %s: %s", key, note)
        if self._services.get(key) != parsed:
            self._services[key] = parsed
            self._mark(key)

    def service_deleted(self, obj: Mapping[str, Any]) -> None:
        key = _key(obj)
        self.errors.pop(("Service", key), None)
        if self._services.pop(key, None) is not None:
            self._mark(key)

    def slice_updated(self, obj: Mapping[str, Any]) -> None:
        slice_key = _key(obj)
        try:
            info = parse_endpoint_slice(obj)
        except InvalidObject as error:
            self._reject("EndpointSlice", slice_key, error)
            return
        self.errors.pop(("EndpointSlice", slice_key), None)
        owner = info.service_key
        previous_owner = self._slice_owner.get(slice_key)
        if previous_owner is not None and previous_owner != owner:
            self._drop_slice(slice_key, previous_owner)
        slices = self._slices.setdefault(owner, {})
        if slices.get(info.name) != info:
            slices[info.name] = info
            self._slice_owner[slice_key] = owner
            self._mark(owner)

    def slice_deleted(self, obj: Mapping[str, Any]) -> None:
        slice_key = _key(obj)
        self.errors.pop(("EndpointSlice", slice_key), None)
        owner = self._slice_owner.get(slice_key)
        if owner is not None:
            self._drop_slice(slice_key, owner)

    def _drop_slice(self, slice_key: str, owner: ServiceKey) -> None:
        slices = self._slices.get(owner, {})
        name = slice_key.rsplit("/", 1)[-1]
        if slices.pop(name, None) is not None:
            self._mark(owner)
        if not slices:
            self._slices.pop(owner, None)
        self._slice_owner.pop(slice_key, None)

    def replace_all(
        self, services: Iterable[Mapping[str, Any]], slices: Iterable[Mapping[str, Any]]
    ) -> None:
        """Make the recorded state exactly these objects (a re-list or a reloaded file).

        Objects missing from the new set get synthetic deletes, as an informer's re-list does.
        """
        service_objs = list(services)
        slice_objs = list(slices)
        seen_services = {_key(o) for o in service_objs}
        seen_slices = {_key(o) for o in slice_objs}
        for key in [k for k in self._services if k not in seen_services]:
            self.service_deleted(_stub(key))
        for kind, key in [k for k in self.errors if k[1] not in seen_services | seen_slices]:
            del self.errors[(kind, key)]
        for slice_key in [k for k in self._slice_owner if k not in seen_slices]:
            self.slice_deleted(_stub(slice_key))
        for obj in service_objs:
            self.service_updated(obj)
        for obj in slice_objs:
            self.slice_updated(obj)

    # -- snapshots ----------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """How many services changed since the last snapshot (kube-proxy's *_changes_pending)."""
        return len(self._dirty)

    @property
    def first_pending_at(self) -> float | None:
        return self._first_pending_at if self._dirty else None

    def snapshot(self) -> tuple[ServiceTable, frozenset[ServiceKey]]:
        """A new table if anything changed (and which services changed), else the current one."""
        change = self.take_change()
        return change.table, change.services

    def take_change(self) -> TableChange:
        """The new table and exactly what differs from the previous one.

        Work is proportional to the change: the new table is derived from the previous one
        (`ServiceTable.replaced`), never rebuilt from every service.
        """
        if not self._dirty:
            return TableChange(self._table, self._table, frozenset(), frozenset())
        changed = frozenset(self._dirty)
        removed: list[ServicePortName] = []
        added: dict[ServicePortName, ServiceEntry] = {}
        for key in changed:
            removed.extend(self._entries.pop(key, {}))
            parsed = self._services.get(key)
            if parsed is None:
                continue
            slices = list(self._slices.get(key, {}).values())
            entries = {
                port.name: ServiceEntry(
                    port, endpoints_for_port(slices, port.name.port, port.name.protocol)
                )
                for port in parsed.ports
            }
            self._entries[key] = entries
            added.update(entries)
        previous = self._table
        self._table = previous.replaced(removed, added)
        self._dirty.clear()
        self._first_pending_at = None
        return TableChange(self._table, previous, changed, frozenset(removed) | added.keys())

    @property
    def table(self) -> ServiceTable:
        return self._table

    def describe_errors(self) -> list[dict[str, Any]]:
        return [
            {"kind": e.kind, "object": e.key, "error": e.message, "since": e.at}
            for e in sorted(self.errors.values(), key=lambda e: (e.kind, e.key))
        ]


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        return "<no metadata>"
    return f"{meta.get('namespace')}/{meta.get('name')}"


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    labels = meta.get("labels") if isinstance(meta, Mapping) else None
    return labels if isinstance(labels, Mapping) else {}


def _stub(key: str) -> dict[str, Any]:
    namespace, _, name = key.partition("/")
    return {"metadata": {"namespace": namespace, "name": name}}
