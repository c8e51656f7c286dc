"""ServiceTable.resolve: which service port an intercepted original destination was."""

from __future__ import annotations

from rapproxy.model.endpoints import Endpoint
from rapproxy.model.service import L4Protocol, ServicePort, ServicePortName
from rapproxy.model.table import Destination, ServiceEntry, ServiceTable

TCP = L4Protocol.TCP
UDP = L4Protocol.UDP
WEB = ServicePortName("default", "web", "http", TCP)
DNS_UDP = ServicePortName("kube-system", "dns", "dns", UDP)
DNS_TCP = ServicePortName("kube-system", "dns", "dns-tcp", TCP)


def table() -> ServiceTable:
    web = ServicePort(
        name=WEB,
        port=80,
        target_port=8080,
        cluster_ips=("10.96.0.10", "fd00::10"),
        node_port=30080,
        external_ips=("198.51.100.1",),
        load_balancer_ips=("203.0.113.1",),
        service_type="LoadBalancer",
    )
    dns_udp = ServicePort(name=DNS_UDP, port=53, target_port=53, cluster_ips=("10.96.0.53",))
    dns_tcp = ServicePort(name=DNS_TCP, port=53, target_port=53, cluster_ips=("10.96.0.53",))
    return ServiceTable(
        {
            WEB: ServiceEntry(web, (Endpoint("10.244.0.1", 8080),)),
            DNS_UDP: ServiceEntry(dns_udp, ()),
            DNS_TCP: ServiceEntry(dns_tcp, ()),
        }
    )


def test_cluster_ip_resolves_as_internal() -> None:
    assert table().resolve(TCP, "10.96.0.10", 80) == Destination(WEB, external=False)
    assert table().resolve(TCP, "fd00::10", 80) == Destination(WEB, external=False)


def test_external_ip_and_load_balancer_ip_resolve_as_external() -> None:
    assert table().resolve(TCP, "198.51.100.1", 80) == Destination(WEB, external=True)
    assert table().resolve(TCP, "203.0.113.1", 80) == Destination(WEB, external=True)


def test_any_local_address_on_the_node_port_resolves_as_external() -> None:
    assert table().resolve(TCP, "192.168.1.2", 30080) == Destination(WEB, external=True)
    assert table().resolve(TCP, "127.0.0.1", 30080) == Destination(WEB, external=True)


def test_protocol_distinguishes_ports_on_the_same_address() -> None:
    t = table()
    assert t.resolve(UDP, "10.96.0.53", 53) == Destination(DNS_UDP, external=False)
    assert t.resolve(TCP, "10.96.0.53", 53) == Destination(DNS_TCP, external=False)
    assert t.resolve(UDP, "10.96.0.10", 80) is None
    assert t.resolve(UDP, "192.168.1.2", 30080) is None


def test_unknown_destination_resolves_to_nothing() -> None:
    t = table()
    assert t.resolve(TCP, "10.96.0.10", 81) is None
    assert t.resolve(TCP, "10.96.0.11", 80) is None


def test_table_behaves_as_a_read_only_collection_of_service_ports() -> None:
    t = table()
    assert len(t) == 3
    assert set(t) == {WEB, DNS_UDP, DNS_TCP}
    assert WEB in t
    entry = t.get(WEB)
    assert entry is not None and entry.endpoints == (Endpoint("10.244.0.1", 8080),)
    assert t.get(ServicePortName("default", "nope", "http")) is None


def test_empty_table_resolves_nothing() -> None:
    assert len(ServiceTable()) == 0
    assert ServiceTable().resolve(TCP, "10.96.0.10", 80) is None


def test_tables_with_the_same_entries_are_equal() -> None:
    assert table() == table()
