"""rapproxy's nat rules applied with real iptables inside throwaway network namespaces.

Each test builds its own namespaces (never the root namespace's iptables), applies rules through
`IptablesRunner`, and checks both what `iptables-save` reports and what real packets do.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Awaitable, Callable

import pytest

from rapproxy.model.service import L4Protocol, ServicePort, ServicePortName
from rapproxy.rules.apply import IptablesError, IptablesRunner
from rapproxy.rules.backend import Backend, detect_backend, tools_for
from rapproxy.rules.render import (
    Family,
    RedirectTarget,
    RuleConfig,
    render_rules,
)
from rapproxy.testing.netns import Namespace

pytestmark = pytest.mark.root

MakeNamespace = Callable[..., Awaitable[Namespace]]
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_CIDR_V6 = "fd00:96::/112"
JUMP = '-m comment --comment "rapproxy service portals" -j RAPPROXY-SERVICES'
SO_ORIGINAL_DST = 80
IP_PKTINFO = 8  # not exported by the socket module on Python 3.11


def service(
    name: str = "web",
    number: int = 80,
    protocol: L4Protocol = L4Protocol.TCP,
    cluster_ip: str = "10.96.0.10",
    node_port: int | None = None,
) -> ServicePort:
    return ServicePort(
        name=ServicePortName("default", name, "p", protocol),
        port=number,
        target_port=8080,
        cluster_ips=(cluster_ip,),
        node_port=node_port,
    )


async def runner_in(
    ns: Namespace, backend: Backend | None = None, family: Family = 4
) -> IptablesRunner:
    chosen = backend or await detect_backend(ns.exec_prefix)
    return IptablesRunner(tools_for(chosen, family), exec_prefix=ns.exec_prefix)


def rule_lines(saved: str) -> list[str]:
    return [line for line in saved.splitlines() if line.startswith("-A ")]


async def listen_tcp(ns: Namespace, family: int = socket.AF_INET) -> tuple[socket.socket, int]:
    listener = ns.socket(family, socket.SOCK_STREAM)
    listener.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
    listener.listen(16)
    listener.setblocking(False)
    return listener, listener.getsockname()[1]


async def connect_and_echo(
    client_ns: Namespace, listener: socket.socket, address: tuple[str, int]
) -> tuple[str, int]:
    """Connect from `client_ns` to `address`; accept on `listener`; echo; return SO_ORIGINAL_DST."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    client = client_ns.socket(family, socket.SOCK_STREAM)
    client.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(client, address), 5)
        accepted, _ = await asyncio.wait_for(loop.sock_accept(listener), 5)
        with accepted:
            original = original_destination(accepted)
            await loop.sock_sendall(client, b"ping")
            data = await asyncio.wait_for(loop.sock_recv(accepted, 16), 5)
            await loop.sock_sendall(accepted, data.upper())
            assert await asyncio.wait_for(loop.sock_recv(client, 16), 5) == b"PING"
        return original
    finally:
        client.close()


def original_destination(sock: socket.socket) -> tuple[str, int]:
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


@pytest.mark.parametrize("backend", [Backend.NFT, Backend.LEGACY])
async def test_applied_rules_show_in_iptables_save_and_reapplying_adds_nothing(
    netns: Namespace, backend: Backend
) -> None:
    runner = await runner_in(netns, backend)
    targets = [
        RedirectTarget(service(node_port=30080), 15001),
        RedirectTarget(service("dns", 53, L4Protocol.UDP, "10.96.0.53"), 40053),
    ]
    await runner.sync(targets, RuleConfig())
    first = await runner.save()
    await runner.sync(targets, RuleConfig())
    second = await runner.save()

    rendered = [
        line for line in render_rules(targets, RuleConfig()).splitlines() if line[:3] == "-A "
    ]
    assert set(rendered) <= set(rule_lines(second))
    assert rule_lines(first) == rule_lines(second)
    assert rule_lines(second).count(f"-A PREROUTING {JUMP}") == 1
    assert rule_lines(second).count(f"-A OUTPUT {JUMP}") == 1


async def test_changed_service_replaces_its_old_rule(netns: Namespace) -> None:
    runner = await runner_in(netns)
    await runner.sync([RedirectTarget(service(cluster_ip="10.96.0.10"), 15001)], RuleConfig())
    await runner.sync(
        [RedirectTarget(service(cluster_ip="10.96.0.20", number=8080), 15001)],
        RuleConfig(),
        repair_jumps=False,
    )
    saved = await runner.save()
    assert "10.96.0.10" not in saved
    assert "-d 10.96.0.20/32" in saved
    assert "--dport 8080" in saved


async def test_cleanup_leaves_no_rapproxy_text_and_is_idempotent(netns: Namespace) -> None:
    runner = await runner_in(netns)
    await runner.sync([RedirectTarget(service(node_port=30080), 15001)], RuleConfig())
    assert await runner.cleanup() is True
    assert "RAPPROXY" not in await runner.save()
    assert await runner.cleanup() is False


async def test_leftovers_of_a_crashed_run_are_repaired_by_the_first_sync(netns: Namespace) -> None:
    runner = await runner_in(netns)
    # What an older, crashed rapproxy might have left: a stale rule in our chain, a chain this
    # version no longer uses (referenced from OUTPUT), duplicate jumps and a non-canonical jump.
    await runner.restore(
        "*nat\n"
        ":RAPPROXY-SERVICES - [0:0]\n"
        ":RAPPROXY-PORTALS - [0:0]\n"
        "-A RAPPROXY-SERVICES -d 10.96.0.99/32 -p tcp -m tcp --dport 99 -j REDIRECT --to-ports 9\n"
        "-A RAPPROXY-PORTALS -p tcp -j REDIRECT --to-ports 9\n"
        f"-A PREROUTING {JUMP}\n"
        f"-A PREROUTING {JUMP}\n"
        "-A OUTPUT -j RAPPROXY-SERVICES\n"
        "-A OUTPUT -j RAPPROXY-PORTALS\n"
        "COMMIT\n"
    )
    await runner.sync([RedirectTarget(service(), 15001)], RuleConfig())
    saved = await runner.save()
    builtin = [
        line for line in rule_lines(saved) if line.startswith(("-A PREROUTING", "-A OUTPUT"))
    ]
    assert sorted(builtin) == [
        f"-A OUTPUT {JUMP}",
        f"-A PREROUTING {JUMP}",
    ]
    assert "RAPPROXY-PORTALS" not in saved
    assert "10.96.0.99" not in saved
    assert "-d 10.96.0.10/32" in saved


async def test_jump_check_restores_a_deleted_jump_without_touching_live_rules(
    netns: Namespace,
) -> None:
    runner = await runner_in(netns)
    await runner.sync([RedirectTarget(service(), 15001)], RuleConfig())
    await runner.restore(f"*nat\n-D OUTPUT {JUMP}\nCOMMIT\n")
    assert await runner.ensure_jumps() is True
    saved = await runner.save()
    assert f"-A OUTPUT {JUMP}" in saved
    assert "-d 10.96.0.10/32" in saved
    assert await runner.ensure_jumps() is False


async def test_rejected_transaction_raises_with_iptables_stderr_and_the_line(
    netns: Namespace,
) -> None:
    runner = await runner_in(netns)
    with pytest.raises(IptablesError) as caught:
        await runner.restore("*nat\n-A RAPPROXY-NO-SUCH-CHAIN -j RETURN\nCOMMIT\n")
    assert caught.value.returncode not in (0, None)
    assert caught.value.stderr
    assert caught.value.failed_line == "-A RAPPROXY-NO-SUCH-CHAIN -j RETURN"
    assert "RAPPROXY" not in await runner.save()


async def test_tcp_connect_to_cluster_ip_reaches_the_listener_with_original_destination(
    netns: Namespace,
) -> None:
    await netns.add_local_route(SERVICE_CIDR)
    listener, port = await listen_tcp(netns)
    with listener:
        runner = await runner_in(netns)
        await runner.sync([RedirectTarget(service(), port)], RuleConfig())
        assert await connect_and_echo(netns, listener, ("10.96.0.10", 80)) == ("10.96.0.10", 80)


async def test_tcp_connect_to_ipv6_cluster_ip_reaches_the_ipv6_listener(netns: Namespace) -> None:
    await netns.add_local_route(SERVICE_CIDR_V6)
    listener, port = await listen_tcp(netns, socket.AF_INET6)
    with listener:
        runner = await runner_in(netns, family=6)
        target = RedirectTarget(service(cluster_ip="fd00:96::10"), port)
        await runner.sync([target], RuleConfig())
        assert "-d fd00:96::10/128" in await runner.save()
        assert await connect_and_echo(netns, listener, ("fd00:96::10", 80)) == ("fd00:96::10", 80)
        await runner.cleanup()


async def test_udp_datagram_to_cluster_ip_reaches_its_socket_and_a_pktinfo_reply_returns(
    netns: Namespace,
) -> None:
    await netns.add_local_route(SERVICE_CIDR)
    server = netns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client = netns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with server, client:
        server.bind(("0.0.0.0", 0))
        server.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        server.settimeout(5)
        client.settimeout(5)
        runner = await runner_in(netns)
        dns = service("dns", 53, L4Protocol.UDP, "10.96.0.53")
        await runner.sync([RedirectTarget(dns, server.getsockname()[1])], RuleConfig())

        client.connect(("10.96.0.53", 53))
        client.send(b"query")
        data, ancillary, _, sender = server.recvmsg(65535, 256)
        assert data == b"query"
        assert sender == client.getsockname()
        # The datagram's destination after REDIRECT is 127.0.0.1. A reply must leave FROM that
        # address for conntrack to map it back to 10.96.0.53:53 (a wildcard-bound reply picks
        # another source and the connected client never sees it): the UDP relay must use
        # IP_PKTINFO. Shown here so the data plane can rely on it.
        (level, kind, info) = ancillary[0]
        assert (level, kind) == (socket.IPPROTO_IP, IP_PKTINFO)
        redirected_to = info[8:12]
        assert socket.inet_ntoa(redirected_to) == "127.0.0.1"
        reply_from = struct.pack("I4s4s", 0, redirected_to, bytes(4))
        server.sendmsg([b"answer"], [(socket.IPPROTO_IP, IP_PKTINFO, reply_from)], 0, sender)
        assert client.recvfrom(65535) == (b"answer", ("10.96.0.53", 53))


async def test_client_namespace_reaches_nodeport_and_cluster_ip_through_prerouting(
    make_namespace: MakeNamespace,
) -> None:
    node = await make_namespace("node")
    client = await make_namespace("client")
    await client.add_veth_peer(node, "10.200.0.1", "10.200.0.2", 24)
    # The client routes the service CIDR to the node (never a default route), as a pod does.
    await client.add_route(SERVICE_CIDR, via="10.200.0.2")
    listener, port = await listen_tcp(node)
    with listener:
        runner = await runner_in(node)
        await runner.sync([RedirectTarget(service(node_port=30080), port)], RuleConfig())
        assert await connect_and_echo(client, listener, ("10.200.0.2", 30080)) == (
            "10.200.0.2",
            30080,
        )
        assert await connect_and_echo(client, listener, ("10.96.0.10", 80)) == ("10.96.0.10", 80)


async def test_nodeport_on_loopback_is_not_intercepted_by_default(netns: Namespace) -> None:
    listener, port = await listen_tcp(netns)
    with listener:
        runner = await runner_in(netns)
        await runner.sync([RedirectTarget(service(node_port=30080), port)], RuleConfig())
        loop = asyncio.get_running_loop()
        client = netns.socket()
        client.setblocking(False)
        with client, pytest.raises(ConnectionRefusedError):
            await asyncio.wait_for(loop.sock_connect(client, ("127.0.0.1", 30080)), 5)
        await runner.sync(
            [RedirectTarget(service(node_port=30080), port)],
            RuleConfig(localhost_nodeports=True),
            repair_jumps=False,
        )
        assert await connect_and_echo(netns, listener, ("127.0.0.1", 30080)) == (
            "127.0.0.1",
            30080,
        )


async def test_ten_thousand_service_ports_render_and_apply_in_one_transaction(
    netns: Namespace,
) -> None:
    targets = [
        RedirectTarget(
            ServicePort(
                name=ServicePortName("bulk", f"svc{i}", "p"),
                port=80,
                target_port=80,
                cluster_ips=(f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}",),
                node_port=30000 + i % 2768 if i < 2768 else None,
            ),
            15001,
        )
        for i in range(10_000)
    ]
    runner = await runner_in(netns)
    started = time.perf_counter()
    text = render_rules(targets, RuleConfig(), saved_nat=await runner.save())
    rendered = time.perf_counter()
    await runner.restore(text)
    applied = time.perf_counter()
    await runner.sync(targets, RuleConfig(), repair_jumps=False)  # a steady-state resync
    resynced = time.perf_counter()
    saved = await runner.save()
    assert len([line for line in rule_lines(saved) if "REDIRECT" in line]) == 10_000 + 2768
    print(
        f"\n10k service ports: render {rendered - started:.3f} s, first apply "
        f"{applied - rendered:.3f} s, resync (render+apply) {resynced - applied:.3f} s"
    )
    assert resynced - started < 60
