"""`run_standalone` (what `rapproxy bps-controller` runs) as a real process: it takes the Lease,
reconciles, serves /metrics, and on SIGTERM gives the Lease back and exits 0."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import textwrap

import aiohttp
import pytest

from rapproxy.bps.testbed import BpsTestbed, set_manifest, wait_for
from rapproxy.cluster.client import LEASES, KubeClient, NotFound

pytestmark = pytest.mark.timeout(60)
LEASE = "bps-standalone-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def holder(client: KubeClient) -> str | None:
    try:
        lease = await client.get(LEASES, LEASE, "kube-system")
    except NotFound:
        return None
    return str(lease["spec"].get("holderIdentity") or "")


async def test_reconciles_serves_metrics_and_releases_the_lease_on_sigterm() -> None:
    async with BpsTestbed() as bed:
        user = await bed.client()
        port = free_port()
        program = textwrap.dedent(
            f"""
            import asyncio
            from rapproxy.bps.controller import run_standalone
            from rapproxy.config import load
            config = load(None, {{}}, [
                "clientConnection.kubeconfig={bed.kubeconfig}",
                "metricsBindAddress=127.0.0.1:{port}",
                "bps.leaseName={LEASE}",
                "bps.leaseNamespace=kube-system",
            ])
            asyncio.run(run_standalone(config, "standalone-1"))
            """
        )
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", program)
        try:
            lease_holder = ""

            async def poll_holder() -> None:
                nonlocal lease_holder
                lease_holder = await holder(user) or ""

            deadline = asyncio.get_running_loop().time() + 20
            while lease_holder != "standalone-1":
                assert asyncio.get_running_loop().time() < deadline, "never took the lease"
                await poll_holder()
                await asyncio.sleep(0.05)  # polling the API for a condition, with a deadline
            await bed.create_set(user, set_manifest("web", 1, 1, 1))
            await wait_for(lambda: bed.settled("web", 1, 1, 1), 15)
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{port}/metrics") as response,
            ):
                metrics = await response.text()
            assert "rapproxy_bps_leader 1.0" in metrics

            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 10) == 0
            assert await holder(user) == ""
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
