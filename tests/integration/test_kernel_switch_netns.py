"""Switching a Service between the relay and the kernel fast path under load loses no connection.

Topology (network namespaces made here, joined by veths; no default routes):

    client 10.0.0.2 ──veth── 10.0.0.1 node (rapproxy run, iptables, forwarding) 10.1.1.1 ── b1
                                                                                10.1.2.1 ── b2

An open-loop load of short connections (one HTTP/1.0 request each, 200 per second) runs through
the ClusterIP while the Service's annotation `rapproxy.io/dataplane` flips it between modes four
times; the daemon follows its manifest file. Every connection must succeed, none refused, reset
or timed out: the switch is one `iptables-restore` transaction that swaps the Service's entry
rule (a REDIRECT to the relay ⇄ a jump to its DNAT chain), and conntrack keeps each connection on
the path its first packet took.

That each mode really served its phase is read from the backends' side: a connection the relay
dialled comes from the node's address on the backend's link, one the kernel DNATed from the
client's own address (no SNAT is configured). Run twice: with the default mode userspace and the
annotation asking for kernel, and the other way round (`dataplane.mode: kernel`, the annotation
asking for userspace), so both the annotation and the configured default are switched from.

And for both kernel backends: with `dataplane.kernelBackend: nftables` the kernel path is an
element of rapproxy's nft map `service-ips` (its nat chains run before iptables'), the relay's
REDIRECT stays in iptables, and the switch is two transactions ordered so that the new path is
in place before the old one goes (rules/nftables.py, Proxier._write_nftables).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rapproxy.testing import probes
from rapproxy.testing.backend import start_in
from rapproxy.testing.connload import OK, LoadReport, LoadSpec, run_load
from rapproxy.testing.netns import Namespace

pytestmark = [pytest.mark.root, pytest.mark.slow]

RAPPROXY = str(Path(sys.executable).with_name("rapproxy"))
STARTUP = 60.0  # a process start on a 2-core box shared with benchmarks can take many seconds
CLUSTER_IP = "10.96.0.10"
CLIENT_IP = "10.0.0.2"
NODE_SIDE = {"10.1.1.1", "10.1.2.1"}  # the node's addresses towards b1 and b2
PHASE = 2.0  # seconds of load in each mode once its rules are in place
MARGIN = 0.5  # a connection started this close to a switch may have met either rule
RATE = 200.0


def objects(annotation: str | None) -> str:
    annotations = f", annotations: {{rapproxy.io/dataplane: {annotation}}}" if annotation else ""
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default{annotations}}}
spec:
  clusterIP: {CLUSTER_IP}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- {{addresses: [10.1.1.2], nodeName: node}}
- {{addresses: [10.1.2.2], nodeName: node}}
"""


@dataclass
class World:
    client: Namespace
    node: Namespace
    tmp_path: Path

    @property
    def manifest(self) -> Path:
        return self.tmp_path / "objects.yaml"

    def write_manifest(self, annotation: str | None) -> None:
        # Written whole under another name and renamed: the daemon must never read half a file.
        partial = self.tmp_path / "objects.yaml.new"
        partial.write_text(objects(annotation))
        partial.replace(self.manifest)

    async def cluster_ip_rule(self) -> str:
        saved = await self.node.exec(["iptables-save", "-t", "nat"])
        rules = [line for line in saved.stdout.splitlines() if f"-d {CLUSTER_IP}/32" in line]
        assert len(rules) <= 1, rules
        return rules[0] if rules else ""

    async def nft_entry(self) -> bool:
        """Whether rapproxy's nft table sends the ClusterIP to a kernel-mode chain."""
        listed = await self.node.exec(
            ["nft", "list", "map", "ip", "rapproxy", "service-ips"], check=False
        )
        return f"{CLUSTER_IP} . tcp . 80 : goto svc-" in listed.stdout


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    namespaces: list[Namespace] = []
    try:
        for tag in ("client", "node", "b1", "b2"):
            namespaces.append(await Namespace.create(tag))
        client, node, b1, b2 = namespaces
        await client.add_veth_peer(node, CLIENT_IP, "10.0.0.1")
        await client.add_route("10.96.0.0/16", via="10.0.0.1")
        # The relay's path needs the ClusterIP delivered locally before REDIRECT; the kernel's
        # needs the node to forward what it DNATs, and the pods a way back to the client.
        await node.add_local_route("10.96.0.0/16")
        await node.exec(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        for number, backend in ((1, b1), (2, b2)):
            await node.add_veth_peer(backend, f"10.1.{number}.1", f"10.1.{number}.2")
            await backend.add_route("10.0.0.0/24", via=f"10.1.{number}.1")
            await start_in(backend, f"b{number}", tmp_path / f"b{number}.ready")
        yield World(client, node, tmp_path)
    finally:
        for namespace in reversed(namespaces):
            await namespace.aclose()


async def wait_for_mode(world: World, kernel: bool, within: float, backend: str) -> float:
    """Poll the rules until the ClusterIP's path is the mode's alone; returns when it was seen."""
    deadline = time.monotonic() + within
    while True:
        rule = await world.cluster_ip_rule()
        if backend == "nftables":
            entry = await world.nft_entry()
            done = (entry and not rule) if kernel else ("-j REDIRECT" in rule and not entry)
        else:
            done = ("-j RAPPROXY-SVC-" in rule) if kernel else ("-j REDIRECT" in rule)
        if done:
            return time.time()
        assert time.monotonic() < deadline, f"not in {'kernel' if kernel else 'userspace'} mode"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
@pytest.mark.parametrize("default", ["userspace", "kernel"])
async def test_switching_modes_under_load_loses_no_new_connection(
    world: World, default: str, backend: str
) -> None:
    other = "kernel" if default == "userspace" else "userspace"
    world.write_manifest(None)
    log = world.tmp_path / "rapproxy.log"
    with log.open("wb") as output:
        daemon = await world.node.spawn(
            [
                RAPPROXY,
                "run",
                "--objects",
                str(world.manifest),
                "--node-name",
                "node",
                "--set",
                f"dataplane.mode={default}",
                "--set",
                f"dataplane.kernelBackend={backend}",
                "--set",
                "iptables.minSyncPeriod=0.05",
                # One patient dial: a backend starved of CPU by other jobs on the box must not
                # turn into a reset that has nothing to do with the switch.
                "--set",
                "proxy.dialTimeouts=[10.0]",
            ],
            stdout=output,
            stderr=output,
        )
    try:
        await world.client.call(probes.wait_http, f"http://{CLUSTER_IP}/", STARTUP)
        # Start in the default mode; then the annotation, then without it, twice.
        modes = [default, other, default, other, default]
        seen = [await wait_for_mode(world, default == "kernel", STARTUP, backend)]

        stop = world.tmp_path / "load.stop"
        spec = LoadSpec(
            CLUSTER_IP,
            80,
            rate=RATE,
            seconds=120,  # an upper bound: the stop file ends it
            connect_timeout=10.0,
            response_timeout=10.0,
            stop_file=str(stop),
        )
        load = asyncio.create_task(world.client.call(run_load, spec))
        switched: list[float] = []
        await asyncio.sleep(PHASE)  # the first phase's load, not a synchronisation
        for mode in modes[1:]:
            switched.append(time.time())
            world.write_manifest(mode if mode != default else None)
            seen.append(await wait_for_mode(world, mode == "kernel", 30, backend))
            await asyncio.sleep(PHASE)  # this mode's share of the load
        switched.append(time.time())
        stop.write_text("")
        report: LoadReport = await asyncio.wait_for(load, 60)
    finally:
        daemon.terminate()
        await asyncio.wait_for(daemon.wait(), 30)

    failures = [
        (round(a.started - switched[0], 2), a.outcome, round(a.seconds, 2))
        for a in report.attempts
        if a.outcome != OK
    ]
    assert not failures, (
        f"outcomes {dict(report.counts())}; switches at "
        f"{[round(t - switched[0], 2) for t in switched]} s; failures (start, outcome, seconds): "
        f"{failures[:20]}\n" + log.read_text(errors="replace")[-3000:]
    )
    assert len(report.attempts) >= RATE * PHASE * len(modes) * 0.8
    for index, mode in enumerate(modes):
        # Connections started well inside the phase: after its rules were seen, before the next
        # switch was asked for.
        begin, end = (seen[index] if index else report.started), switched[index] - MARGIN
        peers = {a.peer for a in report.attempts if begin <= a.started < end}
        served = sum(1 for a in report.attempts if begin <= a.started < end)
        assert served >= RATE * (PHASE - MARGIN) * 0.5, (mode, served)
        expected = {CLIENT_IP} if mode == "kernel" else NODE_SIDE
        assert peers and peers <= expected, (index, mode, peers)
    backends = {a.backend for a in report.attempts}
    assert backends == {"b1", "b2"}, backends

    # `rapproxy cleanup` leaves nothing of either backend behind.
    await world.node.exec([RAPPROXY, "cleanup"])
    assert "RAPPROXY" not in (await world.node.exec(["iptables-save"])).stdout
    assert "rapproxy" not in (await world.node.exec(["nft", "list", "tables"])).stdout
