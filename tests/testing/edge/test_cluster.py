"""The emulated edge cluster: comes up with its delays, serves across nodes, leaves nothing."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from rapproxy.testing.apiserver import EmulatedApiServer
from rapproxy.testing.edge.cgroups import CgroupUnavailable, detect_layout
from rapproxy.testing.edge.cluster import EdgeCluster, NodeSpec
from rapproxy.testing.edge.delays import DelayMatrix, InvalidWanConfig
from rapproxy.testing.edge.measure import http_load, icmp_rtts, wait_port
from rapproxy.testing.netns import child_processes, live_namespaces
from rapproxy.testing.probes import http_get

from .conftest import edge_cgroups_of_this_process, eventually

pytestmark = pytest.mark.root

DELAYS = DelayMatrix.symmetric(
    {("node-1", "node-2"): 4.0, ("node-1", "node-3"): 8.0, ("node-2", "node-3"): 3.0}
)


async def test_three_nodes_come_up_with_the_asked_delays_and_leave_nothing() -> None:
    before = set(live_namespaces())
    cluster = EdgeCluster(3, delays=DELAYS, clients=1)
    async with cluster:
        assert [n.ip for n in cluster.nodes] == ["10.10.1.2", "10.10.2.2", "10.10.3.2"]
        assert [n.pod_cidr for n in cluster.nodes] == [f"10.244.{i}.0/24" for i in (1, 2, 3)]
        node_1 = cluster.node("node-1")
        for target, one_way in (("node-2", 4.0), ("node-3", 8.0)):
            rtts = await node_1.call(icmp_rtts, cluster.node(target).ip, 9, 0.005)
            assert statistics.median(rtts) * 1000 == pytest.approx(2 * one_way, rel=0.15)
        await cluster.set_delay("node-1", "node-3", 6.0)
        assert cluster.delays.delay_ms("node-2", "node-3") == 3.0
        rtts = await node_1.call(icmp_rtts, cluster.node("node-3").ip, 9, 0.005)
        assert statistics.median(rtts) * 1000 == pytest.approx(12.0, rel=0.15)
        # The client's link carries no emulated delay. Any delay would set a floor under every
        # sample; a busy 2-core machine only adds noise on top, so the fastest sample is the test.
        client_rtts = await cluster.clients[0].call(icmp_rtts, node_1.ip, 9, 0.005)
        assert min(client_rtts) * 1000 < 1.0
        assert (await cluster.wan_stats())["dropped"] == 0
    assert cluster.leftovers() == []
    assert set(live_namespaces()) == before
    assert edge_cgroups_of_this_process() == []
    assert child_processes() == []


async def test_http_across_nodes_gains_the_round_trip_delay() -> None:
    async with EdgeCluster(2) as cluster:
        client, server = cluster.node("node-1"), cluster.node("node-2")
        backend = [sys.executable, "-m", "rapproxy.testing.backend", "--name", "b"]
        await server.spawn([*backend, "--http", f"{server.ip}:8080"])
        await client.call(wait_port, server.ip, 8080, 15.0)
        base = await client.call(http_load, server.ip, 8080, 16, 1.0)
        await cluster.set_delays(DelayMatrix.symmetric({("node-1", "node-2"): 5.0}))
        delayed = await client.call(http_load, server.ip, 8080, 16, 1.5)
    assert base.errors == delayed.errors == 0
    # 15 %: the p50 also holds the Python backend's and client's queueing (the ping tests hold
    # the WAN itself to 10 %).
    assert (delayed.p50 - base.p50) * 1000 == pytest.approx(10.0, rel=0.15)
    assert delayed.rate > 16 / (delayed.p50 * 1.2)  # closed loop: connections / latency


async def test_a_failing_body_still_tears_everything_down() -> None:
    cluster = EdgeCluster([NodeSpec("edge-a"), NodeSpec("edge-b")])
    with pytest.raises(RuntimeError, match="midway"):
        async with cluster:
            await cluster.node("edge-a").spawn(["sleep", "60"])
            raise RuntimeError("test failed midway")
    assert cluster.leftovers() == []
    assert edge_cgroups_of_this_process() == []
    assert child_processes() == []


async def test_a_failing_build_tears_down_what_it_had_built() -> None:
    cluster = EdgeCluster(2, delays=DelayMatrix({("node-1", "node-9"): 1.0}))
    with pytest.raises(InvalidWanConfig, match="node-9"):
        async with cluster:
            pass
    assert cluster.nodes  # it got as far as building the nodes
    assert cluster.leftovers() == []
    assert edge_cgroups_of_this_process() == []
    assert child_processes() == []


async def test_node_processes_join_the_nodes_cgroup_and_service_ips_route_locally() -> None:
    async with EdgeCluster(2) as cluster:
        if cluster.cgroups_unavailable:
            pytest.skip(f"NO CGROUPS: {cluster.cgroups_unavailable}")
        node = cluster.node("node-2")
        sleeper = await node.spawn(["sleep", "60"])
        cgroup = node.cgroup
        assert cgroup is not None
        await eventually(lambda: sleeper.pid in cgroup.pids())
        route = await node.namespace.exec(["ip", "route", "get", "10.96.0.10"])
        assert route.stdout.startswith("local 10.96.0.10 dev lo")


async def test_a_busy_capped_node_reports_its_load_through_its_load_file() -> None:
    try:
        detect_layout()
    except CgroupUnavailable as error:
        pytest.skip(f"NO CGROUPS FOR NODE CPU CAPS: {error}")
    async with EdgeCluster([NodeSpec("busy", cpus=0.25), NodeSpec("idle")]) as cluster:
        cluster.load_interval = 0.1
        busy = cluster.load_source("busy")
        idle = cluster.load_source("idle")
        assert busy.startswith("file:")
        await cluster.node("busy").spawn([sys.executable, "-c", "while True: pass"])

        def cpu(source: str) -> float:
            return float(json.loads(Path(source.removeprefix("file:")).read_text())["cpu"])

        await eventually(lambda: cpu(busy) > 0.6)
        assert cpu(idle) < 0.2


async def test_the_uplink_service_route_sends_cluster_ips_to_the_wan_gateway() -> None:
    async with EdgeCluster(1, service_route="uplink") as cluster:
        route = await cluster.node("node-1").namespace.exec(["ip", "route", "get", "10.96.0.10"])
        assert "via 10.10.1.1 dev wan0" in route.stdout


async def test_an_api_server_on_the_routers_control_address_answers_every_site_undelayed() -> None:
    delays = DelayMatrix.uniform(["node-1", "node-2", "client-1"], 20.0)
    async with EdgeCluster(2, delays=delays, clients=1) as cluster:
        api = EmulatedApiServer(host=cluster.control_ip, socket_factory=cluster.router_socket)
        await api.start()
        try:
            for site in ("node-2", "client-1"):
                status, _ = await cluster.site(site).call(
                    http_get, f"http://{cluster.control_ip}:{api.port}/version"
                )
                assert status == 200
            rtts = await cluster.node("node-2").call(icmp_rtts, cluster.control_ip, 5, 0.005)
            assert statistics.median(rtts) < 0.002
        finally:
            await api.stop()
