"""What the emulated server serves: one `ResourceType` per REST resource.

A resource type says everything the generic REST machinery needs to know that differs between
kinds: its URL coordinates (group/version/plural), whether it is namespaced, whether it has a
status subresource and a `metadata.generation`, which field selectors it accepts, what an
empty object of the kind looks like (for BOOKMARK events) and what a DELETE returns. Built-in
types are listed here; custom resources get a `ResourceType` built from their CRD (see crd.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

JsonObject = dict[str, Any]

STANDARD_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True, slots=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    storage_hash: str = ""
    status_subresource: bool = False
    has_generation: bool = False
    # DELETE of an object gone at once returns the object (Pods, Services) instead of a Status.
    delete_returns_object: bool = False
    extra_field_selectors: tuple[str, ...] = ()
    bookmark_body: JsonObject = field(default_factory=dict)
    extra_subresources: tuple[str, ...] = ()  # e.g. "binding"
    custom: bool = False
    verbs: tuple[str, ...] = STANDARD_VERBS
    # PUT requires metadata.resourceVersion (Leases) instead of an unconditional update.
    put_requires_rv: bool = False
    # PUT of a missing object creates it (Leases).
    put_creates: bool = False

    @property
    def key(self) -> str:
        """Storage key: `group/version/plural` (core types: `v1/plural`)."""
        return f"{self.api_version}/{self.plural}"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def field_selectors(self) -> tuple[str, ...]:
        base: tuple[str, ...] = ("metadata.name",)
        if self.namespaced:
            base = (*base, "metadata.namespace")
        return base + self.extra_field_selectors

    def empty_object(self, resource_version: str) -> JsonObject:
        """The kind's zero value carrying only a resourceVersion: a BOOKMARK's object."""
        body: JsonObject = {"kind": self.kind, "apiVersion": self.api_version}
        if self.custom:
            body = {"apiVersion": self.api_version, "kind": self.kind}
            body["metadata"] = {"resourceVersion": resource_version}
            return body
        body["metadata"] = {"resourceVersion": resource_version, "creationTimestamp": None}
        body.update(_json_copy(self.bookmark_body))
        return body


def _json_copy(value: JsonObject) -> JsonObject:
    import json

    copied: JsonObject = json.loads(json.dumps(value))
    return copied


_NODE_STATUS_ZERO: JsonObject = {
    "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
    "nodeInfo": {
        "machineID": "",
        "systemUUID": "",
        "bootID": "",
        "kernelVersion": "",
        "osImage": "",
        "containerRuntimeVersion": "",
        "kubeletVersion": "",
        "kubeProxyVersion": "",
        "operatingSystem": "",
        "architecture": "",
    },
}

NAMESPACES = ResourceType(
    "",
    "v1",
    "namespaces",
    "Namespace",
    False,
    "namespace",
    ("ns",),
    (),
    "Q3oi5N2YM8M=",
    status_subresource=True,
    bookmark_body={"spec": {}, "status": {}},
    extra_field_selectors=("status.phase",),
    verbs=("create", "delete", "get", "list", "patch", "update", "watch"),
    delete_returns_object=True,
)
PODS = ResourceType(
    "",
    "v1",
    "pods",
    "Pod",
    True,
    "pod",
    ("po",),
    ("all",),
    "xPOwRZ+Yhw8=",
    status_subresource=True,
    delete_returns_object=True,
    extra_field_selectors=(
        "spec.nodeName",
        "status.phase",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "status.podIP",
        "status.nominatedNodeName",
        "spec.hostNetwork",
    ),
    bookmark_body={"spec": {"containers": None}, "status": {}},
    extra_subresources=("binding",),
)
SERVICES = ResourceType(
    "",
    "v1",
    "services",
    "Service",
    True,
    "service",
    ("svc",),
    ("all",),
    "0/CO1lhkEBI=",
    status_subresource=True,
    delete_returns_object=True,
    bookmark_body={"spec": {}, "status": {"loadBalancer": {}}},
)
NODES = ResourceType(
    "",
    "v1",
    "nodes",
    "Node",
    False,
    "node",
    ("no",),
    (),
    "XwShjMxG9Fs=",
    status_subresource=True,
    extra_field_selectors=("spec.unschedulable",),
    bookmark_body={"spec": {}, "status": _NODE_STATUS_ZERO},
)
EVENTS = ResourceType(
    "",
    "v1",
    "events",
    "Event",
    True,
    "event",
    ("ev",),
    (),
    "r2yiGXH7wu8=",
    bookmark_body={
        "involvedObject": {},
        "source": {},
        "firstTimestamp": None,
        "lastTimestamp": None,
        "eventTime": None,
        "reportingComponent": "",
        "reportingInstance": "",
    },
    extra_field_selectors=(
        "involvedObject.kind",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.namespace",
        "reason",
        "source",
        "type",
    ),
)
SECRETS = ResourceType(
    "",
    "v1",
    "secrets",
    "Secret",
    True,
    "secret",
    (),
    (),
    "S6u1pOWzb84=",
    extra_field_selectors=("type",),
)
CONFIGMAPS = ResourceType(
    "",
    "v1",
    "configmaps",
    "ConfigMap",
    True,
    "configmap",
    ("cm",),
    (),
    "qFsyl6wFWjQ=",
)
ENDPOINTS = ResourceType(
    "",
    "v1",
    "endpoints",
    "Endpoints",
    True,
    "endpoints",
    ("ep",),
    (),
    "fWeeMqaN/OA=",
)
SERVICE_ACCOUNTS = ResourceType(
    "",
    "v1",
    "serviceaccounts",
    "ServiceAccount",
    True,
    "serviceaccount",
    ("sa",),
    (),
    "pbx9ZvyFpBE=",
)
ENDPOINT_SLICES = ResourceType(
    "discovery.k8s.io",
    "v1",
    "endpointslices",
    "EndpointSlice",
    True,
    "endpointslice",
    (),
    (),
    "Nx3SIv6I0mE=",
    has_generation=True,
    bookmark_body={"addressType": "", "endpoints": None, "ports": None},
)
LEASES = ResourceType(
    "coordination.k8s.io",
    "v1",
    "leases",
    "Lease",
    True,
    "lease",
    (),
    (),
    "gqkMMb/YqFM=",
    bookmark_body={"spec": {}},
    put_requires_rv=True,
    put_creates=True,
)
EVENTS_V1 = ResourceType(
    "events.k8s.io",
    "v1",
    "events",
    "Event",
    True,
    "event",
    ("ev",),
    (),
    "r2yiGXH7wu8=",
    bookmark_body={"eventTime": None, "reportingController": "", "reportingInstance": ""},
)
CRDS = ResourceType(
    "apiextensions.k8s.io",
    "v1",
    "customresourcedefinitions",
    "CustomResourceDefinition",
    False,
    "customresourcedefinition",
    ("crd", "crds"),
    ("api-extensions",),
    "jfWCUB31mvA=",
    status_subresource=True,
    has_generation=True,
    bookmark_body={
        "spec": {"group": "", "names": {"plural": "", "kind": ""}, "scope": "", "versions": None},
        "status": {
            "conditions": None,
            "acceptedNames": {"plural": "", "kind": ""},
            "storedVersions": None,
        },
    },
)

# Stored and served without controllers, so manifests that contain them (RBAC, DaemonSets)
# can be applied as they are.
APPS_TYPES = tuple(
    ResourceType(
        "apps",
        "v1",
        plural,
        kind,
        True,
        kind.lower(),
        short,
        ("all",),
        status_subresource=True,
        has_generation=True,
        bookmark_body={"spec": {}, "status": {}},
    )
    for plural, kind, short in (
        ("deployments", "Deployment", ("deploy",)),
        ("daemonsets", "DaemonSet", ("ds",)),
        ("replicasets", "ReplicaSet", ("rs",)),
        ("statefulsets", "StatefulSet", ("sts",)),
    )
)
RBAC_TYPES = tuple(
    ResourceType(
        "rbac.authorization.k8s.io",
        "v1",
        plural,
        kind,
        namespaced,
        kind.lower(),
        bookmark_body={},
    )
    for plural, kind, namespaced in (
        ("roles", "Role", True),
        ("rolebindings", "RoleBinding", True),
        ("clusterroles", "ClusterRole", False),
        ("clusterrolebindings", "ClusterRoleBinding", False),
    )
)

BUILTIN_TYPES: tuple[ResourceType, ...] = (
    NAMESPACES,
    PODS,
    SERVICES,
    NODES,
    EVENTS,
    SECRETS,
    CONFIGMAPS,
    ENDPOINTS,
    SERVICE_ACCOUNTS,
    ENDPOINT_SLICES,
    LEASES,
    EVENTS_V1,
    CRDS,
    *APPS_TYPES,
    *RBAC_TYPES,
)
