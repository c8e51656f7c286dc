"""RAP across real daemons: three node namespaces, one rapproxy process each, real telemetry.

    node-1 10.10.1.2 ─┐
    node-2 10.10.2.2 ─┼─ router (forwards between the /24s; nothing else)
    node-3 10.10.3.2 ─┘

Each node runs a backend "pod" (10.244.N.2) and its own rapproxy, which polls the others'
`/rap/v1/telemetry` with the shared token. Load is injected through each daemon's
`rap.loadSource=file:...`, so the test decides which node is overloaded; traffic comes from
node-1's host network through the ClusterIP.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from rapproxy.testing import probes
from rapproxy.testing.netns import Namespace

pytestmark = [pytest.mark.root, pytest.mark.slow]

RAPPROXY = str(Path(sys.executable).with_name("rapproxy"))
NODES = 3


def objects_yaml() -> str:
    docs = [
        """apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]"""
    ]
    endpoints = "\n".join(
        f"- {{addresses: [10.244.{n}.2], nodeName: node-{n}}}" for n in range(1, NODES + 1)
    )
    docs.append(
        f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
{endpoints}"""
    )
    for n in range(1, NODES + 1):
        docs.append(
            f"""apiVersion: v1
kind: Node
metadata: {{name: node-{n}}}
status:
  addresses: [{{type: InternalIP, address: 10.10.{n}.2}}]
  conditions: [{{type: Ready, status: "True"}}]"""
        )
    return "\n---\n".join(docs) + "\n"


@dataclass
class Cluster:
    nodes: list[Namespace]
    load_files: list[Path]
    token: str

    def set_load(self, node: int, cpu: float) -> None:
        self.load_files[node - 1].write_text(json.dumps({"cpu": cpu, "memory": 0.2}))

    async def spread(self, requests: int = 40) -> Counter[str]:
        names = await self.nodes[0].call(probes.backend_names, "http://10.96.0.10/", requests)
        return Counter(names)

    async def spread_becomes(
        self, predicate: Callable[[Counter[str]], bool], within: float = 15.0
    ) -> Counter[str]:
        deadline = time.monotonic() + within
        while True:
            spread = await self.spread()
            if predicate(spread):
                return spread
            assert time.monotonic() < deadline, f"spread never satisfied the condition: {spread}"
            await asyncio.sleep(0.5)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    created: list[Namespace] = []
    try:
        router = await Namespace.create("router")
        created.append(router)
        await router.exec(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        nodes = []
        for n in range(1, NODES + 1):
            node = await Namespace.create(f"node-{n}")
            created.append(node)
            nodes.append(node)
            await router.add_veth_peer(node, f"10.10.{n}.1", f"10.10.{n}.2")
            await router.add_route(f"10.244.{n}.0/24", via=f"10.10.{n}.2")
            await node.add_route("10.10.0.0/16", via=f"10.10.{n}.1")
            await node.add_route("10.244.0.0/16", via=f"10.10.{n}.1")
            await node.add_address("lo", f"10.244.{n}.2/32")
            await node.add_local_route("10.96.0.0/16")

        objects = tmp_path / "objects.yaml"
        objects.write_text(objects_yaml())
        token = "t0k3n-for-tests"
        token_file = tmp_path / "token"
        token_file.write_text(token + "\n")
        load_files = [tmp_path / f"load-{n}.json" for n in range(1, NODES + 1)]
        for path in load_files:
            path.write_text(json.dumps({"cpu": 0.1, "memory": 0.2}))
        for n, node in enumerate(nodes, start=1):
            await node.spawn(
                [
                    sys.executable,
                    "-m",
                    "rapproxy.testing.backend",
                    "--name",
                    f"b{n}",
                    "--http",
                    f"10.244.{n}.2:8080",
                ]
            )
            await node.spawn(
                [
                    RAPPROXY,
                    "run",
                    "--objects",
                    str(objects),
                    "--node-name",
                    f"node-{n}",
                    "--set",
                    "iptables.minSyncPeriod=0.05",
                    "--set",
                    "rap.telemetryInterval=0.25",
                    "--set",
                    f"rap.loadSource=file:{load_files[n - 1]}",
                    "--set",
                    f"rap.tokenFile={token_file}",
                ],
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        for n, node in enumerate(nodes, start=1):
            await node.call(probes.wait_http, f"http://10.10.{n}.2:10256/healthz", 20.0)
        yield Cluster(nodes, load_files, token)
    finally:
        for namespace in reversed(created):
            await namespace.aclose()


async def test_spill_over_follows_the_injected_load(cluster: Cluster) -> None:
    spread = await cluster.spread_becomes(lambda s: s == Counter({"b1": 40}))
    assert spread["b1"] == 40, "idle local node keeps everything local"

    cluster.set_load(1, 0.95)
    spread = await cluster.spread_becomes(lambda s: s["b1"] == 0)
    assert spread["b2"] > 0 and spread["b3"] > 0, f"spilled to both healthy peers: {spread}"

    cluster.set_load(2, 0.95)
    spread = await cluster.spread_becomes(lambda s: s["b3"] > s["b2"] and s["b1"] == 0)

    cluster.set_load(1, 0.75)  # between exit (0.7) and overload (0.8): still overloaded
    await asyncio.sleep(1.5)
    assert (await cluster.spread())["b1"] == 0, "hysteresis: no return above the exit threshold"

    cluster.set_load(1, 0.1)
    await cluster.spread_becomes(lambda s: s == Counter({"b1": 40}))


async def test_telemetry_needs_the_token(cluster: Cluster) -> None:
    url = "http://10.10.1.2:10256/rap/v1/telemetry"
    status, body = await cluster.nodes[1].call(probes.http_get, url)
    assert status == 401, body
    assert "token" in body
