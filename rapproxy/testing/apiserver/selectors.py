"""Label and field selectors, parsed the way apimachinery parses them.

Pure functions: a selector string becomes a predicate over an object, or a `SelectorError` with
the message the real server puts in its 400 (`unable to parse requirement: ...`,
`"x" is not a known field selector: only ...`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

JsonObject = dict[str, Any]


class SelectorError(ValueError):
    """A malformed or unsupported selector; the message is the server's 400 message."""


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str  # "=", "!=", "in", "notin", "exists", "!"
    values: tuple[str, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "exists":
            return self.key in labels
        if self.operator == "!":
            return self.key not in labels
        if self.operator in ("=", "in"):
            return self.key in labels and labels[self.key] in self.values
        # "!=" and "notin" match objects without the key too.
        return self.key not in labels or labels[self.key] not in self.values


_TOKEN = re.compile(r"\s*(!=|==|=|\(|\)|,|!|[^\s!=(),]+)")
_KEY = re.compile(
    r"^([a-z0-9A-Z]([-a-z0-9A-Z_.]*[a-z0-9A-Z])?/)?[a-zA-Z0-9]([-a-zA-Z0-9_.]*[a-zA-Z0-9])?$"
)


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None:  # pragma: no cover - the regex matches every non-space char
            raise SelectorError(f"unable to parse requirement: {text!r}")
        out.append(m.group(1))
        pos = m.end()
    return out


def parse_label_selector(text: str) -> tuple[Requirement, ...]:
    """Parse `a=b,c!=d,e in (f,g),h notin (i),j,!k`; raise SelectorError like the server."""
    toks = _tokens(text)
    reqs: list[Requirement] = []
    i = 0

    def expect_values() -> tuple[str, ...]:
        nonlocal i
        if i >= len(toks) or toks[i] != "(":
            found = toks[i] if i < len(toks) else ""
            raise SelectorError(f"unable to parse requirement: found '{found}' expected: '('")
        i += 1
        values: list[str] = []
        while i < len(toks) and toks[i] != ")":
            if toks[i] != ",":
                values.append(toks[i])
            i += 1
        if i >= len(toks):
            raise SelectorError("unable to parse requirement: found '', expected: ')'")
        i += 1
        return tuple(values)

    while i < len(toks):
        tok = toks[i]
        if tok == "!":
            i += 1
            if i >= len(toks):
                raise SelectorError("unable to parse requirement: found '', expected: identifier")
            reqs.append(Requirement(_check_key(toks[i]), "!", ()))
            i += 1
        else:
            key = _check_key(tok)
            i += 1
            if i >= len(toks) or toks[i] == ",":
                reqs.append(Requirement(key, "exists", ()))
            elif toks[i] in ("=", "=="):
                i += 1
                value = toks[i] if i < len(toks) and toks[i] != "," else ""
                if value:
                    i += 1
                reqs.append(Requirement(key, "=", (value,)))
            elif toks[i] == "!=":
                i += 1
                value = toks[i] if i < len(toks) and toks[i] != "," else ""
                if value:
                    i += 1
                reqs.append(Requirement(key, "!=", (value,)))
            elif toks[i] in ("in", "notin"):
                op = toks[i]
                i += 1
                reqs.append(Requirement(key, op, expect_values()))
            else:
                raise SelectorError(
                    f"unable to parse requirement: found '{toks[i]}', expected: "
                    "in, notin, =, ==, !=, gt, lt"
                )
        if i < len(toks):
            if toks[i] != ",":
                raise SelectorError(f"found '{toks[i]}', expected: ',' or 'end of string'")
            i += 1
    return tuple(reqs)


def _check_key(key: str) -> str:
    if key in ("(", ")", ",", "=", "==", "!=") or not _KEY.match(key):
        raise SelectorError(f"unable to parse requirement: invalid label key {key!r}")
    return key


def labels_match(reqs: tuple[Requirement, ...], obj: JsonObject) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(r.matches(labels) for r in reqs)


@dataclass(frozen=True, slots=True)
class FieldRequirement:
    path: str
    negate: bool
    value: str


def parse_field_selector(text: str, allowed: tuple[str, ...]) -> tuple[FieldRequirement, ...]:
    reqs: list[FieldRequirement] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "!=" in part:
            path, value = part.split("!=", 1)
            negate = True
        elif "==" in part:
            path, value = part.split("==", 1)
            negate = False
        elif "=" in part:
            path, value = part.split("=", 1)
            negate = False
        else:
            raise SelectorError(f"invalid selector: '{text}'; can't understand '{part}'")
        path = path.strip()
        if path not in allowed:
            only = ", ".join(f'"{a}"' for a in allowed)
            raise SelectorError(f'"{path}" is not a known field selector: only {only}')
        reqs.append(FieldRequirement(path, negate, value.strip()))
    return tuple(reqs)


def field_value(obj: JsonObject, path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, dict):
            return ""
        node = node.get(part)
    if node is None:
        return ""
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


def fields_match(reqs: tuple[FieldRequirement, ...], obj: JsonObject) -> bool:
    return all((field_value(obj, r.path) == r.value) != r.negate for r in reqs)


def selector_predicate(
    label_selector: str | None, field_selector: str | None, allowed_fields: tuple[str, ...]
) -> Callable[[JsonObject], bool]:
    labels = parse_label_selector(label_selector) if label_selector else ()
    fields = parse_field_selector(field_selector, allowed_fields) if field_selector else ()
    if not labels and not fields:
        return lambda _obj: True
    return lambda obj: labels_match(labels, obj) and fields_match(fields, obj)


def match_label_map(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """A Service-style equality selector (`spec.selector`) against an object's labels."""
    return all(labels.get(k) == v for k, v in selector.items())
