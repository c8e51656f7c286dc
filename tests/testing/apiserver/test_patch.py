"""Merge, strategic-merge and JSON patch semantics."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rapproxy.testing.apiserver.patch import (
    PatchConflict,
    json_patch,
    merge_patch,
    strategic_merge_patch,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=10,
)


def test_merge_patch_deletes_with_null_and_replaces_lists() -> None:
    doc = {"a": {"b": 1, "c": 2}, "l": [1, 2]}
    assert merge_patch(doc, {"a": {"b": None, "d": 3}, "l": [9]}) == {
        "a": {"c": 2, "d": 3},
        "l": [9],
    }


@given(json_values)
def test_merge_patch_with_itself_is_idempotent(doc: object) -> None:
    once = merge_patch({}, {"x": doc})
    assert merge_patch(once, {"x": doc}) == once


def test_strategic_merge_merges_containers_by_name_and_conditions_by_type() -> None:
    pod = {
        "spec": {"containers": [{"name": "app", "image": "a:1"}, {"name": "side", "image": "s:1"}]},
        "status": {"conditions": [{"type": "PodScheduled", "status": "True"}]},
    }
    patched = strategic_merge_patch(
        pod,
        {
            "spec": {"containers": [{"name": "side", "image": "s:2"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        },
    )
    assert patched["spec"]["containers"] == [
        {"name": "app", "image": "a:1"},
        {"name": "side", "image": "s:2"},
    ]
    assert [c["type"] for c in patched["status"]["conditions"]] == ["Ready", "PodScheduled"]


def test_strategic_merge_keys_ports_by_port_and_supports_delete_directive() -> None:
    svc = {"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https"}]}}
    patched = strategic_merge_patch(
        svc,
        {"spec": {"ports": [{"port": 80, "targetPort": 8080}, {"port": 443, "$patch": "delete"}]}},
    )
    assert patched["spec"]["ports"] == [{"port": 80, "name": "http", "targetPort": 8080}]


def test_json_patch_operations_and_escapes() -> None:
    doc = {"data": {"a": "1"}, "metadata": {"labels": {}}, "l": [1, 2]}
    out = json_patch(
        doc,
        [
            {"op": "add", "path": "/metadata/labels/x~1y", "value": "v"},
            {"op": "replace", "path": "/data/a", "value": "2"},
            {"op": "add", "path": "/l/-", "value": 3},
            {"op": "remove", "path": "/l/0"},
            {"op": "copy", "from": "/data/a", "path": "/data/b"},
            {"op": "move", "from": "/data/b", "path": "/data/c"},
            {"op": "test", "path": "/data/c", "value": "2"},
        ],
    )
    assert out == {"data": {"a": "2", "c": "2"}, "metadata": {"labels": {"x/y": "v"}}, "l": [2, 3]}
    assert doc["data"] == {"a": "1"}  # the input is not mutated


@pytest.mark.parametrize(
    "ops",
    [
        [{"op": "test", "path": "/a", "value": 2}],
        [{"op": "remove", "path": "/missing"}],
        [{"op": "replace", "path": "/missing", "value": 1}],
    ],
)
def test_failing_json_patch_is_a_conflict(ops: list[dict[str, object]]) -> None:
    with pytest.raises(PatchConflict):
        json_patch({"a": 1}, ops)
