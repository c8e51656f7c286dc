"""Discovery documents (`/version`, `/api`, `/api/v1`, `/apis`, `/apis/{group}/{version}`).

Pure functions over the list of served `ResourceType`s, reproducing the real server's quirks:
`/api` and `/api/v1` have no `apiVersion` field while group documents do, subresources appear as
`pods/status` with an empty `singularName`, and the aggregated form (`APIGroupDiscoveryList`) is
served when a client such as kubectl 1.28+ asks for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rapproxy.testing.apiserver.resources import ResourceType

JsonObject = dict[str, Any]

VERSION_INFO: JsonObject = {
    "major": "1",
    "minor": "28",
    "gitVersion": "v1.28.7",
    "gitCommit": "c8dcb00be9961ec36d141d2e4103f85f92bcf291",
    "gitTreeState": "clean",
    "buildDate": "2024-02-14T10:32:39Z",
    "goVersion": "go1.21.7",
    "compiler": "gc",
    "platform": "linux/amd64",
}
SUBRESOURCE_VERBS = ["get", "patch", "update"]


def api_versions(server_address: str) -> JsonObject:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ],
    }


def _resource_entries(rt: ResourceType) -> list[JsonObject]:
    entry: JsonObject = {
        "name": rt.plural,
        "singularName": rt.singular,
        "namespaced": rt.namespaced,
        "kind": rt.kind,
        "verbs": list(rt.verbs),
    }
    if rt.short_names:
        entry["shortNames"] = list(rt.short_names)
    if rt.categories:
        entry["categories"] = list(rt.categories)
    if rt.storage_hash:
        entry["storageVersionHash"] = rt.storage_hash
    entries = [entry]
    if rt.status_subresource:
        entries.append(
            {
                "name": f"{rt.plural}/status",
                "singularName": "",
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": SUBRESOURCE_VERBS,
            }
        )
    if "binding" in rt.extra_subresources:
        entries.append(
            {
                "name": f"{rt.plural}/binding",
                "singularName": "",
                "namespaced": rt.namespaced,
                "kind": "Binding",
                "verbs": ["create"],
            }
        )
    return entries


def resource_list(group_version: str, types: Iterable[ResourceType]) -> JsonObject:
    entries: list[JsonObject] = []
    for rt in sorted(types, key=lambda t: t.plural):
        entries += _resource_entries(rt)
    entries.sort(key=lambda e: e["name"])
    body: JsonObject = {"kind": "APIResourceList"}
    if "/" in group_version:
        body["apiVersion"] = "v1"
    body["groupVersion"] = group_version
    body["resources"] = entries
    return body


def groups(types: Iterable[ResourceType]) -> dict[str, list[str]]:
    """Group name → served versions (newest registration last)."""
    out: dict[str, list[str]] = {}
    for rt in types:
        if not rt.group:
            continue
        versions = out.setdefault(rt.group, [])
        if rt.version not in versions:
            versions.append(rt.version)
    return out


def _preferred(versions: list[str]) -> str:
    return sorted(versions, key=_version_priority)[0]


def _version_priority(version: str) -> tuple[int, int, int]:
    """Kubernetes version priority: GA > beta > alpha, higher numbers first."""
    import re

    m = re.match(r"^v(\d+)(?:(alpha|beta)(\d+))?$", version)
    if not m:
        return (3, 0, 0)
    major, stage, minor = int(m.group(1)), m.group(2), int(m.group(3) or 0)
    rank = {None: 0, "beta": 1, "alpha": 2}[stage]
    return (rank, -major, -minor)


def group_list(types: Iterable[ResourceType]) -> JsonObject:
    entries = []
    for name, versions in sorted(groups(types).items()):
        ordered = sorted(versions, key=_version_priority)
        entries.append(
            {
                "name": name,
                "versions": [{"groupVersion": f"{name}/{v}", "version": v} for v in ordered],
                "preferredVersion": {
                    "groupVersion": f"{name}/{_preferred(versions)}",
                    "version": _preferred(versions),
                },
            }
        )
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": entries}


def api_group(name: str, types: Iterable[ResourceType]) -> JsonObject | None:
    versions = groups(types).get(name)
    if not versions:
        return None
    ordered = sorted(versions, key=_version_priority)
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": name,
        "versions": [{"groupVersion": f"{name}/{v}", "version": v} for v in ordered],
        "preferredVersion": {"groupVersion": f"{name}/{ordered[0]}", "version": ordered[0]},
    }


def _aggregated_resource(rt: ResourceType) -> JsonObject:
    entry: JsonObject = {
        "resource": rt.plural,
        "responseKind": {"group": "", "version": "", "kind": rt.kind},
        "scope": "Namespaced" if rt.namespaced else "Cluster",
        "singularResource": rt.singular,
        "verbs": list(rt.verbs),
    }
    if rt.short_names:
        entry["shortNames"] = list(rt.short_names)
    if rt.categories:
        entry["categories"] = list(rt.categories)
    subresources = []
    if rt.status_subresource:
        subresources.append(
            {
                "subresource": "status",
                "responseKind": {"group": "", "version": "", "kind": rt.kind},
                "verbs": SUBRESOURCE_VERBS,
            }
        )
    if "binding" in rt.extra_subresources:
        subresources.append(
            {
                "subresource": "binding",
                "responseKind": {"group": "", "version": "", "kind": "Binding"},
                "verbs": ["create"],
            }
        )
    if subresources:
        entry["subresources"] = subresources
    return entry


def aggregated(types: list[ResourceType], *, core: bool, version: str = "v2beta1") -> JsonObject:
    """`APIGroupDiscoveryList` for `/api` (core) or `/apis` (named groups)."""
    items = []
    if core:
        core_types = [t for t in types if not t.group]
        items.append(
            {
                "metadata": {"creationTimestamp": None},
                "versions": [
                    {
                        "version": "v1",
                        "resources": [
                            _aggregated_resource(t)
                            for t in sorted(core_types, key=lambda t: t.plural)
                        ],
                        "freshness": "Current",
                    }
                ],
            }
        )
    else:
        for name, versions in sorted(groups(types).items()):
            version_entries = []
            for group_version in sorted(versions, key=_version_priority):
                served = [t for t in types if t.group == name and t.version == group_version]
                version_entries.append(
                    {
                        "version": group_version,
                        "resources": [
                            _aggregated_resource(t) for t in sorted(served, key=lambda t: t.plural)
                        ],
                        "freshness": "Current",
                    }
                )
            items.append(
                {"metadata": {"name": name, "creationTimestamp": None}, "versions": version_entries}
            )
    return {
        "kind": "APIGroupDiscoveryList",
        "apiVersion": f"apidiscovery.k8s.io/{version}",
        "metadata": {},
        "items": items,
    }


def aggregated_version(accept: str) -> str | None:
    """The aggregated-discovery version the client prefers (`v2` or `v2beta1`), if any."""
    for part in accept.split(","):
        params = {p.strip() for p in part.split(";")[1:]}
        if "as=APIGroupDiscoveryList" in params and "g=apidiscovery.k8s.io" in params:
            for version in ("v2", "v2beta1"):
                if f"v={version}" in params:
                    return version
    return None


def aggregated_content_type(version: str) -> str:
    return f"application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList"
