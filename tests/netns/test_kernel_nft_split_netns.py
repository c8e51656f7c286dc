"""Shared node splits in nftables, with real nft: one chain draws the node for every Service of
a layout, the Services' own chains pick evenly inside it, and a weight change rewrites that one
chain.

The same world as tests/netns/test_kernel_nft_netns.py (node namespace as the client, one
listener behind a veth for every endpoint address, no default route) and the same binomial
tolerance: N·p ± 5·sqrt(N·p·(1-p)).
"""

from __future__ import annotations

import asyncio
import math
import random
import select
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from rapproxy.balancer.rap import rap_policy_factory
from rapproxy.config import from_mapping
from rapproxy.model.service import ServicePort, ServicePortName
from rapproxy.model.telemetry import NodeStats, RapSettings, TelemetryTracker
from rapproxy.rules.kernel import (
    KernelConfig,
    KernelTarget,
    NodeSplit,
    SplitRef,
    WeightedEndpoint,
    port_hash,
)
from rapproxy.rules.nft_apply import NftRunner
from rapproxy.rules.render import RuleConfig
from rapproxy.sync.proxier import Proxier
from rapproxy.testing.kernel_world import endpoint_world
from rapproxy.testing.netns import Namespace

pytestmark = pytest.mark.root

MakeNamespace = Callable[..., Awaitable[Namespace]]
ENDPOINTS = ("10.200.0.11", "10.200.0.12", "10.200.0.13")
WEB = ServicePortName("default", "web", "http")
API = ServicePortName("default", "api", "http")
IPS = {WEB: "10.96.0.10", API: "10.96.0.11"}
SLOTS = (1, 1, 2)  # .11 and .12 on the first node of the layout, .13 on the second
CONNECTIONS = 1000
FALLBACK = 15001
KEY = "TESTLAYOUTKEY2"


def sigma5(n: int, p: float) -> float:
    return 5 * math.sqrt(n * p * (1 - p))


async def world(make_namespace: MakeNamespace) -> tuple[Namespace, socket.socket]:
    node, _, listener = await endpoint_world(make_namespace, ENDPOINTS)
    return node, listener


def proxy_socket(node: Namespace) -> socket.socket:
    proxy = node.socket()
    proxy.bind(("0.0.0.0", FALLBACK))
    proxy.listen(512)
    proxy.setblocking(False)
    return proxy


async def chosen(
    node: Namespace, listener: socket.socket, count: int, ip: str, proxy: socket.socket | None
) -> Counter[str]:
    """Open `count` connections to `ip`:80 one after another; count who accepted each (the
    endpoint address, or "proxy")."""
    loop = asyncio.get_running_loop()
    watched = [listener] if proxy is None else [proxy, listener]
    seen: Counter[str] = Counter()
    for _ in range(count):
        client = node.socket()
        client.setblocking(False)
        with client:
            await asyncio.wait_for(loop.sock_connect(client, (ip, 80)), 5)
            ready, _, _ = select.select(watched, [], [], 5)
            assert ready, "no listener got the connection"
            accepted, _ = ready[0].accept()
            with accepted:
                seen["proxy" if ready[0] is proxy else accepted.getsockname()[0]] += 1
    return seen


def target(name: ServicePortName, **port: Any) -> KernelTarget:
    service_port = ServicePort(name, 80, 8080, (IPS[name],), **port)
    cluster = tuple(WeightedEndpoint(ip, 8080, 1.0) for ip in ENDPOINTS)
    return KernelTarget(service_port, cluster, (), FALLBACK, split=SplitRef(KEY, SLOTS))


def assert_node_shares(seen: Counter[str], node_shares: tuple[float, float]) -> None:
    """Node 1's share evenly over .11 and .12, node 2's on .13."""
    total = sum(seen.values())
    expected = (node_shares[0] / 2, node_shares[0] / 2, node_shares[1])
    for ip, p in zip(ENDPOINTS, expected, strict=True):
        assert abs(seen[ip] - total * p) <= sigma5(total, p), (ip, p, dict(seen))


async def chain(node: Namespace, name: str) -> str:
    return (await node.exec(["nft", "list", "chain", "ip", "rapproxy", name])).stdout


async def test_services_of_a_layout_share_one_draw_and_a_weight_change_rewrites_it_alone(
    make_namespace: MakeNamespace,
) -> None:
    node, listener = await world(make_namespace)
    with listener:
        runner = NftRunner(4, exec_prefix=node.exec_prefix)
        targets = [target(WEB), target(API)]
        split = NodeSplit(KEY, (0.2, 0.8))
        result = await runner.sync(targets, RuleConfig(), splits={KEY: split})
        assert result.ran and not result.failed
        assert_node_shares(await chosen(node, listener, CONNECTIONS, IPS[WEB], None), (0.2, 0.8))
        service_chains = [await chain(node, f"svc-{port_hash(name)}") for name in (WEB, API)]

        assert await runner.update_splits([NodeSplit(KEY, (0.9, 0.1))], RuleConfig())
        # The other Service, never written again, follows the new draw.
        assert_node_shares(await chosen(node, listener, CONNECTIONS, IPS[API], None), (0.9, 0.1))
        assert [await chain(node, f"svc-{port_hash(name)}") for name in (WEB, API)] == (
            service_chains
        )
        assert runner.splits == {KEY: NodeSplit(KEY, (0.9, 0.1))}
        # A node with share 0 is never drawn.
        assert await runner.update_splits([NodeSplit(KEY, (0.0, 1.0))], RuleConfig())
        assert_node_shares(await chosen(node, listener, 200, IPS[WEB], None), (0.0, 1.0))

        # The last Service gone, the chain goes too.
        assert (await runner.sync([], RuleConfig())).ran
        assert f"lay-{KEY}" not in (await node.exec(["nft", "list", "ruleset"])).stdout
        assert runner.splits == {}
        assert await runner.cleanup()


async def test_the_splits_sample_reaches_the_proxy_and_ends_with_a_split_write(
    make_namespace: MakeNamespace,
) -> None:
    node, listener = await world(make_namespace)
    proxy = proxy_socket(node)
    with listener, proxy:
        runner = NftRunner(4, exec_prefix=node.exec_prefix)
        split = NodeSplit(KEY, (0.5, 0.5), sample_share=0.3)
        assert not (await runner.sync([target(WEB)], RuleConfig(), splits={KEY: split})).failed
        seen = await chosen(node, listener, CONNECTIONS, IPS[WEB], proxy)
        assert abs(seen["proxy"] - CONNECTIONS * 0.3) <= sigma5(CONNECTIONS, 0.3), dict(seen)
        del seen["proxy"]
        assert_node_shares(seen, (0.5, 0.5))

        assert await runner.update_splits([NodeSplit(KEY, (0.5, 0.5))], RuleConfig())
        seen = await chosen(node, listener, 300, IPS[WEB], proxy)
        assert seen["proxy"] == 0, dict(seen)
        assert await runner.cleanup()


async def test_the_node_field_is_clear_after_the_draw_and_other_mark_bits_are_kept(
    make_namespace: MakeNamespace,
) -> None:
    """The field carries the drawn node from the shared chain to the Service's chain only: a
    filter chain after nat sees it clear, and a bit set before it, outside the field, kept."""
    node, listener = await world(make_namespace)
    field = KernelConfig().node_mark_mask
    await node.exec(
        ["nft", "-f", "-"],
        input=(
            "add table ip observe\n"
            "add chain ip observe before { type filter hook output priority -200 ; }\n"
            "add chain ip observe after { type filter hook output priority 0 ; }\n"
            "add rule ip observe before ip daddr 10.96.0.0/16 meta mark set 0x1\n"
            f"add rule ip observe after ip daddr 10.200.0.0/24 meta mark & {field:#x} != 0"
            " counter\n"
            "add rule ip observe after ip daddr 10.200.0.0/24 meta mark == 0x1 counter\n"
            "add rule ip observe after ip daddr 10.200.0.0/24 counter\n"
        ),
    )
    with listener:
        runner = NftRunner(4, exec_prefix=node.exec_prefix)
        split = NodeSplit(KEY, (0.5, 0.5))
        assert not (await runner.sync([target(WEB)], RuleConfig(), splits={KEY: split})).failed
        seen = await chosen(node, listener, 50, IPS[WEB], None)
        assert sum(seen.values()) == 50
        counters = (await node.exec(["nft", "list", "chain", "ip", "observe", "after"])).stdout
        dirty, kept, every = [
            int(line.split("packets ")[1].split()[0])
            for line in counters.splitlines()
            if "packets" in line
        ]
        assert dirty == 0, counters
        assert kept == every >= 50, counters  # the DNATed first packets too
        assert await runner.cleanup()
    await node.exec(["nft", "delete", "table", "ip", "observe"])


async def test_affinity_with_a_split_keeps_every_connection_on_one_endpoint(
    make_namespace: MakeNamespace,
) -> None:
    node, listener = await world(make_namespace)
    with listener:
        runner = NftRunner(4, exec_prefix=node.exec_prefix)
        split = NodeSplit(KEY, (0.5, 0.5))
        sticky = target(WEB, affinity_timeout_seconds=600)
        assert not (await runner.sync([sticky], RuleConfig(), splits={KEY: split})).failed
        seen = await chosen(node, listener, 60, IPS[WEB], None)
        assert len(seen) == 1, dict(seen)
        assert await runner.cleanup()


# -- the Proxier, with real nft and the real rap policy ------------------------------------------

NOW = 100.0


def objects(name: str, ip: str) -> list[dict[str, object]]:
    return [
        {
            "metadata": {"namespace": "default", "name": name},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        },
        {
            "metadata": {
                "namespace": "default",
                "name": f"{name}-1",
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": [address], "nodeName": node_name}
                for address, node_name in zip(ENDPOINTS, ("n0", "n0", "n1"), strict=True)
            ],
        },
    ]


async def test_the_proxier_moves_one_split_for_all_services_of_a_layout_under_injected_load(
    make_namespace: MakeNamespace,
) -> None:
    node, listener = await world(make_namespace)
    settings = RapSettings()
    telemetry = TelemetryTracker("n0", settings)
    telemetry.record_local(NodeStats("n0", 0.2, 0.2, NOW))
    telemetry.record_peer("n1", NodeStats("n1", 0.1, 0.2, NOW), 0.001)
    config = from_mapping(
        {
            "dataplane": {
                "mode": "kernel",
                "kernelBackend": "nftables",
                "weightThreshold": 0.02,
                "kernelSampleShare": 0,
            }
        }
    )
    runner = NftRunner(4, exec_prefix=node.exec_prefix)
    proxier = Proxier(
        config,
        "n0",
        iptables=[],
        nftables=[runner],
        policy_factory=rap_policy_factory(telemetry.snapshot, settings, random.Random(3)),
        clock=lambda: NOW,
        telemetry=telemetry.snapshot,
        rap_settings=settings,
    )
    with listener:
        try:
            for name, ip in (("web", IPS[WEB]), ("api", IPS[API])):
                service, endpoint_slice = objects(name, ip)
                proxier.tracker.service_updated(service)
                proxier.tracker.slice_updated(endpoint_slice)
            await proxier.sync()
            assert len(runner.splits) == 1  # one layout, one draw
            assert_node_shares(await chosen(node, listener, 300, IPS[WEB], None), (1.0, 0.0))
            written = dict(runner.written)

            # Two overloaded samples: rap-aimd's local share is 0.7 * 0.7, the rest goes to n1.
            telemetry.record_local(NodeStats("n0", 0.95, 0.2, NOW))
            telemetry.record_local(NodeStats("n0", 0.95, 0.2, NOW))
            assert await proxier.refresh_weights() == 2  # both Services' weights moved
            (split,) = runner.splits.values()
            local = split.shares[0]
            assert local == pytest.approx(0.49), split
            assert runner.written == written  # no Service was written again
            assert_node_shares(
                await chosen(node, listener, CONNECTIONS, IPS[API], None), (local, 1 - local)
            )
            state = proxier.describe_kernel()[str(API)]
            assert state["weights"]["10.200.0.13:8080"] == pytest.approx(1 - local, abs=1e-6)
            assert state["weights_changed_at"] is not None
            assert await proxier.refresh_weights() == 0  # nothing moved: nothing written
        finally:
            await proxier.cleanup_rules()
        assert "rapproxy" not in (await node.exec(["nft", "list", "ruleset"])).stdout
