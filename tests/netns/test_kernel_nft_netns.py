"""The kernel fast path in nftables, with real nft: shares, affinity, fallback, failure, cleanup.

    node 10.200.0.1 ── veth ── backends 10.200.0.2 (+ endpoint addresses 10.200.0.11-.13)

As tests/netns/test_kernel_netns.py does for iptables: the node namespace holds the table and is
the client (its own connections go through nat-output); the service CIDR is routed out of the
veth, never a default route; one listener in the backends namespace accepts for every endpoint
address, and the address a connection arrived on says which endpoint the kernel chose.

Shares are judged with the same binomial tolerance: over N connections an endpoint drawn with
probability p is hit N·p ± 5·sqrt(N·p·(1-p)) times except with probability below 1e-6.
"""

from __future__ import annotations

import asyncio
import math
import select
import socket
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from rapproxy.model.service import ServicePort, ServicePortName
from rapproxy.rules.kernel import KernelTarget, WeightedEndpoint, port_hash
from rapproxy.rules.nft_apply import NftRunner
from rapproxy.rules.render import RuleConfig
from rapproxy.testing.kernel_world import endpoint_world
from rapproxy.testing.netns import Namespace

pytestmark = pytest.mark.root

MakeNamespace = Callable[..., Awaitable[Namespace]]
CLUSTER_IP = "10.96.0.10"
OTHER_IP = "10.96.0.11"
ENDPOINTS = ("10.200.0.11", "10.200.0.12", "10.200.0.13")
NAME = ServicePortName("default", "web", "http")
OTHER = ServicePortName("default", "api", "http")
CONNECTIONS = 1500
FALLBACK = 15001


def sigma5(n: int, p: float) -> float:
    return 5 * math.sqrt(n * p * (1 - p))


async def world(make_namespace: MakeNamespace) -> tuple[Namespace, socket.socket]:
    node, _, listener = await world_with_backends(make_namespace)
    return node, listener


async def world_with_backends(
    make_namespace: MakeNamespace,
) -> tuple[Namespace, Namespace, socket.socket]:
    return await endpoint_world(make_namespace, ENDPOINTS)


async def chosen(
    node: Namespace, listener: socket.socket, count: int, ip: str = CLUSTER_IP
) -> Counter[str]:
    """Open `count` connections to `ip`:80 one after another; count who accepted each."""
    loop = asyncio.get_running_loop()
    seen: Counter[str] = Counter()
    for _ in range(count):
        client = node.socket()
        client.setblocking(False)
        with client:
            await asyncio.wait_for(loop.sock_connect(client, (ip, 80)), 5)
            accepted, _ = await asyncio.wait_for(loop.sock_accept(listener), 5)
            with accepted:
                seen[accepted.getsockname()[0]] += 1
    return seen


def service_port(
    name: ServicePortName = NAME, ip: str = CLUSTER_IP, **kwargs: object
) -> ServicePort:
    return ServicePort(name, 80, 8080, (ip,), **kwargs)  # type: ignore[arg-type]


def weighted(*weights: float) -> tuple[WeightedEndpoint, ...]:
    return tuple(WeightedEndpoint(ip, 8080, w) for ip, w in zip(ENDPOINTS, weights, strict=True))


def assert_shares(seen: Counter[str], weights: tuple[float, ...]) -> None:
    total = sum(seen.values())
    for ip, weight in zip(ENDPOINTS, weights, strict=True):
        p = weight / sum(weights)
        assert abs(seen[ip] - total * p) <= sigma5(total, p), (ip, p, dict(seen))


async def ruleset(node: Namespace) -> str:
    return (await node.exec(["nft", "list", "ruleset"])).stdout


async def test_measured_shares_match_the_weights_and_follow_a_weight_update(
    make_namespace: MakeNamespace,
) -> None:
    node, listener = await world(make_namespace)
    with listener:
        runner = NftRunner(4, exec_prefix=node.exec_prefix)
        target = KernelTarget(service_port(), weighted(0.6, 0.3, 0.1), (), FALLBACK)
        assert (await runner.sync([target], RuleConfig())).failed == {}
        assert_shares(await chosen(node, listener, CONNECTIONS), (0.6, 0.3, 0.1))

        moved = KernelTarget(service_port(), weighted(0.1, 0.2, 0.7), (), FALLBACK)
        result = await runner.update_weights([moved], RuleConfig())
        assert result.ran and not result.failed
        assert_shares(await chosen(node, listener, CONNECTIONS), (0.1, 0.2, 0.7))

        assert await runner.cleanup()
        assert "rapproxy" not in await ruleset(node)
        assert not await runner.cleanup()  # nothing left to remove


async def test_client_ip_affinity_holds_every_connection_on_the_first_endpoint(
    make_namespace: MakeNamespace,
) -> None:
    node, listener = await world(make_namespace)
    with listener:
        runner = NftRunner(4, exec_prefix=node.exec_prefix)
        target = KernelTarget(service_port(affinity_timeout_seconds=600), weighted(1, 1, 1), (), 1)
        await runner.sync([target], RuleConfig())
        seen = await chosen(node, listener, 60)
        assert len(seen) == 1, dict(seen)
        # The client is remembered in the chosen endpoint's set, with its timeout.
        assert "10.200.0.1 expires" in await ruleset(node)
        await runner.cleanup()
        assert "rapproxy" not in await ruleset(node)


async def test_a_policy_without_endpoints_redirects_to_the_proxy_port(
    make_namespace: MakeNamespace,
) -> None:
    node, listener = await world(make_namespace)
    with listener:
        proxy = node.socket()
        proxy.bind(("0.0.0.0", FALLBACK))
        proxy.listen(8)
        proxy.setblocking(False)
        with proxy:
            runner = NftRunner(4, exec_prefix=node.exec_prefix)
            await runner.sync([KernelTarget(service_port(), (), (), FALLBACK)], RuleConfig())
            loop = asyncio.get_running_loop()
            client = node.socket()
            client.setblocking(False)
            with client:
                await asyncio.wait_for(loop.sock_connect(client, (CLUSTER_IP, 80)), 5)
                accepted, _ = await asyncio.wait_for(loop.sock_accept(proxy), 5)
                accepted.close()
        await runner.cleanup()


async def test_a_broken_service_is_left_out_and_the_others_are_written(
    make_namespace: MakeNamespace,
) -> None:
    """A hand-made rule keeps one Service's chain in use, so nft refuses to delete it: that
    Service is reported with nft's message and kept as it was; the other one's change, in the
    same sync, is written; once the obstacle is gone the next sync finishes the first."""
    node, listener = await world(make_namespace)
    with listener:
        runner = NftRunner(4, exec_prefix=node.exec_prefix)
        web = KernelTarget(service_port(), weighted(1, 0, 0), (), FALLBACK)
        api = KernelTarget(service_port(OTHER, OTHER_IP), weighted(1, 0, 0), (), FALLBACK)
        assert (await runner.sync([web, api], RuleConfig())).failed == {}
        await node.exec(["nft", "add", "chain", "ip", "rapproxy", "hand-made"])
        await node.exec(
            ["nft", "add", "rule", "ip", "rapproxy", "hand-made", "jump", f"svc-{port_hash(NAME)}"]
        )

        moved_api = KernelTarget(service_port(OTHER, OTHER_IP), weighted(0, 0, 1), (), FALLBACK)
        result = await runner.sync([moved_api], RuleConfig())  # web goes, api changes
        assert list(result.failed) == [NAME]
        assert "busy" in result.failed[NAME].lower(), result.failed
        assert runner.written == {NAME: web, OTHER: moved_api}
        assert await chosen(node, listener, 5, OTHER_IP) == Counter({ENDPOINTS[2]: 5})
        assert await chosen(node, listener, 5) == Counter({ENDPOINTS[0]: 5})  # web as it was

        await node.exec(["nft", "delete", "chain", "ip", "rapproxy", "hand-made"])
        assert (await runner.sync([moved_api], RuleConfig())).failed == {}
        assert runner.written == {OTHER: moved_api}
        assert f"svc-{port_hash(NAME)}" not in await ruleset(node)
        await runner.cleanup()


async def test_a_flushed_ruleset_is_rebuilt_by_the_verifying_sync(
    make_namespace: MakeNamespace,
) -> None:
    node, listener = await world(make_namespace)
    with listener:
        runner = NftRunner(4, exec_prefix=node.exec_prefix)
        target = KernelTarget(service_port(), weighted(1, 0, 0), (), FALLBACK)
        await runner.sync([target], RuleConfig())
        await node.exec(["nft", "flush", "ruleset"])
        assert not (await runner.sync([target], RuleConfig())).ran  # nothing changed, it thinks
        assert (await runner.sync([target], RuleConfig(), verify=True)).ran
        assert await chosen(node, listener, 5) == Counter({ENDPOINTS[0]: 5})
        await runner.cleanup()


async def test_an_endpoint_reaching_itself_through_its_service_is_snatted(
    make_namespace: MakeNamespace,
) -> None:
    """Hairpin: an endpoint's connection DNATed back to itself needs the node's source address,
    or the reply would never leave the endpoint's namespace and the connection would hang."""
    node, backends, listener = await world_with_backends(make_namespace)
    with listener:
        await node.exec(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        await backends.add_route("10.96.0.0/16", via="10.200.0.1")
        runner = NftRunner(4, exec_prefix=node.exec_prefix)
        await runner.sync(
            [KernelTarget(service_port(), weighted(1, 0, 0), (), FALLBACK)], RuleConfig()
        )
        loop = asyncio.get_running_loop()
        client = backends.socket()
        client.setblocking(False)
        client.bind((ENDPOINTS[0], 0))
        with client:
            await asyncio.wait_for(loop.sock_connect(client, (CLUSTER_IP, 80)), 5)
            accepted, peer = await asyncio.wait_for(loop.sock_accept(listener), 5)
            accepted.close()
        assert peer[0] == "10.200.0.1"  # the node's address on the way back
        await runner.cleanup()


async def test_a_sample_share_reaches_the_proxy_port_and_the_rest_follows_the_weights(
    make_namespace: MakeNamespace,
) -> None:
    """The nft sample rule REDIRECTs its share to the proxy's port before the draw, and a
    weight write that ends sampling takes it away."""
    node, listener = await world(make_namespace)
    proxy = node.socket()
    proxy.bind(("0.0.0.0", FALLBACK))
    proxy.listen(512)
    proxy.setblocking(False)
    loop = asyncio.get_running_loop()
    with listener, proxy:
        runner = NftRunner(4, exec_prefix=node.exec_prefix)
        target = KernelTarget(service_port(), weighted(0.5, 0.5, 0), (), FALLBACK, sample_share=0.3)
        assert (await runner.sync([target], RuleConfig())).failed == {}
        seen: Counter[str] = Counter()
        for _ in range(CONNECTIONS):
            client = node.socket()
            client.setblocking(False)
            with client:
                await asyncio.wait_for(loop.sock_connect(client, (CLUSTER_IP, 80)), 5)
                ready, _, _ = select.select([proxy, listener], [], [], 5)
                assert ready, "no listener got the connection"
                accepted, _ = ready[0].accept()
                with accepted:
                    seen["proxy" if ready[0] is proxy else accepted.getsockname()[0]] += 1
        assert sum(seen.values()) == CONNECTIONS, dict(seen)
        assert abs(seen["proxy"] - CONNECTIONS * 0.3) <= sigma5(CONNECTIONS, 0.3), dict(seen)
        assert_shares(Counter({ip: seen[ip] for ip in ENDPOINTS}), (0.5, 0.5, 0))

        unsampled = KernelTarget(service_port(), weighted(0.5, 0.5, 0), (), FALLBACK)
        result = await runner.update_weights([unsampled], RuleConfig())
        assert result.ran and not result.failed
        assert "redirect" not in await ruleset(node)
        assert await runner.cleanup()


async def test_a_sync_told_which_ports_changed_writes_and_removes_only_those(
    make_namespace: MakeNamespace,
) -> None:
    node, listener = await world(make_namespace)
    with listener:
        runner = NftRunner(4, exec_prefix=node.exec_prefix)
        web = KernelTarget(service_port(), weighted(1, 0, 0), (), FALLBACK)
        api = KernelTarget(service_port(OTHER, OTHER_IP), weighted(0, 1, 0), (), FALLBACK)
        with pytest.raises(ValueError, match="rebuilt"):
            await runner.sync([web], RuleConfig(), only={NAME})
        assert not (await runner.sync([web, api], RuleConfig())).failed
        moved = KernelTarget(service_port(), weighted(0, 0, 1), (), FALLBACK)
        # Only NAME is looked at: API, absent from `kernel` but not named, stays.
        assert (await runner.sync([moved], RuleConfig(), only={NAME})).ran
        assert await chosen(node, listener, 20) == Counter({ENDPOINTS[2]: 20})
        assert await chosen(node, listener, 20, OTHER_IP) == Counter({ENDPOINTS[1]: 20})
        # Named and absent: removed.
        assert (await runner.sync([moved], RuleConfig(), only={NAME, OTHER})).ran
        assert set(runner.written) == {NAME}
        assert f"svc-{port_hash(OTHER)}" not in await ruleset(node)
        assert await runner.cleanup()
