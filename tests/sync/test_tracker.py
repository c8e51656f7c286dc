"""ChangeTracker: events are recorded, snapshots rebuild only what changed, bad objects are skipped."""

from __future__ import annotations

from typing import Any

from rapproxy.model.service import L4Protocol, ServicePortName
from rapproxy.sync.tracker import ChangeTracker


def service(name: str, ip: str, port: int = 80, **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {"namespace": "default", "name": name, **extra.pop("metadata", {})},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": port, "targetPort": 8080}]},
    }
    obj["spec"].update(extra)
    return obj


def endpoint_slice(
    service_name: str, slice_name: str, *ips: str, ready: bool = True
) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "default",
            "name": slice_name,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}} for ip in ips],
    }


WEB = ServicePortName("default", "web", "http", L4Protocol.TCP)


def test_snapshot_joins_services_with_their_slices() -> None:
    tracker = ChangeTracker()
    tracker.service_updated(service("web", "10.96.0.10"))
    tracker.slice_updated(endpoint_slice("web", "web-a", "10.1.0.1", "10.1.0.2"))
    tracker.slice_updated(endpoint_slice("web", "web-b", "10.1.0.3"))
    table, changed = tracker.snapshot()
    assert changed == {"default/web"}
    entry = table.get(WEB)
    assert entry is not None
    assert [e.address for e in entry.endpoints] == [
        "10.1.0.1:8080",
        "10.1.0.2:8080",
        "10.1.0.3:8080",
    ]
    assert table.resolve(L4Protocol.TCP, "10.96.0.10", 80) is not None


def test_snapshot_without_changes_returns_the_same_table() -> None:
    tracker = ChangeTracker()
    tracker.service_updated(service("web", "10.96.0.10"))
    first, _ = tracker.snapshot()
    tracker.service_updated(service("web", "10.96.0.10"))  # identical: not a change
    second, changed = tracker.snapshot()
    assert second is first
    assert changed == frozenset()


def test_only_changed_services_are_rebuilt() -> None:
    tracker = ChangeTracker()
    tracker.service_updated(service("web", "10.96.0.10"))
    tracker.service_updated(service("api", "10.96.0.11"))
    tracker.snapshot()
    tracker.slice_updated(endpoint_slice("api", "api-a", "10.1.0.9"))
    table, changed = tracker.snapshot()
    assert changed == {"default/api"}
    assert len(table) == 2


def test_invalid_service_is_reported_and_others_keep_working() -> None:
    tracker = ChangeTracker()
    tracker.service_updated(service("web", "10.96.0.10"))
    broken = service("bad", "10.96.0.12", port=70000)
    tracker.service_updated(broken)
    table, _ = tracker.snapshot()
    assert WEB in table
    assert len(table) == 1
    errors = tracker.describe_errors()
    assert errors[0]["object"] == "default/bad"
    assert "spec.ports[0].port" in errors[0]["error"]


def test_service_that_turns_invalid_keeps_its_last_valid_form() -> None:
    tracker = ChangeTracker()
    tracker.service_updated(service("web", "10.96.0.10"))
    tracker.snapshot()
    tracker.service_updated(service("web", "not-an-ip"))
    table, _ = tracker.snapshot()
    entry = table.get(WEB)
    assert entry is not None and entry.port.cluster_ips == ("10.96.0.10",)
    assert tracker.errors


def test_deleting_a_service_removes_it_and_its_error() -> None:
    tracker = ChangeTracker()
    tracker.service_updated(service("web", "not-an-ip"))
    assert tracker.errors
    tracker.service_deleted(service("web", "not-an-ip"))
    assert not tracker.errors


def test_service_claimed_by_another_proxy_is_treated_as_deleted() -> None:
    tracker = ChangeTracker()
    tracker.service_updated(service("web", "10.96.0.10"))
    tracker.snapshot()
    claimed = service(
        "web",
        "10.96.0.10",
        metadata={"labels": {"service.kubernetes.io/service-proxy-name": "other"}},
    )
    tracker.service_updated(claimed)
    table, _ = tracker.snapshot()
    assert WEB not in table


def test_beside_kube_proxy_only_labelled_services_are_handled() -> None:
    tracker = ChangeTracker(service_proxy_name="rapproxy")
    tracker.service_updated(service("plain", "10.96.0.10"))
    labelled = {"labels": {"service.kubernetes.io/service-proxy-name": "rapproxy"}}
    tracker.service_updated(service("mine", "10.96.0.11", metadata=labelled))
    table, _ = tracker.snapshot()
    assert [str(n) for n in table] == ["default/mine:http"]


def test_replace_all_deletes_what_vanished() -> None:
    tracker = ChangeTracker()
    tracker.replace_all(
        [service("web", "10.96.0.10"), service("api", "10.96.0.11")],
        [endpoint_slice("web", "web-a", "10.1.0.1")],
    )
    tracker.snapshot()
    tracker.replace_all([service("web", "10.96.0.10")], [])
    table, changed = tracker.snapshot()
    assert changed == {"default/web", "default/api"}
    entry = table.get(WEB)
    assert entry is not None and entry.endpoints == ()
    assert len(table) == 1


def test_slice_moving_to_another_service_leaves_the_first() -> None:
    tracker = ChangeTracker()
    tracker.service_updated(service("web", "10.96.0.10"))
    tracker.service_updated(service("api", "10.96.0.11"))
    tracker.slice_updated(endpoint_slice("web", "shared", "10.1.0.1"))
    tracker.snapshot()
    tracker.slice_updated(endpoint_slice("api", "shared", "10.1.0.1"))
    table, _ = tracker.snapshot()
    web = table.get(WEB)
    api = table.get(ServicePortName("default", "api", "http", L4Protocol.TCP))
    assert web is not None and web.endpoints == ()
    assert api is not None and len(api.endpoints) == 1


def test_pending_counts_and_first_pending_time() -> None:
    now = [100.0]
    tracker = ChangeTracker(clock=lambda: now[0])
    assert tracker.pending == 0 and tracker.first_pending_at is None
    tracker.service_updated(service("web", "10.96.0.10"))
    now[0] = 105.0
    tracker.service_updated(service("api", "10.96.0.11"))
    assert tracker.pending == 2
    assert tracker.first_pending_at == 100.0
    tracker.snapshot()
    assert tracker.pending == 0 and tracker.first_pending_at is None


def test_garbage_objects_never_raise() -> None:
    tracker = ChangeTracker()
    for garbage in ({}, {"metadata": None}, {"metadata": {"name": 3}}, {"spec": []}):
        tracker.service_updated(garbage)
        tracker.slice_updated(garbage)
        tracker.service_deleted(garbage)
        tracker.slice_deleted(garbage)
    table, _ = tracker.snapshot()
    assert len(table) == 0
