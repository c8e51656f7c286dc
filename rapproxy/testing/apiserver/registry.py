"""REST semantics of the emulated server: what create/get/list/update/patch/delete/bind do.

The registry sits between the HTTP handlers (which only decode requests and encode responses)
and the `Store` (which only persists and publishes). It owns the rules a client can observe:
defaults, validation, `generateName`, `metadata.generation`, status-subresource splitting,
optimistic concurrency, no-op writes that keep the resourceVersion, graceful deletion,
finalizers, DeleteOptions, bindings, and CRDs becoming served resources. Controllers in the
control plane call it directly instead of going through HTTP, so they obey the same rules.
"""

from __future__ import annotations

import base64
import builtins
import ipaddress
import json
import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rapproxy.testing.apiserver import defaults
from rapproxy.testing.apiserver.crd import (
    SchemaProcessor,
    established_status,
    printer_columns,
    resource_types_for,
    version_schema,
)
from rapproxy.testing.apiserver.errors import (
    ApiError,
    Cause,
    already_exists,
    bad_request,
    conflict,
    invalid,
    invalid_value,
    not_found,
    patch_rejected,
    required,
    status_failure,
    unsupported_media_type,
)
from rapproxy.testing.apiserver.patch import (
    PatchConflict,
    PatchError,
    json_patch,
    merge_patch,
    strategic_merge_patch,
)
from rapproxy.testing.apiserver.resources import CRDS, LEASES, NAMESPACES, NODES, PODS, ResourceType
from rapproxy.testing.apiserver.selectors import SelectorError, selector_predicate
from rapproxy.testing.apiserver.store import Store, json_copy
from rapproxy.testing.apiserver.validation import (
    validate_name,
    validate_object,
    validate_update,
)

JsonObject = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

_MICROTIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")
_SERVER_META = ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds")


@dataclass(frozen=True, slots=True)
class DeleteOptions:
    grace_period_seconds: int | None = None
    propagation_policy: str | None = None  # Background | Foreground | Orphan
    precondition_uid: str | None = None
    precondition_resource_version: str | None = None

    @classmethod
    def parse(cls, body: Any, query: dict[str, str]) -> DeleteOptions:
        body = body if isinstance(body, dict) else {}
        grace = body.get("gracePeriodSeconds")
        if "gracePeriodSeconds" in query:
            grace = int(query["gracePeriodSeconds"])
        policy = query.get("propagationPolicy") or body.get("propagationPolicy")
        orphan = query.get("orphanDependents", body.get("orphanDependents"))
        if policy is None and orphan in (True, "true"):
            policy = "Orphan"
        pre = body.get("preconditions") or {}
        return cls(
            None if grace is None else int(grace),
            policy,
            pre.get("uid"),
            pre.get("resourceVersion"),
        )


@dataclass(slots=True)
class WriteResult:
    """The object a write returns, the HTTP code, and `Warning` header values."""

    body: JsonObject
    code: int = 200
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ListOptions:
    label_selector: str | None = None
    field_selector: str | None = None
    limit: int | None = None
    continue_token: str | None = None
    resource_version: str | None = None
    resource_version_match: str | None = None


class Registry:
    """The emulated server's API semantics over one `Store`."""

    def __init__(self, store: Store, service_cidr: str = "10.96.0.0/16") -> None:
        self.store = store
        self.service_network = ipaddress.ip_network(service_cidr)
        self._used_ips: set[str] = set()
        self._schemas: dict[str, SchemaProcessor] = {}
        self._columns: dict[str, list[JsonObject]] = {}
        self._seed()

    # -- bootstrap ------------------------------------------------------------------------
    def _seed(self) -> None:
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            if self.store.get(NAMESPACES, "", ns) is None:
                self.create(NAMESPACES, "", {"metadata": {"name": ns}})
        from rapproxy.testing.apiserver.resources import SERVICES

        if self.store.get(SERVICES, "default", "kubernetes") is None:
            first = str(self.service_network.network_address + 1)
            self.create(
                SERVICES,
                "default",
                {
                    "metadata": {
                        "name": "kubernetes",
                        "labels": {"component": "apiserver", "provider": "kubernetes"},
                    },
                    "spec": {
                        "clusterIP": first,
                        "ports": [{"name": "https", "port": 443, "targetPort": 6443}],
                    },
                },
            )

    # -- lookups --------------------------------------------------------------------------
    def get(self, rt: ResourceType, namespace: str, name: str) -> JsonObject:
        obj = self.store.get(rt, namespace, name)
        if obj is None:
            raise not_found(rt.plural, rt.group, name)
        return obj

    def columns(self, rt: ResourceType) -> builtins.list[JsonObject]:
        return self._columns.get(rt.key, [])

    def list(self, rt: ResourceType, namespace: str | None, options: ListOptions) -> JsonObject:
        """A list response body as a dict (see `list_page` for the stored items themselves)."""
        meta, selected = self.list_page(rt, namespace, options)
        if rt.custom:
            return {
                "apiVersion": rt.api_version,
                "items": selected,
                "kind": rt.list_kind,
                "metadata": meta,
            }
        return {
            "kind": rt.list_kind,
            "apiVersion": rt.api_version,
            "metadata": meta,
            "items": [_strip_type(o) for o in selected],
        }

    def list_page(
        self, rt: ResourceType, namespace: str | None, options: ListOptions
    ) -> tuple[JsonObject, builtins.list[JsonObject]]:
        """The list's metadata and the selected stored objects (shared: do not mutate)."""
        try:
            accepts = selector_predicate(
                options.label_selector, options.field_selector, rt.field_selectors
            )
        except SelectorError as exc:
            raise bad_request(str(exc)) from exc
        revision = self.store.revision
        if options.resource_version_match == "Exact" and options.resource_version:
            revision = int(options.resource_version)
            items = self.store.list_at(rt, namespace, revision)
        else:
            items = self.store.list(rt, namespace)
            if options.resource_version:
                # Served from the watch cache: its revision is the newest it has seen for
                # this resource, not etcd's global one.
                revision = self.store.latest_revision(rt) or revision
        start_after: tuple[str, str] | None = None
        if options.continue_token:
            try:
                token = json.loads(base64.urlsafe_b64decode(options.continue_token.encode()))
                revision, start_after = int(token["rv"]), (token["ns"], token["name"])
            except (ValueError, KeyError, TypeError) as exc:
                raise bad_request(f"continue key is not valid: {exc}") from exc
        selected = [o for o in items if accepts(o)]
        if start_after is not None:
            selected = [o for o in selected if _key(o) > start_after]
        meta: JsonObject = {"resourceVersion": str(revision)}
        if options.limit and 0 < options.limit < len(selected):
            page, rest = selected[: options.limit], len(selected) - options.limit
            last = _key(page[-1])
            token_json = json.dumps({"rv": revision, "ns": last[0], "name": last[1]})
            meta["continue"] = base64.urlsafe_b64encode(token_json.encode()).decode()
            if not options.label_selector and not options.field_selector:
                meta["remainingItemCount"] = rest
            selected = page
        if rt.custom:
            meta = {"continue": meta.get("continue", ""), **meta}
        return meta, selected

    # -- create ---------------------------------------------------------------------------
    def create(
        self,
        rt: ResourceType,
        namespace: str,
        body: Any,
        *,
        field_validation: str = "Warn",
    ) -> WriteResult:
        obj = self._decode(rt, body)
        meta = obj.setdefault("metadata", {})
        if rt.namespaced:
            if meta.get("namespace") and meta["namespace"] != namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request"
                )
            meta["namespace"] = namespace
            self._require_namespace(namespace)
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = defaults.generated_name(meta["generateName"])
            else:
                raise invalid(
                    rt.kind,
                    rt.group,
                    "",
                    [
                        Cause(
                            "FieldValueRequired",
                            "Required value: name or generateName is required",
                            "metadata.name",
                        )
                    ],
                )
        name = meta["name"]
        if self.store.get(rt, namespace, name) is not None:
            raise already_exists(rt.plural, rt.group, name)
        for key in (
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
            "selfLink",
        ):
            meta.pop(key, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = defaults.now_rfc3339()
        if rt.has_generation:
            meta["generation"] = 1
        else:
            meta.pop("generation", None)
        warnings: list[str] = []
        causes = validate_name(rt.kind, name)
        self._default_on_create(rt, obj)
        if rt.custom:
            if rt.status_subresource:
                obj.pop("status", None)
            warnings, schema_causes = self._apply_schema(rt, obj, field_validation)
            causes += schema_causes
        causes += validate_object(rt.kind, obj)
        self._check_micro_times(rt, obj)
        if causes:
            raise invalid(rt.kind, rt.group, name, causes)
        stored = self.store.persist(rt, _ordered(rt, obj))
        if rt is CRDS:
            self._establish(stored)
        return WriteResult(stored, 201, warnings)

    def _decode(self, rt: ResourceType, body: Any) -> JsonObject:
        if not isinstance(body, dict):
            raise bad_request(f"the object provided is unrecognized (must be of type {rt.kind})")
        kind = body.get("kind")
        if kind and kind != rt.kind:
            version = str(body.get("apiVersion", rt.api_version)).rsplit("/", 1)[-1]
            raise bad_request(
                f'{kind} in version "{version}" cannot be handled as a {rt.kind}: converting '
                f"({version}.{kind}) to ({rt.group.split('.')[0] or 'core'}.{rt.kind}): "
                "unknown conversion"
            )
        obj = json_copy(body)
        obj["kind"] = rt.kind
        obj["apiVersion"] = rt.api_version
        if not isinstance(obj.get("metadata"), dict):
            obj["metadata"] = {}
        return obj

    def _require_namespace(self, namespace: str) -> None:
        if self.store.get(NAMESPACES, "", namespace) is None:
            raise not_found("namespaces", "", namespace)

    def _default_on_create(self, rt: ResourceType, obj: JsonObject) -> None:
        if rt is NAMESPACES:
            defaults.default_namespace(obj)
        elif rt.kind == "Service" and not rt.group:
            defaults.default_service(obj, self._allocate_cluster_ip)
            ip = (obj.get("spec") or {}).get("clusterIP")
            if ip and ip != "None":
                self._used_ips.add(ip)
        elif rt is PODS:
            defaults.default_pod(obj)
            defaults.normalize_pod_status(obj)
        elif rt is NODES:
            defaults.default_node(obj)
        elif rt.kind == "EndpointSlice":
            defaults.default_endpoint_slice(obj)
        elif rt is CRDS:
            defaults.default_crd(obj)

    def _allocate_cluster_ip(self) -> str:
        net = self.service_network
        for _ in range(1000):
            candidate = str(net.network_address + random.randint(10, net.num_addresses - 2))
            if candidate not in self._used_ips:
                self._used_ips.add(candidate)
                return candidate
        raise ApiError(status_failure(500, "InternalError", "no ClusterIPs left", {}))

    def _apply_schema(
        self, rt: ResourceType, obj: JsonObject, field_validation: str
    ) -> tuple[builtins.list[str], builtins.list[Cause]]:
        processor = self._schemas.get(rt.key)
        if processor is None:
            return [], []
        result = processor.process(obj)
        if result.pruned and field_validation == "Strict":
            listed = ", ".join(f'unknown field "{p}"' for p in result.pruned)
            raise bad_request(
                f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: '
                f"strict decoding error: {listed}"
            )
        warnings = []
        if field_validation != "Ignore":
            warnings = [f'unknown field "{p}"' for p in result.pruned]
        return warnings, result.causes

    def _check_micro_times(self, rt: ResourceType, obj: JsonObject) -> None:
        if rt is not LEASES:
            return
        for key in ("acquireTime", "renewTime"):
            value = (obj.get("spec") or {}).get(key)
            if value is not None and not _MICROTIME.match(str(value)):
                raise bad_request(
                    f'Lease in version "v1" cannot be handled as a Lease: parsing time '
                    f'"{value}" as "2006-01-02T15:04:05.000000Z07:00": cannot parse '
                    f'"{str(value)[19:]}" as ".000000"'
                )

    # -- CRDs -----------------------------------------------------------------------------
    def _establish(self, crd: JsonObject) -> None:
        updated = json_copy(crd)
        updated["status"] = established_status(updated, defaults.now_rfc3339())
        self.store.persist(CRDS, updated)
        self._serve_crd(updated)

    def _serve_crd(self, crd: JsonObject) -> None:
        for rt in resource_types_for(crd):
            self.store.register(rt)
            self._schemas[rt.key] = SchemaProcessor(version_schema(crd, rt.version))
            self._columns[rt.key] = printer_columns(crd, rt.version)

    def _unserve_crd(self, crd: JsonObject) -> None:
        for rt in resource_types_for(crd):
            served = self.store.lookup(rt.group, rt.version, rt.plural)
            if served is None:
                continue
            for obj in self.store.list(served):
                ns, name = _key(obj)
                self.store.remove(served, ns, name)
            self.store.unregister(served)
            self._schemas.pop(rt.key, None)
            self._columns.pop(rt.key, None)

    # -- update / patch -------------------------------------------------------------------
    def update(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        body: Any,
        *,
        subresource: str | None = None,
        field_validation: str = "Warn",
    ) -> WriteResult:
        if not isinstance(body, dict):
            raise bad_request(f"the object provided is unrecognized (must be of type {rt.kind})")
        meta = body.get("metadata") or {}
        if meta.get("name") and meta["name"] != name:
            raise bad_request(
                f"the name of the object ({meta['name']}) does not match the name on the URL "
                f"({name})"
            )
        if rt.namespaced and meta.get("namespace") and meta["namespace"] != namespace:
            raise bad_request(
                "the namespace of the provided object does not match the namespace sent on the "
                "request"
            )
        self._check_micro_times(rt, body)
        old = self.store.get(rt, namespace, name)
        if old is None:
            if rt.put_creates and subresource is None:
                created = json_copy(body)
                created.setdefault("metadata", {})["name"] = name
                return self.create(rt, namespace, created, field_validation=field_validation)
            raise not_found(rt.plural, rt.group, name)
        rv = meta.get("resourceVersion")
        if not rv and rt.put_requires_rv and subresource is None:
            cause = invalid_value("metadata.resourceVersion", 0, "must be specified for an update")
            cause = Cause(cause.reason, cause.message.replace("0:", "0x0:", 1), cause.field)
            raise invalid(rt.plural, rt.group, name, [cause]) from None
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise conflict(rt.plural, rt.group, name)
        new = self._decode(rt, body)
        return self._commit(rt, old, new, subresource, field_validation)

    def patch(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        content_type: str,
        raw: bytes,
        *,
        subresource: str | None = None,
        field_validation: str = "Warn",
    ) -> WriteResult:
        media = content_type.split(";", maxsplit=1)[0].strip().lower()
        if media == STRATEGIC_PATCH and rt.custom:
            raise unsupported_media_type(
                "the body of the request was in an unknown format - accepted media types "
                "include: application/json-patch+json, application/merge-patch+json, "
                "application/apply-patch+yaml"
            )
        if media not in (MERGE_PATCH, STRATEGIC_PATCH, JSON_PATCH):
            raise unsupported_media_type()
        try:
            document = json.loads(raw or b"null")
        except ValueError as exc:
            raise bad_request(f"error decoding patch: {go_json_error(exc)}") from exc
        old = self.store.get(rt, namespace, name)
        if old is None:
            raise not_found(rt.plural, rt.group, name)
        try:
            if media == JSON_PATCH:
                patched = json_patch(old, document)
            elif media == MERGE_PATCH:
                patched = merge_patch(old, document)
            else:
                patched = strategic_merge_patch(old, document)
        except PatchConflict as exc:
            raise patch_rejected() from exc
        except PatchError as exc:
            raise bad_request(str(exc)) from exc
        if not isinstance(patched, dict):
            raise bad_request("patch did not produce an object")
        patched_rv = (patched.get("metadata") or {}).get("resourceVersion")
        if patched_rv and patched_rv != old["metadata"]["resourceVersion"]:
            raise conflict(rt.plural, rt.group, name)
        touched_meta = isinstance(document, dict) and "metadata" in document
        new = self._decode(rt, patched)
        return self._commit(
            rt,
            old,
            new,
            subresource,
            field_validation,
            force_status_write=subresource == "status" and touched_meta,
        )

    def _commit(
        self,
        rt: ResourceType,
        old: JsonObject,
        new: JsonObject,
        subresource: str | None,
        field_validation: str,
        *,
        force_status_write: bool = False,
    ) -> WriteResult:
        new = self._prepare_update(rt, old, new, subresource)
        warnings: list[str] = []
        causes: list[Cause] = []
        if rt.custom:
            warnings, causes = self._apply_schema(rt, new, field_validation)
        name = old["metadata"]["name"]
        causes += validate_update(rt.kind, new, old)
        self._check_micro_times(rt, new)
        if causes:
            raise invalid(rt.kind, rt.group, name, causes)
        if rt.has_generation and _spec_of(rt, new) != _spec_of(rt, old):
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old and not force_status_write:
            return WriteResult(old, 200, warnings)
        if _deletion_complete(new):
            self.store.remove(rt, *_key(old))
            return WriteResult(new, 200, warnings)
        stored = self.store.persist(rt, _ordered(rt, new))
        if rt is CRDS:
            self._serve_crd(stored)
        return WriteResult(stored, 200, warnings)

    def _prepare_update(
        self, rt: ResourceType, old: JsonObject, new: JsonObject, subresource: str | None
    ) -> JsonObject:
        old_meta, meta = old["metadata"], new["metadata"]
        for key in (*_SERVER_META, "name", "namespace", "generation"):
            if key in old_meta:
                meta[key] = old_meta[key]
            else:
                meta.pop(key, None)
        for key in ("managedFields", "selfLink"):
            meta.pop(key, None)
        if subresource == "status":
            result = json_copy(old)
            if "status" in new:
                result["status"] = new["status"]
            else:
                result.pop("status", None)
            if not rt.custom:
                # pods/status and nodes/status apply label and annotation changes too.
                for key in ("labels", "annotations"):
                    if key in meta:
                        result["metadata"][key] = meta[key]
                    else:
                        result["metadata"].pop(key, None)
            new = result
        elif rt.status_subresource:
            if "status" in old:
                new["status"] = json_copy(old)["status"]
            else:
                new.pop("status", None)
        if rt.kind == "Service" and not rt.group:
            old_spec, spec = old.get("spec") or {}, new.setdefault("spec", {})
            if not spec.get("clusterIP") and old_spec.get("clusterIP"):
                spec["clusterIP"] = old_spec["clusterIP"]
                spec.setdefault("clusterIPs", old_spec.get("clusterIPs"))
            defaults.default_service(new, self._allocate_cluster_ip)
            new["status"] = json_copy(old).get("status", {"loadBalancer": {}})
        if rt is PODS:
            defaults.normalize_pod_status(new)
        return new

    # -- delete ---------------------------------------------------------------------------
    def delete(
        self, rt: ResourceType, namespace: str, name: str, options: DeleteOptions
    ) -> WriteResult:
        old = self.get(rt, namespace, name)
        meta = old["metadata"]
        if options.precondition_uid and options.precondition_uid != meta["uid"]:
            raise ApiError(
                status_failure(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {rt.kind} "{name}": the UID in the '
                    f"precondition ({options.precondition_uid}) does not match the UID in record "
                    f"({meta['uid']}). The object might have been deleted and then recreated",
                    {"name": name, **({"group": rt.group} if rt.group else {}), "kind": rt.kind},
                )
            )
        if (
            options.precondition_resource_version
            and options.precondition_resource_version != meta["resourceVersion"]
        ):
            raise ApiError(
                status_failure(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {rt.kind} "{name}": the ResourceVersion '
                    f"in the precondition ({options.precondition_resource_version}) does not "
                    f"match the ResourceVersion in record ({meta['resourceVersion']}). The object "
                    "might have been modified",
                    {"name": name, **({"group": rt.group} if rt.group else {}), "kind": rt.kind},
                )
            )
        if rt is CRDS:
            self._unserve_crd(old)
        grace = self._grace_period(rt, old, options)
        finalizers = list(meta.get("finalizers") or [])
        policy_finalizer = {"Foreground": "foregroundDeletion", "Orphan": "orphan"}.get(
            options.propagation_policy or ""
        )
        if rt is NAMESPACES:
            policy_finalizer = None
        if meta.get("deletionTimestamp"):
            return self._delete_again(rt, old, grace)
        if policy_finalizer and policy_finalizer not in finalizers:
            finalizers.append(policy_finalizer)
        stays = bool(finalizers) or grace > 0 or rt is NAMESPACES
        if stays or rt is PODS:
            marked = json_copy(old)
            marked["metadata"]["deletionTimestamp"] = defaults.now_rfc3339(grace)
            marked["metadata"]["deletionGracePeriodSeconds"] = grace
            if finalizers:
                marked["metadata"]["finalizers"] = finalizers
            if rt is NAMESPACES:
                marked["status"] = {"phase": "Terminating"}
            stored = self.store.persist(rt, marked)
            if stays:
                return WriteResult(stored, 200)
        gone = self.store.remove(rt, namespace, name)
        self._release(rt, gone)
        return WriteResult(self._deleted_body(rt, gone), 200)

    def _delete_again(self, rt: ResourceType, old: JsonObject, grace: int) -> WriteResult:
        """DELETE of an object already being deleted: may shorten the grace period."""
        meta = old["metadata"]
        current = int(meta.get("deletionGracePeriodSeconds") or 0)
        if grace >= current:
            return WriteResult(old, 200)
        marked = json_copy(old)
        marked["metadata"]["deletionTimestamp"] = defaults.now_rfc3339(grace)
        marked["metadata"]["deletionGracePeriodSeconds"] = grace
        if grace == 0 and not meta.get("finalizers"):
            stored = self.store.persist(rt, marked)
            gone = self.store.remove(rt, *_key(stored))
            self._release(rt, gone)
            return WriteResult(self._deleted_body(rt, gone), 200)
        return WriteResult(self.store.persist(rt, marked), 200)

    def _grace_period(self, rt: ResourceType, obj: JsonObject, options: DeleteOptions) -> int:
        if rt is not PODS:
            return 0
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        if not spec.get("nodeName") or status.get("phase") in ("Succeeded", "Failed"):
            return 0
        if options.grace_period_seconds is not None:
            return max(0, options.grace_period_seconds)
        return int(spec.get("terminationGracePeriodSeconds", 30))

    def finish_deletion(self, rt: ResourceType, namespace: str, name: str) -> JsonObject | None:
        """Remove an object whose deletion has nothing left to wait for (GC, kubelet)."""
        obj = self.store.get(rt, namespace, name)
        if obj is None:
            return None
        gone = self.store.remove(rt, namespace, name)
        self._release(rt, gone)
        return gone

    def _release(self, rt: ResourceType, gone: JsonObject) -> None:
        if rt.kind == "Service" and not rt.group:
            self._used_ips.discard((gone.get("spec") or {}).get("clusterIP", ""))

    def _deleted_body(self, rt: ResourceType, gone: JsonObject) -> JsonObject:
        if rt.delete_returns_object:
            return gone
        details: JsonObject = {"name": gone["metadata"]["name"]}
        if rt.group:
            details["group"] = rt.group
        details["kind"] = rt.plural
        details["uid"] = gone["metadata"]["uid"]
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": details,
        }

    # -- binding --------------------------------------------------------------------------
    def bind(self, namespace: str, name: str, body: Any) -> JsonObject:
        pod = self.get(PODS, namespace, name)
        target = (body or {}).get("target") or {}
        node = target.get("name")
        if not node:
            raise invalid("Binding", "", name, [required("target.name")])
        current = (pod.get("spec") or {}).get("nodeName")
        if current:
            raise ApiError(
                status_failure(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on pods/binding "{name}": pod {name} is '
                    f'already assigned to node "{current}"',
                    {"name": name, "kind": "pods/binding"},
                )
            )
        if pod["metadata"].get("deletionTimestamp"):
            raise conflict("pods/binding", "", name, "pod is being deleted")
        bound = json_copy(pod)
        bound["spec"]["nodeName"] = node
        status = bound.setdefault("status", {})
        conditions = [c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"]
        conditions.append(
            {
                "type": "PodScheduled",
                "status": "True",
                "lastProbeTime": None,
                "lastTransitionTime": defaults.now_rfc3339(),
            }
        )
        status["conditions"] = conditions
        self.store.persist(PODS, bound)
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "code": 201,
        }

    # -- direct access for controllers and tests ------------------------------------------
    def inject(self, rt: ResourceType, obj: JsonObject) -> JsonObject:
        """Store `obj` as given, skipping defaults and validation (a create or replace).

        For tests that need what a real server would refuse (a malformed Service, a slice
        with a bad address) or exact control over fields. Only kind/apiVersion, uid and
        creationTimestamp are filled in when missing; watchers see ADDED or MODIFIED.
        """
        stored = json_copy(obj)
        stored["kind"], stored["apiVersion"] = rt.kind, rt.api_version
        meta = stored.setdefault("metadata", {})
        if not rt.namespaced:
            meta.pop("namespace", None)
        elif not meta.get("namespace"):
            meta["namespace"] = "default"
        current = self.store.get(rt, meta.get("namespace", ""), meta["name"])
        meta.setdefault("uid", current["metadata"]["uid"] if current else str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", defaults.now_rfc3339())
        return self.store.persist(rt, _ordered(rt, stored))

    def mutate(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        change: Callable[[JsonObject], None],
        *,
        subresource: str | None = None,
    ) -> JsonObject | None:
        """Read-modify-write by a controller: `change` edits a copy; a no-op writes nothing."""
        old = self.store.get(rt, namespace, name)
        if old is None:
            return None
        new = json_copy(old)
        change(new)
        return self._commit(rt, old, new, subresource, "Ignore").body


def _key(obj: JsonObject) -> tuple[str, str]:
    meta = obj["metadata"]
    return (meta.get("namespace") or "", meta["name"])


def _strip_type(obj: JsonObject) -> JsonObject:
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


def _ordered(rt: ResourceType, obj: JsonObject) -> JsonObject:
    head = ("apiVersion", "kind") if rt.custom else ("kind", "apiVersion")
    out = {k: obj[k] for k in (*head, "metadata") if k in obj}
    out.update((k, v) for k, v in obj.items() if k not in out)
    return out


def _spec_of(rt: ResourceType, obj: JsonObject) -> JsonObject:
    skip = ("metadata", "status") if rt.status_subresource or rt.custom else ("metadata",)
    return {k: v for k, v in obj.items() if k not in skip}


def _deletion_complete(obj: JsonObject) -> bool:
    meta = obj["metadata"]
    return (
        bool(meta.get("deletionTimestamp"))
        and not meta.get("finalizers")
        and not meta.get("deletionGracePeriodSeconds")
        and obj.get("kind") != "Namespace"
    )


def go_json_error(exc: ValueError) -> str:
    """Python's JSON decode error rephrased the way Go's encoding/json words it."""
    if isinstance(exc, json.JSONDecodeError):
        doc, pos = exc.doc, exc.pos
        if pos >= len(doc.rstrip()):
            return "unexpected end of JSON input"
        char = doc[pos]
        if exc.msg.startswith("Expecting property name"):
            return f"invalid character '{char}' looking for beginning of object key string"
        return f"invalid character '{char}' looking for beginning of value"
    return str(exc)
