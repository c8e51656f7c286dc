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
import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rapproxy.testing import probes
from rapproxy.testing.netns import Namespace

# xdist_group: tests that judge RAP by measured latency share one worker (`--dist loadgroup`),
# so the demo's CPU-bound neighbour pod never runs beside them on this two-core machine.
pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.xdist_group("edge-timing")]

RAPPROXY = str(Path(sys.executable).with_name("rapproxy"))
NODES = 3
SERVICE_URL = "http://10.96.0.10/"
METRICS = ("127.0.0.1", 10249)  # metricsBindAddress default: /debug/state, inside each node


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
    proxies: list[asyncio.subprocess.Process]  # `ip netns exec` execs: these are the rapproxys
    load_files: list[Path]
    token: str

    def set_load(self, node: int, cpu: float) -> None:
        self.load_files[node - 1].write_text(json.dumps({"cpu": cpu, "memory": 0.2}))

    async def spread(self, requests: int = 40) -> Counter[str]:
        names = await self.nodes[0].call(probes.backend_names, SERVICE_URL, requests)
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
    """Pods that cost nothing; RAP's utilization variant, steered by the injected load."""
    async with started_cluster(tmp_path, ("proxy.lbPolicy=rap-aimd",)) as running:
        yield running


@contextlib.asynccontextmanager
async def started_cluster(
    tmp_path: Path, settings: tuple[str, ...], work_ms: tuple[float, ...] = (0.0,) * NODES
) -> AsyncIterator[Cluster]:
    """The three nodes, each backend spending `work_ms[n]` of CPU per request."""
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
        proxies = []
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
                    "--work-ms",
                    f"{work_ms[n - 1]:g}",
                ]
            )
            proxy = await node.spawn(
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
                    *(arg for setting in settings for arg in ("--set", setting)),
                ],
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            proxies.append(proxy)
        for n, node in enumerate(nodes, start=1):
            await node.call(probes.wait_http, f"http://10.10.{n}.2:10256/healthz", 20.0)
        yield Cluster(nodes, proxies, load_files, token)
    finally:
        for namespace in reversed(created):
            await namespace.aclose()


async def test_rap_spills_only_while_the_local_pod_queues_then_returns(tmp_path: Path) -> None:
    # The default policy, with real queueing: every pod spends 20 ms of CPU per request and
    # serves one at a time. Node-1's CPU verdict comes from its load file (a real node's from
    # its cgroup): spilling needs the node short of CPU *and* a queue that costs more than a
    # round trip to a peer.
    async with started_cluster(tmp_path, (), work_ms=(20.0, 20.0, 20.0)) as cluster:
        # One request at a time: nobody waits for node-1's pod, and a peer's would cost the
        # same plus a round trip. Everything local.
        spread = await cluster.spread_becomes(lambda s: s == Counter({"b1": 40}))
        assert spread == Counter({"b1": 40})

        # Sixteen clients on a node whose CPU figure says it has room: the queue is the
        # clients' own, and a peer's pod would queue them as well. Nothing spills.
        names = await cluster.nodes[0].call(probes.concurrent_backend_names, SERVICE_URL, 16, 2.0)
        assert Counter(names) == Counter({"b1": len(names)}), Counter(names)

        # The node is short of CPU now. One client at a time still keeps up: all local.
        cluster.set_load(1, 0.95)
        await overloaded_becomes(cluster.nodes[0], True)
        spread = await cluster.spread_becomes(lambda s: s == Counter({"b1": 40}))
        assert spread == Counter({"b1": 40})

        # Sixteen clients at once: a queue forms in front of node-1's pod, and it costs more
        # than the round trip to a peer. Traffic spills, while node-1 keeps busy.
        names = await cluster.nodes[0].call(probes.concurrent_backend_names, SERVICE_URL, 16, 3.0)
        served = Counter(names)
        assert served[""] == 0, f"requests failed under load: {served}"
        assert served["b2"] + served["b3"] > served["b1"] > 0, served

        # Load gone, the queue drains: back to all local, though the node is still short of CPU.
        await cluster.spread_becomes(lambda s: s == Counter({"b1": 40}))
        decision = await web_decision(cluster.nodes[0])
        assert decision["local_overloaded"] is True and decision["decision"] == "local", decision


async def web_decision(node: Namespace) -> dict[str, Any]:
    """The rap policy's explanation for Service web in the node's `/debug/state`."""
    services = (await debug_state(node))["services"]
    return next(v["decision"] for k, v in services.items() if "default/web" in k)


async def overloaded_becomes(node: Namespace, overloaded: bool, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while (await web_decision(node)).get("local_overloaded") is not overloaded:
        assert time.monotonic() < deadline, f"node never seen overloaded={overloaded}"
        await asyncio.sleep(0.05)


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


# -- a peer that dies or answers garbage ----------------------------------------------------------

# rap.telemetryInterval=0.25 and 3 stale periods: figures count as unknown 0.75 s after the last
# good poll even when polls hang, and a poll that fails (refused, reset, garbage) makes the peer
# stale when its round ends, at most one interval + poll timeout (0.5 s) after the change. The rest
# is slack for a loaded two-core machine (measured here: about 0.2 s for both failures).
STALE_WITHIN = 2.5


def requests_until(url: str, stop: str, limit: float = 60.0) -> list[tuple[float, str]]:
    """GETs one after another (fresh connection each) until the file `stop` exists.

    Runs in a node's worker. Returns (monotonic time, serving backend or the error) per request;
    CLOCK_MONOTONIC is system-wide, so the test can place each request before or after an event.
    """
    outcomes = []
    deadline = time.monotonic() + limit
    while not os.path.exists(stop) and time.monotonic() < deadline:
        try:
            status, body = probes.http_get(url, timeout=2.0)
            outcome = body.split("\n", 1)[0] if status == 200 else f"HTTP {status}: {body[:80]}"
        except OSError as error:
            outcome = f"{type(error).__name__}: {error}"
        outcomes.append((time.monotonic(), outcome))
        time.sleep(0.01)  # pacing (about 60 requests/s), not synchronisation
    return outcomes


async def debug_state(node: Namespace) -> dict[str, Any]:
    """`GET /debug/state` of the node's rapproxy, over a socket made inside that node.

    Not through `node.call`: node-1's single worker is busy generating traffic meanwhile.
    """
    sock = node.socket()
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, METRICS), 3.0)
        reader, writer = await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise
    try:
        writer.write(b"GET /debug/state HTTP/1.0\r\n\r\n")
        response = await asyncio.wait_for(reader.read(), 3.0)  # HTTP/1.0: read to the close
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"200", head
    state: dict[str, Any] = json.loads(body)
    return state


async def views_of(cluster: Cluster, peer: str, observers: list[int]) -> dict[str, Any]:
    """What each observer node's RAP telemetry says about `peer` (fresh, last_error, age...)."""
    views = {}
    for n in observers:
        state = await debug_state(cluster.nodes[n - 1])
        views[f"node-{n}"] = state["rap"]["telemetry"]["nodes"].get(peer, {})
    return views


async def views_become(
    cluster: Cluster,
    peer: str,
    predicate: Callable[[dict[str, Any]], bool],
    within: float,
    observers: tuple[int, ...] = (1, 2),
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        views = await views_of(cluster, peer, list(observers))
        if all(predicate(view) for view in views.values()):
            return views
        assert time.monotonic() < deadline, f"not within {within}s: {peer} seen as {views}"
        await asyncio.sleep(0.05)


async def selections(node: Namespace) -> int:
    """How many connections the node's balancer has placed so far."""
    return sum((await debug_state(node))["selections"].values())


async def traffic_passes(node: Namespace, count: int, within: float = 10.0) -> None:
    """Wait until the node's proxy has placed `count` more connections: traffic is flowing."""
    target = await selections(node) + count
    deadline = time.monotonic() + within
    while await selections(node) < target:
        assert time.monotonic() < deadline, f"fewer than {count} connections within {within}s"
        await asyncio.sleep(0.05)


async def test_a_dead_or_garbage_peer_is_marked_stale_without_disturbing_traffic(
    cluster: Cluster, tmp_path: Path
) -> None:
    def fresh(view: dict[str, Any]) -> bool:
        return view.get("fresh") is True

    def stale(error_prefix: str = "") -> Callable[[dict[str, Any]], bool]:
        def check(view: dict[str, Any]) -> bool:
            error = view.get("last_error")
            return view.get("fresh") is False and (error or "").startswith(error_prefix)

        return check

    # node-1 overloaded: it spills to both peers, so node-3's pod carries traffic when node-3's
    # proxy goes away.
    cluster.set_load(1, 0.95)
    await cluster.spread_becomes(lambda s: s["b1"] == 0 and s["b2"] > 0 and s["b3"] > 0)
    await views_become(cluster, "node-3", fresh, within=10.0)

    stop = tmp_path / "stop-traffic"
    traffic = asyncio.create_task(cluster.nodes[0].call(requests_until, SERVICE_URL, str(stop)))
    try:
        await traffic_passes(cluster.nodes[0], 20)

        killed_at = time.monotonic()
        cluster.proxies[2].kill()  # a crash: no goodbye, its sockets reset by the kernel
        await asyncio.wait_for(cluster.proxies[2].wait(), 5.0)
        dead = await views_become(cluster, "node-3", stale(), STALE_WITHIN)
        dead_after = time.monotonic() - killed_at
        assert all(v["last_error"] for v in dead.values()), f"a failed poll, not only age: {dead}"

        # Something else now answers on node-3's telemetry port: 200, but not telemetry.
        ready = tmp_path / "garbage-ready"
        await cluster.nodes[2].spawn(
            [
                sys.executable,
                "-m",
                "rapproxy.testing.backend",
                "--name",
                "not-telemetry",
                "--http",
                "10.10.3.2:10256",
                "--ready-file",
                str(ready),
            ]
        )
        deadline = time.monotonic() + 10.0
        while not ready.exists():
            assert time.monotonic() < deadline, "the garbage server did not start"
            await asyncio.sleep(0.05)
        await views_become(cluster, "node-3", stale("bad answer"), STALE_WITHIN)
        garbage_seen_at = time.monotonic()
        await traffic_passes(cluster.nodes[0], 20)
    finally:
        stop.touch()
        outcomes = await traffic

    # Only node-3's proxy died: its pod still serves, and node-1 dials pods directly, so not a
    # single request may fail — before, during or after the peer went stale.
    failures = [o for o in outcomes if o[1] not in {"b1", "b2", "b3"}]
    assert failures == [], failures[:10]
    before = [o for t, o in outcomes if t < killed_at]
    during = [o for t, o in outcomes if killed_at <= t < garbage_seen_at]
    after = [o for t, o in outcomes if t >= garbage_seen_at]
    assert before and during and after, (len(before), len(during), len(after))
    assert dead_after < STALE_WITHIN, "stale within the bound counted from the crash itself"

    # Stale is unknown, not gone: node-3 ranks below the fresh node-2 yet keeps a share, because
    # its pod may well be healthy (as it is here).
    spread = await cluster.spread(100)
    assert spread["b1"] == 0 and spread["b2"] > spread["b3"] > 0, spread
