"""kubectl (a real client with its own discovery, openapi and apply logic) against the emulator."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from rapproxy.testing.apiserver import EmulatedApiServer
from rapproxy.testing.apiserver.resources import NAMESPACES

from .conftest import eventually

KUBECTL = shutil.which("kubectl")
MANIFEST = """\
apiVersion: v1
kind: Namespace
metadata: {name: smoke}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: smoke}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: smoke, labels: {app: web}}
spec:
  containers:
  - {name: app, image: nginx:1, ports: [{name: http, containerPort: 8080}]}
"""

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="KUBECTL MISSING: not on PATH")


async def _kubectl(kubeconfig: Path, *args: str) -> tuple[int, str, str]:
    assert KUBECTL is not None
    proc = await asyncio.create_subprocess_exec(
        KUBECTL,
        "--kubeconfig",
        str(kubeconfig),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_kubectl_apply_get_and_delete_against_the_emulated_cluster(tmp_path: Path) -> None:
    async with EmulatedApiServer(nodes=["node-a"]) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        manifest = tmp_path / "m.yaml"
        manifest.write_text(MANIFEST)
        code, out, err = await _kubectl(kubeconfig, "apply", "-f", str(manifest))
        assert code == 0, err
        assert "service/web created" in out and "pod/web-1 created" in out
        code, out, err = await _kubectl(kubeconfig, "apply", "-f", str(manifest))
        assert code == 0 and "pod/web-1 unchanged" in out, err

        async def running() -> bool:
            code, out, _ = await _kubectl(
                kubeconfig,
                "get",
                "pod",
                "web-1",
                "-n",
                "smoke",
                "-o",
                "jsonpath={.status.phase} {.status.podIP}",
            )
            return code == 0 and out.startswith("Running 10.244.")

        await eventually(running, within=10)
        code, out, err = await _kubectl(kubeconfig, "get", "pods", "-A")
        assert code == 0, err
        assert "web-1" in out and "smoke" in out
        code, out, err = await _kubectl(
            kubeconfig,
            "get",
            "endpointslices",
            "-n",
            "smoke",
            "-o",
            "jsonpath={.items[0].endpoints[0].addresses[0]}:{.items[0].ports[0].port}",
        )
        assert code == 0 and out.startswith("10.244.") and out.endswith(":8080"), (out, err)
        code, out, err = await _kubectl(
            kubeconfig, "delete", "-f", str(manifest), "--wait=true", "--timeout=20s"
        )
        assert code == 0, err
        assert api.store.get(NAMESPACES, "", "smoke") is None


COLD_POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: cold
  annotations: {rapproxy.io/activation-token: t0ken}
spec:
  initContainers:
  - name: bps-wait
    image: rapproxy:1
    command: [rapproxy, bps-wait, --port, "9901"]
    env:
    - name: RAPPROXY_ACTIVATION_TOKEN
      valueFrom: {fieldRef: {fieldPath: "metadata.annotations['rapproxy.io/activation-token']"}}
  containers:
  - {name: app, image: app:1}
---
apiVersion: v1
kind: Pod
metadata: {name: hot}
spec:
  containers:
  - {name: app, image: app:1}
"""


async def test_kubectl_get_pods_shows_a_cold_backup_held_in_its_init_container(
    tmp_path: Path,
) -> None:
    async with EmulatedApiServer(nodes=["node-a"]) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        manifest = tmp_path / "pods.yaml"
        manifest.write_text(COLD_POD)
        code, _, err = await _kubectl(kubeconfig, "apply", "-f", str(manifest))
        assert code == 0, err

        async def table() -> dict[str, list[str]] | None:
            code, out, _ = await _kubectl(kubeconfig, "get", "pods", "-o", "wide")
            lines = [line.split() for line in out.splitlines()]
            if code != 0 or len(lines) != 3:
                return None
            rows = {row[0]: row for row in lines[1:]}
            return rows if rows["hot"][2] == "Running" and rows["cold"][2] != "Pending" else None

        rows = await eventually(table, within=10)
        header = (await _kubectl(kubeconfig, "get", "pods"))[1].splitlines()[0].split()
        assert header == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
        assert rows["cold"][1:4] == ["0/1", "Init:0/1", "0"]
        assert rows["hot"][1:4] == ["1/1", "Running", "0"]
        assert rows["cold"][5].startswith("10.244.")  # the IP while init containers run
        assert rows["cold"][6] == "node-a"
