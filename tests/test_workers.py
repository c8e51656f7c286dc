"""Relay workers for real: `rapproxy run` with `proxy.workers` in a network namespace.

Topology (namespaces made here, joined by veths; no default routes):

    client 10.0.0.2 ──veth── 10.0.0.1 node (rapproxy + workers, iptables) 10.1.1.1 ──veth── b1

Checked: several processes accept from the one listener and their counters add up in /metrics
and /debug/state; a worker killed with SIGKILL is started again while the others keep serving;
SIGTERM ends the workers with the main process. The pure parts (merging counters, the telemetry
mirror) are tested beside their modules.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rapproxy.config import ConfigError, RapproxyConfiguration, validate
from rapproxy.testing import probes
from rapproxy.testing.backend import start_in
from rapproxy.testing.connload import OK, RESET, TRUNCATED, LoadReport, LoadSpec, run_load
from rapproxy.testing.netns import Namespace
from rapproxy.workers import resolve_count

RAPPROXY = str(Path(sys.executable).with_name("rapproxy"))
STARTUP = 60.0  # a process start on a 2-core box shared with benchmarks can take many seconds
DRAIN = 2.0

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
"""


def test_zero_workers_means_one_per_cpu() -> None:
    assert resolve_count(0) == len(os.sched_getaffinity(0))
    assert resolve_count(3) == 3


def test_a_negative_worker_count_is_refused() -> None:
    from dataclasses import replace

    config = RapproxyConfiguration()
    with pytest.raises(ConfigError, match=r"proxy\.workers"):
        validate(replace(config, proxy=replace(config.proxy, workers=-1)))


@dataclass
class Node:
    client: Namespace
    node: Namespace
    tmp_path: Path

    async def start_daemon(self, workers: int) -> tuple[asyncio.subprocess.Process, Path]:
        log = self.tmp_path / "rapproxy.log"
        with log.open("wb") as output:
            daemon = await self.node.spawn(
                [
                    RAPPROXY,
                    "run",
                    "--objects",
                    str(self.tmp_path / "objects.yaml"),
                    "--node-name",
                    "node",
                    "--set",
                    "iptables.minSyncPeriod=0.05",
                    "--set",
                    f"proxy.drainTimeout={DRAIN}",
                    "--set",
                    f"proxy.workers={workers}",
                    "--set",
                    "proxy.dialTimeouts=[10.0]",
                ],
                stdout=output,
                stderr=output,
            )
        return daemon, log

    async def state(self) -> dict[str, Any]:
        status, body = await self.node.call(
            probes.http_get, "http://127.0.0.1:10249/debug/state", 5.0
        )
        assert status == 200, body
        state: dict[str, Any] = json.loads(body)
        return state

    async def metric(self, name: str) -> float:
        status, body = await self.node.call(probes.http_get, "http://127.0.0.1:10249/metrics", 5.0)
        assert status == 200, body
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in body.splitlines()
            if line.startswith(name + "{") or line.startswith(name + " ")
        )

    async def workers_up(self, count: int, within: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + within
        while True:
            workers: list[dict[str, Any]] = (await self.state()).get("workers", [])
            if len(workers) == count and all(
                w["pid"] is not None and w["tcp_connections"] is not None for w in workers
            ):
                return workers
            assert time.monotonic() < deadline, f"workers not all up within {within} s: {workers}"
            await asyncio.sleep(0.2)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[Node]:
    namespaces: list[Namespace] = []
    try:
        for tag in ("client", "node", "b1"):
            namespaces.append(await Namespace.create(tag))
        client, node, b1 = namespaces
        await client.add_veth_peer(node, "10.0.0.2", "10.0.0.1")
        await node.add_veth_peer(b1, "10.1.1.1", "10.1.1.2")
        await client.add_route("10.96.0.0/16", via="10.0.0.1")
        await node.add_local_route("10.96.0.0/16")
        await start_in(b1, "b1", tmp_path / "b1.ready")
        (tmp_path / "objects.yaml").write_text(OBJECTS)
        yield Node(client, node, tmp_path)
    finally:
        for namespace in namespaces:
            await namespace.aclose()


@pytest.mark.root
async def test_workers_accept_from_one_listener_and_their_counters_add_up(world: Node) -> None:
    daemon, log = await world.start_daemon(workers=3)
    await world.client.call(probes.wait_http, "http://10.96.0.10/", STARTUP)
    await world.workers_up(2, STARTUP)
    before = await world.metric("rapproxy_connections_total")
    report: LoadReport = await world.client.call(
        run_load, LoadSpec("10.96.0.10", 80, rate=100, seconds=3, connect_timeout=10.0)
    )
    assert report.counts() == {OK: 300}
    await asyncio.sleep(1.5)  # a worker reports its counters every second
    state = await world.state()
    served = [w["tcp_connections"] for w in state["workers"]] + [state["tcp_here"]["connections"]]
    total = await world.metric("rapproxy_connections_total")
    assert total - before == 300, f"/metrics sums every process: {served}"
    assert sum(served) == total
    assert sum(1 for n in served if n > 0) >= 2, f"more than one process accepted: {served}"
    daemon.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(daemon.wait(), DRAIN + 15) == 0, log.read_text()[-3000:]
    for worker in state["workers"]:
        assert not alive(worker["pid"]), "the workers end with the main process"


@pytest.mark.root
async def test_a_killed_worker_is_started_again_while_the_others_keep_serving(world: Node) -> None:
    daemon, log = await world.start_daemon(workers=2)
    await world.client.call(probes.wait_http, "http://10.96.0.10/", STARTUP)
    (worker,) = await world.workers_up(1, STARTUP)
    load = asyncio.create_task(
        world.client.call(
            run_load, LoadSpec("10.96.0.10", 80, rate=100, seconds=4, connect_timeout=10.0)
        )
    )
    await asyncio.sleep(1.0)
    killed_at = time.time()
    os.kill(worker["pid"], signal.SIGKILL)
    report: LoadReport = await load
    counts = report.counts()
    # Only what the killed worker held at that instant may fail: reset, or closed before the
    # whole answer when the kernel closed its sockets with nothing unread (truncated). Nothing
    # is refused, and the main process goes on accepting from the shared queue.
    assert set(counts) <= {OK, RESET, TRUNCATED}, counts
    assert counts.get(RESET, 0) + counts.get(TRUNCATED, 0) <= 5, counts
    assert report.counts(since=killed_at + 0.5)[OK] >= 200, counts
    deadline = time.monotonic() + STARTUP
    while True:
        (again,) = (await world.state())["workers"]
        if again["pid"] not in (None, worker["pid"]) and again["restarts"] == 1:
            break
        assert time.monotonic() < deadline, f"worker not restarted: {again}"
        await asyncio.sleep(0.2)
    assert "SIGKILL" in again["last_exit"] or "-9" in again["last_exit"], again
    after: LoadReport = await world.client.call(
        run_load, LoadSpec("10.96.0.10", 80, rate=100, seconds=1, connect_timeout=10.0)
    )
    assert after.counts() == {OK: 100}
    daemon.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(daemon.wait(), DRAIN + 15) == 0, log.read_text()[-3000:]
    assert not alive(again["pid"])
