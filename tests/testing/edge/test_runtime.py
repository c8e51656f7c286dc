"""Pods as real processes on emulated nodes, driven by the emulated kubelet."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from rapproxy.model.bps import (
    ANNOTATION_ACTIVATION_TOKEN,
    DEFAULT_ACTIVATION_PORT,
    ENV_ACTIVATION_TOKEN,
    ENV_POD_IP,
)
from rapproxy.testing.apiserver import EmulatedApiServer
from rapproxy.testing.apiserver.registry import DeleteOptions
from rapproxy.testing.apiserver.resources import PODS
from rapproxy.testing.edge.cluster import EdgeCluster
from rapproxy.testing.edge.measure import http_post_status, wait_port
from rapproxy.testing.probes import http_get

from .conftest import eventually

pytestmark = pytest.mark.root

WAIT_FOR_FLAG = "import os, sys, time\nwhile not os.path.exists(sys.argv[1]):\n    time.sleep(0.02)"


@dataclass
class Emulation:
    cluster: EdgeCluster
    api: EmulatedApiServer


@pytest.fixture
async def emulation() -> AsyncIterator[Emulation]:
    async with EdgeCluster(2, probe_period=0.1) as cluster:
        api = EmulatedApiServer(
            nodes=cluster.kubelet_configs(), runtime_factory=cluster.runtime_for
        )
        await api.start()
        try:
            yield Emulation(cluster, api)
        finally:
            await api.stop()


def backend_pod(name: str, node: str, flag: Path | None = None, **spec: Any) -> dict[str, Any]:
    main = {
        "name": "web",
        "image": "rapproxy/backend:ignored",
        "command": ["python", "-m", "rapproxy.testing.backend"],
        "args": ["--name", "$(POD_NAME)", "--http", "$(POD_IP):8080"],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
    }
    inits = []
    if flag is not None:
        inits.append(
            {
                "name": "wait",
                "image": "ignored",
                "command": ["python", "-c", WAIT_FOR_FLAG, str(flag)],
            }
        )
    return {
        "metadata": {"name": name},
        "spec": {"nodeName": node, "initContainers": inits, "containers": [main], **spec},
    }


def status_of(api: EmulatedApiServer, name: str) -> dict[str, Any]:
    pod = api.store.get(PODS, "default", name) or {}
    status: dict[str, Any] = pod.get("status") or {}
    return status


def is_ready(api: EmulatedApiServer, name: str) -> bool:
    conditions = status_of(api, name).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def cmdlines_in(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(" ".join(psutil.Process(pid).cmdline()))
        except psutil.Error:
            continue
    return out


async def test_an_init_container_holds_the_pod_until_its_flag_then_the_backend_serves(
    emulation: Emulation, tmp_path: Path
) -> None:
    api, cluster = emulation.api, emulation.cluster
    node = cluster.node("node-2")
    flag = tmp_path / "activate"
    api.registry.create(PODS, "default", backend_pod("web-0", "node-2", flag))
    runtime = cluster.runtime_for("node-2")

    def init_running() -> bool:
        return any(WAIT_FOR_FLAG.splitlines()[0] in c for c in cmdlines_in(running_pids(runtime)))

    await eventually(init_running)
    status = status_of(api, "web-0")
    assert status["phase"] == "Pending"
    assert "running" in status["initContainerStatuses"][0]["state"]
    assert not any("rapproxy.testing.backend" in c for c in cmdlines_in(running_pids(runtime)))

    flag.touch()
    await eventually(lambda: is_ready(api, "web-0"))
    pod_ip = status_of(api, "web-0")["podIP"]
    assert pod_ip.startswith("10.244.2.")
    code, body = await cluster.node("node-1").call(http_get, f"http://{pod_ip}:8080/")
    assert (code, body.splitlines()[0]) == (200, "web-0")
    if node.cgroup is not None:
        backend_pid = runtime_pid(runtime, "web")
        assert backend_pid in node.cgroup.pids()


async def test_deleting_the_pod_kills_its_process_and_frees_its_address(
    emulation: Emulation,
) -> None:
    api, cluster = emulation.api, emulation.cluster
    api.registry.create(PODS, "default", backend_pod("web-1", "node-1"))
    await eventually(lambda: is_ready(api, "web-1"))
    pod_ip = status_of(api, "web-1")["podIP"]
    pid = runtime_pid(cluster.runtime_for("node-1"), "web")
    api.registry.delete(PODS, "default", "web-1", DeleteOptions(grace_period_seconds=2))
    await eventually(lambda: api.store.get(PODS, "default", "web-1") is None)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    addresses = await cluster.node("node-1").namespace.exec(["ip", "-4", "addr", "show", "lo"])
    assert pod_ip not in addresses.stdout
    with pytest.raises(TimeoutError):
        await cluster.node("node-2").call(wait_port, pod_ip, 8080, 0.3)


async def test_an_exited_container_is_restarted_and_ready_again(emulation: Emulation) -> None:
    api, cluster = emulation.api, emulation.cluster
    api.registry.create(PODS, "default", backend_pod("web-2", "node-1"))
    await eventually(lambda: is_ready(api, "web-2"))
    runtime = cluster.runtime_for("node-1")
    first = runtime_pid(runtime, "web")
    os.kill(first, 9)
    await eventually(lambda: status_of(api, "web-2")["containerStatuses"][0]["restartCount"] == 1)
    await eventually(lambda: is_ready(api, "web-2"))
    assert runtime_pid(runtime, "web") != first


async def test_a_pod_that_cannot_run_fails_saying_which_field(emulation: Emulation) -> None:
    api = emulation.api
    pod = backend_pod("broken", "node-1")
    del pod["spec"]["containers"][0]["command"]
    api.registry.create(PODS, "default", pod)
    await eventually(lambda: status_of(api, "broken").get("phase") == "Failed")
    [handle] = emulation.cluster.runtime_for("node-1").pods
    assert "spec.containers[0].command: required" in handle.failure


def running_pids(runtime: Any) -> list[int]:
    return [
        p.pid for handle in runtime.pods for p in handle.processes.values() if p.returncode is None
    ]


def runtime_pid(runtime: Any, container: str) -> int:
    pids = [h.processes[container].pid for h in runtime.pods if container in h.processes]
    assert len(pids) == 1
    return int(pids[0])


async def test_a_cold_backup_waits_in_bps_wait_until_activated_across_the_wan(
    emulation: Emulation,
) -> None:
    api, cluster = emulation.api, emulation.cluster
    cold = backend_pod("cold-0", "node-2")
    cold["metadata"]["annotations"] = {ANNOTATION_ACTIVATION_TOKEN: "t0ken"}
    token_path = f"metadata.annotations['{ANNOTATION_ACTIVATION_TOKEN}']"
    cold["spec"]["initContainers"] = [
        {
            "name": "bps-wait",
            "image": "ignored",
            # No --port: `rapproxy bps-wait --port N` is refused by the CLI's argument parsing
            # (REMAINDER after a subcommand does not take leading options); reported.
            "command": ["rapproxy", "bps-wait"],
            "env": [
                {"name": ENV_POD_IP, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {
                    "name": ENV_ACTIVATION_TOKEN,
                    "valueFrom": {"fieldRef": {"fieldPath": token_path}},
                },
            ],
        }
    ]
    api.registry.create(PODS, "default", cold)
    runtime = cluster.runtime_for("node-2")
    await eventually(lambda: any(h.pod_ip for h in runtime.pods))
    [handle] = runtime.pods
    port = DEFAULT_ACTIVATION_PORT
    await cluster.node("node-1").call(wait_port, handle.pod_ip, port, 15.0)
    assert status_of(api, "cold-0")["phase"] == "Pending"
    assert not is_ready(api, "cold-0")

    url = f"http://{handle.pod_ip}:{port}/activate"
    assert await cluster.node("node-1").call(http_post_status, url, "wrong") == 401
    assert status_of(api, "cold-0")["phase"] == "Pending"
    assert await cluster.node("node-1").call(http_post_status, url, "t0ken") == 200
    await eventually(lambda: is_ready(api, "cold-0"))
    code, body = await cluster.node("node-1").call(http_get, f"http://{handle.pod_ip}:8080/")
    assert (code, body.splitlines()[0]) == (200, "cold-0")
