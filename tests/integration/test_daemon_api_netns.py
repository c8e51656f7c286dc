"""The daemon following an API server: real kubernetes-asyncio, real iptables, real relays.

The emulated API server runs in this test process but listens on a socket that lives in the node
namespace, so the rapproxy process (started inside that namespace with a kubeconfig) reaches it
at 127.0.0.1 exactly as a node reaches its API server. The test writes objects straight into the
server's registry and checks what a client in the namespace experiences.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rapproxy.testing import probes
from rapproxy.testing.apiserver import DeleteOptions, EmulatedApiServer
from rapproxy.testing.apiserver.resources import ENDPOINT_SLICES, SERVICES
from rapproxy.testing.netns import Namespace

pytestmark = pytest.mark.root

RAPPROXY = str(Path(sys.executable).with_name("rapproxy"))
BACKENDS = {"b1": "10.244.0.2", "b2": "10.244.0.3"}


def service(name: str, cluster_ip: str, port: int = 80) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "clusterIP": cluster_ip,
            "ports": [{"name": "http", "port": port, "targetPort": 8080}],
        },
    }


def endpoint_slice(service_name: str, *ips: str) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service_name}-slice",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node"} for ip in ips
        ],
    }


@dataclass
class Setup:
    node: Namespace
    api: EmulatedApiServer

    def create(self, rt: Any, obj: dict[str, Any]) -> None:
        self.api.registry.create(rt, "default", obj)

    async def names(self, url: str, count: int = 6) -> set[str]:
        return set(await self.node.call(probes.backend_names, url, count))

    async def until(self, check: Callable[[], Any], within: float = 10.0) -> float:
        """Seconds until the async `check()` returns truthy (exceptions count as not yet)."""
        started = time.monotonic()
        last: object = None
        while time.monotonic() - started < within:
            try:
                last = await check()
                if last:
                    return time.monotonic() - started
            except OSError as error:
                last = error
            await asyncio.sleep(0.02)
        raise AssertionError(f"not reached within {within}s (last: {last!r})")

    async def debug_state(self) -> dict[str, Any]:
        status, body = await self.node.call(probes.http_get, "http://127.0.0.1:10249/debug/state")
        assert status == 200
        result: dict[str, Any] = json.loads(body)
        return result


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    node = await Namespace.create("node")
    try:
        await node.add_local_route("10.96.0.0/16")
        for name, ip in BACKENDS.items():
            await node.add_address("lo", f"{ip}/32")
            await node.spawn(
                [
                    sys.executable,
                    "-m",
                    "rapproxy.testing.backend",
                    "--name",
                    name,
                    "--http",
                    f"{ip}:8080",
                ]
            )
        api = EmulatedApiServer(socket_factory=node.socket, bookmark_interval=1.0, history_size=50)
        await api.start()
        try:
            kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
            await node.spawn(
                [
                    RAPPROXY,
                    "run",
                    "--kubeconfig",
                    str(kubeconfig),
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
            await node.call(probes.wait_http, "http://127.0.0.1:10256/healthz", 20.0)
            yield Setup(node, api)
        finally:
            await api.stop()
    finally:
        await node.aclose()


async def test_service_created_through_the_api_is_served_within_a_second(setup: Setup) -> None:
    setup.create(ENDPOINT_SLICES, endpoint_slice("web", *BACKENDS.values()))
    setup.create(SERVICES, service("web", "10.96.0.10"))
    elapsed = await setup.until(lambda: setup.names("http://10.96.0.10/"))
    assert elapsed < 1.0, f"Service reachable {elapsed:.3f}s after its creation"
    assert await setup.names("http://10.96.0.10/") == {"b1", "b2"}


async def test_endpoint_changes_are_applied(setup: Setup) -> None:
    setup.create(ENDPOINT_SLICES, endpoint_slice("web", *BACKENDS.values()))
    setup.create(SERVICES, service("web", "10.96.0.10"))
    await setup.until(lambda: setup.names("http://10.96.0.10/"))
    setup.api.registry.mutate(
        ENDPOINT_SLICES,
        "default",
        "web-slice",
        lambda obj: obj.update(endpoints=endpoint_slice("web", BACKENDS["b2"])["endpoints"]),
    )

    async def only_b2() -> bool:
        return await setup.names("http://10.96.0.10/") == {"b2"}

    await setup.until(only_b2)


async def test_api_trouble_keeps_traffic_and_ends_in_a_correct_resync(setup: Setup) -> None:
    setup.create(ENDPOINT_SLICES, endpoint_slice("web", *BACKENDS.values()))
    setup.create(SERVICES, service("web", "10.96.0.10"))
    setup.create(ENDPOINT_SLICES, endpoint_slice("old", BACKENDS["b1"]))
    setup.create(SERVICES, service("old", "10.96.0.11"))
    await setup.until(lambda: setup.names("http://10.96.0.11/"))

    setup.api.drop_watches()
    setup.api.fail_next(5, status=500)
    await setup.api.stop()
    # The API is gone: traffic keeps flowing on the last known state.
    assert await setup.names("http://10.96.0.10/") == {"b1", "b2"}
    # While it is gone, "old" is deleted and "new" created; history is compacted, so the
    # daemon's watch version is too old (410) and it must re-list and diff.
    setup.api.registry.delete(SERVICES, "default", "old", DeleteOptions())
    setup.create(ENDPOINT_SLICES, endpoint_slice("new", BACKENDS["b2"]))
    setup.create(SERVICES, service("new", "10.96.0.12"))
    setup.api.compact()
    await setup.api.start()

    async def resynced() -> bool:
        return await setup.names("http://10.96.0.12/", 2) == {"b2"}

    await setup.until(resynced, within=20)

    async def old_gone() -> bool:
        try:
            await setup.node.call(probes.http_get, "http://10.96.0.11/", 0.5)
        except OSError:
            return True
        return False

    await setup.until(old_gone)
    assert await setup.names("http://10.96.0.10/") == {"b1", "b2"}


async def test_malformed_service_is_reported_and_skipped(setup: Setup) -> None:
    setup.create(ENDPOINT_SLICES, endpoint_slice("web", *BACKENDS.values()))
    setup.create(SERVICES, service("web", "10.96.0.10"))
    broken = service("broken", "10.96.0.13", port=0)
    setup.api.registry.inject(SERVICES, broken)  # a real server would refuse it; we must cope
    garbage_slice = endpoint_slice("web", "not-an-ip")
    garbage_slice["metadata"]["name"] = "web-garbage"
    setup.api.registry.inject(ENDPOINT_SLICES, garbage_slice)
    await setup.until(lambda: setup.names("http://10.96.0.10/"))

    async def reported() -> bool:
        rejected = (await setup.debug_state())["rejected_objects"]
        return {r["object"] for r in rejected} == {"default/broken", "default/web-garbage"}

    await setup.until(reported)
    state = await setup.debug_state()
    messages = " ".join(r["error"] for r in state["rejected_objects"])
    assert "spec.ports[0].port" in messages and "endpoints[0].addresses[0]" in messages
    assert await setup.names("http://10.96.0.10/") == {"b1", "b2"}
