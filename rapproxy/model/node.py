"""Nodes as the proxy sees them: names, addresses, zone and readiness.

The RAP policy scores nodes, the telemetry poller polls their addresses, and topology-aware
routing needs the local node's zone. All of that comes from v1 Node objects, parsed here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rapproxy.model.errors import InvalidObject

LABEL_ZONE = "topology.kubernetes.io/zone"
ADDRESS_PREFERENCE = ("InternalIP", "ExternalIP")


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    addresses: tuple[str, ...]
    zone: str | None
    ready: bool
    unschedulable: bool = False

    @property
    def primary_address(self) -> str | None:
        return self.addresses[0] if self.addresses else None


def parse_node(obj: Mapping[str, Any]) -> NodeInfo:
    """Parse a v1 Node; InternalIP addresses come first, hostnames are ignored."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise InvalidObject("Node", "<unnamed>", "metadata.name", "required")
    name: str = meta["name"]
    labels = meta.get("labels") or {}
    zone = labels.get(LABEL_ZONE) if isinstance(labels, Mapping) else None
    status = obj.get("status") or {}
    if not isinstance(status, Mapping):
        raise InvalidObject("Node", name, "status", "must be an object")
    raw_addresses = status.get("addresses") or []
    if not isinstance(raw_addresses, list):
        raise InvalidObject("Node", name, "status.addresses", "must be a list")
    ranked: list[tuple[int, str]] = []
    for i, entry in enumerate(raw_addresses):
        if not isinstance(entry, Mapping):
            raise InvalidObject("Node", name, f"status.addresses[{i}]", "must be an object")
        kind = entry.get("type")
        if kind not in ADDRESS_PREFERENCE:
            continue
        try:
            raw_address = entry.get("address")
            # ip_address() also takes integers (5 -> 0.0.0.5); the API only ever sends text.
            if not isinstance(raw_address, str):
                raise ValueError(raw_address)
            address = str(ipaddress.ip_address(raw_address))
        except ValueError:
            raise InvalidObject(
                "Node",
                name,
                f"status.addresses[{i}].address",
                f"{entry.get('address')!r} is not an IP",
            ) from None
        ranked.append((ADDRESS_PREFERENCE.index(kind), address))
    addresses = tuple(address for _, address in sorted(ranked, key=lambda item: item[0]))
    conditions = status.get("conditions") or []
    if not isinstance(conditions, list):
        raise InvalidObject("Node", name, "status.conditions", "must be a list")
    ready = False
    for condition in conditions:
        if isinstance(condition, Mapping) and condition.get("type") == "Ready":
            ready = condition.get("status") == "True"
    spec = obj.get("spec") or {}
    unschedulable = bool(spec.get("unschedulable")) if isinstance(spec, Mapping) else False
    return NodeInfo(name, addresses, zone if isinstance(zone, str) else None, ready, unschedulable)
