"""ClientIP session affinity: sticky, sliding, expiring, and reset on demand."""

from __future__ import annotations

from rapproxy.balancer.affinity import AffinityTable

A = ("10.0.0.1", 8080)
B = ("10.0.0.2", 8080)


def test_unknown_client_has_no_sticky_endpoint() -> None:
    assert AffinityTable(60).lookup("192.168.0.1", 0.0) is None


def test_client_sticks_to_the_remembered_endpoint_within_the_timeout() -> None:
    table = AffinityTable(60)
    table.remember("192.168.0.1", A, 100.0)
    assert table.lookup("192.168.0.1", 100.0) == A
    assert table.lookup("192.168.0.1", 160.0) == A
    assert table.lookup("192.168.0.2", 100.0) is None


def test_entry_expires_after_the_timeout_without_use() -> None:
    table = AffinityTable(60)
    table.remember("192.168.0.1", A, 100.0)
    assert table.lookup("192.168.0.1", 160.5) is None
    assert len(table) == 0


def test_expiry_slides_with_each_use() -> None:
    table = AffinityTable(60)
    table.remember("192.168.0.1", A, 0.0)
    for now in (50.0, 100.0, 150.0, 200.0):
        assert table.lookup("192.168.0.1", now) == A
        table.remember("192.168.0.1", A, now)
    assert table.lookup("192.168.0.1", 259.0) == A
    assert table.lookup("192.168.0.1", 261.0) is None


def test_lookup_alone_does_not_slide_the_expiry() -> None:
    table = AffinityTable(60)
    table.remember("192.168.0.1", A, 0.0)
    assert table.lookup("192.168.0.1", 50.0) == A
    assert table.lookup("192.168.0.1", 61.0) is None


def test_remember_replaces_the_endpoint() -> None:
    table = AffinityTable(60)
    table.remember("192.168.0.1", A, 0.0)
    table.remember("192.168.0.1", B, 1.0)
    assert table.lookup("192.168.0.1", 2.0) == B
    assert len(table) == 1


def test_forget_client_resets_only_that_client() -> None:
    table = AffinityTable(60)
    table.remember("192.168.0.1", A, 0.0)
    table.remember("192.168.0.2", A, 0.0)
    table.forget_client("192.168.0.1")
    table.forget_client("192.168.0.99")  # unknown: no error
    assert table.lookup("192.168.0.1", 1.0) is None
    assert table.lookup("192.168.0.2", 1.0) == A


def test_retain_endpoints_drops_clients_of_endpoints_that_disappeared() -> None:
    table = AffinityTable(60)
    table.remember("192.168.0.1", A, 0.0)
    table.remember("192.168.0.2", B, 0.0)
    table.retain_endpoints({B})
    assert table.lookup("192.168.0.1", 1.0) is None
    assert table.lookup("192.168.0.2", 1.0) == B


def test_expire_drops_stale_entries_and_counts_them() -> None:
    table = AffinityTable(60)
    table.remember("192.168.0.1", A, 0.0)
    table.remember("192.168.0.2", A, 50.0)
    assert table.expire(100.0) == 1
    assert len(table) == 1
    assert table.lookup("192.168.0.2", 100.0) == A


def test_timeout_can_be_changed_in_place() -> None:
    table = AffinityTable(60)
    table.remember("192.168.0.1", A, 0.0)
    table.timeout_seconds = 10
    assert table.lookup("192.168.0.1", 11.0) is None
