"""CustomResourceDefinitions: turning a CRD into a served resource, and its structural schema.

Pure functions. `resource_types_for(crd)` gives the `ResourceType`s a CRD serves (one per served
version). `SchemaProcessor` applies an openAPIV3Schema the way the API server does on every write:
prune unknown fields (reporting them for the `Warning` header or a Strict 400), apply `default`s,
and validate `required`, `minimum`/`maximum`, `enum`, types and embedded resources
(`x-kubernetes-embedded-resource` needs `apiVersion` and `kind`; its `metadata` keeps only
ObjectMeta fields, while a `metadata` declared as a bare object is pruned to `{}`).
"""

from __future__ import annotations

import base64
import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any

from rapproxy.testing.apiserver.errors import Cause, invalid_value, not_supported, required
from rapproxy.testing.apiserver.resources import ResourceType

JsonObject = dict[str, Any]

OBJECT_META_FIELDS = frozenset(
    {
        "name",
        "generateName",
        "namespace",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
        "managedFields",
        "selfLink",
    }
)
# ObjectMeta fields an embedded resource may carry (server-managed ones are dropped there too).
EMBEDDED_META_FIELDS = frozenset(
    {"name", "generateName", "namespace", "labels", "annotations", "ownerReferences", "finalizers"}
)


def served_versions(crd: JsonObject) -> list[JsonObject]:
    return [v for v in (crd.get("spec") or {}).get("versions") or [] if v.get("served", True)]


def resource_types_for(crd: JsonObject) -> list[ResourceType]:
    spec = crd["spec"]
    names = spec["names"]
    out = []
    for version in served_versions(crd):
        out.append(
            ResourceType(
                group=spec["group"],
                version=version["name"],
                plural=names["plural"],
                kind=names["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                singular=names.get("singular") or names["kind"].lower(),
                short_names=tuple(names.get("shortNames") or ()),
                categories=tuple(names.get("categories") or ()),
                storage_hash=storage_version_hash(spec["group"], version["name"], names["kind"]),
                status_subresource="status" in (version.get("subresources") or {}),
                has_generation=True,
                custom=True,
                verbs=(
                    "delete",
                    "deletecollection",
                    "get",
                    "list",
                    "patch",
                    "create",
                    "update",
                    "watch",
                ),
            )
        )
    return out


def storage_version_hash(group: str, version: str, kind: str) -> str:
    """What discovery reports as `storageVersionHash` (first 8 bytes of a SHA-256, base64)."""
    digest = hashlib.sha256(f"{group}/{version}/{kind}".encode()).digest()
    return base64.b64encode(digest[:8]).decode()


def version_schema(crd: JsonObject, version: str) -> JsonObject:
    for v in served_versions(crd):
        if v["name"] == version:
            schema: JsonObject = ((v.get("schema") or {}).get("openAPIV3Schema")) or {}
            return schema
    return {}


def printer_columns(crd: JsonObject, version: str) -> list[JsonObject]:
    for v in served_versions(crd):
        if v["name"] == version:
            return list(v.get("additionalPrinterColumns") or [])
    return []


def established_status(crd: JsonObject, now: str) -> JsonObject:
    names = copy.deepcopy(crd["spec"]["names"])
    names.setdefault("singular", names["kind"].lower())
    names.setdefault("listKind", names["kind"] + "List")
    status = dict(crd.get("status") or {})
    status["conditions"] = [
        {
            "type": "NamesAccepted",
            "status": "True",
            "lastTransitionTime": now,
            "reason": "NoConflicts",
            "message": "no conflicts found",
        },
        {
            "type": "Established",
            "status": "True",
            "lastTransitionTime": now,
            "reason": "InitialNamesAccepted",
            "message": "the initial names have been accepted",
        },
    ]
    status["acceptedNames"] = names
    return status


@dataclass(slots=True)
class SchemaResult:
    pruned: list[str] = field(default_factory=list)
    causes: list[Cause] = field(default_factory=list)


class SchemaProcessor:
    """Prunes, defaults and validates one custom resource against its version's schema."""

    def __init__(self, schema: JsonObject) -> None:
        self.schema = schema

    def process(self, obj: JsonObject) -> SchemaResult:
        """Mutates `obj` in place (prune + default); returns pruned paths and 422 causes."""
        result = SchemaResult()
        if not self.schema:
            return result
        props = self.schema.get("properties") or {}
        for key in list(obj):
            if key in ("apiVersion", "kind", "metadata"):
                continue
            if key in props:
                obj[key] = self._prune(obj[key], props[key], key, result)
            elif not self.schema.get("x-kubernetes-preserve-unknown-fields"):
                result.pruned.append(key)
                del obj[key]
        self._default(obj, self.schema, top=True)
        self._validate(obj, self.schema, "", result, top=True)
        return result

    # -- pruning --------------------------------------------------------------------------
    def _prune(self, value: Any, schema: JsonObject, path: str, result: SchemaResult) -> Any:
        if isinstance(value, list):
            items = schema.get("items")
            if isinstance(items, dict):
                return [self._prune(v, items, f"{path}[{i}]", result) for i, v in enumerate(value)]
            return value
        if not isinstance(value, dict):
            return value
        props = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        embedded = bool(schema.get("x-kubernetes-embedded-resource"))
        out: JsonObject = {}
        for key, item in value.items():
            child = f"{path}.{key}"
            if embedded and key in ("apiVersion", "kind"):
                out[key] = item
            elif embedded and key == "metadata" and key not in props:
                out[key] = self._prune_embedded_meta(item, child, result)
            elif key in props:
                out[key] = self._prune(item, props[key], child, result)
            elif isinstance(additional, dict):
                out[key] = self._prune(item, additional, child, result)
            elif additional is True or preserve:
                out[key] = item
            else:
                result.pruned.append(child)
        return out

    def _prune_embedded_meta(self, meta: Any, path: str, result: SchemaResult) -> Any:
        if not isinstance(meta, dict):
            return meta
        out = {}
        for key, item in meta.items():
            if key in EMBEDDED_META_FIELDS:
                out[key] = item
            else:
                result.pruned.append(f"{path}.{key}")
        return out

    # -- defaulting -----------------------------------------------------------------------
    def _default(self, value: Any, schema: JsonObject, *, top: bool = False) -> None:
        if isinstance(value, list) and isinstance(schema.get("items"), dict):
            for item in value:
                self._default(item, schema["items"])
            return
        if not isinstance(value, dict):
            return
        for key, prop in (schema.get("properties") or {}).items():
            if top and key == "metadata":
                continue
            if key not in value and "default" in prop:
                value[key] = copy.deepcopy(prop["default"])
            if key in value:
                self._default(value[key], prop)

    # -- validation -----------------------------------------------------------------------
    def _validate(
        self, value: Any, schema: JsonObject, path: str, result: SchemaResult, *, top: bool = False
    ) -> None:
        if value is None and schema.get("nullable"):
            return
        expected = schema.get("type")
        if expected and not top and not _has_type(value, expected):
            shown = f'"{value}"' if isinstance(value, str) else _render(value)
            result.causes.append(
                Cause(
                    "FieldValueTypeInvalid",
                    f"Invalid value: {shown}: {path} in body must be of type {expected}: "
                    f'"{_json_type(value)}"',
                    path,
                )
            )
            return
        if isinstance(value, bool):
            pass
        elif isinstance(value, int | float):
            if "minimum" in schema and value < schema["minimum"]:
                result.causes.append(
                    invalid_value(
                        path,
                        value,
                        f"{path} in body should be greater than or equal to {schema['minimum']}",
                    )
                )
            if "maximum" in schema and value > schema["maximum"]:
                result.causes.append(
                    invalid_value(
                        path,
                        value,
                        f"{path} in body should be less than or equal to {schema['maximum']}",
                    )
                )
        if "enum" in schema and value not in schema["enum"]:
            result.causes.append(not_supported(path, str(value), [str(e) for e in schema["enum"]]))
        if isinstance(value, str):
            if "maxLength" in schema and len(value) > schema["maxLength"]:
                result.causes.append(
                    Cause(
                        "FieldValueTooLong",
                        f"Too long: may not be longer than {schema['maxLength']}",
                        path,
                    )
                )
            if "minLength" in schema and len(value) < schema["minLength"]:
                result.causes.append(
                    invalid_value(
                        path,
                        value,
                        f"{path} in body should be at least {schema['minLength']} chars long",
                    )
                )
        if isinstance(value, list) and isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                self._validate(item, schema["items"], f"{path}[{i}]", result)
        if isinstance(value, dict):
            for key in schema.get("required") or []:
                if key not in value:
                    result.causes.append(required(_join(path, key)))
            for key, prop in (schema.get("properties") or {}).items():
                if top and key == "metadata":
                    continue
                if key in value:
                    self._validate(value[key], prop, _join(path, key), result)
            if schema.get("x-kubernetes-embedded-resource"):
                for key in ("apiVersion", "kind"):
                    if not value.get(key):
                        result.causes.append(
                            Cause(
                                "FieldValueRequired",
                                "Required value: must not be empty",
                                _join(path, key),
                            )
                        )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _has_type(value: Any, expected: str) -> bool:
    actual = _json_type(value)
    if expected == "number":
        return actual in ("number", "integer")
    if expected == "integer" and isinstance(value, float):
        return value.is_integer()
    return actual == expected


def _render(value: Any) -> str:
    import json

    return json.dumps(value)
