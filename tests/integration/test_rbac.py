"""The RBAC rules an operator applies grant exactly the API calls rapproxy's ServiceAccount makes.

Derived, not listed. Every request rapproxy makes passes through `KubeClient._request`, which
counts it as `(verb, group, resource[/subresource])`. This test runs the code that runs under the
DaemonSet's ServiceAccount — the proxy's Service and EndpointSlice informers and its Node informer,
composed as `rapproxy.daemon.run` composes them, and the BackupPodSet controller through
`run_controller`, Lease election included — against the emulated API server, drives it through
every path that reaches the API, and compares the counted calls with the rules kustomize renders
for both overlays, both ways: a call the rules do not grant fails (the daemon would be forbidden
in a cluster), and so does a grant no call uses (privilege nobody needs). `bpsctl` runs with the
operator's credentials, not the ServiceAccount, and is not part of this.

The paths, and how the scenario reaches each one:
- informer lists and watches: every informer lists, then watches;
- pod creates, relabels and deletes, Events, BackupPodSet status: the example BackupPodSet from
  manifests/examples/ converges, is rescaled (promotions, a cold backup's activation), loses a
  primary (failover), and is scaled down (surplus pods deleted);
- the pod `get` a relabel makes only after a 409: the emulated server is made to see a concurrent
  write (as a kubelet's status update would be) land on the pod just before the controller's
  relabel, so the relabel's resourceVersion precondition fails, deterministically, once;
- the Lease: created on the first campaign, renewed (short but valid lease timings), released on
  shutdown.

The proxy and the controller each get their own client here (in the daemon they share one), so the
split the manifests promise — the controller's ClusterRole plus the Lease Role are enough for
`rapproxy bps-controller` run alone — is checked as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from rapproxy import config as rapproxy_config
from rapproxy.bps.controller import run_controller
from rapproxy.bps.testbed import BpsTestbed, wait_for
from rapproxy.cluster.client import (
    BACKUP_POD_SETS,
    LEASES,
    NODES,
    PODS,
    SERVICES,
    KubeClient,
    Resource,
)
from rapproxy.cluster.informer import Callbacks, Informer
from rapproxy.config import RapproxyConfiguration
from rapproxy.daemon import proxy_informers
from rapproxy.model.bps import LABEL_ROLE
from rapproxy.sync.proxier import Proxier
from rapproxy.telemetry.runtime import RapRuntime
from rapproxy.testing.apiserver import Registry, ResourceType
from rapproxy.testing.apiserver.registry import WriteResult
from rapproxy.testing.apiserver.resources import LEASES as SERVER_LEASES
from rapproxy.testing.apiserver.resources import NAMESPACES as SERVER_NAMESPACES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
EXAMPLE = MANIFESTS / "examples" / "bps-web.yaml"
OVERLAYS = ("overlays/replace-kube-proxy", "overlays/beside-kube-proxy")
NODE = "node-a"
SETTLE = 20.0

# Which rendered roles hold each component's rules (manifests/base/clusterrole.yaml, role.yaml).
PROXY_ROLES = {("ClusterRole", "rapproxy-proxy")}
CONTROLLER_ROLES = {
    ("ClusterRole", "rapproxy-bps-controller"),
    ("Role", "rapproxy-leader-election"),
}

Call = tuple[str, str, str]  # (group, resource[/subresource], verb), as RBAC rules spell them
Objects = list[dict[str, Any]]


# -- what the rules grant ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grant:
    kind: str  # ClusterRole or Role
    name: str
    namespace: str  # "" for a ClusterRole
    call: Call


def grants(objects: Objects) -> set[Grant]:
    """Every (group, resource, verb) each ClusterRole and Role grants, expanded rule by rule."""
    out: set[Grant] = set()
    for role in (o for o in objects if o["kind"] in ("ClusterRole", "Role")):
        meta = role["metadata"]
        for rule in role.get("rules") or []:
            assert not rule.get("nonResourceURLs"), f"{meta['name']}: grants non-resource URLs"
            assert not rule.get("resourceNames"), f"{meta['name']}: narrowed by resourceNames"
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        call = (group, resource, verb)
                        assert "*" not in call, f"{meta['name']}: wildcard in {call}"
                        out.add(Grant(role["kind"], meta["name"], meta.get("namespace", ""), call))
    return out


def calls_of(found: Iterable[Grant], roles: set[tuple[str, str]] | None = None) -> set[Call]:
    return {g.call for g in found if roles is None or (g.kind, g.name) in roles}


def describe(calls: Iterable[Call]) -> str:
    return "\n".join(
        f"    {verb:7} {resource} ({group or 'core'})" for group, resource, verb in sorted(calls)
    )


def assert_same(observed: set[Call], granted: set[Call], what: str) -> None:
    missing, spare = observed - granted, granted - observed
    message = [f"{what}: the rules and the calls differ"]
    if missing:
        message.append(f"  made but NOT granted (forbidden in a cluster):\n{describe(missing)}")
    if spare:
        message.append(f"  granted but never made (trim them):\n{describe(spare)}")
    if missing or spare:
        pytest.fail("\n".join(message), pytrace=False)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Objects]:
    """The root kustomization and both overlays, rendered as `kubectl apply -k` would."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        message = "NO KUBECTL: kustomize (built into kubectl) renders the RBAC under test"
        if os.environ.get("CI"):
            pytest.fail(message + " (required in CI)")
        pytest.skip(message)
    copy = tmp_path_factory.mktemp("manifests") / "manifests"
    shutil.copytree(MANIFESTS, copy, ignore=shutil.ignore_patterns("telemetry-token"))
    subprocess.run(
        [str(copy / "base" / "generate-telemetry-token")], check=True, capture_output=True
    )
    out: dict[str, Objects] = {}
    for kustomization in ("", *OVERLAYS):
        result = subprocess.run(
            [kubectl, "kustomize", str(copy / kustomization)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, f"kustomize {kustomization!r} failed:\n{result.stderr}"
        out[kustomization] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def deployed_config(objects: Objects) -> RapproxyConfiguration:
    (config_map,) = (
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("rapproxy-config")
    )
    return rapproxy_config.from_yaml(config_map["data"]["rapproxy.yaml"])


# -- what the code calls -------------------------------------------------------------------------


class ConcurrentWriteBeforeRelabel:
    """Makes the next role relabel of a pod meet a write it did not see, exactly once.

    Wraps the emulated server's `Registry.patch`: when armed, a merge patch that sets the role
    label first has the pod rewritten (an annotation, as any concurrent writer would), so the
    patch's `metadata.resourceVersion` precondition is stale and the server answers 409 — what a
    kubelet's status update racing a promotion produces in a cluster, without the race.
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.original = registry.patch
        self.armed = False
        self.conflicted: list[str] = []

    def patch(
        self, rt: ResourceType, namespace: str, name: str, content_type: str, raw: bytes, **kw: Any
    ) -> WriteResult:
        if self.armed and (rt.group, rt.plural) == ("", "pods") and _sets_role(raw):
            self.armed = False
            self.registry.mutate(rt, namespace, name, _annotate_concurrent_write)
            self.conflicted.append(name)
        return self.original(rt, namespace, name, content_type, raw, **kw)


def _sets_role(raw: bytes) -> bool:
    try:
        document = json.loads(raw)
    except ValueError:
        return False
    if not isinstance(document, dict):
        return False  # a JSON patch (a list): the controller relabels with merge patches
    labels = (document.get("metadata") or {}).get("labels") or {}
    return isinstance(labels, dict) and LABEL_ROLE in labels


def _annotate_concurrent_write(pod: dict[str, Any]) -> None:
    annotations = pod["metadata"].setdefault("annotations", {})
    annotations["test.rapproxy.io/concurrent-write"] = str(len(annotations))


@dataclass(frozen=True, slots=True)
class Observed:
    proxy: set[Call]
    controller: set[Call]
    lease_namespaces: set[str]
    conflicted: list[str]

    @property
    def daemon(self) -> set[Call]:
        return self.proxy | self.controller


def counted(client: KubeClient) -> set[Call]:
    return {(group, resource, verb) for verb, group, resource in client.calls}


def made(client: KubeClient, verb: str, resource: Resource, subresource: str = "") -> int:
    plural = f"{resource.plural}/{subresource}" if subresource else resource.plural
    return client.calls[(verb, resource.group, plural)]


async def run_daemon_scenario(
    config: RapproxyConfiguration, monkeypatch: pytest.MonkeyPatch
) -> Observed:
    # Lease timings as short as the configuration allows (>= 1 s), so a renewal happens quickly.
    bps = dataclasses.replace(config.bps, lease_duration=3.0, renew_deadline=2.0, retry_period=1.0)
    # No telemetry token: the peer poller is not started here, and it makes no API calls.
    config = dataclasses.replace(config, rap=dataclasses.replace(config.rap, token_file=""))
    example = [doc for doc in yaml.safe_load_all(EXAMPLE.read_text()) if doc]
    (service,) = (o for o in example if o["kind"] == "Service")
    (backup_pod_set,) = (o for o in example if o["kind"] == "BackupPodSet")
    name, namespace = backup_pod_set["metadata"]["name"], backup_pod_set["metadata"]["namespace"]

    async with BpsTestbed(nodes=(NODE, "node-b", "node-c")) as bed:
        registry = bed.api.registry
        if bed.api.store.get(SERVER_NAMESPACES, "", bps.lease_namespace) is None:
            registry.create(SERVER_NAMESPACES, "", {"metadata": {"name": bps.lease_namespace}})
        injector = ConcurrentWriteBeforeRelabel(registry)
        monkeypatch.setattr(registry, "patch", injector.patch)
        user = await bed.client()  # the test's own writes: an operator's, not the daemon's
        proxy_client = await bed.client()
        controller_client = await bed.client()

        # The proxy's sources, as rapproxy.daemon.run builds them from a client.
        proxier = Proxier(config, NODE)
        rap = RapRuntime(config, NODE)
        informers = proxy_informers(proxy_client, proxier, config, proxier.note_change)
        informers.append(
            Informer(
                proxy_client,
                NODES,
                Callbacks(rap.nodes.upsert, rap.nodes.delete, rap.nodes.listed.set),
                relist_period=config.config_sync_period,
            )
        )
        tasks = [asyncio.create_task(i.run(), name=f"proxy-{i.name}") for i in informers]
        tasks.append(
            asyncio.create_task(
                run_controller(
                    controller_client,
                    bps,
                    f"{NODE}_rbac-test",
                    activation_target=bed.runtime.target,  # loopback waiters, not pod IPs
                ),
                name="bps-controller",
            )
        )

        def settled(replicas: int, hot: int, cold: int) -> Callable[[], bool]:
            return lambda: bed.settled(name, replicas, hot, cold)

        async def rescale(replicas: int, hot: int, cold: int) -> None:
            counts = {"replicas": replicas, "hotBackups": hot, "coldBackups": cold}
            await user.patch(BACKUP_POD_SETS, name, {"spec": counts}, namespace)
            await wait_for(settled(replicas, hot, cold), SETTLE)

        try:
            await user.create(SERVICES, service, namespace)
            await user.create(BACKUP_POD_SETS, backup_pod_set, namespace)
            spec = backup_pod_set["spec"]
            await wait_for(
                settled(spec["replicas"], spec["hotBackups"], spec["coldBackups"]), SETTLE
            )
            await rescale(3, 2, 1)  # a hot backup promoted, a cold one activated into its place

            injector.armed = True  # the failover's promotion meets a concurrent write
            primary = bed.roles(name, namespace)["primary"][0]
            await user.delete(PODS, primary, namespace)
            await wait_for(lambda: not injector.armed, SETTLE)
            await wait_for(settled(3, 2, 1), SETTLE)

            await rescale(1, 1, 1)  # surplus pods deleted by the controller

            await wait_for(lambda: made(controller_client, "update", LEASES) >= 1, SETTLE)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task  # run_controller releases the Lease on its way out

        lease_namespaces = {  # the emulated kubelets hold node Leases: not the daemon's
            lease["metadata"]["namespace"]
            for lease in bed.api.store.list(SERVER_LEASES)
            if lease["metadata"]["name"] == bps.lease_name
        }
        return Observed(
            counted(proxy_client),
            counted(controller_client),
            lease_namespaces,
            injector.conflicted,
        )


# -- the comparison ------------------------------------------------------------------------------


async def test_the_service_account_is_granted_every_call_the_daemon_makes_and_no_other(
    rendered: dict[str, Objects], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = deployed_config(rendered[""])
    observed = await run_daemon_scenario(config, monkeypatch)

    # The scenario reached the paths it claims to: a relabel hit its 409 and re-read the pod, and
    # the Lease lives where the configuration (and so the Role) puts it.
    assert observed.conflicted, "no relabel met the injected concurrent write"
    assert ("", "pods", "get") in observed.controller
    assert observed.lease_namespaces == {config.bps.lease_namespace}

    for overlay in OVERLAYS:
        found = grants(rendered[overlay])
        assert_same(observed.daemon, calls_of(found), f"{overlay}: the ServiceAccount")
        assert_same(observed.proxy, calls_of(found, PROXY_ROLES), f"{overlay}: the proxy")
        assert_same(
            observed.controller,
            calls_of(found, CONTROLLER_ROLES),
            f"{overlay}: the BackupPodSet controller",
        )
        # Leases only through the namespaced Role, in the namespace the Lease really lives in.
        lease_grants = {g for g in found if g.call[:2] == ("coordination.k8s.io", "leases")}
        assert {(g.kind, g.namespace) for g in lease_grants} == {
            ("Role", config.bps.lease_namespace)
        }
