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
import socket
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from rapproxy.config import from_mapping
from rapproxy.model.service import ServicePort, ServicePortName
from rapproxy.model.telemetry import NodeStats, RapSettings, TelemetryTracker
from rapproxy.rules.apply import IptablesRunner
from rapproxy.rules.backend import detect_backend, tools_for
from rapproxy.rules.kernel import KernelTarget, WeightedEndpoint, endpoint_chain
from rapproxy.rules.render import RuleConfig
from rapproxy.sync.proxier import Proxier
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
    node = await make_namespace("node")
    backends = await make_namespace("backends")
    veth = await node.add_veth_peer(backends, "10.200.0.1", "10.200.0.2", 24)
    for ip in ENDPOINTS:
        await backends.add_address(veth.peer_ifname, f"{ip}/24")
    await node.add_route("10.96.0.0/16", dev=veth.ifname)
    listener = backends.socket()
    listener.bind(("0.0.0.0", 8080))
    listener.listen(512)
    listener.setblocking(False)
    return node, backends, listener


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


async def test_weights_follow_the_injected_load_of_the_local_node(
    make_namespace: MakeNamespace,
) -> None:
    node, _, listener = await world(make_namespace)
    settings = RapSettings()
    telemetry = TelemetryTracker("n0", settings)
    now = 100.0
    telemetry.record_local(NodeStats("n0", 0.2, 0.2, now))
    telemetry.record_peer("n1", NodeStats("n1", 0.1, 0.2, now), 0.001)
    telemetry.record_peer("n2", NodeStats("n2", 0.1, 0.2, now), 0.001)
    config = from_mapping({"dataplane": {"mode": "kernel", "weightThreshold": 0.02}})
    proxier = Proxier(
        config,
        "n0",
        iptables=[await runner_in(node)],
        clock=lambda: now,
        telemetry=telemetry.snapshot,
        rap_settings=settings,
    )
    service, endpoint_slice = objects({})
    proxier.tracker.service_updated(service)
    proxier.tracker.slice_updated(endpoint_slice)
    with listener:
        await proxier.sync()
        # The local node copes: every new connection stays on its endpoint.
        assert await chosen(node, listener, 50) == Counter({ENDPOINTS[0]: 50})
        state = proxier.describe()["kernel"]["default/web:http"]
        assert state["written"] and state["decision"] == "local"

        # Two overloaded samples: the local share is 0.7 * 0.7 = 0.49, the rest split evenly
        # over the two equally scored peers.
        telemetry.record_local(NodeStats("n0", 0.95, 0.2, now))
        telemetry.record_local(NodeStats("n0", 0.95, 0.2, now))
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
