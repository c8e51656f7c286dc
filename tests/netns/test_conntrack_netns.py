"""Stale UDP conntrack entries, shown and removed inside a throwaway namespace.

The first test demonstrates the problem itself (a live UDP flow keeps its old redirect target
after the rules change) so that the fix is tested against the real failure, not a model of it.
"""

from __future__ import annotations

import socket
import subprocess

import pytest

from rapproxy.model.service import L4Protocol, ServicePort, ServicePortName
from rapproxy.rules.apply import IptablesRunner
from rapproxy.rules.backend import detect_backend, tools_for
from rapproxy.rules.conntrack import delete_udp_entries, delete_udp_entries_cli
from rapproxy.rules.render import RedirectTarget, RuleConfig
from rapproxy.testing.netns import Namespace

pytestmark = pytest.mark.root


def udp_service(name: str, cluster_ip: str) -> ServicePort:
    return ServicePort(
        name=ServicePortName("default", name, "dns", L4Protocol.UDP),
        port=53,
        target_port=53,
        cluster_ips=(cluster_ip,),
    )


# A namespace only tracks connections once a rule needs conntrack (NAT does): any REDIRECT will do.
TRACKING = [RedirectTarget(udp_service("unrelated", "10.96.9.9"), 9)]


def udp_socket(ns: Namespace, bind: bool = True) -> socket.socket:
    sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    if bind:
        sock.bind(("0.0.0.0", 0))
    return sock


def flows(ns: Namespace, family: str = "ipv4") -> str:
    listed: subprocess.CompletedProcess[str] = ns.run(
        ["conntrack", "-L", "-f", family, "-p", "udp"]
    )
    return listed.stdout


async def prepared(ns: Namespace) -> IptablesRunner:
    await ns.add_local_route("10.96.0.0/16")
    return IptablesRunner(
        tools_for(await detect_backend(ns.exec_prefix), 4), exec_prefix=ns.exec_prefix
    )


async def test_udp_flow_keeps_its_old_target_until_its_conntrack_entry_is_deleted(
    netns: Namespace,
) -> None:
    runner = await prepared(netns)
    old, new, client = udp_socket(netns), udp_socket(netns), udp_socket(netns, bind=False)
    with old, new, client:
        dns = udp_service("dns", "10.96.0.53")
        await runner.sync([RedirectTarget(dns, old.getsockname()[1])], RuleConfig())
        client.connect(("10.96.0.53", 53))
        client.send(b"one")
        assert old.recv(100) == b"one"

        await runner.sync([RedirectTarget(dns, new.getsockname()[1])], RuleConfig())
        client.send(b"two")
        assert old.recv(100) == b"two", "the stale entry should still steer to the old socket"
        assert "dst=10.96.0.53" in flows(netns)

        assert await delete_udp_entries("10.96.0.53", 53, netns=netns.name) == 1
        assert "dst=10.96.0.53" not in flows(netns)
        client.send(b"three")
        assert new.recv(100) == b"three"


async def test_only_the_named_service_address_and_port_are_forgotten(netns: Namespace) -> None:
    runner = await prepared(netns)
    server, first, second = udp_socket(netns), udp_socket(netns, False), udp_socket(netns, False)
    with server, first, second:
        port = server.getsockname()[1]
        await runner.sync(
            [
                RedirectTarget(udp_service("a", "10.96.0.53"), port),
                RedirectTarget(udp_service("b", "10.96.0.54"), port),
            ],
            RuleConfig(),
        )
        first.sendto(b"x", ("10.96.0.53", 53))
        second.sendto(b"y", ("10.96.0.54", 53))
        assert {server.recv(100), server.recv(100)} == {b"x", b"y"}

        assert await delete_udp_entries("10.96.0.53", 53, netns=netns.name) == 1
        assert "dst=10.96.0.53" not in flows(netns)
        assert "dst=10.96.0.54" in flows(netns)
        assert await delete_udp_entries("10.96.0.53", 53, netns=netns.name) == 0


async def test_nodeport_entries_are_matched_by_port_on_any_address(netns: Namespace) -> None:
    runner = await prepared(netns)
    await runner.sync(TRACKING, RuleConfig())
    sender = udp_socket(netns, bind=False)
    with sender:
        sender.sendto(b"x", ("127.0.0.1", 30053))
        sender.sendto(b"x", ("10.96.0.7", 30053))
        assert flows(netns).count("dport=30053") == 2
        assert await delete_udp_entries(None, 30053, netns=netns.name) == 2
        assert "dport=30053" not in flows(netns)


async def test_the_cli_fallback_deletes_the_same_entries(netns: Namespace) -> None:
    runner = await prepared(netns)
    await runner.sync(TRACKING, RuleConfig())
    sender = udp_socket(netns, bind=False)
    with sender:
        sender.sendto(b"x", ("10.96.0.53", 53))
        sender.sendto(b"x", ("10.96.0.53", 54))
        deleted = await delete_udp_entries_cli("10.96.0.53", 53, exec_prefix=netns.exec_prefix)
        assert deleted == 1
        assert "dport=53 " not in flows(netns)
        assert "dport=54 " in flows(netns)
        assert await delete_udp_entries_cli("10.96.0.53", 53, exec_prefix=netns.exec_prefix) == 0


async def test_a_port_out_of_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="dst_port"):
        await delete_udp_entries("10.96.0.53", 0)


async def test_ipv6_entries_are_deleted_too(netns: Namespace) -> None:
    await netns.add_local_route("fd00:96::/112")
    runner = IptablesRunner(
        tools_for(await detect_backend(netns.exec_prefix), 6), exec_prefix=netns.exec_prefix
    )
    tracking = RedirectTarget(udp_service("unrelated", "fd00:96::99"), 9)
    await runner.sync([tracking], RuleConfig())
    sender = netns.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with sender:
        sender.sendto(b"x", ("fd00:96::53", 53))
        assert "dst=fd00:96::53" in flows(netns, "ipv6")
        assert await delete_udp_entries("FD00:96:0::53", 53, netns=netns.name) == 1
        assert "dst=fd00:96::53" not in flows(netns, "ipv6")
