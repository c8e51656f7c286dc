"""Validation of built-in kinds: the 422 causes a real server reports for common mistakes.

Pure: each validator returns a list of `Cause`s (empty when the object is fine). Covered: object
names (DNS-1123 subdomain), Service ports (range, names in multi-port Services, protocols),
Pods (containers required; updates may only change images and a few fields), EndpointSlices
(no loopback/link-local addresses, port ranges) and finalizers on objects under deletion.
Anything not covered is accepted, as a lenient emulator should be.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from rapproxy.testing.apiserver.errors import (
    Cause,
    forbidden,
    invalid_value,
    not_supported,
    required,
)

JsonObject = dict[str, Any]

_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SUBDOMAIN_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
LABEL_MESSAGE = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
PROTOCOLS = ["SCTP", "TCP", "UDP"]
# Kinds whose names must be DNS-1123 labels rather than subdomains.
LABEL_NAMED_KINDS = {"Namespace", "Service"}


def validate_name(kind: str, name: str) -> list[Cause]:
    if kind in LABEL_NAMED_KINDS:
        if not _DNS1123_LABEL.match(name) or len(name) > 63:
            return [invalid_value("metadata.name", name, LABEL_MESSAGE)]
        return []
    if not _DNS1123_SUBDOMAIN.match(name) or len(name) > 253:
        return [invalid_value("metadata.name", name, SUBDOMAIN_MESSAGE)]
    return []


def _check_port(field: str, value: Any) -> list[Cause]:
    if not isinstance(value, int) or not 1 <= value <= 65535:
        return [invalid_value(field, value, "must be between 1 and 65535, inclusive")]
    return []


def validate_service(obj: JsonObject) -> list[Cause]:
    causes: list[Cause] = []
    spec = obj.get("spec") or {}
    ports = spec.get("ports") or []
    if not ports and spec.get("type") != "ExternalName" and spec.get("clusterIP") != "None":
        causes.append(required("spec.ports"))
    for i, port in enumerate(ports):
        field = f"spec.ports[{i}]"
        if len(ports) > 1 and not port.get("name"):
            causes.append(required(f"{field}.name"))
        causes += _check_port(f"{field}.port", port.get("port"))
        proto = port.get("protocol", "TCP")
        if proto not in PROTOCOLS:
            causes.append(not_supported(f"{field}.protocol", proto, PROTOCOLS))
        target = port.get("targetPort")
        if isinstance(target, int) and target != 0:
            causes += _check_port(f"{field}.targetPort", target)
    return causes


def validate_pod(obj: JsonObject) -> list[Cause]:
    spec = obj.get("spec") or {}
    causes: list[Cause] = []
    containers = spec.get("containers") or []
    if not containers:
        causes.append(required("spec.containers"))
    for group in ("initContainers", "containers"):
        for i, container in enumerate(spec.get(group) or []):
            if not container.get("name"):
                causes.append(required(f"spec.{group}[{i}].name"))
            if not container.get("image"):
                causes.append(required(f"spec.{group}[{i}].image"))
            for j, port in enumerate(container.get("ports") or []):
                causes += _check_port(
                    f"spec.{group}[{i}].ports[{j}].containerPort", port.get("containerPort")
                )
    return causes


# Pod spec fields an update may change (everything else is immutable once created).
_MUTABLE_POD_SPEC = {"activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds"}


def validate_pod_update(new: JsonObject, old: JsonObject) -> list[Cause]:
    new_spec, old_spec = new.get("spec") or {}, old.get("spec") or {}
    for group in ("containers", "initContainers"):
        new_names = [c.get("name") for c in new_spec.get(group) or []]
        old_names = [c.get("name") for c in old_spec.get(group) or []]
        if len(new_names) != len(old_names) or (
            group == "containers" and sorted(map(str, new_names)) != sorted(map(str, old_names))
        ):
            return [forbidden(f"spec.{group}", "pod updates may not add or remove containers")]

    def comparable(spec: JsonObject) -> JsonObject:
        out = {k: v for k, v in spec.items() if k not in _MUTABLE_POD_SPEC}
        for group in ("containers", "initContainers"):
            if group in out:
                out[group] = [{k: v for k, v in c.items() if k != "image"} for c in out[group]]
        # The binding subresource and the scheduler set nodeName exactly once.
        if not old_spec.get("nodeName"):
            out.pop("nodeName", None)
        return out

    if comparable(new_spec) != comparable(old_spec):
        return [
            forbidden(
                "spec",
                "pod updates may not change fields other than `spec.containers[*].image`,"
                "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,"
                "`spec.tolerations` (only additions to existing tolerations),"
                "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was "
                "previously negative)",
            )
        ]
    return []


def validate_endpoint_slice(obj: JsonObject) -> list[Cause]:
    causes: list[Cause] = []
    address_type = obj.get("addressType")
    if not address_type:
        causes.append(required("addressType"))
    elif address_type not in ("IPv4", "IPv6", "FQDN"):
        causes.append(not_supported("addressType", address_type, ["FQDN", "IPv4", "IPv6"]))
    for i, endpoint in enumerate(obj.get("endpoints") or []):
        addresses = endpoint.get("addresses") or []
        if not addresses:
            causes.append(required(f"endpoints[{i}].addresses"))
        for j, address in enumerate(addresses):
            field = f"endpoints[{i}].addresses[{j}]"
            if address_type == "FQDN":
                continue
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                causes.append(invalid_value(field, address, "must be a valid IP address"))
                continue
            if ip.is_loopback:
                causes.append(
                    invalid_value(
                        field, address, "may not be in the loopback range (127.0.0.0/8, ::1/128)"
                    )
                )
            elif ip.is_link_local:
                causes.append(
                    invalid_value(
                        field,
                        address,
                        "may not be in the link-local range (169.254.0.0/16, fe80::/10)",
                    )
                )
    for i, port in enumerate(obj.get("ports") or []):
        if port.get("port") is not None:
            causes += _check_port(f"ports[{i}].port", port.get("port"))
        proto = port.get("protocol", "TCP")
        if proto not in PROTOCOLS:
            causes.append(not_supported(f"ports[{i}].protocol", proto, PROTOCOLS))
    return causes


def validate_new_finalizers(new: JsonObject, old: JsonObject) -> list[Cause]:
    """Objects being deleted may lose finalizers but not gain new ones."""
    if not (old.get("metadata") or {}).get("deletionTimestamp"):
        return []
    before = set((old["metadata"].get("finalizers")) or [])
    added = [f for f in (new["metadata"].get("finalizers") or []) if f not in before]
    if not added:
        return []
    rendered = "[]string{" + ", ".join(f'"{f}"' for f in added) + "}"
    cause = forbidden(
        "metadata.finalizers",
        f"no new finalizers can be added if the object is being deleted, found new finalizers "
        f"{rendered}",
    )
    # The real server reports this cause twice (metadata and object validation both run).
    return [cause, cause]


def validate_object(kind: str, obj: JsonObject) -> list[Cause]:
    if kind == "Service":
        return validate_service(obj)
    if kind == "Pod":
        return validate_pod(obj)
    if kind == "EndpointSlice":
        return validate_endpoint_slice(obj)
    return []


def validate_update(kind: str, new: JsonObject, old: JsonObject) -> list[Cause]:
    causes = validate_new_finalizers(new, old)
    if kind == "Pod":
        causes += validate_pod_update(new, old)
    else:
        causes += validate_object(kind, new)
    return causes
