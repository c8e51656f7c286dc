"""Service ports: what a Kubernetes Service asks the node proxy to intercept.

A Service with N ports becomes N independent `ServicePort` values, keyed like kube-proxy keys them
(`namespace/name:portname`), because everything downstream — rules, listeners, balancing — works
per port. Parsing is strict about what the proxy relies on (addresses, port numbers, protocols) and
lenient about everything else, so an object a real API server accepted is never rejected here for
a field rapproxy does not use.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rapproxy.model.addresses import parse_ip
from rapproxy.model.errors import InvalidObject

DEFAULT_AFFINITY_TIMEOUT_SECONDS = 10800
MAX_AFFINITY_TIMEOUT_SECONDS = 86400

LABEL_SERVICE_PROXY_NAME = "service.kubernetes.io/service-proxy-name"
LABEL_HEADLESS = "service.kubernetes.io/headless"
ANNOTATION_LB_POLICY = "rapproxy.io/lb-policy"
ANNOTATION_DATAPLANE = "rapproxy.io/dataplane"


class L4Protocol(enum.StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class LbPolicy(enum.StrEnum):
    """Per-service balancing policy, chosen with the `rapproxy.io/lb-policy` annotation."""

    RAP = "rap"  # queue- and latency-aware local first (balancer/rap_cost.py)
    RAP_AIMD = "rap-aimd"  # utilization verdicts, gradual local share (balancer/rap.py)
    RAP_SWITCH = "rap-switch"  # the paper's switch: all local, or all to the best node
    ROUND_ROBIN = "round-robin"
    LEAST_CONN = "least-conn"
    RANDOM = "random"
    LOCAL_ONLY = "local-only"


class DataplaneMode(enum.StrEnum):
    """Who forwards a Service's connections: the userspace relay, or the kernel (DNAT).

    Chosen per Service with the `rapproxy.io/dataplane` annotation; `dataplane.mode` in the
    configuration is the default. In kernel mode the RAP weights become DNAT probabilities
    (rules/kernel.py, balancer/kernel_weights.py).
    """

    USERSPACE = "userspace"
    KERNEL = "kernel"


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """Identity of one port of one Service: kube-proxy's `ServicePortName`."""

    namespace: str
    name: str
    port: str
    protocol: L4Protocol = L4Protocol.TCP

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}:{self.port}"

    @property
    def service_key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of a Service, with every address that must be redirected to the proxy.

    `affinity_timeout_seconds` is None when session affinity is off. `lb_policy` and `dataplane`
    are None when the Service does not ask for one (the configured default applies). Addresses are normalized text
    (`ipaddress` canonical form) so they compare and render predictably.
    """

    name: ServicePortName
    port: int
    target_port: int | str
    cluster_ips: tuple[str, ...] = ()
    node_port: int | None = None
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    affinity_timeout_seconds: int | None = None
    internal_traffic_local: bool = False
    external_traffic_local: bool = False
    traffic_distribution: str | None = None
    lb_policy: LbPolicy | None = None
    service_type: str = "ClusterIP"
    dataplane: DataplaneMode | None = None

    @property
    def protocol(self) -> L4Protocol:
        return self.name.protocol

    @property
    def external_addresses(self) -> tuple[str, ...]:
        """Addresses reached from outside the cluster; externalTrafficPolicy applies to them."""
        return self.external_ips + self.load_balancer_ips


@dataclass(frozen=True, slots=True)
class ParsedService:
    """The usable ports of a Service plus notes about what was deliberately left out."""

    namespace: str
    name: str
    ports: tuple[ServicePort, ...]
    notes: tuple[str, ...] = ()


def object_key(obj: Mapping[str, Any]) -> str:
    """`namespace/name` of an API object, best effort, for messages about broken objects."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        return "<no metadata>"
    namespace = meta.get("namespace")
    name = meta.get("name")
    return f"{namespace}/{name}" if namespace else str(name)


def is_proxied_by(labels: Mapping[str, str], service_proxy_name: str) -> bool:
    """kube-proxy's label filter: which Services this proxy instance is responsible for.

    With an empty `service_proxy_name` rapproxy replaces kube-proxy and handles every Service that
    no other proxy claimed; with a name it runs beside kube-proxy and handles only the Services
    labelled with that name. Headless Services are never proxied.
    """
    if LABEL_HEADLESS in labels:
        return False
    claimed_by = labels.get(LABEL_SERVICE_PROXY_NAME)
    if service_proxy_name:
        return claimed_by == service_proxy_name
    return claimed_by is None


def parse_service(obj: Mapping[str, Any]) -> ParsedService:
    """Parse a v1 Service (API JSON form) into its proxyable ports.

    Raises `InvalidObject` naming the field when something the proxy relies on is malformed.
    Headless and ExternalName Services parse to zero ports: they are valid, there is just nothing
    for a node proxy to do.
    """
    key = object_key(obj)
    meta = _mapping(obj, "metadata", "Service", key)
    namespace = _str_field(meta, "namespace", "Service", key, "metadata.namespace")
    name = _str_field(meta, "name", "Service", key, "metadata.name")
    spec = _mapping(obj, "spec", "Service", key)
    service_type = spec.get("type") or "ClusterIP"
    if not isinstance(service_type, str):
        raise InvalidObject("Service", key, "spec.type", f"{service_type!r} is not a string")
    if service_type == "ExternalName":
        return ParsedService(namespace, name, (), ("ExternalName services are resolved by DNS",))

    cluster_ips = _cluster_ips(spec, key)
    if cluster_ips is None:
        return ParsedService(namespace, name, (), ("headless service (clusterIP: None)",))

    external_ips = tuple(
        _ip(value, key, f"spec.externalIPs[{i}]")
        for i, value in enumerate(_list(spec, "externalIPs", key))
    )
    lb_ips = _load_balancer_ips(obj, key) if service_type == "LoadBalancer" else ()
    affinity = _affinity_timeout(spec, key)
    internal_local = _traffic_policy(spec, "internalTrafficPolicy", key)
    external_local = _traffic_policy(spec, "externalTrafficPolicy", key)
    traffic_distribution = spec.get("trafficDistribution")
    if traffic_distribution is not None and not isinstance(traffic_distribution, str):
        raise InvalidObject("Service", key, "spec.trafficDistribution", "must be a string")
    lb_policy = _lb_policy(meta, key)
    dataplane = _dataplane(meta, key)

    raw_ports = _list(spec, "ports", key)
    if not raw_ports:
        raise InvalidObject("Service", key, "spec.ports", "a non-headless Service needs ports")
    ports: list[ServicePort] = []
    notes: list[str] = []
    # The API server rejects both duplicates; checking again here keeps a hand-written manifest
    # (static source) from making endpoint matching or interception ambiguous.
    seen_names: set[str] = set()
    seen_ports: set[tuple[int, L4Protocol]] = set()
    for index, raw in enumerate(raw_ports):
        field = f"spec.ports[{index}]"
        if not isinstance(raw, Mapping):
            raise InvalidObject("Service", key, field, "must be an object")
        port_name = raw.get("name") or ""
        if not isinstance(port_name, str):
            raise InvalidObject("Service", key, f"{field}.name", "must be a string")
        if len(raw_ports) > 1 and not port_name:
            raise InvalidObject("Service", key, f"{field}.name", "required when there are several")
        # Like the API server's defaulting: unset, null and "" all mean TCP.
        protocol = _protocol(raw.get("protocol") or "TCP", key, f"{field}.protocol")
        port = _port_number(raw.get("port"), key, f"{field}.port")
        target = raw.get("targetPort", port)
        if isinstance(target, bool) or not isinstance(target, int | str):
            raise InvalidObject("Service", key, f"{field}.targetPort", "must be a number or name")
        if isinstance(target, int):
            _port_number(target, key, f"{field}.targetPort")
        node_port = raw.get("nodePort")
        if node_port is not None:
            node_port = _port_number(node_port, key, f"{field}.nodePort")
        if port_name in seen_names:
            raise InvalidObject("Service", key, f"{field}.name", f"duplicate port {port_name!r}")
        if (port, protocol) in seen_ports:
            raise InvalidObject("Service", key, f"{field}.port", f"duplicate {port}/{protocol}")
        seen_names.add(port_name)
        seen_ports.add((port, protocol))
        if protocol is L4Protocol.SCTP:
            notes.append(f"{field}: SCTP is not proxied by a userspace proxy; port skipped")
            continue
        ports.append(
            ServicePort(
                name=ServicePortName(namespace, name, port_name, protocol),
                port=port,
                target_port=target,
                cluster_ips=cluster_ips,
                node_port=node_port if service_type in ("NodePort", "LoadBalancer") else None,
                external_ips=external_ips,
                load_balancer_ips=lb_ips,
                affinity_timeout_seconds=affinity,
                internal_traffic_local=internal_local,
                external_traffic_local=external_local,
                traffic_distribution=traffic_distribution,
                lb_policy=lb_policy,
                service_type=service_type,
                dataplane=dataplane,
            )
        )
    return ParsedService(namespace, name, tuple(ports), tuple(notes))


def _cluster_ips(spec: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    raw = spec.get("clusterIPs")
    if raw is None:
        single = spec.get("clusterIP")
        raw = [single] if single not in (None, "") else []
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise InvalidObject("Service", key, "spec.clusterIPs", "must be a list")
    if any(value == "None" for value in raw):
        return None
    if not raw:
        raise InvalidObject("Service", key, "spec.clusterIP", "not allocated yet")
    return tuple(_ip(value, key, f"spec.clusterIPs[{i}]") for i, value in enumerate(raw))


def _load_balancer_ips(obj: Mapping[str, Any], key: str) -> tuple[str, ...]:
    status = obj.get("status") or {}
    lb = status.get("loadBalancer") if isinstance(status, Mapping) else None
    ingress = lb.get("ingress") if isinstance(lb, Mapping) else None
    if not ingress:
        return ()
    if not isinstance(ingress, list):
        raise InvalidObject("Service", key, "status.loadBalancer.ingress", "must be a list")
    ips = []
    for i, entry in enumerate(ingress):
        # ipMode "Proxy": the load balancer delivers to the node with its own address as the
        # destination, so kube-proxy (1.30+) does not intercept that IP; only "VIP" (the default).
        if isinstance(entry, Mapping) and entry.get("ip") and entry.get("ipMode") in (None, "VIP"):
            ips.append(_ip(entry["ip"], key, f"status.loadBalancer.ingress[{i}].ip"))
    return tuple(ips)


def _affinity_timeout(spec: Mapping[str, Any], key: str) -> int | None:
    affinity = spec.get("sessionAffinity") or "None"
    if affinity == "None":
        return None
    if affinity != "ClientIP":
        raise InvalidObject(
            "Service",
            key,
            "spec.sessionAffinity",
            f'{affinity!r}: supported values: "ClientIP", "None"',
        )
    config = spec.get("sessionAffinityConfig") or {}
    client_ip = config.get("clientIP") if isinstance(config, Mapping) else None
    timeout = client_ip.get("timeoutSeconds") if isinstance(client_ip, Mapping) else None
    if timeout is None:
        return DEFAULT_AFFINITY_TIMEOUT_SECONDS
    if isinstance(timeout, bool) or not isinstance(timeout, int):
        raise InvalidObject(
            "Service",
            key,
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            "must be an integer",
        )
    if not 0 < timeout <= MAX_AFFINITY_TIMEOUT_SECONDS:
        raise InvalidObject(
            "Service",
            key,
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            f"{timeout}: must be in the range 1-{MAX_AFFINITY_TIMEOUT_SECONDS}",
        )
    return timeout


def _traffic_policy(spec: Mapping[str, Any], field: str, key: str) -> bool:
    value = spec.get(field)
    if value in (None, "Cluster"):
        return False
    if value == "Local":
        return True
    raise InvalidObject(
        "Service", key, f"spec.{field}", f'{value!r}: supported values: "Cluster", "Local"'
    )


def _lb_policy(meta: Mapping[str, Any], key: str) -> LbPolicy | None:
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, Mapping):
        raise InvalidObject("Service", key, "metadata.annotations", "must be an object")
    value = annotations.get(ANNOTATION_LB_POLICY)
    if value is None:
        return None
    try:
        return LbPolicy(value)
    except ValueError:
        allowed = ", ".join(p.value for p in LbPolicy)
        raise InvalidObject(
            "Service",
            key,
            f"metadata.annotations[{ANNOTATION_LB_POLICY}]",
            f"{value!r}: one of {allowed}",
        ) from None


def _dataplane(meta: Mapping[str, Any], key: str) -> DataplaneMode | None:
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, Mapping):
        raise InvalidObject("Service", key, "metadata.annotations", "must be an object")
    value = annotations.get(ANNOTATION_DATAPLANE)
    if value is None:
        return None
    try:
        return DataplaneMode(value)
    except ValueError:
        allowed = ", ".join(m.value for m in DataplaneMode)
        raise InvalidObject(
            "Service",
            key,
            f"metadata.annotations[{ANNOTATION_DATAPLANE}]",
            f"{value!r}: one of {allowed}",
        ) from None


def _protocol(value: object, key: str, field: str) -> L4Protocol:
    try:
        return L4Protocol(str(value))
    except ValueError:
        raise InvalidObject(
            "Service", key, field, f'{value!r}: supported values: "TCP", "UDP", "SCTP"'
        ) from None


def _port_number(value: object, key: str, field: str, kind: str = "Service") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidObject(kind, key, field, f"{value!r} is not a port number")
    if not 0 < value < 65536:
        raise InvalidObject(kind, key, field, f"{value}: must be between 1 and 65535, inclusive")
    return value


def _ip(value: object, key: str, field: str, kind: str = "Service") -> str:
    if not isinstance(value, str):
        raise InvalidObject(kind, key, field, f"{value!r} is not an IP address")
    try:
        return parse_ip(value)[1]
    except ValueError:
        raise InvalidObject(kind, key, field, f"{value!r} is not a valid IP address") from None


def _mapping(obj: Mapping[str, Any], field: str, kind: str, key: str) -> Mapping[str, Any]:
    value = obj.get(field) if isinstance(obj, Mapping) else None
    if not isinstance(value, Mapping):
        raise InvalidObject(kind, key, field, "missing or not an object")
    return value


def _str_field(obj: Mapping[str, Any], field: str, kind: str, key: str, path: str) -> str:
    value = obj.get(field)
    if not isinstance(value, str) or not value:
        raise InvalidObject(kind, key, path, "required")
    return value


def _list(obj: Mapping[str, Any], field: str, key: str, kind: str = "Service") -> list[Any]:
    value = obj.get(field)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidObject(kind, key, f"spec.{field}", "must be a list")
    return value
