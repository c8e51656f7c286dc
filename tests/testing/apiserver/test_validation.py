"""Built-in validation: names, Service ports, pod update rules, finalizers on deletion."""

from __future__ import annotations

from rapproxy.testing.apiserver.validation import (
    validate_endpoint_slice,
    validate_name,
    validate_new_finalizers,
    validate_pod_update,
    validate_service,
)

POD = {"spec": {"containers": [{"name": "a", "image": "x:1"}], "restartPolicy": "Always"}}


def test_names_follow_dns_rules_per_kind() -> None:
    assert validate_name("Pod", "a.b-c") == []
    assert validate_name("Pod", "Bad_Name")[0].field == "metadata.name"
    assert validate_name("Service", "a.b")  # Services need a DNS label


def test_service_ports_need_names_when_several_and_valid_numbers() -> None:
    causes = validate_service({"spec": {"ports": [{"port": 80}, {"port": 0, "name": "b"}]}})
    assert [(c.field, c.reason) for c in causes] == [
        ("spec.ports[0].name", "FieldValueRequired"),
        ("spec.ports[1].port", "FieldValueInvalid"),
    ]


def test_pod_updates_may_change_images_only() -> None:
    image = {"spec": {"containers": [{"name": "a", "image": "x:2"}], "restartPolicy": "Always"}}
    assert validate_pod_update(image, POD) == []
    policy = {"spec": {"containers": [{"name": "a", "image": "x:1"}], "restartPolicy": "Never"}}
    assert validate_pod_update(policy, POD)[0].field == "spec"
    more = {"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}}
    assert validate_pod_update(more, POD)[0].field == "spec.containers"


def test_no_new_finalizers_while_deleting() -> None:
    old = {"metadata": {"deletionTimestamp": "2024-01-01T00:00:00Z", "finalizers": ["a"]}}
    assert validate_new_finalizers({"metadata": {"finalizers": []}}, old) == []
    assert validate_new_finalizers({"metadata": {"finalizers": ["a", "b"]}}, old)


def test_endpoint_slices_refuse_loopback_and_link_local_addresses() -> None:
    causes = validate_endpoint_slice(
        {
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["127.0.0.1"]},
                {"addresses": ["169.254.1.1"]},
                {"addresses": ["10.1.2.3"]},
            ],
        }
    )
    assert [c.field for c in causes] == ["endpoints[0].addresses[0]", "endpoints[1].addresses[0]"]
