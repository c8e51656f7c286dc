"""Leader election against the emulated API server: one leader, fast handover on release."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from rapproxy.cluster.client import LEASES, ClientSettings, KubeClient
from rapproxy.cluster.leader import LeaderElector, LeaseSettings
from rapproxy.testing.apiserver import EmulatedApiServer


async def eventually(condition: Callable[[], bool], within: float = 10.0) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[KubeClient]:
    async with EmulatedApiServer() as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        kube = await KubeClient.connect(ClientSettings(kubeconfig=str(kubeconfig)))
        try:
            yield kube
        finally:
            await kube.close()


def settings(identity: str) -> LeaseSettings:
    return LeaseSettings(
        "bps", "default", identity, lease_duration=3, renew_deadline=2, retry_period=0.2
    )


class Worker:
    def __init__(self) -> None:
        self.leading = False
        self.terms = 0

    async def lead(self) -> None:
        self.leading = True
        self.terms += 1
        try:
            await asyncio.Event().wait()
        finally:
            self.leading = False


async def test_exactly_one_leads_and_release_hands_over_within_a_second(client: KubeClient) -> None:
    a, b = Worker(), Worker()
    elector_a = LeaderElector(client, settings("a"))
    elector_b = LeaderElector(client, settings("b"))
    task_a = asyncio.create_task(elector_a.run(a.lead))
    await eventually(lambda: a.leading)
    task_b = asyncio.create_task(elector_b.run(b.lead))
    await asyncio.sleep(1.0)
    assert a.leading and not b.leading, "the second candidate must wait"
    lease = await client.get(LEASES, "bps", "default")
    assert lease["spec"]["holderIdentity"] == "a"

    task_a.cancel()  # graceful shutdown releases the lease
    await asyncio.gather(task_a, return_exceptions=True)
    handover = await eventually(lambda: b.leading, within=5)
    assert handover < 1.0, f"handover took {handover:.2f}s"
    assert not a.leading
    task_b.cancel()
    await asyncio.gather(task_b, return_exceptions=True)


async def test_a_crashed_leader_is_replaced_after_the_lease_expires(client: KubeClient) -> None:
    a, b = Worker(), Worker()
    task_a = asyncio.create_task(
        LeaderElector(client, settings("a"), release_on_exit=False).run(a.lead)
    )
    await eventually(lambda: a.leading)
    task_b = asyncio.create_task(LeaderElector(client, settings("b")).run(b.lead))
    task_a.cancel()  # dies without releasing
    await asyncio.gather(task_a, return_exceptions=True)
    takeover = await eventually(lambda: b.leading, within=10)
    assert 2.0 < takeover < 5.0, f"takeover after {takeover:.2f}s; lease is 3s"
    lease = await client.get(LEASES, "bps", "default")
    assert lease["spec"]["holderIdentity"] == "b"
    assert lease["spec"]["leaseTransitions"] >= 1
    task_b.cancel()
    await asyncio.gather(task_b, return_exceptions=True)
