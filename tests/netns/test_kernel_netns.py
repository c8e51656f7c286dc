"""The kernel fast path with real iptables: measured shares, affinity, weights that follow load.

    node 10.200.0.1 ── veth ── backends 10.200.0.2 (+ endpoint addresses 10.200.0.11-.13)

The node namespace holds the rules and is the client (its own processes reach the ClusterIP
through OUTPUT); the service CIDR is routed out of the veth, never a default route. One listener
in the backends namespace accepts for every endpoint address; the address a connection arrived
on says which endpoint the kernel chose.

Shares are judged with a binomial tolerance: over N connections an endpoint drawn with
probability p is hit N·p ± 5·sqrt(N·p·(1-p)) times except with probability below 1e-6.
"""

from __future__ import annotations

import asyncio
import math
import random
import select
import socket
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from rapproxy.balancer.rap import rap_policy_factory
from rapproxy.config import from_mapping
from rapproxy.model.service import ServicePort, ServicePortName
from rapproxy.model.telemetry import NodeStats, RapSettings, TelemetryTracker
from rapproxy.rules.apply import IptablesRunner
from rapproxy.rules.backend import detect_backend, tools_for
from rapproxy.rules.kernel import KernelTarget, WeightedEndpoint, endpoint_chain
from rapproxy.rules.render import RuleConfig
from rapproxy.sync.proxier import Proxier
from rapproxy.testing.kernel_world import endpoint_world
from rapproxy.testing.netns import Namespace

pytestmark = pytest.mark.root

MakeNamespace = Callable[..., Awaitable[Namespace]]
CLUSTER_IP = "10.96.0.10"
ENDPOINTS = ("10.200.0.11", "10.200.0.12", "10.200.0.13")
NAME = ServicePortName("default", "web", "http")
CONNECTIONS = 1500


def sigma5(n: int, p: float) -> float:
    return 5 * math.sqrt(n * p * (1 - p))


async def world(make_namespace: MakeNamespace) -> tuple[Namespace, Namespace, socket.socket]:
    return await endpoint_world(make_namespace, ENDPOINTS)


async def runner_in(ns: Namespace) -> IptablesRunner:
    return IptablesRunner(
        tools_for(await detect_backend(ns.exec_prefix), 4), exec_prefix=ns.exec_prefix
    )


async def chosen(node: Namespace, listener: socket.socket, count: int) -> Counter[str]:
    """Open `count` connections to the ClusterIP one after another; count who accepted each."""
    loop = asyncio.get_running_loop()
    seen: Counter[str] = Counter()
    for _ in range(count):
        client = node.socket()
        client.setblocking(False)
        with client:
            await asyncio.wait_for(loop.sock_connect(client, (CLUSTER_IP, 80)), 5)
            accepted, _ = await asyncio.wait_for(loop.sock_accept(listener), 5)
            with accepted:
                seen[accepted.getsockname()[0]] += 1
    return seen


def service_port(affinity: int | None = None) -> ServicePort:
    return ServicePort(NAME, 80, 8080, (CLUSTER_IP,), affinity_timeout_seconds=affinity)


def weighted(*weights: float) -> tuple[WeightedEndpoint, ...]:
    return tuple(WeightedEndpoint(ip, 8080, w) for ip, w in zip(ENDPOINTS, weights, strict=True))


def assert_shares(seen: Counter[str], weights: tuple[float, ...]) -> None:
    total = sum(seen.values())
    for ip, weight in zip(ENDPOINTS, weights, strict=True):
        p = weight / sum(weights)
        assert abs(seen[ip] - total * p) <= sigma5(total, p), (ip, p, dict(seen))


async def test_measured_shares_match_the_weights_and_follow_a_weight_update(
    make_namespace: MakeNamespace,
) -> None:
    node, _, listener = await world(make_namespace)
    with listener:
        runner = await runner_in(node)
        target = KernelTarget(service_port(), weighted(0.6, 0.3, 0.1), (), 15001)
        await runner.sync([], RuleConfig(), kernel=[target])
        assert_shares(await chosen(node, listener, CONNECTIONS), (0.6, 0.3, 0.1))

        moved = KernelTarget(service_port(), weighted(0.1, 0.2, 0.7), (), 15001)
        assert await runner.update_weights([moved], RuleConfig())
        assert_shares(await chosen(node, listener, CONNECTIONS), (0.1, 0.2, 0.7))

        await runner.cleanup()
        saved = await runner.save()
        assert "RAPPROXY" not in saved
        assert "recent" not in saved


async def test_established_connections_keep_their_endpoint_across_a_weight_update(
    make_namespace: MakeNamespace,
) -> None:
    node, _, listener = await world(make_namespace)
    with listener:
        runner = await runner_in(node)
        await runner.sync(
            [], RuleConfig(), kernel=[KernelTarget(service_port(), weighted(1, 0, 0), (), 15001)]
        )
        loop = asyncio.get_running_loop()
        client = node.socket()
        client.setblocking(False)
        with client:
            await asyncio.wait_for(loop.sock_connect(client, (CLUSTER_IP, 80)), 5)
            accepted, _ = await asyncio.wait_for(loop.sock_accept(listener), 5)
            with accepted:
                assert accepted.getsockname()[0] == ENDPOINTS[0]
                await runner.update_weights(
                    [KernelTarget(service_port(), weighted(0, 0, 1), (), 15001)], RuleConfig()
                )
                assert await chosen(node, listener, 20) == Counter({ENDPOINTS[2]: 20})
                # The old flow still reaches its endpoint (conntrack kept the DNAT).
                await loop.sock_sendall(client, b"still here")
                assert await asyncio.wait_for(loop.sock_recv(accepted, 32), 5) == b"still here"
        await runner.cleanup()


async def test_client_ip_affinity_holds_every_connection_on_the_first_endpoint(
    make_namespace: MakeNamespace,
) -> None:
    node, _, listener = await world(make_namespace)
    with listener:
        runner = await runner_in(node)
        target = KernelTarget(service_port(affinity=600), weighted(1, 1, 1), (), 15001)
        await runner.sync([], RuleConfig(), kernel=[target])
        seen = await chosen(node, listener, 60)
        assert len(seen) == 1, dict(seen)
        await runner.cleanup()
        assert "RAPPROXY" not in await runner.save()


def objects(annotations: dict[str, str]) -> list[dict[str, object]]:
    return [
        {
            "metadata": {"namespace": "default", "name": "web", "annotations": annotations},
            "spec": {
                "clusterIP": CLUSTER_IP,
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            },
        },
        {
            "metadata": {
                "namespace": "default",
                "name": "web-1",
                "labels": {"kubernetes.io/service-name": "web"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": [ip], "nodeName": node}
                for ip, node in zip(ENDPOINTS, ("n0", "n1", "n2"), strict=True)
            ],
        },
    ]


NOW = 100.0  # the kernel Proxier's clock: telemetry samples are taken at it


async def kernel_proxier(node: Namespace, sample_share: float) -> tuple[TelemetryTracker, Proxier]:
    """A kernel-mode Proxier on node n0 (the real `rap` policy), Service web known, telemetry
    fresh: n0 healthy, its two peers idle and 1 ms away."""
    settings = RapSettings()
    telemetry = TelemetryTracker("n0", settings)
    telemetry.record_local(NodeStats("n0", 0.2, 0.2, NOW))
    telemetry.record_peer("n1", NodeStats("n1", 0.1, 0.2, NOW), 0.001)
    telemetry.record_peer("n2", NodeStats("n2", 0.1, 0.2, NOW), 0.001)
    config = from_mapping(
        {
            "dataplane": {
                "mode": "kernel",
                "weightThreshold": 0.02,
                "kernelSampleShare": sample_share,
            }
        }
    )
    proxier = Proxier(
        config,
        "n0",
        iptables=[await runner_in(node)],
        policy_factory=rap_policy_factory(telemetry.snapshot, settings, random.Random(3)),
        clock=lambda: NOW,
        telemetry=telemetry.snapshot,
        rap_settings=settings,
    )
    service, endpoint_slice = objects({})
    proxier.tracker.service_updated(service)
    proxier.tracker.slice_updated(endpoint_slice)
    return telemetry, proxier


async def test_weights_follow_the_injected_load_of_the_local_node(
    make_namespace: MakeNamespace,
) -> None:
    node, _, listener = await world(make_namespace)
    # Telemetry alone (no sample): the weights are rap-aimd's split.
    telemetry, proxier = await kernel_proxier(node, sample_share=0)
    with listener:
        await proxier.sync()
        # The local node copes: every new connection stays on its endpoint.
        assert await chosen(node, listener, 50) == Counter({ENDPOINTS[0]: 50})
        state = proxier.describe()["kernel"]["default/web:http"]
        assert state["written"] and state["decision"] == "local"

        # Two overloaded samples: the local share is 0.7 * 0.7 = 0.49, the rest split evenly
        # over the two equally scored peers.
        telemetry.record_local(NodeStats("n0", 0.95, 0.2, NOW))
        telemetry.record_local(NodeStats("n0", 0.95, 0.2, NOW))
        assert await proxier.refresh_weights() == 1
        assert_shares(await chosen(node, listener, CONNECTIONS), (0.49, 0.255, 0.255))
        weights = proxier.describe()["kernel"]["default/web:http"]["weights"]
        assert weights[f"{ENDPOINTS[0]}:8080"] == pytest.approx(0.49)
        assert await proxier.refresh_weights() == 0  # nothing moved: nothing written

        # The mode switch to userspace is one transaction: the jump becomes a REDIRECT.
        service, _ = objects({"rapproxy.io/dataplane": "userspace"})
        proxier.tracker.service_updated(service)
        await proxier.sync()
        saved = await proxier.iptables[0].save()
        assert "RAPPROXY-SVC" not in saved
        assert f"-d {CLUSTER_IP}/32" in saved and "REDIRECT --to-ports 15001" in saved
        await proxier.cleanup_rules()
        assert "RAPPROXY" not in await proxier.iptables[0].save()


def routed(node: Namespace, listeners: dict[str, socket.socket], count: int) -> list[str]:
    """Open `count` connections to the ClusterIP one after another; which listener got each
    (by name), and for the backends' listener which endpoint address. Blocking: run in a thread."""
    out: list[str] = []
    for _ in range(count):
        client = node.socket()
        with client:
            client.settimeout(5)
            client.connect((CLUSTER_IP, 80))
            ready, _, _ = select.select(list(listeners.values()), [], [], 5)
            assert ready, "no listener got the connection"
            which = next(name for name, sock in listeners.items() if sock is ready[0])
            accepted, _ = ready[0].accept()
            with accepted:
                out.append(which if which == "proxy" else accepted.getsockname()[0])
    return out


async def test_while_overloaded_a_sample_reaches_the_proxy_and_its_decisions_set_the_weights(
    make_namespace: MakeNamespace,
) -> None:
    """The sample rule REDIRECTs its share to the proxy's port; the decisions the proxier makes
    for those connections (its `choose`, which the relay calls per connection, here with the
    real `rap` policy) move the weights of the rest; healthy again, the sample rule goes."""
    node, _, listener = await world(make_namespace)
    telemetry, proxier = await kernel_proxier(node, sample_share=0.3)
    proxy = node.socket()
    proxy.bind(("0.0.0.0", 15001))
    proxy.listen(512)
    listeners = {"proxy": proxy, "backends": listener}
    with listener, proxy:
        await proxier.sync()
        assert await proxier.refresh_weights() == 0  # healthy: no sample, nothing moves
        assert "sample decided by the proxy" not in await proxier.iptables[0].save()

        telemetry.record_local(NodeStats("n0", 0.95, 0.2, NOW))
        telemetry.record_local(NodeStats("n0", 0.95, 0.2, NOW))
        assert await proxier.refresh_weights() == 1
        state = proxier.describe()["kernel"]["default/web:http"]
        assert state["decision"].startswith("sampled")
        assert state["local_share"] == 1.0  # where rap starts: local first

        seen = Counter(await asyncio.to_thread(routed, node, listeners, CONNECTIONS))
        assert abs(seen["proxy"] - CONNECTIONS * 0.3) <= sigma5(CONNECTIONS, 0.3), dict(seen)
        assert seen[ENDPOINTS[0]] == CONNECTIONS - seen["proxy"], dict(seen)

        # The local pod answers in 200 ms, the remote ones in 1 ms: rap spills what it decides.
        for ip, seconds in zip(ENDPOINTS, (0.2, 0.001, 0.001), strict=True):
            for _ in range(3):
                queued = proxier.balancer.connection_opened((ip, 8080), 0.0005, NOW)
                proxier.balancer.first_response((ip, 8080), 0.0005, seconds, NOW, queued)
                proxier.balancer.connection_closed((ip, 8080), awaiting=False)
        # Play the relay: one decision per connection the proxy received.
        key = proxier.service_for("TCP", CLUSTER_IP, 80)
        assert key is not None
        decided: Counter[str] = Counter()
        for _ in range(seen["proxy"]):
            backend = proxier.choose(key, "10.200.0.1", frozenset())
            assert backend is not None
            decided[backend.ip] += 1
        observed_local = decided[ENDPOINTS[0]] / sum(decided.values())
        assert observed_local < 0.5, dict(decided)
        assert await proxier.refresh_weights() == 1
        state = proxier.describe()["kernel"]["default/web:http"]
        expected_local = observed_local  # the first observed split is taken whole
        assert state["local_share"] == pytest.approx(expected_local)
        assert state["weights"][f"{ENDPOINTS[0]}:8080"] == pytest.approx(expected_local)
        remote = state["weights"][f"{ENDPOINTS[1]}:8080"] + state["weights"][f"{ENDPOINTS[2]}:8080"]
        assert remote == pytest.approx(1.0 - expected_local)

        # Healthy again (below the exit threshold): the sample rule goes, all stays local.
        for _ in range(10):
            telemetry.record_local(NodeStats("n0", 0.1, 0.2, NOW))
        assert await proxier.refresh_weights() == 1
        assert "sample decided by the proxy" not in await proxier.iptables[0].save()
        seen = Counter(await asyncio.to_thread(routed, node, listeners, 50))
        assert seen == Counter({ENDPOINTS[0]: 50})
        await proxier.cleanup_rules()
        assert "RAPPROXY" not in await proxier.iptables[0].save()


async def test_an_endpoint_change_rewrites_only_the_services_own_chains(
    make_namespace: MakeNamespace,
) -> None:
    node, _, listener = await world(make_namespace)
    config = from_mapping({"dataplane": {"mode": "kernel"}})
    runner = await runner_in(node)
    proxier = Proxier(config, "n0", iptables=[runner])
    service, endpoint_slice = objects({})
    proxier.tracker.service_updated(service)
    proxier.tracker.slice_updated(endpoint_slice)
    with listener:
        await proxier.sync()
        assert set(await chosen(node, listener, 60)) == set(ENDPOINTS)

        def entry_packets(saved: str) -> int:
            rule = next(line for line in saved.splitlines() if f"-d {CLUSTER_IP}/32" in line)
            return int(rule[1:].split(":", 1)[0])

        counted = entry_packets((await node.exec(["iptables-save", "-c", "-t", "nat"])).stdout)
        assert counted >= 60
        # The third endpoint goes away: a rewrite of web's chains alone.
        gone = endpoint_chain(NAME, ENDPOINTS[2], 8080)
        endpoint_slice["endpoints"] = endpoint_slice["endpoints"][:2]  # type: ignore[index]
        proxier.tracker.slice_updated(endpoint_slice)
        await proxier.sync()
        saved = (await node.exec(["iptables-save", "-c", "-t", "nat"])).stdout
        # RAPPROXY-SERVICES was not rewritten: its rule kept counting from before.
        assert entry_packets(saved) == counted
        assert gone not in saved
        assert set(await chosen(node, listener, 60)) == set(ENDPOINTS[:2])
        await proxier.cleanup_rules()
        assert "RAPPROXY" not in await runner.save()


# -- IPv6 ----------------------------------------------------------------------------------------

CLUSTER_IP_V6 = "fd00:96::10"
ENDPOINTS_V6 = ("fd00:200::11", "fd00:200::12", "fd00:200::13")


async def world_v6(make_namespace: MakeNamespace) -> tuple[Namespace, socket.socket]:
    """One namespace: the endpoints are addresses on its `lo`, the listener answers for all."""
    node = await make_namespace("node6")
    for ip in ENDPOINTS_V6:
        await node.add_address("lo", f"{ip}/128")
    await node.add_local_route("fd00:96::/112")
    listener = node.socket(socket.AF_INET6)
    listener.bind(("::", 8080))
    listener.listen(512)
    listener.setblocking(False)
    return node, listener


async def chosen_v6(node: Namespace, listener: socket.socket, count: int) -> Counter[str]:
    loop = asyncio.get_running_loop()
    seen: Counter[str] = Counter()
    for _ in range(count):
        client = node.socket(socket.AF_INET6)
        client.setblocking(False)
        with client:
            await asyncio.wait_for(loop.sock_connect(client, (CLUSTER_IP_V6, 80)), 5)
            accepted, _ = await asyncio.wait_for(loop.sock_accept(listener), 5)
            with accepted:
                seen[accepted.getsockname()[0]] += 1
    return seen


def v6_target(weights: tuple[float, ...], affinity: int | None = None) -> KernelTarget:
    endpoints = tuple(
        WeightedEndpoint(ip, 8080, w) for ip, w in zip(ENDPOINTS_V6, weights, strict=True)
    )
    port = ServicePort(NAME, 80, 8080, (CLUSTER_IP_V6,), affinity_timeout_seconds=affinity)
    return KernelTarget(port, endpoints, (), 15001)


async def test_ipv6_shares_match_the_weights_and_affinity_masks_the_whole_address(
    make_namespace: MakeNamespace,
) -> None:
    node, listener = await world_v6(make_namespace)
    with listener:
        runner = IptablesRunner(
            tools_for(await detect_backend(node.exec_prefix), 6), exec_prefix=node.exec_prefix
        )
        await runner.sync([], RuleConfig(), kernel=[v6_target((0.6, 0.3, 0.1))])
        assert "-d fd00:96::10/128" in await runner.save()
        count = 900
        seen = await chosen_v6(node, listener, count)
        for ip, p in zip(ENDPOINTS_V6, (0.6, 0.3, 0.1), strict=True):
            assert abs(seen[ip] - count * p) <= sigma5(count, p), (ip, p, dict(seen))

        # ClientIP affinity in IPv6: `recent` with a 128-bit mask keeps the client on one.
        await runner.sync([], RuleConfig(), kernel=[v6_target((1, 1, 1), affinity=600)])
        assert len(await chosen_v6(node, listener, 40)) == 1
        await runner.cleanup()
        saved = await runner.save()
        assert "RAPPROXY" not in saved and "recent" not in saved


# -- stale UDP flows -----------------------------------------------------------------------------

UDP_CLUSTER_IP = "10.96.0.53"
UDP_ENDPOINTS = ("10.200.0.21", "10.200.0.22")


def dns_objects(endpoints: tuple[str, ...]) -> list[dict[str, object]]:
    return [
        {
            "metadata": {
                "namespace": "default",
                "name": "dns",
                "annotations": {"rapproxy.io/dataplane": "kernel"},
            },
            "spec": {
                "clusterIP": UDP_CLUSTER_IP,
                "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}],
            },
        },
        {
            "metadata": {
                "namespace": "default",
                "name": "dns-1",
                "labels": {"kubernetes.io/service-name": "dns"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [{"addresses": [ip], "nodeName": "n0"} for ip in endpoints],
        },
    ]


def udp_flow_across_an_endpoint_removal() -> list[str]:
    """Runs inside the namespace (`Namespace.call`): the Proxier, its UDP sockets and the client
    all live there. One client flow (one source port) sends before and after its endpoint is
    removed; returns which endpoint received each datagram."""
    return asyncio.run(_udp_flow_across_an_endpoint_removal())


async def _udp_flow_across_an_endpoint_removal() -> list[str]:
    runner = IptablesRunner(tools_for(await detect_backend(()), 4))
    proxier = Proxier(from_mapping({}), "n0", iptables=[runner])
    receivers: dict[str, socket.socket] = {}
    for ip in UDP_ENDPOINTS:
        receivers[ip] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receivers[ip].bind((ip, 5353))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.connect((UDP_CLUSTER_IP, 53))
    try:
        service, endpoint_slice = dns_objects(UDP_ENDPOINTS[:1])
        proxier.tracker.service_updated(service)
        proxier.tracker.slice_updated(endpoint_slice)
        await proxier.sync()
        client.send(b"first")
        first = who_received(receivers, b"first")
        # The flow's endpoint goes away and another comes; the client keeps its source port.
        _, endpoint_slice = dns_objects(UDP_ENDPOINTS[1:])
        proxier.tracker.slice_updated(endpoint_slice)
        await proxier.sync()
        client.send(b"second")
        return [first, who_received(receivers, b"second")]
    finally:
        client.close()
        for receiver in receivers.values():
            receiver.close()
        await proxier.aclose()
        await proxier.cleanup_rules()


def who_received(receivers: dict[str, socket.socket], payload: bytes) -> str:
    """The endpoint whose socket got `payload` within 5 s ("nobody" otherwise)."""
    readable, _, _ = select.select(list(receivers.values()), [], [], 5)
    for ip, receiver in receivers.items():
        if receiver in readable and receiver.recv(64) == payload:
            return ip
    return "nobody"


async def test_a_udp_flow_follows_its_endpoint_removal_because_its_conntrack_entry_goes(
    make_namespace: MakeNamespace,
) -> None:
    node = await make_namespace("udp")
    for ip in UDP_ENDPOINTS:
        await node.add_address("lo", f"{ip}/32")
    await node.add_local_route("10.96.0.0/16")
    # Without the flush the second datagram would follow the first's conntrack entry to the
    # removed endpoint, whose socket still listens (kube-proxy's stale-UDP problem).
    assert await node.call(udp_flow_across_an_endpoint_removal) == list(UDP_ENDPOINTS)
    assert "RAPPROXY" not in (await node.exec(["iptables-save", "-t", "nat"])).stdout
