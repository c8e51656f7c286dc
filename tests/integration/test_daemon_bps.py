"""`rapproxy run` embeds the leader-elected BackupPodSet controller; `--no-bps` leaves it out.

The daemon runs as a real process against the BPS testbed's emulated API server, without
interception rules (`--no-iptables`), so no root is needed. What its controller did is read back
from the API: the Lease, the pods, and the Events the controller posts under its own identity —
that identity (the node name plus a per-process suffix) is what ties a created pod to this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rapproxy.bps.testbed import BpsTestbed, set_manifest, wait_for
from rapproxy.cluster.client import (
    ENDPOINT_SLICES,
    EVENTS,
    LEASES,
    SERVICES,
    KubeClient,
    NotFound,
)

pytestmark = pytest.mark.timeout(90)

RAPPROXY = str(Path(sys.executable).with_name("rapproxy"))
NODE = "node-a"
LEASE, LEASE_NAMESPACE = "rapproxy-bps", "kube-system"  # the bps.lease* defaults
RETRY_PERIOD = 1.0  # bps.retryPeriod (its minimum): how soon a lost attempt is tried again
# An enabled daemon campaigns from the instant its informers start: its first attempt (a GET and a
# create of the Lease) waits for nothing, and a lost attempt is retried after RETRY_PERIOD. So it
# holds the Lease at the latest LEASE_WITHIN after its first sync has made /healthz answer 200;
# `test_run_reconciles_a_backup_pod_set_as_the_lease_holder` asserts exactly that bound.
LEASE_WITHIN = RETRY_PERIOD + 0.5
# Watching a `--no-bps` daemon for twice that after the same point would see the Lease, and then
# the pods of a BackupPodSet that exists before it starts, were a controller running in it.
QUIET_WINDOW = 2 * LEASE_WITHIN


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Daemon:
    process: asyncio.subprocess.Process
    health_url: str
    metrics_url: str
    log: Path

    async def get(self, url: str) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session,
            session.get(url) as response,
        ):
            return response.status, await response.text()

    async def synced(self, within: float = 20.0) -> float:
        """Wait until /healthz answers 200; returns when (monotonic).

        The first sync, which /healthz waits for, runs only once the Service and EndpointSlice
        informers have listed, so from here on the daemon acts on the API's state.
        """
        deadline = time.monotonic() + within
        last = ""
        while True:
            assert self.process.returncode is None, f"daemon exited: {self.log.read_text()}"
            try:
                status, body = await self.get(f"{self.health_url}/healthz")
                if status == 200:
                    return time.monotonic()
                last = f"{status} {body}"
            except aiohttp.ClientError as error:
                last = repr(error)
            assert time.monotonic() < deadline, f"/healthz not 200 within {within}s: {last}"
            await asyncio.sleep(0.05)  # polling for a condition, with a deadline

    async def debug_state(self) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session,
            session.get(f"{self.metrics_url}/debug/state") as response,
        ):
            assert response.status == 200
            state: dict[str, Any] = await response.json()
            return state

    async def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 10)


@contextlib.asynccontextmanager
async def daemon(bed: BpsTestbed, tmp_path: Path, *extra: str) -> AsyncIterator[Daemon]:
    health, metrics, proxy = free_port(), free_port(), free_port()
    log = tmp_path / "rapproxy.log"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            RAPPROXY,
            "run",
            "--no-iptables",
            "--kubeconfig",
            str(bed.kubeconfig),
            "--node-name",
            NODE,
            "--healthz-bind-address",
            f"127.0.0.1:{health}",
            "--metrics-bind-address",
            f"127.0.0.1:{metrics}",
            "--set",
            f"proxy.tcpPort={proxy}",
            "--set",
            "proxy.listenAddress=127.0.0.1",
            "--set",
            f"bps.retryPeriod={RETRY_PERIOD}",
            *extra,
            stdout=output,
            stderr=output,
        )
    try:
        yield Daemon(process, f"http://127.0.0.1:{health}", f"http://127.0.0.1:{metrics}", log)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def lease_holder(client: KubeClient) -> str | None:
    """The Lease's holder ("" once released), None while no one ever created it."""
    try:
        lease = await client.get(LEASES, LEASE, LEASE_NAMESPACE)
    except NotFound:
        return None
    return str(lease["spec"].get("holderIdentity") or "")


async def until(condition: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, f"{what}: not within {within}s"
        await asyncio.sleep(0.02)  # polling the API for a condition, with a deadline


async def serve_a_service(client: KubeClient) -> None:
    """A Service the daemon must pick up: proof that it watches this very API server."""
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "echo", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]},
    }
    slice_ = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "echo-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "echo"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.0.5"], "conditions": {"ready": True}}],
    }
    await client.create(SERVICES, service, "default")
    await client.create(ENDPOINT_SLICES, slice_, "default")


async def test_run_reconciles_a_backup_pod_set_as_the_lease_holder(tmp_path: Path) -> None:
    async with BpsTestbed() as bed, daemon(bed, tmp_path) as proxy:
        user = await bed.client()
        synced_at = await proxy.synced()

        holder = ""

        async def holds_the_lease() -> bool:
            nonlocal holder
            holder = await lease_holder(user) or ""
            return holder.startswith(f"{NODE}_")

        await until(holds_the_lease, LEASE_WITHIN, "the daemon never took the Lease")
        lease_after = time.monotonic() - synced_at
        assert lease_after < LEASE_WITHIN

        await bed.create_set(user, set_manifest("web", 2, 1, 1))
        await wait_for(lambda: bed.settled("web", 2, 1, 1), 20)

        # Every pod of the set was created by the Lease holder, i.e. by this daemon process.
        pods = {p["metadata"]["name"] for p in bed.pods("web")}
        created_by: dict[str, str] = {}

        async def every_creation_reported() -> bool:
            events = (await user.list(EVENTS, "default"))["items"]
            for event in events:
                if event["reason"] == "SuccessfulCreate":
                    pod = event["message"].rsplit(" ", 1)[-1]
                    created_by[pod] = event["reportingInstance"]
            return pods <= created_by.keys()

        await until(every_creation_reported, 10, f"SuccessfulCreate events for {pods}")
        assert {created_by[pod] for pod in pods} == {holder}, created_by

        status, metrics = await proxy.get(f"{proxy.metrics_url}/metrics")
        assert status == 200 and "rapproxy_bps_leader 1.0" in metrics

        # Shutting down hands the Lease back at once, for a fast failover to another node.
        assert await proxy.stop() == 0, proxy.log.read_text()
        assert await lease_holder(user) == ""


async def test_no_bps_never_takes_the_lease_nor_creates_pods(tmp_path: Path) -> None:
    async with BpsTestbed() as bed:
        user = await bed.client()
        # Both exist before the daemon starts: a controller would find the set in its first list.
        await bed.create_set(user, set_manifest("web", 1, 1, 1))
        await serve_a_service(user)
        async with daemon(bed, tmp_path, "--no-bps") as proxy:
            synced_at = await proxy.synced()
            state = await proxy.debug_state()
            assert "default/echo:http" in state["services"], state["services"]

            while time.monotonic() - synced_at < QUIET_WINDOW:
                assert await lease_holder(user) is None
                assert bed.pods("web") == []
                await asyncio.sleep(0.05)  # observing a window for something that must not happen

            assert proxy.process.returncode is None, proxy.log.read_text()
            assert await proxy.stop() == 0, proxy.log.read_text()
        assert await lease_holder(user) is None
