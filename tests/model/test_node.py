"""Node parsing: the addresses, zone and readiness the RAP policy and topology routing use."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rapproxy.model.errors import InvalidObject
from rapproxy.model.node import LABEL_ZONE, NodeInfo, parse_node


def api_node(**status_changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": "node-b",
            "labels": {"kubernetes.io/hostname": "node-b", LABEL_ZONE: "zone-b"},
        },
        "spec": {"podCIDR": "10.244.1.0/24"},
        "status": {
            "addresses": [
                {"type": "Hostname", "address": "node-b"},
                {"type": "ExternalIP", "address": "203.0.113.2"},
                {"type": "InternalIP", "address": "192.168.1.2"},
                {"type": "InternalIP", "address": "fd00::2"},
            ],
            "conditions": [
                {"type": "MemoryPressure", "status": "False"},
                {"type": "Ready", "status": "True", "reason": "KubeletReady"},
            ],
        },
    }
    obj["status"].update(status_changes)
    return obj


def test_internal_ips_come_before_external_ips_and_hostnames_are_ignored() -> None:
    node = parse_node(api_node())
    assert node.name == "node-b"
    assert node.addresses == ("192.168.1.2", "fd00::2", "203.0.113.2")
    assert node.primary_address == "192.168.1.2"


def test_zone_comes_from_the_topology_label() -> None:
    assert parse_node(api_node()).zone == "zone-b"


def test_node_without_zone_label_has_no_zone() -> None:
    obj = api_node()
    del obj["metadata"]["labels"][LABEL_ZONE]
    assert parse_node(obj).zone is None


def test_ready_condition_true_means_ready() -> None:
    assert parse_node(api_node()).ready


@pytest.mark.parametrize("status", ["False", "Unknown"])
def test_ready_condition_not_true_means_not_ready(status: str) -> None:
    obj = api_node(conditions=[{"type": "Ready", "status": status}])
    assert not parse_node(obj).ready


def test_node_without_conditions_is_not_ready() -> None:
    assert not parse_node(api_node(conditions=None)).ready


def test_cordoned_node_is_unschedulable() -> None:
    obj = api_node()
    obj["spec"]["unschedulable"] = True
    assert parse_node(obj).unschedulable
    assert not parse_node(api_node()).unschedulable


def test_node_without_addresses_has_no_primary_address() -> None:
    node = parse_node({"metadata": {"name": "bare"}})
    assert node == NodeInfo("bare", (), None, False)
    assert node.primary_address is None


def refused(obj: Any) -> InvalidObject:
    with pytest.raises(InvalidObject) as error:
        parse_node(obj)
    assert error.value.kind == "Node"
    return error.value


@pytest.mark.parametrize("name", [None, "", 5])
def test_node_without_a_name_is_refused(name: object) -> None:
    obj = api_node()
    obj["metadata"]["name"] = name
    assert refused(obj).field == "metadata.name"


@pytest.mark.parametrize("address", ["not-an-ip", 3232235778, None])
def test_bad_internal_ip_is_refused(address: object) -> None:
    obj = api_node(addresses=[{"type": "InternalIP", "address": address}])
    assert refused(obj).field == "status.addresses[0].address"


@pytest.mark.parametrize(
    ("status", "field"),
    [
        ({"status": "x"}, "status"),
        ({"addresses": "192.168.1.2"}, "status.addresses"),
        ({"addresses": ["192.168.1.2"]}, "status.addresses[0]"),
        ({"conditions": 5}, "status.conditions"),
        ({"conditions": {"type": "Ready"}}, "status.conditions"),
    ],
)
def test_malformed_status_is_refused_naming_the_field(status: dict[str, Any], field: str) -> None:
    obj = api_node()
    if "status" in status:
        obj["status"] = status["status"]
    else:
        obj["status"].update(status)
    assert refused(obj).field == field


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=75, deadline=None)
@given(st.data())
def test_random_garbage_only_ever_raises_invalid_object(data: st.DataObject) -> None:
    obj = api_node()
    places = [
        (obj, ["metadata", "status", "spec"]),
        (obj["metadata"], ["name", "labels"]),
        (obj["status"], ["addresses", "conditions"]),
        (obj["status"]["addresses"][1], ["type", "address"]),
        (obj["status"]["conditions"][1], ["type", "status"]),
    ]
    for _ in range(data.draw(st.integers(1, 3))):
        where, keys = data.draw(st.sampled_from(places))
        where[data.draw(st.sampled_from(keys))] = data.draw(json_values)
    with contextlib.suppress(InvalidObject):
        node = parse_node(obj)
        assert all(isinstance(a, str) for a in node.addresses)
        assert node.zone is None or isinstance(node.zone, str)


@settings(max_examples=50, deadline=None)
@given(json_values)
def test_entirely_random_json_only_ever_raises_invalid_object(value: Any) -> None:
    with contextlib.suppress(InvalidObject):
        parse_node(value)
