"""bpsctl as a user runs it: a real process against a live emulated cluster with the controller.

Each command runs as `python -m bpsctl.cli` in a subprocess (its own event loop, its own
kubeconfig handling), so what is checked is exactly what a person would see on stdout/stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from rapproxy.bps.controller import BpsController
from rapproxy.bps.testbed import BpsTestbed, set_manifest, wait_for
from rapproxy.cluster.client import BACKUP_POD_SETS, KubeClient
from rapproxy.testing.apiserver import EmulatedApiServer

pytestmark = pytest.mark.timeout(90)
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


async def bpsctl(*args: str, env: dict[str, str] | None = None) -> Result:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bpsctl.cli",
        *args,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


@dataclass
class Cluster:
    bed: BpsTestbed
    client: KubeClient
    controller: BpsController

    @property
    def kubeconfig(self) -> str:
        return str(self.bed.kubeconfig)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with BpsTestbed() as bed:
        client = await bed.client()
        controller = bed.controller(client)
        task = asyncio.create_task(controller.run())
        try:
            await asyncio.wait_for(controller.ready.wait(), 10)
            await bed.create_set(client, set_manifest("web", 3, 2, 2))
            await bed.create_set(client, set_manifest("api", 1, 1, 0))
            await wait_for(
                lambda: (
                    bed.settled("web", 3, 2, 2)
                    and bed.settled("api", 1, 1, 0)
                    and all(
                        ((bed.get_set(n) or {}).get("status") or {}).get("readyReplicas") == want
                        for n, want in (("web", 3), ("api", 1))
                    )
                ),
                15,
            )
            yield Cluster(bed, client, controller)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def rows(text: str) -> dict[str, list[str]]:
    """A kubectl-style table keyed by its first column (the header row under its own name)."""
    return {line.split()[0]: line.split() for line in text.strip().splitlines()}


async def test_status_lists_every_set_with_ready_over_desired_per_role(cluster: Cluster) -> None:
    result = await bpsctl("--kubeconfig", cluster.kubeconfig, "status")
    assert result.code == 0, result.err
    table = rows(result.out)
    assert table["NAME"][:4] == ["NAME", "PRIMARY", "HOT", "COLD"]
    assert table["web"][1:4] == ["3/3", "2/2", "2/2"]
    assert table["api"][1:4] == ["1/1", "1/1", "0/0"]
    assert "<none>" in table["web"]  # no failover yet


async def test_status_all_namespaces_wide_adds_namespace_and_conditions(cluster: Cluster) -> None:
    result = await bpsctl("status", "-A", "-o", "wide", "--kubeconfig", cluster.kubeconfig)
    assert result.code == 0, result.err
    table = rows(result.out)
    assert table["NAMESPACE"][-3:] == ["AVAILABLE", "PROGRESSING", "GENERATION"]
    web = next(r for r in table.values() if r[1] == "web")
    assert web[0] == "default"
    assert "True" in web


async def test_status_name_shows_pods_by_role_with_node_ip_phase_readiness(
    cluster: Cluster,
) -> None:
    result = await bpsctl("--kubeconfig", cluster.kubeconfig, "status", "web")
    assert result.code == 0, result.err
    lines = result.out.strip().splitlines()
    assert lines[0].startswith("BackupPodSet default/web: primaries 3/3 ready")
    assert lines[1].split() == [
        *("ROLE", "POD", "READY", "STATUS", "RESTARTS", "NODE", "IP", "AGE")
    ]
    pods = [line.split() for line in lines[2:]]
    assert [p[0] for p in pods] == ["primary"] * 3 + ["hot-backup"] * 2 + ["cold-backup"] * 2
    live = {p["metadata"]["name"]: p for p in cluster.bed.pods("web")}
    for role, name, ready, status, restarts, node, ip, _age in pods:
        pod = live[name]
        assert node == pod["spec"]["nodeName"]
        assert ip == pod["status"]["podIP"]
        assert restarts == "0"
        # A cold backup is held by its bps-wait init container, as kubectl would show it.
        assert (ready, status) == (
            ("0/1", "Init:0/1") if role == "cold-backup" else ("1/1", "Running")
        )


async def test_status_json_and_yaml_carry_the_objects(cluster: Cluster) -> None:
    as_json = await bpsctl("--kubeconfig", cluster.kubeconfig, "status", "web", "-o", "json")
    assert as_json.code == 0, as_json.err
    data = json.loads(as_json.out)
    assert data["backupPodSet"]["metadata"]["name"] == "web"
    assert len(data["pods"]) == 7
    as_yaml = await bpsctl("--kubeconfig", cluster.kubeconfig, "status", "-o", "yaml")
    listed = yaml.safe_load(as_yaml.out)
    assert sorted(i["metadata"]["name"] for i in listed["items"]) == ["api", "web"]


async def test_failover_deletes_a_primary_and_prints_the_measured_timeline(
    cluster: Cluster,
) -> None:
    victim = cluster.bed.roles("web")["primary"][1]
    result = await bpsctl(
        "--kubeconfig", cluster.kubeconfig, "failover", "web", victim, "--timeout", "20"
    )
    assert result.code == 0, result.err
    assert f"deleted primary {victim}" in result.out
    assert f"failed primary:  {victim}" in result.out
    for stage in ("detected", "promoted", "activated", "replacement created", "restored"):
        assert stage in result.out
    assert "controller handling" in result.out
    await wait_for(lambda: cluster.bed.settled("web", 3, 2, 2), 15)
    assert victim not in {p["metadata"]["name"] for p in cluster.bed.pods("web")}

    described = await bpsctl("--kubeconfig", cluster.kubeconfig, "describe", "web")
    assert described.code == 0, described.err
    text = described.out
    for heading in ("Spec:", "Status:", "Conditions:", "Pods:", "Last failover:", "Events:"):
        assert heading in text
    assert f"failed primary:  {victim}" in text
    assert "Available" in text and "PrimariesReady" in text
    assert "PrimaryFailed" in text and "FailoverComplete" in text
    assert "Problems:" not in text  # the cold backups are cold


async def test_failover_refuses_a_pod_that_is_not_a_primary(cluster: Cluster) -> None:
    hot = cluster.bed.roles("web")["hot-backup"][0]
    result = await bpsctl("--kubeconfig", cluster.kubeconfig, "failover", "web", hot)
    assert result.code == 1
    assert f'pod "{hot}" is not a live primary of "web"' in result.err
    assert hot in {p["metadata"]["name"] for p in cluster.bed.pods("web")}


async def test_watch_re_renders_on_change_and_stops_at_its_timeout(cluster: Cluster) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bpsctl.cli",
        *("--kubeconfig", cluster.kubeconfig, "status", "--watch", "--watch-timeout", "5"),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        first = []
        while not first or not first[-1].startswith("web"):
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            assert line, "bpsctl exited before printing its first table"
            first.append(line.decode())
        # The first table is out, so the watch resumes from the version it was listed at.
        await cluster.client.patch(BACKUP_POD_SETS, "api", {"spec": {"hotBackups": 2}}, "default")
        rest, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    tables = rest.decode().split("\n--- ")
    assert len(tables) >= 2
    assert rows(tables[-1].split("\n", 1)[1])["api"][2] == "2/2"


async def test_unknown_set_is_one_clear_line(cluster: Cluster) -> None:
    result = await bpsctl("--kubeconfig", cluster.kubeconfig, "describe", "nope")
    assert result.code == 1
    assert result.err.strip() == 'bpsctl: backuppodset "nope" not found in namespace "default"'


async def test_namespace_comes_from_the_kubeconfig_context_and_kubeconfig_env(
    cluster: Cluster, tmp_path: Path
) -> None:
    config = cluster.bed.api.write_kubeconfig(tmp_path / "config", namespace="elsewhere")
    result = await bpsctl("status", env={"KUBECONFIG": f"/nonexistent:{config}"})
    assert result.code == 0, result.err
    assert 'No BackupPodSets found in namespace "elsewhere"' in result.out
    result = await bpsctl("status", "-n", "default", env={"KUBECONFIG": str(config)})
    assert "web" in rows(result.out)


async def test_unreachable_api_server_is_one_line_without_traceback(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before bpsctl connects: nothing listens
    api = EmulatedApiServer(port=port)
    config = api.write_kubeconfig(tmp_path / "config")
    result = await bpsctl("--kubeconfig", str(config), "--request-timeout", "3", "status")
    assert result.code == 1
    assert "Traceback" not in result.err
    assert result.err.strip() == f"bpsctl: cannot reach the API server at http://127.0.0.1:{port}"


async def test_missing_crd_is_named(tmp_path: Path) -> None:
    async with EmulatedApiServer() as api:
        config = api.write_kubeconfig(tmp_path / "config")
        result = await bpsctl("--kubeconfig", str(config), "status")
    assert result.code == 1
    assert "backuppodsets.rapproxy.io" in result.err and "Traceback" not in result.err
