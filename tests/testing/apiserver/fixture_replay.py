"""Replaying recorded kube-apiserver exchanges against the emulator, with placeholder matching.

The fixtures replace server-chosen values by placeholders (`<rv-3>`, `<uid-1>`, `gen-<sfx-1>`,
`<cluster-ip-2>`, `<ts-4>`, ...). A `Bindings` object turns them into patterns: the first time a
placeholder meets a real value it is bound, afterwards the same placeholder must meet the same
value, a value may not be bound to two placeholders, and resourceVersions must keep the numeric
order of their placeholder numbers. Timestamps are only checked for their format (the real and
the emulated clocks tick differently); `<age>`, `<build-date>` etc. match anything.
"""

from __future__ import annotations

import itertools
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

PLACEHOLDER = re.compile(
    r"<(rv|ts|uid|sfx|cluster-ip)-(\d+)>|<(continue-token|build-date|go-version|server-address|age)>"
)
PATTERNS = {
    "rv": r"\d+",
    "ts": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{6})?Z",
    "uid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "sfx": r"[a-z0-9]{5}",
    "cluster-ip": r"\d+\.\d+\.\d+\.\d+",
    "continue-token": r"\S+",
    "build-date": r".+",
    "go-version": r".+",
    "server-address": r".+",
    "age": r".+",
}
BOUND_KINDS = ("rv", "uid", "sfx", "cluster-ip", "continue-token")


@dataclass
class Bindings:
    values: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    # -- matching -------------------------------------------------------------------------
    def match_string(self, expected: str, actual: str, where: str) -> bool:
        if PLACEHOLDER.search(expected) is None:
            return expected == actual
        names: list[str] = []
        pattern = ""
        pos = 0
        for m in PLACEHOLDER.finditer(expected):
            pattern += re.escape(expected[pos : m.start()])
            name = m.group(0)[1:-1]
            kind = m.group(1) or m.group(3)
            names.append(name)
            pattern += f"({PATTERNS[kind]})"
            pos = m.end()
        pattern += re.escape(expected[pos:])
        found = re.fullmatch(pattern, actual, re.DOTALL)
        if found is None:
            return False
        for name, value in zip(names, found.groups(), strict=True):
            if not self.bind(name, value, where):
                return False
        return True

    def bind(self, name: str, value: str, where: str) -> bool:
        kind = name.rsplit("-", 1)[0] if name[-1].isdigit() else name
        if kind not in BOUND_KINDS:
            return True
        if name in self.values:
            if self.values[name] != value:
                self.errors.append(f"{where}: <{name}> was {self.values[name]!r}, now {value!r}")
                return False
            return True
        for other, bound in self.values.items():
            if bound == value and other.startswith(kind + "-") and other != name:
                self.errors.append(f"{where}: {value!r} is <{other}> and <{name}>")
                return False
        self.values[name] = value
        return True

    def check_rv_order(self) -> list[str]:
        rvs = sorted(
            (int(k.split("-")[1]), int(v)) for k, v in self.values.items() if k.startswith("rv-")
        )
        return [
            f"<rv-{a}>={va} is not below <rv-{b}>={vb}"
            for (a, va), (b, vb) in itertools.pairwise(rvs)
            if va >= vb
        ]

    # -- substitution into requests --------------------------------------------------------
    def substitute(self, value: Any) -> Any:
        if isinstance(value, str):
            return PLACEHOLDER.sub(lambda m: self._value_for(m.group(0)[1:-1]), value)
        if isinstance(value, list):
            return [self.substitute(v) for v in value]
        if isinstance(value, dict):
            return {k: self.substitute(v) for k, v in value.items()}
        return value

    def _value_for(self, name: str) -> str:
        if name not in self.values:
            kind, number = name.rsplit("-", 1)
            n = int(number) if number.isdigit() else 0
            fresh = {
                "uid": lambda: str(uuid.uuid4()),
                # Distinct and chronological, in the MicroTime format Leases need.
                "ts": lambda: f"2024-05-01T10:{n // 60:02d}:{n % 60:02d}.123456Z",
                "rv": lambda: "999999999",
            }.get(kind, lambda: "x")
            self.values[name] = fresh()
        return self.values[name]


@dataclass
class Compare:
    """Options for one exchange's body comparison."""

    subset: bool = False  # fixture ⊆ emulator (trimmed discovery documents)
    loose_paths: tuple[str, ...] = ()  # paths whose value is not compared
    prefix_paths: tuple[str, ...] = ()  # strings compared up to the first newline
    unordered_paths: tuple[str, ...] = ()  # lists compared as multisets


def compare(expected: Any, actual: Any, b: Bindings, opts: Compare, path: str = "") -> list[str]:
    if _generic(path) in opts.loose_paths:
        return []
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path or '.'}: expected an object, got {_short(actual)}"]
        errors = []
        for key, value in expected.items():
            child = f"{path}.{key}"
            if key not in actual:
                if _generic(child) not in opts.loose_paths:
                    errors.append(f"{child}: missing (expected {_short(value)})")
                continue
            errors += compare(value, actual[key], b, opts, child)
        if not opts.subset:
            errors += [
                f"{path}.{key}: unexpected {_short(actual[key])}"
                for key in actual
                if key not in expected and _generic(f"{path}.{key}") not in opts.loose_paths
            ]
        return errors
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return [f"{path}: expected a list, got {_short(actual)}"]
        if _generic(path) in opts.unordered_paths:
            return _compare_unordered(expected, actual, b, opts, path)
        if opts.subset:
            return _compare_subset_list(expected, actual, b, opts, path)
        if len(expected) != len(actual):
            return [f"{path}: {len(expected)} items expected, got {len(actual)}: {_short(actual)}"]
        errors = []
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            errors += compare(e, a, b, opts, f"{path}[{i}]")
        return errors
    if isinstance(expected, str) and isinstance(actual, str):
        if _generic(path) in opts.prefix_paths:
            expected, actual = expected.split("\n")[0], actual.split("\n")[0]
        if not b.match_string(expected, actual, path):
            return [f"{path}: expected {expected!r}, got {actual!r}"]
        return []
    if expected != actual or type(expected) is not type(actual):
        return [f"{path}: expected {_short(expected)}, got {_short(actual)}"]
    return []


def _compare_subset_list(
    expected: list[Any], actual: list[Any], b: Bindings, opts: Compare, path: str
) -> list[str]:
    errors = []
    for i, e in enumerate(expected):
        if not any(
            not compare(e, a, Bindings(dict(b.values)), opts, f"{path}[{i}]") for a in actual
        ):
            errors.append(f"{path}[{i}]: no match for {_short(e)}")
    return errors


def _compare_unordered(
    expected: list[Any], actual: list[Any], b: Bindings, opts: Compare, path: str
) -> list[str]:
    if len(expected) != len(actual):
        return [f"{path}: {len(expected)} items expected, got {len(actual)}"]
    remaining = list(actual)
    for i, e in enumerate(expected):
        for j, a in enumerate(remaining):
            if not compare(e, a, Bindings(dict(b.values)), opts, f"{path}[{i}]"):
                compare(e, a, b, opts, f"{path}[{i}]")
                remaining.pop(j)
                break
        else:
            return [f"{path}[{i}]: no match for {_short(e)} in {_short(actual)}"]
    return []


def _generic(path: str) -> str:
    """`.items[3].metadata` → `.items[].metadata`, for option lookups."""
    return re.sub(r"\[\d+\]", "[]", path)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) < 300 else text[:300] + "..."
