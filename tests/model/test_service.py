"""Service parsing: what the proxy takes from a v1 Service, and what it refuses, field by field.

The shapes are the API server's own (/work/shared/fixtures/kube-api-v1.28: 02-crud-service.json,
10-endpointslice-controller.json) with the recorded placeholders replaced by real addresses.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rapproxy.model.errors import InvalidObject
from rapproxy.model.service import (
    ANNOTATION_LB_POLICY,
    DEFAULT_AFFINITY_TIMEOUT_SECONDS,
    LABEL_HEADLESS,
    LABEL_SERVICE_PROXY_NAME,
    L4Protocol,
    LbPolicy,
    ServicePortName,
    is_proxied_by,
    parse_service,
)


def api_service(**spec_changes: Any) -> dict[str, Any]:
    """A Service exactly as the API server returns it (fixture 10, web with two named ports)."""
    obj: dict[str, Any] = {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {
            "name": "web",
            "namespace": "fx-eps",
            "uid": "0b5e4d0c-0000-4000-8000-000000000001",
            "resourceVersion": "1234",
            "creationTimestamp": "2024-01-01T00:00:00Z",
        },
        "spec": {
            "ports": [
                {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
                {"name": "metrics", "protocol": "TCP", "port": 9090, "targetPort": "metrics"},
            ],
            "selector": {"app": "web"},
            "clusterIP": "10.96.12.34",
            "clusterIPs": ["10.96.12.34"],
            "type": "ClusterIP",
            "sessionAffinity": "None",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
        },
        "status": {"loadBalancer": {}},
    }
    obj["spec"].update(spec_changes)
    return obj


def single_port_service(**spec_changes: Any) -> dict[str, Any]:
    obj = api_service(**spec_changes)
    if "ports" not in spec_changes:
        obj["spec"]["ports"] = [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]
    return obj


def field_of(error: pytest.ExceptionInfo[InvalidObject]) -> str:
    return error.value.field


# -- what is accepted ---------------------------------------------------------------------------


def test_cluster_ip_service_from_the_api_parses_into_one_port_per_service_port() -> None:
    parsed = parse_service(api_service())
    assert (parsed.namespace, parsed.name) == ("fx-eps", "web")
    assert [str(p.name) for p in parsed.ports] == ["fx-eps/web:http", "fx-eps/web:metrics"]
    http, metrics = parsed.ports
    assert http.name == ServicePortName("fx-eps", "web", "http", L4Protocol.TCP)
    assert http.name.service_key == "fx-eps/web"
    assert (http.port, http.target_port) == (80, 8080)
    assert (metrics.port, metrics.target_port) == (9090, "metrics")
    assert http.cluster_ips == ("10.96.12.34",)
    assert http.protocol is L4Protocol.TCP
    assert http.node_port is None
    assert http.external_addresses == ()
    assert http.affinity_timeout_seconds is None
    assert not http.internal_traffic_local and not http.external_traffic_local
    assert http.lb_policy is None
    assert http.service_type == "ClusterIP"
    assert parsed.notes == ()


def test_single_unnamed_port_is_allowed_and_target_port_defaults_to_port() -> None:
    obj = api_service(ports=[{"port": 53, "protocol": "UDP"}])
    (port,) = parse_service(obj).ports
    assert port.name == ServicePortName("fx-eps", "web", "", L4Protocol.UDP)
    assert port.target_port == 53
    assert str(port.name) == "fx-eps/web:"


@pytest.mark.parametrize("unset", [{}, {"protocol": None}, {"protocol": ""}])
def test_protocol_defaults_to_tcp_when_unset_like_the_api_server(unset: dict[str, Any]) -> None:
    (port,) = parse_service(api_service(ports=[{"port": 80, **unset}])).ports
    assert port.protocol is L4Protocol.TCP


def test_dual_stack_cluster_ips_are_all_kept_in_canonical_form() -> None:
    obj = single_port_service(clusterIP="10.96.0.10", clusterIPs=["10.96.0.10", "FD00:0::00A"])
    (port,) = parse_service(obj).ports
    assert port.cluster_ips == ("10.96.0.10", "fd00::a")


def test_legacy_cluster_ip_field_is_used_when_cluster_ips_is_absent() -> None:
    obj = single_port_service()
    del obj["spec"]["clusterIPs"]
    (port,) = parse_service(obj).ports
    assert port.cluster_ips == ("10.96.12.34",)


def test_node_port_service_carries_node_ports() -> None:
    obj = api_service(type="NodePort", externalTrafficPolicy="Local")
    obj["spec"]["ports"][0]["nodePort"] = 30080
    obj["spec"]["ports"][1]["nodePort"] = 30090
    http, metrics = parse_service(obj).ports
    assert (http.node_port, metrics.node_port) == (30080, 30090)
    assert http.external_traffic_local
    assert http.service_type == "NodePort"


def test_node_port_field_is_ignored_on_a_cluster_ip_service() -> None:
    # A type change NodePort -> ClusterIP can leave a stale nodePort in a manifest; it must not
    # open a NodePort.
    obj = single_port_service()
    obj["spec"]["ports"][0]["nodePort"] = 30080
    (port,) = parse_service(obj).ports
    assert port.node_port is None


def test_load_balancer_service_carries_node_ports_and_ingress_ips() -> None:
    obj = single_port_service(type="LoadBalancer")
    obj["spec"]["ports"][0]["nodePort"] = 31000
    obj["status"] = {
        "loadBalancer": {
            "ingress": [
                {"ip": "203.0.113.7"},
                {"hostname": "lb.example.com"},
                {"ip": "2001:db8::7"},
            ]
        }
    }
    (port,) = parse_service(obj).ports
    assert port.node_port == 31000
    assert port.load_balancer_ips == ("203.0.113.7", "2001:db8::7")
    assert port.external_addresses == ("203.0.113.7", "2001:db8::7")


def test_load_balancer_ingress_in_proxy_ip_mode_is_not_intercepted() -> None:
    obj = single_port_service(type="LoadBalancer")
    obj["status"] = {
        "loadBalancer": {
            "ingress": [
                {"ip": "203.0.113.7", "ipMode": "Proxy"},
                {"ip": "203.0.113.8", "ipMode": "VIP"},
            ]
        }
    }
    (port,) = parse_service(obj).ports
    assert port.load_balancer_ips == ("203.0.113.8",)


def test_ingress_ips_of_a_non_load_balancer_service_are_ignored() -> None:
    obj = single_port_service()
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}
    (port,) = parse_service(obj).ports
    assert port.load_balancer_ips == ()


def test_load_balancer_without_status_yet_has_no_ingress_ips() -> None:
    obj = single_port_service(type="LoadBalancer")
    del obj["status"]
    (port,) = parse_service(obj).ports
    assert port.load_balancer_ips == ()


def test_external_ips_are_external_addresses() -> None:
    obj = single_port_service(externalIPs=["198.51.100.1", "198.51.100.2"])
    (port,) = parse_service(obj).ports
    assert port.external_ips == ("198.51.100.1", "198.51.100.2")
    assert port.external_addresses == ("198.51.100.1", "198.51.100.2")


def test_client_ip_affinity_defaults_to_three_hours() -> None:
    (port,) = parse_service(single_port_service(sessionAffinity="ClientIP")).ports
    assert port.affinity_timeout_seconds == DEFAULT_AFFINITY_TIMEOUT_SECONDS == 10800


def test_client_ip_affinity_with_api_defaulted_config_uses_its_timeout() -> None:
    obj = single_port_service(
        sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}
    )
    (port,) = parse_service(obj).ports
    assert port.affinity_timeout_seconds == 60


@pytest.mark.parametrize("timeout", [1, 86400])
def test_client_ip_affinity_accepts_the_api_range_bounds(timeout: int) -> None:
    obj = single_port_service(
        sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": timeout}}
    )
    (port,) = parse_service(obj).ports
    assert port.affinity_timeout_seconds == timeout


def test_affinity_config_is_ignored_when_affinity_is_none() -> None:
    obj = single_port_service(
        sessionAffinity="None", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}
    )
    (port,) = parse_service(obj).ports
    assert port.affinity_timeout_seconds is None


def test_traffic_policies_local_are_recorded_per_direction() -> None:
    obj = single_port_service(
        type="NodePort", internalTrafficPolicy="Local", externalTrafficPolicy="Cluster"
    )
    (port,) = parse_service(obj).ports
    assert port.internal_traffic_local
    assert not port.external_traffic_local


def test_traffic_distribution_is_carried() -> None:
    (port,) = parse_service(single_port_service(trafficDistribution="PreferClose")).ports
    assert port.traffic_distribution == "PreferClose"


@pytest.mark.parametrize("policy", list(LbPolicy))
def test_lb_policy_annotation_selects_the_policy(policy: LbPolicy) -> None:
    obj = single_port_service()
    obj["metadata"]["annotations"] = {ANNOTATION_LB_POLICY: policy.value, "other": "x"}
    (port,) = parse_service(obj).ports
    assert port.lb_policy is policy


def test_headless_service_is_valid_with_no_ports() -> None:
    parsed = parse_service(single_port_service(clusterIP="None", clusterIPs=["None"]))
    assert parsed.ports == ()
    assert "headless" in parsed.notes[0]


def test_external_name_service_is_valid_with_no_ports() -> None:
    obj = single_port_service(type="ExternalName", externalName="db.example.com")
    del obj["spec"]["clusterIP"], obj["spec"]["clusterIPs"]
    parsed = parse_service(obj)
    assert parsed.ports == ()
    assert "ExternalName" in parsed.notes[0]


def test_sctp_port_is_skipped_with_a_note_and_the_others_kept() -> None:
    obj = api_service()
    obj["spec"]["ports"][1]["protocol"] = "SCTP"
    parsed = parse_service(obj)
    assert [p.name.port for p in parsed.ports] == ["http"]
    assert len(parsed.notes) == 1
    assert "spec.ports[1]" in parsed.notes[0]
    assert "SCTP" in parsed.notes[0]


def test_same_port_number_on_tcp_and_udp_gives_two_ports() -> None:
    obj = api_service(
        ports=[
            {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 53},
            {"name": "dns-tcp", "protocol": "TCP", "port": 53, "targetPort": 53},
        ]
    )
    udp, tcp = parse_service(obj).ports
    assert (udp.protocol, tcp.protocol) == (L4Protocol.UDP, L4Protocol.TCP)


def test_unknown_fields_are_ignored() -> None:
    obj = single_port_service(someFutureField={"x": 1}, ipFamilies=["IPv4", "IPv6", "IPv9"])
    obj["metadata"]["managedFields"] = [{"manager": "kubectl"}]
    assert len(parse_service(obj).ports) == 1


# -- what is refused, and the field each refusal names -------------------------------------------


def refused(obj: Any) -> InvalidObject:
    with pytest.raises(InvalidObject) as error:
        parse_service(obj)
    assert error.value.kind == "Service"
    assert error.value.field in str(error.value)
    return error.value


@pytest.mark.parametrize("bad", [0, 70000, -1, "80", 80.0, True, None])
def test_invalid_port_number_is_refused_naming_the_port(bad: object) -> None:
    obj = api_service()
    obj["spec"]["ports"][1]["port"] = bad
    error = refused(obj)
    assert error.field == "spec.ports[1].port"
    assert error.key == "fx-eps/web"


@pytest.mark.parametrize("bad", [0, 65536, 1.5, None, [80]])
def test_invalid_target_port_is_refused(bad: object) -> None:
    obj = single_port_service()
    obj["spec"]["ports"][0]["targetPort"] = bad
    assert refused(obj).field == "spec.ports[0].targetPort"


@pytest.mark.parametrize("bad", [0, 70000, "30080"])
def test_invalid_node_port_is_refused(bad: object) -> None:
    obj = single_port_service(type="NodePort")
    obj["spec"]["ports"][0]["nodePort"] = bad
    assert refused(obj).field == "spec.ports[0].nodePort"


@pytest.mark.parametrize("bad", ["tcp", "ICMP", 6, ["TCP"]])
def test_unknown_protocol_is_refused(bad: object) -> None:
    obj = single_port_service()
    obj["spec"]["ports"][0]["protocol"] = bad
    assert refused(obj).field == "spec.ports[0].protocol"


@pytest.mark.parametrize("bad", ["10.96.0.300", "not-an-ip", "", 167772161, None])
def test_bad_cluster_ip_is_refused(bad: object) -> None:
    obj = single_port_service(clusterIPs=["10.96.0.1", bad])
    assert refused(obj).field == "spec.clusterIPs[1]"


def test_unallocated_cluster_ip_is_refused() -> None:
    obj = single_port_service(clusterIP="")
    del obj["spec"]["clusterIPs"]
    assert refused(obj).field == "spec.clusterIP"


def test_cluster_ips_that_is_not_a_list_is_refused() -> None:
    assert refused(single_port_service(clusterIPs="10.96.0.1")).field == "spec.clusterIPs"


@pytest.mark.parametrize("bad", ["1.2.3", 12, None])
def test_bad_external_ip_is_refused(bad: object) -> None:
    obj = single_port_service(externalIPs=["198.51.100.1", bad])
    assert refused(obj).field == "spec.externalIPs[1]"


def test_bad_load_balancer_ingress_ip_is_refused() -> None:
    obj = single_port_service(type="LoadBalancer")
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": "999.0.0.1"}]}}
    assert refused(obj).field == "status.loadBalancer.ingress[0].ip"


def test_load_balancer_ingress_that_is_not_a_list_is_refused() -> None:
    obj = single_port_service(type="LoadBalancer")
    obj["status"] = {"loadBalancer": {"ingress": {"ip": "203.0.113.1"}}}
    assert refused(obj).field == "status.loadBalancer.ingress"


def test_missing_port_name_when_there_are_several_is_refused() -> None:
    obj = api_service()
    del obj["spec"]["ports"][1]["name"]
    assert refused(obj).field == "spec.ports[1].name"


def test_duplicate_port_names_are_refused() -> None:
    obj = api_service()
    obj["spec"]["ports"][1]["name"] = "http"
    error = refused(obj)
    assert error.field == "spec.ports[1].name"
    assert "http" in error.reason


def test_duplicate_port_names_are_refused_even_across_protocols() -> None:
    # The API server requires unique port names within a Service; endpoints are matched by name.
    obj = api_service()
    obj["spec"]["ports"][1].update(name="http", protocol="UDP")
    assert refused(obj).field == "spec.ports[1].name"


def test_duplicate_port_and_protocol_is_refused() -> None:
    # Two service ports on the same address, port and protocol would make interception ambiguous.
    obj = api_service()
    obj["spec"]["ports"][1]["port"] = 80
    assert refused(obj).field == "spec.ports[1].port"


@pytest.mark.parametrize("bad", [None, "", 42])
def test_missing_name_is_refused(bad: object) -> None:
    obj = single_port_service()
    obj["metadata"]["name"] = bad
    assert refused(obj).field == "metadata.name"


def test_missing_namespace_is_refused() -> None:
    obj = single_port_service()
    del obj["metadata"]["namespace"]
    assert refused(obj).field == "metadata.namespace"


@pytest.mark.parametrize("bad", [None, [], "spec", 3])
def test_spec_that_is_not_an_object_is_refused(bad: object) -> None:
    obj = single_port_service()
    obj["spec"] = bad
    assert refused(obj).field == "spec"


@pytest.mark.parametrize("bad", [None, "meta", ["x"]])
def test_metadata_that_is_not_an_object_is_refused(bad: object) -> None:
    obj = single_port_service()
    obj["metadata"] = bad
    assert refused(obj).field == "metadata"


@pytest.mark.parametrize("bad", [None, "Service", 7, ["metadata"]])
def test_object_that_is_not_a_mapping_is_refused(bad: object) -> None:
    refused(bad)


def test_a_non_headless_service_without_ports_is_refused() -> None:
    assert refused(single_port_service(ports=[])).field == "spec.ports"


@pytest.mark.parametrize("bad", ["80", {"port": 80}, 80])
def test_ports_that_is_not_a_list_is_refused(bad: object) -> None:
    assert refused(single_port_service(ports=bad)).field == "spec.ports"


def test_port_entry_that_is_not_an_object_is_refused() -> None:
    assert refused(single_port_service(ports=[80])).field == "spec.ports[0]"


def test_port_name_that_is_not_a_string_is_refused() -> None:
    obj = single_port_service()
    obj["spec"]["ports"][0]["name"] = 8
    assert refused(obj).field == "spec.ports[0].name"


@pytest.mark.parametrize("bad", [0, -5, 86401, "60", 60.5, True])
def test_bad_affinity_timeout_is_refused(bad: object) -> None:
    obj = single_port_service(
        sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": bad}}
    )
    assert refused(obj).field == "spec.sessionAffinityConfig.clientIP.timeoutSeconds"


def test_unknown_session_affinity_is_refused() -> None:
    assert refused(single_port_service(sessionAffinity="Cookie")).field == "spec.sessionAffinity"


@pytest.mark.parametrize("field", ["internalTrafficPolicy", "externalTrafficPolicy"])
@pytest.mark.parametrize("bad", ["local", "Node", 1])
def test_unknown_traffic_policy_is_refused(field: str, bad: object) -> None:
    assert refused(single_port_service(**{field: bad})).field == f"spec.{field}"


def test_traffic_distribution_that_is_not_a_string_is_refused() -> None:
    error = refused(single_port_service(trafficDistribution=["PreferClose"]))
    assert error.field == "spec.trafficDistribution"


@pytest.mark.parametrize("bad", ["roundrobin", "RAP", "", 3, ["rap"]])
def test_unknown_lb_policy_annotation_is_refused_listing_the_choices(bad: object) -> None:
    obj = single_port_service()
    obj["metadata"]["annotations"] = {ANNOTATION_LB_POLICY: bad}
    error = refused(obj)
    assert error.field == f"metadata.annotations[{ANNOTATION_LB_POLICY}]"
    assert "round-robin" in error.reason


def test_annotations_that_are_not_an_object_are_refused() -> None:
    obj = single_port_service()
    obj["metadata"]["annotations"] = ["x"]
    assert refused(obj).field == "metadata.annotations"


def test_type_that_is_not_a_string_is_refused() -> None:
    assert refused(single_port_service(type=["NodePort"])).field == "spec.type"


def test_parsing_never_mutates_the_input() -> None:
    obj = api_service(type="LoadBalancer", sessionAffinity="ClientIP")
    before = copy.deepcopy(obj)
    parse_service(obj)
    assert obj == before


# -- garbage in: only InvalidObject out ----------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-(2**33), 2**33) | st.floats() | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
SERVICE_KEYS = [
    "type",
    "clusterIP",
    "clusterIPs",
    "externalIPs",
    "ports",
    "sessionAffinity",
    "sessionAffinityConfig",
    "internalTrafficPolicy",
    "externalTrafficPolicy",
    "trafficDistribution",
]
PORT_KEYS = ["name", "protocol", "port", "targetPort", "nodePort"]


@settings(max_examples=75, deadline=None)
@given(st.data())
def test_random_garbage_in_any_field_only_ever_raises_invalid_object(data: st.DataObject) -> None:
    obj = api_service(type=data.draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"])))
    obj["metadata"]["annotations"] = {ANNOTATION_LB_POLICY: "random"}
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.1"}]}}
    spec, meta, port = obj["spec"], obj["metadata"], obj["spec"]["ports"][0]
    places = [
        (spec, SERVICE_KEYS),
        (port, PORT_KEYS),
        (meta, ["name", "namespace", "annotations", "labels"]),
        (obj, ["metadata", "spec", "status"]),
    ]
    for _ in range(data.draw(st.integers(1, 4))):
        where, keys = data.draw(st.sampled_from(places))
        where[data.draw(st.sampled_from(keys))] = data.draw(json_values)
    try:
        parse_service(obj)
    except InvalidObject as error:
        assert error.field and error.field in str(error)


@settings(max_examples=50, deadline=None)
@given(json_values)
def test_entirely_random_json_only_ever_raises_invalid_object(value: Any) -> None:
    with contextlib.suppress(InvalidObject):
        parse_service(value)


# -- which proxy handles a Service ---------------------------------------------------------------


def test_replacing_kube_proxy_handles_unlabelled_services() -> None:
    assert is_proxied_by({}, "")
    assert is_proxied_by({"app": "web"}, "")


def test_replacing_kube_proxy_leaves_services_claimed_by_another_proxy() -> None:
    assert not is_proxied_by({LABEL_SERVICE_PROXY_NAME: "cilium"}, "")


def test_beside_kube_proxy_handles_only_services_with_its_name() -> None:
    assert is_proxied_by({LABEL_SERVICE_PROXY_NAME: "rapproxy"}, "rapproxy")
    assert not is_proxied_by({LABEL_SERVICE_PROXY_NAME: "other"}, "rapproxy")
    assert not is_proxied_by({}, "rapproxy")


@pytest.mark.parametrize("proxy_name", ["", "rapproxy"])
def test_services_labelled_headless_are_never_proxied(proxy_name: str) -> None:
    labels = {LABEL_HEADLESS: "", LABEL_SERVICE_PROXY_NAME: "rapproxy"}
    assert not is_proxied_by(labels, proxy_name)
    assert not is_proxied_by({LABEL_HEADLESS: ""}, proxy_name)


def test_empty_service_proxy_name_label_counts_as_claimed() -> None:
    # kube-proxy's selector is `service.kubernetes.io/service-proxy-name` DoesNotExist: a label
    # with an empty value still exists.
    assert not is_proxied_by({LABEL_SERVICE_PROXY_NAME: ""}, "")
