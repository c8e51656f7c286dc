"""Endpoints: the backends of a Service port, as EndpointSlices describe them.

A Service's endpoints are spread over several `discovery.k8s.io/v1` EndpointSlices, each with its
own port list. The proxy needs, per service port, one de-duplicated list of `ip:port` backends with
their conditions, node and topology hints — that is what `endpoints_for_port` builds, the way
kube-proxy's endpoint slice cache does (the same address in two slices counts once, the
readiest copy wins).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rapproxy.model.addresses import ip_sort_key, parse_ip
from rapproxy.model.errors import InvalidObject
from rapproxy.model.service import L4Protocol, object_key

LABEL_SERVICE_NAME = "kubernetes.io/service-name"
SUPPORTED_ADDRESS_TYPES = ("IPv4", "IPv6")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend `ip:port` of one service port."""

    ip: str
    port: int
    node_name: str | None = None
    zone: str | None = None
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    zone_hints: frozenset[str] = frozenset()
    node_hints: frozenset[str] = frozenset()

    @property
    def address(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return self.address


@dataclass(frozen=True, slots=True)
class SlicePort:
    name: str
    port: int
    protocol: L4Protocol


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    addresses: tuple[str, ...]
    ready: bool
    serving: bool
    terminating: bool
    node_name: str | None
    zone: str | None
    zone_hints: frozenset[str]
    node_hints: frozenset[str]


@dataclass(frozen=True, slots=True)
class EndpointSliceInfo:
    """The parts of an EndpointSlice a proxy uses, keyed to its Service."""

    namespace: str
    name: str
    service_name: str
    address_type: str
    ports: tuple[SlicePort, ...]
    endpoints: tuple[SliceEndpoint, ...]

    @property
    def service_key(self) -> str:
        return f"{self.namespace}/{self.service_name}"


def parse_endpoint_slice(obj: Mapping[str, Any]) -> EndpointSliceInfo:
    """Parse a `discovery.k8s.io/v1` EndpointSlice; raise `InvalidObject` naming the field.

    Conditions follow the API's documented defaults: an unset `ready` means ready, an unset
    `serving` follows `ready`, an unset `terminating` means not terminating.
    """
    key = object_key(obj)
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        raise InvalidObject("EndpointSlice", key, "metadata", "missing or not an object")
    namespace = meta.get("namespace")
    name = meta.get("name")
    if not isinstance(namespace, str) or not namespace:
        raise InvalidObject("EndpointSlice", key, "metadata.namespace", "required")
    if not isinstance(name, str) or not name:
        raise InvalidObject("EndpointSlice", key, "metadata.name", "required")
    labels = meta.get("labels") or {}
    service_name = labels.get(LABEL_SERVICE_NAME) if isinstance(labels, Mapping) else None
    if not isinstance(service_name, str) or not service_name:
        raise InvalidObject(
            "EndpointSlice",
            key,
            f"metadata.labels[{LABEL_SERVICE_NAME}]",
            "required to find its Service",
        )
    address_type = obj.get("addressType")
    if address_type not in SUPPORTED_ADDRESS_TYPES:
        # FQDN slices are valid API objects but carry nothing a proxy can dial.
        raise InvalidObject(
            "EndpointSlice",
            key,
            "addressType",
            f"{address_type!r}: rapproxy proxies IPv4 and IPv6 only",
        )
    ports = tuple(_parse_ports(obj.get("ports"), key))
    endpoints = tuple(_parse_endpoints(obj.get("endpoints"), key, address_type))
    return EndpointSliceInfo(namespace, name, service_name, address_type, ports, endpoints)


def _parse_ports(raw: object, key: str) -> Iterable[SlicePort]:
    if raw is None:
        return
    if not isinstance(raw, list):
        raise InvalidObject("EndpointSlice", key, "ports", "must be a list")
    for i, entry in enumerate(raw):
        if not isinstance(entry, Mapping):
            raise InvalidObject("EndpointSlice", key, f"ports[{i}]", "must be an object")
        port = entry.get("port")
        if port is None:
            # "port: nil" means all ports; a userspace proxy cannot dial "all ports".
            continue
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise InvalidObject(
                "EndpointSlice", key, f"ports[{i}].port", f"{port!r} is not a port number"
            )
        protocol_text = entry.get("protocol") or "TCP"
        try:
            protocol = L4Protocol(protocol_text)
        except ValueError:
            raise InvalidObject(
                "EndpointSlice", key, f"ports[{i}].protocol", f"{protocol_text!r} is not a protocol"
            ) from None
        name = entry.get("name") or ""
        if not isinstance(name, str):
            raise InvalidObject("EndpointSlice", key, f"ports[{i}].name", "must be a string")
        yield SlicePort(name, port, protocol)


def _parse_endpoints(raw: object, key: str, address_type: str) -> Iterable[SliceEndpoint]:
    if raw is None:
        return
    if not isinstance(raw, list):
        raise InvalidObject("EndpointSlice", key, "endpoints", "must be a list")
    version = 4 if address_type == "IPv4" else 6
    for i, entry in enumerate(raw):
        field = f"endpoints[{i}]"
        if not isinstance(entry, Mapping):
            raise InvalidObject("EndpointSlice", key, field, "must be an object")
        addresses = entry.get("addresses")
        if not isinstance(addresses, list) or not addresses:
            raise InvalidObject(
                "EndpointSlice", key, f"{field}.addresses", "must be a non-empty list"
            )
        parsed = []
        for j, address in enumerate(addresses):
            try:
                family, canonical = parse_ip(address)
            except ValueError:
                raise InvalidObject(
                    "EndpointSlice",
                    key,
                    f"{field}.addresses[{j}]",
                    f"{address!r} is not an IP address",
                ) from None
            if family != version:
                raise InvalidObject(
                    "EndpointSlice",
                    key,
                    f"{field}.addresses[{j}]",
                    f"{address} is not {address_type}",
                )
            parsed.append(canonical)
        conditions = entry.get("conditions") or {}
        if not isinstance(conditions, Mapping):
            raise InvalidObject("EndpointSlice", key, f"{field}.conditions", "must be an object")
        ready = _condition(conditions, "ready", True, key, field)
        serving = _condition(conditions, "serving", ready, key, field)
        terminating = _condition(conditions, "terminating", False, key, field)
        hints = entry.get("hints") or {}
        zone_hints = frozenset(_hint_names(hints, "forZones", key, field))
        node_hints = frozenset(_hint_names(hints, "forNodes", key, field))
        node_name = entry.get("nodeName")
        zone = entry.get("zone")
        yield SliceEndpoint(
            addresses=tuple(parsed),
            ready=ready,
            serving=serving,
            terminating=terminating,
            node_name=node_name if isinstance(node_name, str) else None,
            zone=zone if isinstance(zone, str) else None,
            zone_hints=zone_hints,
            node_hints=node_hints,
        )


def _condition(
    conditions: Mapping[str, Any], name: str, default: bool, key: str, field: str
) -> bool:
    value = conditions.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidObject("EndpointSlice", key, f"{field}.conditions.{name}", "must be a boolean")
    return value


def _hint_names(hints: object, field_name: str, key: str, field: str) -> Iterable[str]:
    if not isinstance(hints, Mapping):
        raise InvalidObject("EndpointSlice", key, f"{field}.hints", "must be an object")
    entries = hints.get(field_name) or []
    if not isinstance(entries, list):
        raise InvalidObject("EndpointSlice", key, f"{field}.hints.{field_name}", "must be a list")
    for entry in entries:
        if isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
            yield entry["name"]


def endpoints_for_port(
    slices: Iterable[EndpointSliceInfo], port_name: str, protocol: L4Protocol
) -> tuple[Endpoint, ...]:
    """Merge a Service's slices into the backends of one of its ports.

    Slices are matched by port name and protocol. The same `ip:port` in several slices (which
    happens briefly while the EndpointSlice controller moves endpoints) counts once; the copy that
    is ready (then serving) wins. The result is sorted so that identical inputs give identical
    snapshots, which keeps syncs idempotent and round-robin order stable.
    """
    merged: dict[tuple[str, int], Endpoint] = {}
    for info in slices:
        for slice_port in info.ports:
            if slice_port.name != port_name or slice_port.protocol is not protocol:
                continue
            for entry in info.endpoints:
                for ip in entry.addresses[:1]:  # kube-proxy uses the first address only
                    candidate = Endpoint(
                        ip=ip,
                        port=slice_port.port,
                        node_name=entry.node_name,
                        zone=entry.zone,
                        ready=entry.ready,
                        serving=entry.serving,
                        terminating=entry.terminating,
                        zone_hints=entry.zone_hints,
                        node_hints=entry.node_hints,
                    )
                    existing = merged.get((ip, slice_port.port))
                    if existing is None or _rank(candidate) > _rank(existing):
                        merged[(ip, slice_port.port)] = candidate
    return tuple(sorted(merged.values(), key=_sort_key))


def _sort_key(endpoint: Endpoint) -> tuple[int, bytes, int]:
    return (*ip_sort_key(endpoint.ip), endpoint.port)


def _rank(endpoint: Endpoint) -> tuple[bool, bool]:
    return (endpoint.ready, endpoint.serving)
