"""Two controller instances against one emulated cluster: one reconciles, the other takes over.

`run_controller` is what `rapproxy run` and `rapproxy bps-controller` call; here two of them
campaign for the same Lease with short timings. Writes are attributed to an instance by its own
`KubeClient.calls`, so "exactly one reconciles" is checked on the requests actually sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from prometheus_client import CollectorRegistry

from rapproxy.bps.controller import run_controller
from rapproxy.bps.testbed import BpsTestbed, set_manifest, wait_for
from rapproxy.cluster.client import LEASES, PODS, KubeClient
from rapproxy.config import BpsSettings

pytestmark = pytest.mark.timeout(60)

SETTINGS = BpsSettings(
    lease_name="bps-leader-test",
    lease_namespace="kube-system",
    lease_duration=3.0,
    renew_deadline=2.0,
    retry_period=0.2,
)
POD_WRITES = (("create", "", "pods"), ("patch", "", "pods"), ("delete", "", "pods"))


def pod_writes(client: KubeClient) -> int:
    return sum(client.calls[call] for call in POD_WRITES)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_one_instance_reconciles_and_the_other_takes_over_when_it_stops() -> None:
    async with BpsTestbed() as bed:
        user = await bed.client()
        first, second = await bed.client(), await bed.client()
        options = {"activation_target": bed.runtime.target}
        task_a = asyncio.create_task(
            run_controller(first, SETTINGS, "instance-a", CollectorRegistry(), **options)
        )
        await wait_for(lambda: first.calls[("create", "coordination.k8s.io", "leases")] > 0, 10)
        task_b = asyncio.create_task(
            run_controller(second, SETTINGS, "instance-b", CollectorRegistry(), **options)
        )
        try:
            await bed.create_set(user, set_manifest("web", 2, 1, 1))
            await wait_for(lambda: bed.settled("web", 2, 1, 1), 15)
            assert pod_writes(first) > 0
            assert pod_writes(second) == 0
            assert second.calls[("watch", "", "pods")] == 0  # the follower only campaigns

            stopped_at = time.monotonic()
            await stop(task_a)  # graceful: releases the Lease
            lease = await user.get(LEASES, SETTINGS.lease_name, SETTINGS.lease_namespace)
            assert lease["spec"]["holderIdentity"] == ""

            victim = bed.roles("web")["primary"][0]
            await user.delete(PODS, victim, "default")
            await wait_for(lambda: pod_writes(second) > 0, 10)
            handover = time.monotonic() - stopped_at
            await wait_for(
                lambda: victim not in bed.roles("web")["primary"] and bed.settled("web", 2, 1, 1),
                15,
            )
            lease = await user.get(LEASES, SETTINGS.lease_name, SETTINGS.lease_namespace)
            assert lease["spec"]["holderIdentity"] == "instance-b"
            assert handover < 1.5
        finally:
            await stop(task_a)
            await stop(task_b)
