"""The status-only kubelet's stand-in runtime: a cold backup stays cold until it is activated.

Driven the way users drive the emulator: pods created and read through the API with
kubernetes-asyncio (the project's `KubeClient`), activation sent with the controller's own
`activate()` over HTTP. STATUS/READY are read as kubectl would print them (bpsctl's renderer).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bpsctl import render
from rapproxy.bps.activation import ActivationOutcome, activate
from rapproxy.cluster.client import PODS, ClientSettings, KubeClient
from rapproxy.model.bps import ANNOTATION_ACTIVATION_TOKEN, ENV_ACTIVATION_TOKEN, ENV_POD_IP
from rapproxy.testing.apiserver import EmulatedApiServer, StandInRuntime
from rapproxy.testing.apiserver.controlplane.standin import waiter_args, waiter_token

from ..conftest import eventually

pytestmark = pytest.mark.timeout(30)
ACTIVATED_WITHIN = 1.0  # seconds from the 200 to the pod Ready, on a loaded 2-core machine
TOKEN = "t0ken"


@dataclass
class Emulator:
    api: EmulatedApiServer
    runtime: StandInRuntime
    client: KubeClient


@pytest.fixture
async def emulator(tmp_path: Path) -> AsyncIterator[Emulator]:
    runtime = StandInRuntime(backoff_base=0.05, backoff_cap=0.2)
    async with EmulatedApiServer(nodes=["node-a"], runtime_factory=lambda _node: runtime) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        client = await KubeClient.connect(ClientSettings(str(kubeconfig), request_timeout=10))
        try:
            yield Emulator(api, runtime, client)
        finally:
            await client.close()


def cold_pod(name: str, *, token: str | None = TOKEN, **spec: Any) -> dict[str, Any]:
    """A pod shaped like the BPS controller's cold backups (see rapproxy.bps.pod_template)."""
    annotations = {ANNOTATION_ACTIVATION_TOKEN: token} if token else {}
    waiter = {
        "name": "bps-wait",
        "image": "rapproxy:1",
        "command": ["rapproxy", "bps-wait", "--port", "9901", *spec.pop("waiter_args", [])],
        "env": [
            {"name": ENV_POD_IP, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {
                "name": ENV_ACTIVATION_TOKEN,
                "valueFrom": {
                    "fieldRef": {
                        "fieldPath": f"metadata.annotations['{ANNOTATION_ACTIVATION_TOKEN}']"
                    }
                },
            },
        ],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "initContainers": [waiter],
            "containers": [{"name": "app", "image": "app:1"}],
            **spec,
        },
    }


async def pod_of(emulator: Emulator, name: str) -> dict[str, Any]:
    return await emulator.client.get(PODS, name, "default")


async def listening(emulator: Emulator, name: str) -> tuple[str, int]:
    pod = await eventually(lambda: pod_of(emulator, name))
    uid = pod["metadata"]["uid"]
    address: tuple[str, int] = await eventually(lambda: emulator.runtime.waiters.get(uid))
    return address


def columns(pod: dict[str, Any]) -> tuple[str, str]:
    return render.pod_ready_count(pod), render.pod_status(pod)


async def test_a_cold_backup_stays_pending_in_init_until_activated(emulator: Emulator) -> None:
    await emulator.client.create(PODS, cold_pod("cold"), "default")
    host, port = await listening(emulator, "cold")

    # Not a single look at the pod while its waiter listens shows it anything but cold.
    loop = asyncio.get_running_loop()
    until = loop.time() + 0.5
    seen = 0
    while loop.time() < until:
        pod = await pod_of(emulator, "cold")
        assert pod["status"]["phase"] == "Pending"
        assert columns(pod) == ("0/1", "Init:0/1")
        assert not render.pod_ready(pod)
        assert pod["status"]["podIP"]  # reachable for its activation while it waits
        seen += 1
    assert seen > 1

    async with aiohttp.ClientSession() as session:
        refused = await activate(session, host, port, "wrong", timeout=2)
        assert refused.outcome is ActivationOutcome.UNAUTHORIZED
        assert columns(await pod_of(emulator, "cold")) == ("0/1", "Init:0/1")

        result = await activate(session, host, port, TOKEN, timeout=2)
        assert result.ok, result.detail
        answered = time.monotonic()

    pod = await eventually(
        lambda: _ready_pod(emulator, "cold"), within=ACTIVATED_WITHIN, interval=0.005
    )
    took = time.monotonic() - answered
    assert took < ACTIVATED_WITHIN
    assert columns(pod) == ("1/1", "Running")
    (waiter,) = pod["status"]["initContainerStatuses"]
    assert waiter["state"]["terminated"]["reason"] == "Completed"
    assert pod["metadata"]["uid"] in emulator.runtime.activated


async def _ready_pod(emulator: Emulator, name: str) -> dict[str, Any] | None:
    pod = await pod_of(emulator, name)
    return pod if render.pod_ready(pod) else None


async def test_a_waiter_without_a_token_crash_loops_like_the_real_one(emulator: Emulator) -> None:
    await emulator.client.create(PODS, cold_pod("no-token", token=None), "default")

    async def restarted_twice() -> dict[str, Any] | None:
        pod = await pod_of(emulator, "no-token")
        return pod if render.pod_restarts(pod) >= 2 else None

    pod = await eventually(restarted_twice)
    assert pod["status"]["phase"] == "Pending" and not render.pod_ready(pod)
    (waiter,) = pod["status"]["initContainerStatuses"]
    assert waiter["lastState"]["terminated"]["exitCode"] == 2  # bps-wait's usage error

    async def backing_off() -> bool:
        return render.pod_status(await pod_of(emulator, "no-token")) == "Init:CrashLoopBackOff"

    await eventually(backing_off)


async def test_a_timed_out_waiter_fails_the_pod_under_restart_policy_never(
    emulator: Emulator,
) -> None:
    pod = cold_pod("never", restartPolicy="Never", waiter_args=["--timeout", "0.2"])
    await emulator.client.create(PODS, pod, "default")

    async def failed() -> dict[str, Any] | None:
        pod = await pod_of(emulator, "never")
        return pod if pod["status"].get("phase") == "Failed" else None

    pod = await eventually(failed)
    assert columns(pod) == ("0/1", "Init:Error")
    (waiter,) = pod["status"]["initContainerStatuses"]
    assert waiter["state"]["terminated"]["exitCode"] == 1  # bps-wait's timeout


async def test_a_deleted_cold_backup_stops_its_waiter(emulator: Emulator) -> None:
    await emulator.client.create(PODS, cold_pod("gone"), "default")
    host, port = await listening(emulator, "gone")
    await emulator.client.delete(PODS, "gone", "default")
    await eventually(lambda: not emulator.runtime.waiters)
    async with aiohttp.ClientSession() as session:
        result = await activate(session, host, port, TOKEN, timeout=0.3)
    assert result.outcome is ActivationOutcome.REFUSED


def test_the_waiters_arguments_and_token_are_read_as_the_container_would() -> None:
    pod = cold_pod("p", waiter_args=["--timeout=7.5"])
    waiter = pod["spec"]["initContainers"][0]
    assert waiter_args(waiter).port == 9901
    assert waiter_args(waiter).timeout == 7.5
    assert waiter_token(pod, waiter) == TOKEN
    literal = {**waiter, "env": [{"name": ENV_ACTIVATION_TOKEN, "value": " lit "}]}
    assert waiter_token(pod, literal) == "lit"
    assert waiter_token(cold_pod("q", token=None), waiter) == ""
