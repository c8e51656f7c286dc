"""The whole proxy, for real: a client namespace reaches Services through rapproxy on a node.

Topology (every piece a network namespace made here, joined by veths; no default routes, nothing
reaches the root namespace):

    client 10.0.0.2 ──veth── 10.0.0.1 node (rapproxy, iptables) 10.1.1.1 ──veth── 10.1.1.2 b1
                                                                 10.1.2.1 ──veth── 10.1.2.2 b2

The client's route to the service CIDR points at the node, as a pod's traffic reaches its node.
rapproxy runs as a real process from the CLI with `--objects`, backends are real processes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rapproxy.testing import probes
from rapproxy.testing.netns import Namespace

pytestmark = pytest.mark.root

RAPPROXY = str(Path(sys.executable).with_name("rapproxy"))

OBJECTS = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  clusterIP: 10.96.0.12
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: default}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: dns, port: 53, protocol: UDP, targetPort: 5353}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.1.1.2], nodeName: node}
- {addresses: [10.1.2.2], nodeName: node}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sticky-1, namespace: default, labels: {kubernetes.io/service-name: sticky}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.1.1.2], nodeName: node}
- {addresses: [10.1.2.2], nodeName: node}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, namespace: default, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: [10.1.1.2], nodeName: node}
- {addresses: [10.1.2.2], nodeName: node}
"""


@dataclass
class World:
    client: Namespace
    node: Namespace
    objects: Path
    daemon: asyncio.subprocess.Process | None = None

    async def start_daemon(self) -> None:
        self.daemon = await self.node.spawn(
            [
                RAPPROXY,
                "run",
                "--objects",
                str(self.objects),
                "--node-name",
                "node",
                "--lb-policy",
                "round-robin",
                "--set",
                "iptables.minSyncPeriod=0.05",
            ],
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await self.client.call(probes.wait_http, "http://10.0.0.1:10256/healthz", 20.0)

    async def kill_daemon(self, sig: int = signal.SIGKILL) -> None:
        assert self.daemon is not None
        self.daemon.send_signal(sig)
        await asyncio.wait_for(self.daemon.wait(), 10)

    async def rapproxy_rules(self) -> list[str]:
        saved = await self.node.exec(["iptables-save", "-t", "nat"])
        return [line for line in saved.stdout.splitlines() if "RAPPROXY" in line]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    namespaces: list[Namespace] = []
    try:
        for tag in ("client", "node", "b1", "b2"):
            namespaces.append(await Namespace.create(tag))
        client, node, b1, b2 = namespaces
        await client.add_veth_peer(node, "10.0.0.2", "10.0.0.1")
        await node.add_veth_peer(b1, "10.1.1.1", "10.1.1.2")
        await node.add_veth_peer(b2, "10.1.2.1", "10.1.2.2")
        await client.add_route("10.96.0.0/16", via="10.0.0.1")
        await node.add_local_route("10.96.0.0/16")
        for name, backend in (("b1", b1), ("b2", b2)):
            ready = tmp_path / f"{name}.ready"
            await backend.spawn(
                [
                    sys.executable,
                    "-m",
                    "rapproxy.testing.backend",
                    "--name",
                    name,
                    "--http",
                    "0.0.0.0:8080",
                    "--udp",
                    "0.0.0.0:5353",
                    "--ready-file",
                    str(ready),
                ]
            )
            deadline = time.monotonic() + 10
            while not ready.exists():
                assert time.monotonic() < deadline, f"backend {name} did not start"
                await asyncio.sleep(0.02)
        objects = tmp_path / "objects.yaml"
        objects.write_text(OBJECTS)
        yield World(client, node, objects)
    finally:
        for namespace in namespaces:
            await namespace.aclose()


async def test_cluster_ip_node_port_and_udp_reach_backends_in_other_namespaces(
    world: World,
) -> None:
    await world.start_daemon()
    names = await world.client.call(probes.backend_names, "http://10.96.0.10/", 6)
    assert sorted(set(names)) == ["b1", "b2"], "round-robin over both backends"
    names = await world.client.call(probes.backend_names, "http://10.0.0.1:30080/", 4)
    assert sorted(set(names)) == ["b1", "b2"], "NodePort on the node's address"

    reply = await world.client.call(probes.udp_ask, "10.96.0.11", 53, b"x" * 60_000)
    assert len(reply) == 60_000 and reply.split(b":")[0] in (b"b1", b"b2")
    # From the node itself (nat OUTPUT, REDIRECT to 127.0.0.1), with a connected socket that
    # only accepts a reply from 10.96.0.11:53.
    for connected in (True, False):
        reply = await world.node.call(probes.udp_ask, "10.96.0.11", 53, b"ping", 3.0, connected)
        assert reply.split(b":")[0] in (b"b1", b"b2")
    reply = await world.client.call(probes.udp_ask, "10.96.0.11", 53, b"ping", 3.0, True)
    assert reply.split(b":")[0] in (b"b1", b"b2")

    rules = await world.rapproxy_rules()
    assert any("10.96.0.10/32" in rule for rule in rules)
    status, _body = await world.client.call(probes.http_get, "http://10.0.0.1:10256/livez")
    assert status == 200


async def test_client_ip_affinity_sticks_to_one_backend(world: World) -> None:
    await world.start_daemon()
    names = await world.client.call(probes.backend_names, "http://10.96.0.12/", 8)
    assert len(set(names)) == 1, f"ClientIP affinity: {names}"


async def test_cleanup_removes_every_rule_and_restart_restores_traffic(world: World) -> None:
    await world.start_daemon()
    assert await world.rapproxy_rules()

    await world.kill_daemon(signal.SIGKILL)  # a crash: rules stay behind
    assert await world.rapproxy_rules()
    await world.start_daemon()  # startup repairs the leftovers and serves again
    names = await world.client.call(probes.backend_names, "http://10.96.0.10/", 2)
    assert set(names) <= {"b1", "b2"}
    jumps = [rule for rule in await world.rapproxy_rules() if rule.startswith("-A OUTPUT")]
    assert len(jumps) == 1, f"restart must not duplicate jumps: {jumps}"

    await world.kill_daemon(signal.SIGTERM)
    result = await world.node.exec([RAPPROXY, "cleanup"])
    assert "removed" in result.stdout
    assert await world.rapproxy_rules() == []
    with pytest.raises(OSError):
        await world.client.call(probes.http_get, "http://10.96.0.10/", 1.0)

    await world.start_daemon()
    names = await world.client.call(probes.backend_names, "http://10.96.0.10/", 2)
    assert set(names) <= {"b1", "b2"}


async def test_file_edits_reach_the_data_plane(world: World) -> None:
    await world.start_daemon()
    # Drop b2 from the web Service: only b1 must answer afterwards.
    text = world.objects.read_text().replace(
        "- {addresses: [10.1.1.2], nodeName: node}\n- {addresses: [10.1.2.2], nodeName: node}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: sticky-1",
        "- {addresses: [10.1.1.2], nodeName: node}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: sticky-1",
    )
    assert text != world.objects.read_text()
    world.objects.write_text(text)
    os.utime(world.objects)
    deadline = time.monotonic() + 10
    while True:
        names = await world.client.call(probes.backend_names, "http://10.96.0.10/", 4)
        if set(names) == {"b1"}:
            break
        assert time.monotonic() < deadline, f"endpoint removal not applied: {names}"
        await asyncio.sleep(0.1)
