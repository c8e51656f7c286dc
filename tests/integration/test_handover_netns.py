"""A rolling update of the proxy, for real: a second `rapproxy run` takes over, the first drains.

Topology (network namespaces made here, joined by veths; no default routes):

    client 10.0.0.2 ──veth── 10.0.0.1 node (two rapproxy processes, iptables) 10.1.1.1 ──veth── b1

While an open-loop load of short connections runs through the ClusterIP, and long keep-alive
connections opened before the update keep asking, a new rapproxy starts on the node (it takes the
listening sockets over), then the old one gets SIGTERM. Every short connection must succeed —
none refused, none reset — and the long ones must keep being answered until the old process's
drain deadline, when it resets them.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from rapproxy.testing import probes
from rapproxy.testing.apiserver import EmulatedApiServer
from rapproxy.testing.apiserver.resources import ENDPOINT_SLICES, SERVICES
from rapproxy.testing.backend import start_in
from rapproxy.testing.connload import OK, RESET, SURVIVED, LoadReport, LoadSpec, run_load
from rapproxy.testing.netns import Namespace

pytestmark = pytest.mark.root

RAPPROXY = str(Path(sys.executable).with_name("rapproxy"))
DRAIN = 3.0
STARTUP = 60.0  # a process start on a 2-core box shared with benchmarks can take many seconds

OBJECTS = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.1.1.2], nodeName: node}
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
metadata: {name: dns-1, namespace: default, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: [10.1.1.2], nodeName: node}
"""


@dataclass
class Node:
    client: Namespace
    node: Namespace
    tmp_path: Path
    source: list[str]  # --objects FILE, or --kubeconfig FILE of an emulated API server
    daemons: list[asyncio.subprocess.Process] = field(default_factory=list)

    async def start_daemon(self, *extra: str) -> tuple[asyncio.subprocess.Process, Path]:
        log = self.tmp_path / f"rapproxy-{len(self.daemons)}.log"
        with log.open("wb") as output:
            daemon = await self.node.spawn(
                [
                    RAPPROXY,
                    "run",
                    *self.source,
                    "--node-name",
                    "node",
                    "--set",
                    "iptables.minSyncPeriod=0.05",
                    "--set",
                    f"proxy.drainTimeout={DRAIN}",
                    # One dial attempt with a patient timeout: the default first attempt gives
                    # up after 250 ms, and a backend starved of CPU by other jobs on the box
                    # can leave its accept queue full that long; the client would see a reset
                    # that has nothing to do with the handover.
                    "--set",
                    "proxy.dialTimeouts=[10.0]",
                    *extra,
                ],
                stdout=output,
                stderr=output,
            )
        self.daemons.append(daemon)
        return daemon, log

    async def rapproxy_rules(self) -> list[str]:
        saved = await self.node.exec(["iptables-save", "-t", "nat"])
        return [line for line in saved.stdout.splitlines() if "RAPPROXY" in line]


def log_text(log: Path) -> str:
    return log.read_text(errors="replace")


def exists(path: Path) -> bool:
    return path.exists()


async def wait_for_line(log: Path, text: str, within: float) -> None:
    deadline = time.monotonic() + within
    while text not in log_text(log):
        assert time.monotonic() < deadline, (
            f"{text!r} not logged within {within} s:\n" + (log_text(log)[-3000:])
        )
        await asyncio.sleep(0.05)


async def wait_for_file(path: Path, within: float) -> None:
    deadline = time.monotonic() + within
    while not exists(path):
        assert time.monotonic() < deadline, f"{path} did not appear within {within} s"
        await asyncio.sleep(0.05)


@pytest.fixture(params=["objects", "api"])
async def world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Node]:
    """The node, its Services from a file or from an emulated API server (whose lists take a
    while: a successor must not accept before its first sync)."""
    namespaces: list[Namespace] = []
    try:
        for tag in ("client", "node", "b1"):
            namespaces.append(await Namespace.create(tag))
        client, node, b1 = namespaces
        await client.add_veth_peer(node, "10.0.0.2", "10.0.0.1")
        await node.add_veth_peer(b1, "10.1.1.1", "10.1.1.2")
        await client.add_route("10.96.0.0/16", via="10.0.0.1")
        await node.add_local_route("10.96.0.0/16")
        await start_in(b1, "b1", tmp_path / "b1.ready", udp="0.0.0.0:5353")
        (tmp_path / "objects.yaml").write_text(OBJECTS)
        if request.param == "objects":
            yield Node(client, node, tmp_path, ["--objects", str(tmp_path / "objects.yaml")])
            return
        api = EmulatedApiServer(socket_factory=node.socket, bookmark_interval=1.0)
        await api.start()
        try:
            for obj in yaml.safe_load_all(OBJECTS):
                resource = SERVICES if obj["kind"] == "Service" else ENDPOINT_SLICES
                api.registry.create(resource, "default", obj)
            kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
            yield Node(client, node, tmp_path, ["--kubeconfig", str(kubeconfig)])
        finally:
            await api.stop()
    finally:
        for namespace in namespaces:
            await namespace.aclose()


@pytest.mark.parametrize("workers", [1, 2])
async def test_new_instance_takes_over_while_the_old_drains_losing_no_connection(
    world: Node, workers: int
) -> None:
    # With workers, the listener taken over is the one every worker accepts from, and the old
    # instance's drain covers its workers' connections as well as its own.
    old, _old_log = await world.start_daemon("--set", f"proxy.workers={workers}")
    await world.client.call(probes.wait_http, "http://10.96.0.10/", STARTUP)

    ready, stop = world.tmp_path / "load.ready", world.tmp_path / "load.stop"
    spec = LoadSpec(
        "10.96.0.10",
        80,
        rate=100,
        seconds=3 * STARTUP,  # an upper bound: the stop file ends it
        # Patient clients: on a box starved by other jobs a connection may wait seconds for
        # the CPU, which is not what this test is about. A lost queue shows as refused/reset.
        connect_timeout=10.0,
        response_timeout=10.0,
        long_connections=2,
        ready_file=str(ready),
        stop_file=str(stop),
    )
    load = asyncio.create_task(world.client.call(run_load, spec))
    await wait_for_file(ready, 10)  # the long connections are open, on the old process

    rules = await world.rapproxy_rules()
    started = time.time()
    _new, new_log = await world.start_daemon("--set", f"proxy.workers={workers}")
    # TCP listener, healthz, metrics, and the UDP service port's socket.
    await wait_for_line(new_log, "took over 4 listening socket(s)", STARTUP)
    await wait_for_line(new_log, "first sync done: accepting on the listener taken over", STARTUP)
    terminated = time.time()
    old.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(old.wait(), DRAIN + 10) == 0
    exited = time.time()
    assert await world.rapproxy_rules() == rules, "the rules stayed, the UDP port too"
    await asyncio.sleep(2.0)  # two more seconds of load, served by the new instance alone
    stop.write_text("")
    report: LoadReport = await asyncio.wait_for(load, 60)
    # After the load: the client namespace's worker ran it and is free again.
    reply = await world.client.call(probes.udp_ask, "10.96.0.11", 53, b"after", 3.0)
    assert reply == b"b1:er", "the new instance reads the UDP socket it took over"

    deadline = terminated + DRAIN
    failures = [
        (round(a.started - terminated, 2), a.outcome, round(a.seconds, 2))
        for a in report.attempts
        # The only failures a handover may cause: connections the old process still held at its
        # drain deadline, reset there (longer than the deadline, for a loaded box).
        if a.outcome != OK
        and not (
            a.outcome == RESET and a.started < terminated <= deadline - 0.5 <= a.started + a.seconds
        )
    ]
    counts = report.counts()
    assert not failures, (
        f"outcomes {dict(counts)}; new instance started {started - terminated:.2f} s and the old "
        f"exited {exited - terminated:.2f} s from SIGTERM; failures (start from SIGTERM, outcome, "
        f"seconds): {failures[:10]} ... {failures[-10:]}"
    )
    assert report.counts(since=exited)[OK] >= 100, "the new instance serves after the old left"
    for long in report.long:
        assert long.outcome == RESET, "the drain deadline ends the old process's connections"
        assert long.last_answer is not None and long.last_answer >= terminated + DRAIN - 0.5, (
            f"answered until {long.last_answer - terminated:.2f} s after SIGTERM, drain {DRAIN} s"
        )
        assert long.ended <= exited + 1.0


async def test_a_second_instance_without_a_predecessor_to_take_over_from_serves_alone(
    world: Node,
) -> None:
    # The fallback: with handover off, the new instance binds beside the old (SO_REUSEPORT).
    old, _log = await world.start_daemon("--set", "proxy.handoverSocket=disabled")
    await world.client.call(probes.wait_http, "http://10.96.0.10/", STARTUP)
    _new, new_log = await world.start_daemon("--set", "proxy.handoverSocket=disabled")
    await wait_for_line(new_log, "rapproxy on node node", STARTUP)
    old.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(old.wait(), DRAIN + 10) == 0
    report: LoadReport = await world.client.call(
        run_load, LoadSpec("10.96.0.10", 80, rate=50, seconds=1, long_connections=1)
    )
    assert report.counts() == {OK: 50}
    assert [long.outcome for long in report.long] == [SURVIVED]
