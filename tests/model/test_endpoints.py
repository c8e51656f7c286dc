"""EndpointSlice parsing and the per-port merge, against the shapes the controller writes.

The slices are those recorded in /work/shared/fixtures/kube-api-v1.28/10-endpointslice-controller
(a Service `web` with ports http/8080 and metrics/9100 on node-b, zone-b).
"""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rapproxy.model.endpoints import (
    LABEL_SERVICE_NAME,
    Endpoint,
    EndpointSliceInfo,
    SlicePort,
    endpoints_for_port,
    parse_endpoint_slice,
)
from rapproxy.model.errors import InvalidObject
from rapproxy.model.service import L4Protocol

TCP = L4Protocol.TCP
UDP = L4Protocol.UDP


def conditions(ready: bool, serving: bool, terminating: bool) -> dict[str, bool]:
    return {"ready": ready, "serving": serving, "terminating": terminating}


def api_endpoint(
    ip: str, *, node: str = "node-b", cond: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "addresses": [ip],
        "conditions": cond if cond is not None else conditions(True, True, False),
        "targetRef": {"kind": "Pod", "namespace": "fx-eps", "name": f"pod-{ip}", "uid": "u"},
        "nodeName": node,
        "zone": "zone-b",
    }
    entry.update(extra)
    return entry


def api_slice(
    endpoints: list[dict[str, Any]] | None,
    *,
    name: str = "web-abcde",
    address_type: str = "IPv4",
    ports: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "generateName": "web-",
            "namespace": "fx-eps",
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                LABEL_SERVICE_NAME: "web",
            },
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web"}],
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports
        if ports is not None
        else [
            {"name": "http", "protocol": "TCP", "port": 8080},
            {"name": "metrics", "protocol": "TCP", "port": 9100},
        ],
    }


# -- parsing ------------------------------------------------------------------------------------


def test_slice_from_the_controller_parses_with_its_service_and_ports() -> None:
    info = parse_endpoint_slice(
        api_slice(
            [
                api_endpoint("10.244.1.11"),
                api_endpoint("10.244.1.12", cond=conditions(False, False, False)),
            ]
        )
    )
    assert (info.namespace, info.name, info.service_name) == ("fx-eps", "web-abcde", "web")
    assert info.service_key == "fx-eps/web"
    assert info.address_type == "IPv4"
    assert info.ports == (SlicePort("http", 8080, TCP), SlicePort("metrics", 9100, TCP))
    first, second = info.endpoints
    assert first.addresses == ("10.244.1.11",)
    assert (first.ready, first.serving, first.terminating) == (True, True, False)
    assert (first.node_name, first.zone) == ("node-b", "zone-b")
    assert (second.ready, second.serving, second.terminating) == (False, False, False)


def test_fresh_slice_with_null_endpoints_and_ports_is_empty() -> None:
    info = parse_endpoint_slice(api_slice(None, ports=[]) | {"ports": None})
    assert info.ports == ()
    assert info.endpoints == ()


def test_unset_conditions_follow_the_api_defaults() -> None:
    info = parse_endpoint_slice(api_slice([api_endpoint("10.0.0.1", cond={})]))
    (entry,) = info.endpoints
    assert (entry.ready, entry.serving, entry.terminating) == (True, True, False)


def test_missing_conditions_object_means_ready() -> None:
    raw = api_endpoint("10.0.0.1")
    del raw["conditions"]
    (entry,) = parse_endpoint_slice(api_slice([raw])).endpoints
    assert (entry.ready, entry.serving, entry.terminating) == (True, True, False)


def test_unset_serving_follows_ready() -> None:
    info = parse_endpoint_slice(
        api_slice(
            [
                api_endpoint("10.0.0.1", cond={"ready": False}),
                api_endpoint("10.0.0.2", cond={"ready": True, "serving": None}),
            ]
        )
    )
    not_ready, ready = info.endpoints
    assert (not_ready.ready, not_ready.serving) == (False, False)
    assert (ready.ready, ready.serving) == (True, True)


def test_terminating_endpoint_keeps_its_serving_condition() -> None:
    cond = conditions(False, True, True)
    (entry,) = parse_endpoint_slice(api_slice([api_endpoint("10.0.0.1", cond=cond)])).endpoints
    assert (entry.ready, entry.serving, entry.terminating) == (False, True, True)


def test_ipv6_slice_normalizes_addresses() -> None:
    info = parse_endpoint_slice(api_slice([api_endpoint("FD00:10:244::0B")], address_type="IPv6"))
    assert info.endpoints[0].addresses == ("fd00:10:244::b",)


def test_address_of_the_other_family_is_refused() -> None:
    with pytest.raises(InvalidObject) as error:
        parse_endpoint_slice(api_slice([api_endpoint("fd00::1")]))
    assert error.value.field == "endpoints[0].addresses[0]"


def test_fqdn_slices_are_refused_as_unproxyable() -> None:
    with pytest.raises(InvalidObject) as error:
        parse_endpoint_slice(api_slice([api_endpoint("db.example.com")], address_type="FQDN"))
    assert error.value.field == "addressType"
    assert "FQDN" in error.value.reason


def test_hints_for_zones_and_nodes_are_kept() -> None:
    hints = {"forZones": [{"name": "zone-a"}, {"name": "zone-b"}], "forNodes": [{"name": "n1"}]}
    info = parse_endpoint_slice(api_slice([api_endpoint("10.0.0.1", hints=hints)]))
    (entry,) = info.endpoints
    assert entry.zone_hints == {"zone-a", "zone-b"}
    assert entry.node_hints == {"n1"}


def test_port_without_a_number_means_all_ports_and_is_skipped() -> None:
    info = parse_endpoint_slice(
        api_slice([api_endpoint("10.0.0.1")], ports=[{"name": "", "protocol": "TCP"}])
    )
    assert info.ports == ()


def test_port_protocol_and_name_default_like_the_api() -> None:
    info = parse_endpoint_slice(api_slice([], ports=[{"port": 53}]))
    assert info.ports == (SlicePort("", 53, TCP),)


def test_only_the_first_address_of_an_endpoint_is_used_like_kube_proxy() -> None:
    raw = api_endpoint("10.0.0.1")
    raw["addresses"] = ["10.0.0.1", "10.0.0.2"]
    info = parse_endpoint_slice(api_slice([raw]))
    assert [e.ip for e in endpoints_for_port([info], "http", TCP)] == ["10.0.0.1"]


def refused(obj: Any) -> InvalidObject:
    with pytest.raises(InvalidObject) as error:
        parse_endpoint_slice(obj)
    assert error.value.kind == "EndpointSlice"
    assert error.value.field in str(error.value)
    return error.value


def test_slice_without_service_name_label_is_refused() -> None:
    obj = api_slice([])
    del obj["metadata"]["labels"][LABEL_SERVICE_NAME]
    assert refused(obj).field == f"metadata.labels[{LABEL_SERVICE_NAME}]"


@pytest.mark.parametrize("field", ["name", "namespace"])
def test_slice_without_name_or_namespace_is_refused(field: str) -> None:
    obj = api_slice([])
    obj["metadata"][field] = ""
    assert refused(obj).field == f"metadata.{field}"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda o: o.update(metadata="x"), "metadata"),
        (lambda o: o.update(ports={"port": 1}), "ports"),
        (lambda o: o.update(ports=[7]), "ports[0]"),
        (lambda o: o["ports"][1].update(port=0), "ports[1].port"),
        (lambda o: o["ports"][1].update(port=65536), "ports[1].port"),
        (lambda o: o["ports"][1].update(port="80"), "ports[1].port"),
        (lambda o: o["ports"][1].update(port=True), "ports[1].port"),
        (lambda o: o["ports"][0].update(protocol="ICMP"), "ports[0].protocol"),
        (lambda o: o["ports"][0].update(protocol=["TCP"]), "ports[0].protocol"),
        (lambda o: o["ports"][0].update(name=5), "ports[0].name"),
        (lambda o: o.update(endpoints={"a": 1}), "endpoints"),
        (lambda o: o.update(endpoints=["10.0.0.1"]), "endpoints[0]"),
        (lambda o: o["endpoints"][0].update(addresses=[]), "endpoints[0].addresses"),
        (lambda o: o["endpoints"][0].update(addresses="10.0.0.1"), "endpoints[0].addresses"),
        (lambda o: o["endpoints"][0].update(addresses=["x"]), "endpoints[0].addresses[0]"),
        (lambda o: o["endpoints"][0].update(addresses=[167772161]), "endpoints[0].addresses[0]"),
        (lambda o: o["endpoints"][0].update(addresses=[None]), "endpoints[0].addresses[0]"),
        (lambda o: o["endpoints"][0].update(conditions=["ready"]), "endpoints[0].conditions"),
        (
            lambda o: o["endpoints"][0].update(conditions={"ready": "true"}),
            "endpoints[0].conditions.ready",
        ),
        (
            lambda o: o["endpoints"][0].update(conditions={"terminating": 1}),
            "endpoints[0].conditions.terminating",
        ),
        (lambda o: o["endpoints"][0].update(hints=["zone-a"]), "endpoints[0].hints"),
        (
            lambda o: o["endpoints"][0].update(hints={"forZones": "zone-a"}),
            "endpoints[0].hints.forZones",
        ),
    ],
)
def test_malformed_slice_is_refused_naming_the_field(mutate: Any, field: str) -> None:
    obj = api_slice([api_endpoint("10.0.0.1")])
    mutate(obj)
    assert refused(obj).field == field


json_scalars = st.none() | st.booleans() | st.integers(-(2**130), 2**130) | st.floats() | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=75, deadline=None)
@given(st.data())
def test_random_garbage_in_any_field_only_ever_raises_invalid_object(data: st.DataObject) -> None:
    obj = api_slice(
        [api_endpoint("10.0.0.1", hints={"forZones": [{"name": "zone-b"}]})],
        address_type=data.draw(st.sampled_from(["IPv4", "IPv6"])),
    )
    endpoint = obj["endpoints"][0]
    places = [
        (obj, ["metadata", "addressType", "endpoints", "ports"]),
        (obj["metadata"], ["name", "namespace", "labels"]),
        (obj["ports"][0], ["name", "protocol", "port"]),
        (endpoint, ["addresses", "conditions", "hints", "nodeName", "zone"]),
        (endpoint["conditions"], ["ready", "serving", "terminating"]),
        (endpoint["hints"], ["forZones", "forNodes"]),
    ]
    for _ in range(data.draw(st.integers(1, 4))):
        where, keys = data.draw(st.sampled_from(places))
        where[data.draw(st.sampled_from(keys))] = data.draw(json_values)
    try:
        info = parse_endpoint_slice(obj)
    except InvalidObject as error:
        assert error.field in str(error)
        return
    for entry in info.endpoints:
        for address in entry.addresses:
            assert isinstance(address, str)
            assert ipaddress.ip_address(address).version == (
                4 if info.address_type == "IPv4" else 6
            )
    endpoints_for_port([info], "http", TCP)


@settings(max_examples=50, deadline=None)
@given(json_values)
def test_entirely_random_json_only_ever_raises_invalid_object(value: Any) -> None:
    with contextlib.suppress(InvalidObject):
        parse_endpoint_slice(value)


# -- merging slices into the endpoints of one port ------------------------------------------------


def slice_info(*entries: dict[str, Any], name: str = "s1", **kwargs: Any) -> EndpointSliceInfo:
    return parse_endpoint_slice(api_slice(list(entries), name=name, **kwargs))


def test_endpoints_for_port_uses_the_port_of_the_matching_name() -> None:
    info = slice_info(api_endpoint("10.0.0.1"))
    assert [e.address for e in endpoints_for_port([info], "http", TCP)] == ["10.0.0.1:8080"]
    assert [e.address for e in endpoints_for_port([info], "metrics", TCP)] == ["10.0.0.1:9100"]
    assert endpoints_for_port([info], "grpc", TCP) == ()


def test_endpoints_for_port_matches_the_protocol_too() -> None:
    info = slice_info(
        api_endpoint("10.0.0.1"),
        ports=[{"name": "dns", "protocol": "UDP", "port": 53}],
    )
    assert [e.address for e in endpoints_for_port([info], "dns", UDP)] == ["10.0.0.1:53"]
    assert endpoints_for_port([info], "dns", TCP) == ()


def test_endpoint_carries_node_zone_conditions_and_hints() -> None:
    hints = {"forZones": [{"name": "zone-b"}], "forNodes": [{"name": "node-b"}]}
    cond = conditions(False, True, True)
    info = slice_info(api_endpoint("10.0.0.1", cond=cond, hints=hints))
    (endpoint,) = endpoints_for_port([info], "http", TCP)
    assert endpoint == Endpoint(
        ip="10.0.0.1",
        port=8080,
        node_name="node-b",
        zone="zone-b",
        ready=False,
        serving=True,
        terminating=True,
        zone_hints=frozenset({"zone-b"}),
        node_hints=frozenset({"node-b"}),
    )


def test_endpoints_from_several_slices_are_merged() -> None:
    a = slice_info(api_endpoint("10.0.0.2"), name="s1")
    b = slice_info(api_endpoint("10.0.0.1"), api_endpoint("10.0.0.3"), name="s2")
    result = endpoints_for_port([a, b], "http", TCP)
    assert [e.ip for e in result] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


@pytest.mark.parametrize("order", [0, 1])
def test_same_address_in_two_slices_counts_once_and_the_ready_copy_wins(order: int) -> None:
    stale = slice_info(api_endpoint("10.0.0.1", cond=conditions(False, False, False)), name="old")
    fresh = slice_info(api_endpoint("10.0.0.1"), name="new")
    slices = [stale, fresh] if order == 0 else [fresh, stale]
    (endpoint,) = endpoints_for_port(slices, "http", TCP)
    assert endpoint.ready


def test_serving_copy_beats_a_not_serving_copy() -> None:
    a = slice_info(api_endpoint("10.0.0.1", cond=conditions(False, False, True)), name="a")
    b = slice_info(api_endpoint("10.0.0.1", cond=conditions(False, True, True)), name="b")
    (endpoint,) = endpoints_for_port([a, b], "http", TCP)
    assert endpoint.serving


def test_same_ip_on_different_ports_is_two_endpoints() -> None:
    a = slice_info(api_endpoint("10.0.0.1"), ports=[{"name": "http", "port": 8080}], name="a")
    b = slice_info(api_endpoint("10.0.0.1"), ports=[{"name": "http", "port": 8081}], name="b")
    assert [e.port for e in endpoints_for_port([a, b], "http", TCP)] == [8080, 8081]


def test_mixed_ipv4_and_ipv6_sort_without_error_v4_first() -> None:
    v6 = slice_info(api_endpoint("fd00::2"), api_endpoint("fd00::1"), address_type="IPv6")
    v4 = slice_info(api_endpoint("10.0.0.9"), api_endpoint("10.0.0.10"), name="v4")
    result = endpoints_for_port([v6, v4], "http", TCP)
    assert [e.ip for e in result] == ["10.0.0.9", "10.0.0.10", "fd00::1", "fd00::2"]


def test_ipv6_endpoint_address_is_bracketed() -> None:
    assert Endpoint("fd00::1", 80).address == "[fd00::1]:80"
    assert str(Endpoint("10.0.0.1", 80)) == "10.0.0.1:80"


addresses = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(addresses, st.booleans(), st.booleans(), st.booleans(), st.integers(0, 2)),
        max_size=12,
    ),
    st.randoms(use_true_random=False),
)
def test_merge_is_deduplicated_sorted_and_independent_of_slice_order(
    rows: list[tuple[str, bool, bool, bool, int]], rng: Any
) -> None:
    by_slice: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for ip, ready, serving, terminating, slice_no in rows:
        family = ipaddress.ip_address(ip).version
        by_slice.setdefault((family, slice_no), []).append(
            api_endpoint(ip, cond=conditions(ready, serving, terminating))
        )
    slices = [
        slice_info(*entries, name=f"s{family}-{no}", address_type=f"IPv{family}")
        for (family, no), entries in by_slice.items()
    ]
    result = endpoints_for_port(slices, "http", TCP)
    shuffled = list(slices)
    rng.shuffle(shuffled)
    again = endpoints_for_port(shuffled, "http", TCP)
    assert [(e.ip, e.ready, e.serving) for e in again] == [
        (e.ip, e.ready, e.serving) for e in result
    ]
    ips = [e.ip for e in result]
    assert len(ips) == len(set(ips)) == len({ip for ip, *_ in rows})
    keys = [(ipaddress.ip_address(ip).version, ipaddress.ip_address(ip).packed) for ip in ips]
    assert keys == sorted(keys)
    for endpoint in result:
        copies = [(r, s) for ip, r, s, _, _ in rows if ip == endpoint.ip]
        assert (endpoint.ready, endpoint.serving) == max(copies)
