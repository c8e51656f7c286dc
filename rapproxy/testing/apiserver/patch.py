"""The three PATCH flavours the API server accepts, as pure functions over JSON values.

- JSON merge patch (RFC 7386): maps merge, `null` deletes, lists are replaced wholesale.
- Strategic merge patch (Kubernetes): like merge, but lists with a known merge key are merged
  element by element (`containers` by `name`, `conditions` by `type`, ports by `containerPort` /
  `port`, ...). The key table covers the common cases; unknown lists are replaced.
- JSON patch (RFC 6902): add/remove/replace/move/copy/test; a failing `test` or a `remove` of a
  missing path raises `PatchConflict` (the server answers 422).
"""

from __future__ import annotations

import copy
from typing import Any

JsonValue = Any

# Field name → merge key for strategic merge patch (as in the Kubernetes Go types).
MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "conditions": "type",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "containerStatuses": "name",
    "initContainerStatuses": "name",
    "ownerReferences": "uid",
    "tolerations": "key",
    "taints": "key",
    "addresses": "type",
    "hostAliases": "ip",
    "podIPs": "ip",
}
# `ports` is keyed by containerPort in containers and by port in Services.
PORT_KEYS = ("containerPort", "port")


class PatchError(ValueError):
    """The patch document itself is malformed (400)."""


class PatchConflict(ValueError):
    """A JSON patch `test` failed or an operation addressed a missing path (422)."""


def merge_patch(target: JsonValue, patch: JsonValue) -> JsonValue:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: dict[str, Any] = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: JsonValue, patch: JsonValue) -> JsonValue:
    return _smp(target, patch, "")


def _smp(target: JsonValue, patch: JsonValue, field_name: str) -> JsonValue:
    if isinstance(patch, dict):
        if patch.get("$patch") == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
        if patch.get("$patch") == "delete":
            return None
        result: dict[str, Any] = dict(target) if isinstance(target, dict) else {}
        for key, value in patch.items():
            if key.startswith("$"):
                continue
            if value is None:
                result.pop(key, None)
            else:
                merged = _smp(result.get(key), value, key)
                result[key] = merged
        return result
    if isinstance(patch, list) and isinstance(target, list):
        merge_key = _merge_key(field_name, patch + target)
        if merge_key is not None:
            return _merge_list(target, patch, merge_key, field_name)
    return copy.deepcopy(patch)


def _merge_key(field_name: str, items: list[Any]) -> str | None:
    if not items or not all(isinstance(i, dict) for i in items):
        return None
    if field_name == "ports":
        for key in PORT_KEYS:
            if all(key in i for i in items if "$patch" not in i):
                return key
        return None
    return MERGE_KEYS.get(field_name)


def _merge_list(target: list[Any], patch: list[Any], key: str, field_name: str) -> list[Any]:
    # Like the real server's element ordering: merged elements keep their place, new ones come
    # first in patch order (a status patch adding Ready lands before the existing PodScheduled).
    result = [copy.deepcopy(i) for i in target]
    added: list[Any] = []
    for item in patch:
        directive = item.get("$patch")
        index = next((n for n, cur in enumerate(result) if cur.get(key) == item.get(key)), None)
        if directive == "delete":
            if index is not None:
                result.pop(index)
            continue
        if index is None:
            added.append({k: v for k, v in item.items() if not k.startswith("$")})
        else:
            result[index] = _smp(result[index], item, field_name + "[]")
    return added + result


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _split(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"invalid JSON pointer {path!r}")
    return [_unescape(t) for t in path[1:].split("/")]


def _walk(doc: JsonValue, tokens: list[str]) -> JsonValue:
    node = doc
    for tok in tokens:
        if isinstance(node, dict):
            if tok not in node:
                raise PatchConflict(f"missing path element {tok!r}")
            node = node[tok]
        elif isinstance(node, list):
            node = node[_index(node, tok, allow_end=False)]
        else:
            raise PatchConflict(f"cannot descend into {tok!r}")
    return node


def _index(node: list[Any], tok: str, *, allow_end: bool) -> int:
    if tok == "-" and allow_end:
        return len(node)
    if not tok.isdigit():
        raise PatchConflict(f"invalid list index {tok!r}")
    idx = int(tok)
    limit = len(node) if allow_end else len(node) - 1
    if idx > limit:
        raise PatchConflict(f"index {idx} out of range")
    return idx


def _add(doc: JsonValue, tokens: list[str], value: JsonValue) -> JsonValue:
    if not tokens:
        return value
    parent = _walk(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, allow_end=True), value)
    else:
        raise PatchConflict("add target is not a container")
    return doc


def _remove(doc: JsonValue, tokens: list[str]) -> JsonValue:
    if not tokens:
        raise PatchConflict("cannot remove the root")
    parent = _walk(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchConflict(f"remove of missing key {last!r}")
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(parent, last, allow_end=False))
    raise PatchConflict("remove target is not a container")


def json_patch(doc: JsonValue, operations: JsonValue) -> JsonValue:
    if not isinstance(operations, list):
        raise PatchError("json patch must be a list of operations")
    result = copy.deepcopy(doc)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError("json patch operation needs 'op' and 'path'")
        tokens = _split(str(op["path"]))
        kind = op["op"]
        if kind == "add":
            result = _add(result, tokens, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            _remove(result, tokens)
        elif kind == "replace":
            _walk(result, tokens)  # must exist
            if tokens:
                _remove(result, tokens)
            result = _add(result, tokens, copy.deepcopy(op.get("value")))
        elif kind in ("move", "copy"):
            source = _split(str(op.get("from", "")))
            value = copy.deepcopy(_walk(result, source))
            if kind == "move":
                _remove(result, source)
            result = _add(result, tokens, value)
        elif kind == "test":
            if _walk(result, tokens) != op.get("value"):
                raise PatchConflict(f"test failed at {op['path']}")
        else:
            raise PatchError(f"unknown json patch operation {kind!r}")
    return result
