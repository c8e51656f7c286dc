"""The process runtime and the status-only kubelet's stand-in agree on what a pod's status says.

Both run the same cold backup: node-a's kubelet with `StandInRuntime` (no processes), node-b's
with `ProcessRuntime`, which runs the real `rapproxy bps-wait` process. The process runtime's
host here is this machine itself (no network namespace, so no root needed): node-b's pod CIDR is
on loopback (127.77.0.0/24), where the real waiter can bind its pod IP. At every step — waiting
in the init container, activated and Ready — the two statuses must have the same shape once
times, IPs and container IDs are set aside, and read the same as kubectl columns.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bpsctl import render
from rapproxy.bps.activation import activate
from rapproxy.model.bps import ANNOTATION_ACTIVATION_TOKEN, ENV_ACTIVATION_TOKEN, ENV_POD_IP
from rapproxy.testing.apiserver import EmulatedApiServer, KubeletConfig, StandInRuntime
from rapproxy.testing.apiserver.resources import PODS
from rapproxy.testing.edge.runtime import ProcessRuntime, cancel_and_wait

from .conftest import eventually

pytestmark = pytest.mark.timeout(60)
TOKEN = "t0ken"


class LocalHost:
    """A `PodHost` that is this machine: processes as plain children, addresses on loopback."""

    name = "local"

    @property
    def ip(self) -> str:
        return "127.0.0.1"

    async def spawn(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdout: Any = None,
        stderr: Any = None,
        start_new_session: bool = False,
    ) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdout=stdout,
            stderr=stderr,
            start_new_session=start_new_session,
        )

    async def add_pod_address(self, ip: str) -> None:
        """127.0.0.0/8 is local already."""

    async def remove_pod_address(self, ip: str) -> None:
        """Nothing was added."""

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        return socket.socket(family, type)


@dataclass
class Pair:
    api: EmulatedApiServer
    standin: StandInRuntime
    process: ProcessRuntime


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    standin = StandInRuntime()
    process = ProcessRuntime(
        LocalHost(),
        log_dir=tmp_path / "logs",
        probe_period=0.1,
        base_env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    nodes = [
        KubeletConfig("node-a", pod_cidr="10.244.0.0/24", node_ip="10.250.0.1"),
        KubeletConfig("node-b", pod_cidr="127.77.0.0/24", node_ip="10.250.0.2"),
    ]
    runtimes = {"node-a": standin, "node-b": process}
    api = EmulatedApiServer(nodes=nodes, runtime_factory=runtimes.__getitem__)
    await api.start()
    try:
        yield Pair(api, standin, process)
    finally:
        await process.aclose(grace_seconds=1.0)  # no waiter or app process outlives the test
        await api.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cold_pod(name: str, node: str, port: int) -> dict[str, Any]:
    token_path = f"metadata.annotations['{ANNOTATION_ACTIVATION_TOKEN}']"
    return {
        "metadata": {"name": name, "annotations": {ANNOTATION_ACTIVATION_TOKEN: TOKEN}},
        "spec": {
            "nodeName": node,
            "initContainers": [
                {
                    "name": "bps-wait",
                    "image": "rapproxy:1",
                    "command": ["rapproxy", "bps-wait", "--port", str(port)],
                    "env": [
                        {
                            "name": ENV_POD_IP,
                            "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
                        },
                        {
                            "name": ENV_ACTIVATION_TOKEN,
                            "valueFrom": {"fieldRef": {"fieldPath": token_path}},
                        },
                    ],
                }
            ],
            "containers": [
                {
                    "name": "app",
                    "image": "app:1",
                    "command": ["python", "-c", "import time; time.sleep(300)"],
                }
            ],
        },
    }


VOLATILE = {"startedAt", "finishedAt", "lastTransitionTime", "startTime", "containerID", "message"}


def shape(value: Any) -> Any:
    """Everything but times, addresses, IDs and free-text messages."""
    if isinstance(value, dict):
        return {
            k: shape(v)
            for k, v in value.items()
            if k not in VOLATILE and k not in {"podIP", "podIPs", "hostIP", "hostIPs"}
        }
    if isinstance(value, list):
        return [shape(v) for v in value]
    return value


def pod(pair: Pair, name: str) -> dict[str, Any]:
    found = pair.api.store.get(PODS, "default", name)
    assert found is not None
    return found


async def test_a_cold_backup_reads_the_same_from_the_stand_in_and_from_real_processes(
    pair: Pair,
) -> None:
    port = free_port()
    pair.api.registry.create(PODS, "default", cold_pod("standin", "node-a", port))
    pair.api.registry.create(PODS, "default", cold_pod("process", "node-b", port))
    standin_uid = pod(pair, "standin")["metadata"]["uid"]
    standin_at = await eventually(lambda: pair.standin.waiters.get(standin_uid))
    process_ip = await eventually(lambda: pod(pair, "process").get("status", {}).get("podIP"))
    assert process_ip.startswith("127.77.0.")

    async def process_waiter_listens() -> bool:
        try:
            _, writer = await asyncio.open_connection(process_ip, port)
        except OSError:
            return False
        writer.close()
        await writer.wait_closed()
        return True

    await eventually(process_waiter_listens, within=20)

    waiting = [pod(pair, "standin"), pod(pair, "process")]
    assert shape(waiting[0]["status"]) == shape(waiting[1]["status"])
    for each in waiting:
        assert each["status"]["phase"] == "Pending"
        assert (render.pod_ready_count(each), render.pod_status(each)) == ("0/1", "Init:0/1")
        assert each["status"]["podIP"]

    async with aiohttp.ClientSession() as session:
        for host, at in ((standin_at[0], standin_at[1]), (process_ip, port)):
            result = await activate(session, host, at, TOKEN, timeout=5)
            assert result.ok, result.detail

    def both_ready() -> bool:
        return all(render.pod_ready(pod(pair, n)) for n in ("standin", "process"))

    await eventually(both_ready, within=20)
    ready = [pod(pair, "standin"), pod(pair, "process")]
    assert shape(ready[0]["status"]) == shape(ready[1]["status"])
    for each in ready:
        assert each["status"]["phase"] == "Running"
        assert (render.pod_ready_count(each), render.pod_status(each)) == ("1/1", "Running")
        (waiter,) = each["status"]["initContainerStatuses"]
        assert waiter["state"]["terminated"]["exitCode"] == 0
        assert waiter["state"]["terminated"]["reason"] == "Completed"


async def test_a_task_that_swallows_a_cancel_is_cancelled_again_until_it_ends() -> None:
    """The readiness loop once survived its cancel (wait_for on 3.11) and a teardown awaited it
    forever; the runtime now cancels until the task has ended."""
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed > 2:
                    raise

    task = asyncio.get_running_loop().create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task), 5)
    assert task.cancelled()
    assert swallowed == 3
