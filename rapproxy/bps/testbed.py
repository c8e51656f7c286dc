"""An emulated cluster in which the BPS controller can be exercised end to end, in one process.

Used by the controller's integration tests, `bpsctl`'s tests and `benchmarks/bps`. It is the
emulated API server (`rapproxy.testing.apiserver`) with its control plane, whose kubelets hold a
cold backup in its `bps-wait` init container until it is activated: their `StandInRuntime` runs
the *real* waiter (`serve_until_activated`) on loopback for each cold pod, and the controller is
given an `activation_target` that maps the pod to that loopback port instead of its (unroutable,
emulated) pod IP. When the waiter answers 200 and exits, the kubelet reports the init container
Completed and the pod Running and Ready — the sequence a real kubelet produces.

Not imported by the controller: production code never depends on this module.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from rapproxy.bps.controller import BpsController
from rapproxy.cluster.client import BACKUP_POD_SETS, ClientSettings, KubeClient
from rapproxy.config import BpsSettings
from rapproxy.model.bps import API_VERSION, KIND, LABEL_BPS, LABEL_ROLE, WAITER_CONTAINER
from rapproxy.testing.apiserver import ControlPlane, EmulatedApiServer, StandInRuntime
from rapproxy.testing.apiserver.resources import CRDS, PODS

JsonObject = dict[str, Any]
CRD_MANIFEST = Path(__file__).resolve().parents[2] / "manifests" / "crd-backuppodset.yaml"

# Used only when the repository's CRD manifest is not there (an installed package): a permissive
# CRD with the same names and a status subresource.
FALLBACK_CRD: JsonObject = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "backuppodsets.rapproxy.io"},
    "spec": {
        "group": "rapproxy.io",
        "scope": "Namespaced",
        "names": {
            "plural": "backuppodsets",
            "singular": "backuppodset",
            "kind": KIND,
            "listKind": f"{KIND}List",
            "shortNames": ["bps"],
        },
        "versions": [
            {
                "name": "v1alpha1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "x-kubernetes-preserve-unknown-fields": True,
                            },
                            "status": {
                                "type": "object",
                                "x-kubernetes-preserve-unknown-fields": True,
                            },
                        },
                    }
                },
            }
        ],
    },
}


def crd_manifest() -> JsonObject:
    if CRD_MANIFEST.exists():
        for doc in yaml.safe_load_all(CRD_MANIFEST.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                return doc
    fallback: JsonObject = json.loads(json.dumps(FALLBACK_CRD))
    return fallback


def set_manifest(
    name: str,
    replicas: int,
    hot: int,
    cold: int,
    *,
    namespace: str = "default",
    image: str = "registry.example/app:1",
    extra_spec: JsonObject | None = None,
) -> JsonObject:
    spec: JsonObject = {
        "replicas": replicas,
        "hotBackups": hot,
        "coldBackups": cold,
        "template": {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"labels": {"app": name}},
            "spec": {"containers": [{"name": "app", "image": image}]},
        },
    }
    spec.update(extra_spec or {})
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


class BpsTestbed:
    """Emulated API server + control plane (one `StandInRuntime`) + a client; async context."""

    def __init__(
        self,
        nodes: tuple[str, ...] = ("node-a", "node-b", "node-c"),
        *,
        startup_delay: float = 0.0,
        install_crd: bool = True,
    ) -> None:
        # install_crd=False starts without the BackupPodSet CRD, for a test that installs it the
        # way an operator does (`kubectl apply -f manifests/crd-backuppodset.yaml`).
        self.nodes = nodes
        self.startup_delay = startup_delay
        self.install_crd = install_crd
        self.api = EmulatedApiServer(control_plane=False)
        self.runtime = StandInRuntime(startup_delay=startup_delay)
        self.api.control_plane = ControlPlane(
            self.api.registry, nodes=list(nodes), runtime_factory=lambda _node: self.runtime
        )
        self._dir = Path(tempfile.mkdtemp(prefix="bps-testbed-"))
        self.kubeconfig = self._dir / "kubeconfig"
        self._clients: list[KubeClient] = []

    async def __aenter__(self) -> BpsTestbed:
        await self.api.start()
        if self.install_crd:
            self.api.registry.create(CRDS, "", crd_manifest())
        self.api.write_kubeconfig(self.kubeconfig)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for client in self._clients:
            await client.close()
        await self.api.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    async def client(self) -> KubeClient:
        client = await KubeClient.connect(ClientSettings(str(self.kubeconfig), request_timeout=10))
        self._clients.append(client)
        return client

    def controller(
        self, client: KubeClient, settings: BpsSettings | None = None, **options: Any
    ) -> BpsController:
        options.setdefault("activation_target", self.runtime.target)
        return BpsController(client, settings or BpsSettings(), **options)

    # -- looking at the emulated cluster directly (no API round trip) -------------------------
    def pods(self, name: str, namespace: str = "default") -> list[JsonObject]:
        return [
            p
            for p in self.api.store.list(PODS)
            if p["metadata"].get("namespace") == namespace
            and (p["metadata"].get("labels") or {}).get(LABEL_BPS) == name
        ]

    def roles(self, name: str, namespace: str = "default") -> dict[str, list[str]]:
        """Live (not terminating) pods by role label: {"primary": [...], ...}."""
        out: dict[str, list[str]] = {"primary": [], "hot-backup": [], "cold-backup": []}
        for pod in self.pods(name, namespace):
            if pod["metadata"].get("deletionTimestamp"):
                continue
            role = (pod["metadata"].get("labels") or {}).get(LABEL_ROLE, "")
            out.setdefault(role, []).append(pod["metadata"]["name"])
        return {k: sorted(v) for k, v in out.items()}

    def settled(self, name: str, replicas: int, hot: int, cold: int) -> bool:
        """Exactly the desired pods, primaries and hot backups Ready, cold ones waiting (with an
        IP, their waiter running)."""
        pods = [p for p in self.pods(name) if not p["metadata"].get("deletionTimestamp")]
        by_role: dict[str, list[JsonObject]] = {}
        for pod in pods:
            role = (pod["metadata"].get("labels") or {}).get(LABEL_ROLE, "")
            by_role.setdefault(role, []).append(pod)
        if len(pods) != replicas + hot + cold:
            return False
        for role, want, need_ready in (
            ("primary", replicas, True),
            ("hot-backup", hot, True),
            ("cold-backup", cold, False),
        ):
            members = by_role.get(role, [])
            if len(members) != want:
                return False
            if need_ready and not all(_ready(p) for p in members):
                return False
            if not need_ready and not all(_waiting(p) for p in members):
                return False
        return True

    def cache_current(self, controller: BpsController) -> bool:
        """The controller's pod cache holds exactly the server's pods, at the same versions."""
        server = {
            f"{p['metadata']['namespace']}/{p['metadata']['name']}": p["metadata"][
                "resourceVersion"
            ]
            for p in self.api.store.list(PODS)
            if LABEL_BPS in (p["metadata"].get("labels") or {})
        }
        cached = {
            key: str(obj["metadata"].get("resourceVersion"))
            for key, obj in controller.pods.store.items()
        }
        return server == cached

    def get_set(self, name: str, namespace: str = "default") -> JsonObject | None:
        rt = self.api.store.lookup("rapproxy.io", "v1alpha1", "backuppodsets")
        if rt is None:
            return None
        return self.api.store.get(rt, namespace, name)

    async def create_set(self, client: KubeClient, manifest: JsonObject) -> JsonObject:
        namespace = manifest["metadata"].get("namespace", "default")
        return await client.create(BACKUP_POD_SETS, manifest, namespace)


def _waiting(pod: JsonObject) -> bool:
    """A cold backup ready to be activated: its waiter runs and the pod has an IP."""
    status = pod.get("status") or {}
    if not status.get("podIP"):
        return False
    return any(
        c.get("name") == WAITER_CONTAINER and "running" in (c.get("state") or {})
        for c in status.get("initContainerStatuses") or []
    )


def _ready(pod: JsonObject) -> bool:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return bool(condition.get("status") == "True")
    return False


async def wait_for(
    condition: Callable[[], bool], within: float = 10.0, interval: float = 0.002
) -> float:
    """Poll `condition` until true; return the seconds it took. TimeoutError after `within`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + within
    while not condition():
        if loop.time() >= deadline:
            raise TimeoutError(f"condition not met within {within:g}s")
        await asyncio.sleep(interval)
    return loop.time() - started
