"""Several emulated nodes exchanging real telemetry over loopback, and RAP (its utilization variant, `rap-aimd`) acting on it.

Each emulated node runs the production pieces — a `Collector` on an injectable probe, the
`/rap/v1/telemetry` endpoint on its own 127.0.0.x address — and node n0 also runs the poller and
a `Balancer` with the RAP policy. Load is injected per node; the test waits (with deadlines) for
the decisions to follow it. A later issue repeats this with whole proxies in network namespaces.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import pytest
from aiohttp import web

from rapproxy.balancer.balancer import Balancer
from rapproxy.balancer.categorize import Locality
from rapproxy.balancer.rap import rap_policy_factory
from rapproxy.model.endpoints import Endpoint
from rapproxy.model.service import LbPolicy, ServicePort, ServicePortName
from rapproxy.model.table import ServiceEntry, ServiceTable
from rapproxy.model.telemetry import RapSettings, TelemetryTracker
from rapproxy.telemetry.collector import Collector, FixedProbe
from rapproxy.telemetry.poller import PeerPoller, PeerTarget
from rapproxy.telemetry.server import TelemetryEndpoint, TokenFile, telemetry_app

from .conftest import Serve

SETTINGS = RapSettings(telemetry_interval=0.2, poll_timeout=0.15)
NAME = ServicePortName("default", "web", "http")
NODES = {"n0": "127.0.0.1", "n1": "127.0.0.2", "n2": "127.0.0.3"}


@dataclass
class EmulatedNode:
    name: str
    probe: FixedProbe
    collector: Collector
    runner: web.AppRunner
    target: PeerTarget


@dataclass
class Cluster:
    nodes: dict[str, EmulatedNode]
    tracker: TelemetryTracker
    balancer: Balancer

    def load(self, node: str, cpu: float) -> None:
        self.nodes[node].probe.set(cpu, 0.2)

    def decide(self, n: int = 300) -> Counter[str | None]:
        counts: Counter[str | None] = Counter()
        for _ in range(n):
            choice = self.balancer.choose(NAME, "192.0.2.1", time.monotonic())
            assert choice is not None
            counts[choice.endpoint.node_name] += 1
            counts[choice.placement.value] += 1
        return counts

    async def until(self, predicate: Callable[[Counter[str | None]], bool], what: str) -> None:
        deadline = time.monotonic() + 5.0
        while True:
            counts = self.decide()
            if predicate(counts):
                return
            assert time.monotonic() < deadline, f"not {what} within 5 s: {counts}"
            await asyncio.sleep(SETTINGS.telemetry_interval / 2)

    async def until_local_cpu(self, cpu: float) -> None:
        """Wait until the tracker has recorded this node at `cpu` (the collector runs on its own)."""
        deadline = time.monotonic() + 5.0
        while True:
            stats = self.tracker.snapshot().nodes["n0"].stats
            if stats is not None and stats.cpu == cpu:
                return
            assert time.monotonic() < deadline, f"n0 never sampled at cpu={cpu}"
            await asyncio.sleep(0.02)


def table() -> ServiceTable:
    port = ServicePort(NAME, 80, 8080, cluster_ips=("10.96.0.10",), lb_policy=LbPolicy.RAP_AIMD)
    endpoints = tuple(
        Endpoint(f"10.244.{i}.{j}", 8080, node_name=name)
        for i, name in enumerate(NODES)
        for j in (1, 2)
    )
    return ServiceTable({NAME: ServiceEntry(port, endpoints)})


@pytest.fixture
async def cluster(
    serve: Serve, token_file: TokenFile, node_ips: Callable[[str], bool]
) -> AsyncIterator[Cluster]:
    tracker = TelemetryTracker("n0", SETTINGS)
    # The stack exits first: it cancels the tasks, then the TaskGroup waits for them to end.
    async with asyncio.TaskGroup() as tasks, AsyncExitStack() as stack:
        nodes = {}
        for name, address in NODES.items():
            probe = FixedProbe(0.1, 0.2)
            collector = Collector(name, probe)
            endpoint = TelemetryEndpoint(
                lambda c=collector: c.latest, dict, token_file.current, node_ips
            )
            runner, port = await stack.enter_async_context(serve(telemetry_app(endpoint), address))
            sink = tracker.record_local if name == "n0" else (lambda stats: None)
            collector_task = tasks.create_task(collector.run(sink, SETTINGS.telemetry_interval))
            stack.callback(collector_task.cancel)
            nodes[name] = EmulatedNode(
                name, probe, collector, runner, PeerTarget(name, address, port)
            )
        poller = PeerPoller(
            tracker,
            lambda: [n.target for n in nodes.values()],
            token_file.current,
            source_address=NODES["n0"],
        )
        poller_task = tasks.create_task(poller.run())
        stack.callback(poller_task.cancel)
        balancer = Balancer(
            Locality("n0"), policy_factory=rap_policy_factory(tracker.snapshot, SETTINGS)
        )
        balancer.update(table())
        yield Cluster(nodes, tracker, balancer)


async def test_spill_over_follows_injected_load(cluster: Cluster) -> None:
    await cluster.until(lambda c: c["local"] == 300, "all local while n0 is idle")

    cluster.load("n0", 0.9)
    await cluster.until(
        lambda c: c["remote"] == 300 and c["n1"] > 50 and c["n2"] > 50,
        "spilled to both peers once n0 is overloaded",
    )

    cluster.load("n1", 0.85)
    await cluster.until(lambda c: c["n2"] == 300, "spilled only to n2 once n1 is overloaded too")

    cluster.load("n1", 0.1)
    cluster.load("n2", 0.6)
    await cluster.until(
        lambda c: c["n1"] > c["n2"] > 0, "shifted towards n1 once its load fell below n2's"
    )

    cluster.load("n0", 0.75)  # below the overload threshold but above the exit threshold
    await cluster.until_local_cpu(0.75)
    assert cluster.decide()["remote"] == 300, "hysteresis: still spilling between 0.7 and 0.8"

    cluster.load("n0", 0.5)
    await cluster.until(lambda c: c["local"] == 300, "back to local once n0 fell below 0.7")


async def test_dead_peer_goes_stale_and_traffic_keeps_flowing(cluster: Cluster) -> None:
    cluster.load("n0", 0.9)
    await cluster.until(lambda c: c["n1"] > 50 and c["n2"] > 50, "spilled to both peers")
    await cluster.nodes["n2"].runner.cleanup()
    deadline = time.monotonic() + 5.0
    while cluster.tracker.snapshot().nodes["n2"].last_error is None:
        assert time.monotonic() < deadline, "n2 was not marked stale"
        await asyncio.sleep(0.05)
    # n2 is unknown now: still eligible, but it ranks below fresh n1 and gets a small share.
    counts = cluster.decide(1000)
    assert counts["n1"] + counts["n2"] == counts["remote"] > 0  # n0 keeps its shrinking share
    assert counts["n1"] > counts["n2"] * 3
