"""The demo's cluster: an emulated edge cluster running rapproxy on every node, and `web`.

`DemoCluster` assembles, as one async context manager, the parts other packages provide:

* `EdgeCluster` (rapproxy.testing.edge): three nodes as namespaces on a WAN with the demo's
  one-way delays, a cgroup per node for its CPU capacity, pods as real processes;
* `EmulatedApiServer` on the WAN router's control address (reached by every node without WAN
  delay), with scheduler, EndpointSlice controller and a kubelet per node, and the BackupPodSet
  CRD installed;
* one `rapproxy run` per node, inside that node's namespace with its own iptables, following the
  API server, exchanging telemetry with its peers (shared token) and reading its node's load
  from a file the cluster keeps current from the node's cgroup — so the daemons run the same
  binary and code paths as in a real cluster, including the leader-elected BPS controller;
* Service `web` (ClusterIP 10.96.0.10:80) selecting the primaries of BackupPodSet `web`: three
  primaries, one hot and one cold backup, each pod the experiment backend.

Daemons and load generators run in their node's namespace but outside its cgroup: the cgroup is
the node's capacity *for pods*, which is what an overloaded edge node runs out of.
Leaving the block removes everything (the API server first, so nothing reacts to the teardown).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from rapproxy.bps.testbed import crd_manifest
from rapproxy.demo.options import DemoOptions, policy_and_dataplane
from rapproxy.demo.probes import debug_state, serving_names
from rapproxy.model.bps import LABEL_BPS, LABEL_ROLE, Role
from rapproxy.model.service import ANNOTATION_DATAPLANE, ANNOTATION_LB_POLICY
from rapproxy.testing.apiserver import DeleteOptions, EmulatedApiServer
from rapproxy.testing.apiserver.resources import CRDS, PODS, SERVICES
from rapproxy.testing.edge.cluster import EdgeCluster, EdgeNode
from rapproxy.testing.edge.delays import DelayMatrix
from rapproxy.testing.edge.runtime import ProcessPodHandle
from rapproxy.testing.edge.wan import POD_SUPERNET
from rapproxy.testing.probes import wait_http

JsonObject = dict[str, Any]
RAPPROXY = str(Path(sys.executable).with_name("rapproxy"))
NODES = ("node-1", "node-2", "node-3")
CLUSTER_IP = "10.96.0.10"
SERVICE_URL = f"http://{CLUSTER_IP}/"
OVERLOADED_CPUS = 0.25  # node-1's capacity while a CPU-bound neighbour pod runs there
BPS_NAME = "web"
HOG_POD = "noisy-neighbour"


class DemoSetupError(RuntimeError):
    """The cluster did not reach the state the demo needs; the message says which."""


async def until(condition: Callable[[], bool], within: float, what: str, poll: float = 0.1) -> None:
    """Poll `condition` until true; `DemoSetupError` naming `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise DemoSetupError(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(poll)


class DemoCluster:
    def __init__(self, options: DemoOptions, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self._stack = contextlib.AsyncExitStack()
        self.edge: EdgeCluster | None = None
        self.api: EmulatedApiServer | None = None
        self.load_files: dict[str, Path] = {}
        self.injected_load = False  # True: no cgroups here; node load figures are written by us
        self.leftover_report: list[str] = []

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> DemoCluster:
        try:
            await self._start_edge()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        edge = self.edge
        try:
            await self._stack.aclose()
        finally:
            if edge is not None:
                self.leftover_report = edge.leftovers()

    async def _start_edge(self) -> None:
        delays = DelayMatrix.symmetric(self.options.delays_ms())
        edge = EdgeCluster(
            list(NODES), delays=delays, probe_period=0.2, workdir=self.workdir / "edge"
        )
        self.edge = await self._stack.enter_async_context(edge)
        for node in edge.nodes:
            # Connection-close load makes a fresh client port per request: without reuse of
            # TIME_WAIT ports the client stalls in connect() after ~15k connections a minute
            # (benchmarks/README.md). Both settings are per namespace: only the emulated nodes.
            await node.namespace.exec(
                [
                    "sysctl",
                    "-qw",
                    "net.ipv4.tcp_tw_reuse=1",
                    "net.ipv4.ip_local_port_range=1024 65000",
                ]
            )
            if edge.cgroups_unavailable is None:
                node.set_cpu_limit(self.options.node_cpus)

    async def start_control_plane(self) -> None:
        edge = self.require_edge()
        api = EmulatedApiServer(
            host=edge.control_ip,
            socket_factory=edge.router_socket,
            nodes=edge.kubelet_configs(heartbeat_interval=2.0),
            runtime_factory=edge.runtime_for,
            bookmark_interval=5.0,
        )
        await api.start()
        self._stack.push_async_callback(api.stop)
        self.api = api
        api.registry.create(CRDS, "", crd_manifest())

    async def start_daemons(self) -> None:
        edge, api = self.require_edge(), self.require_api()
        kubeconfig = api.write_kubeconfig(self.workdir / "kubeconfig")
        token = self.workdir / "rap-token"
        token.write_text(secrets.token_hex(16) + "\n")
        token.chmod(0o600)
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for node in edge.nodes:
            log = (logs / f"rapproxy-{node.name}.log").open("ab")
            self._stack.callback(log.close)
            await node.namespace.spawn(
                [
                    RAPPROXY,
                    "run",
                    "--kubeconfig",
                    str(kubeconfig),
                    "--node-name",
                    node.name,
                    "--set",
                    "iptables.minSyncPeriod=0.05",
                    "--set",
                    "rap.telemetryInterval=0.5",
                    "--set",
                    f"rap.loadSource={self._load_source(node)}",
                    "--set",
                    f"rap.tokenFile={token}",
                    # Kernel mode (the `-kernel` policies): a node reaches ClusterIPs through a
                    # local route, so its own connections leave with a loopback-scoped source
                    # that a remote pod cannot answer; SNAT what does not come from a pod, as
                    # kube-proxy does with its clusterCIDR. Userspace mode ignores it.
                    "--set",
                    f"dataplane.clusterCidrs=[{POD_SUPERNET}]",
                    *(
                        arg
                        for setting in self.options.daemon_settings
                        for arg in ("--set", setting)
                    ),
                ],
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        for node in edge.nodes:
            await node.call(wait_http, f"http://{node.ip}:10256/healthz", 30.0)

    def _load_source(self, node: EdgeNode) -> str:
        edge = self.require_edge()
        if edge.cgroups_unavailable is None:
            return edge.load_source(node.name)
        self.injected_load = True
        path = self.workdir / "load" / f"{node.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.load_files[node.name] = path
        self.write_injected_load(node.name, 0.1)
        return f"file:{path}"

    def write_injected_load(self, node: str, cpu: float) -> None:
        path = self.load_files[node]
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps({"cpu": cpu, "memory": 0.2}))
        partial.replace(path)

    def node_load(self, node: str) -> float:
        """The CPU figure node `node`'s rapproxy reads now (fraction of the node's capacity)."""
        edge = self.require_edge()
        if self.injected_load:
            path = self.load_files[node]
        else:
            path = Path(edge.load_source(node).removeprefix("file:"))
        try:
            return float(json.loads(path.read_text())["cpu"])
        except (OSError, ValueError, KeyError):
            return 0.0

    # -- the workload -----------------------------------------------------------------------------

    def deploy_web(self) -> None:
        api = self.require_api()
        api.registry.create(SERVICES, "default", service_manifest("rap"))
        rt = api.store.lookup("rapproxy.io", "v1alpha1", "backuppodsets")
        if rt is None:
            raise DemoSetupError("the BackupPodSet CRD is not served by the API server")
        api.registry.create(rt, "default", bps_manifest(self.options.work_ms))

    def pods_by_role(self) -> dict[str, list[JsonObject]]:
        api = self.require_api()
        roles: dict[str, list[JsonObject]] = {role.value: [] for role in Role}
        for pod in api.store.list(PODS):
            meta = pod["metadata"]
            labels = meta.get("labels") or {}
            if labels.get(LABEL_BPS) != BPS_NAME or meta.get("deletionTimestamp"):
                continue
            roles.setdefault(labels.get(LABEL_ROLE, ""), []).append(pod)
        return roles

    def web_settled(self) -> bool:
        roles = self.pods_by_role()
        primaries = roles[Role.PRIMARY.value]
        hot = roles[Role.HOT_BACKUP.value]
        return (
            len(primaries) == 3
            and len(hot) == 1
            and len(roles[Role.COLD_BACKUP.value]) == 1
            and all(pod_ready(p) for p in [*primaries, *hot])
        )

    def describe_pods(self) -> str:
        """Every pod of the set with role, node, phase and readiness: for error messages."""
        parts = []
        for role, pods in self.pods_by_role().items():
            for pod in pods:
                phase = (pod.get("status") or {}).get("phase", "?")
                ready = "ready" if pod_ready(pod) else "not ready"
                node = pod["spec"].get("nodeName") or "unscheduled"
                parts.append(f"{pod['metadata']['name']} {role or '?'} {node} {phase} {ready}")
        return "; ".join(parts) or "none"

    def bps_status(self) -> JsonObject:
        api = self.require_api()
        rt = api.store.lookup("rapproxy.io", "v1alpha1", "backuppodsets")
        bps = api.store.get(rt, "default", BPS_NAME) if rt is not None else None
        status: JsonObject = (bps or {}).get("status") or {}
        return status

    async def wait_web_serving(self, within: float = 60.0) -> list[str]:
        """Until BPS `web` is settled and node-1 reaches every primary; the primaries' names."""
        try:
            await until(self.web_settled, within, "BackupPodSet web: 3 primaries, 1 hot, 1 cold")
        except DemoSetupError as error:
            raise DemoSetupError(f"{error}; pods now: {self.describe_pods()}") from None
        names = sorted(p["metadata"]["name"] for p in self.pods_by_role()[Role.PRIMARY.value])
        node1 = self.require_edge().node("node-1")
        await self.set_policy("round-robin")
        deadline = time.monotonic() + within
        while True:
            seen = set(await node1.call(serving_names, SERVICE_URL, 12))
            if set(names) <= seen:
                return names
            if time.monotonic() > deadline:
                raise DemoSetupError(f"node-1 reaches only {sorted(seen)} of primaries {names}")
            await asyncio.sleep(0.3)

    async def set_policy(self, policy: str, within: float = 15.0) -> None:
        """Annotate Service web with `policy` and wait until node-1's rapproxy applies it.

        A `-kernel` policy also moves web to the kernel fast path (and any other back to the
        relay); applied means node-1's rules for web are written in that mode.
        """
        api = self.require_api()
        lb_policy, dataplane = policy_and_dataplane(policy)
        annotations = {ANNOTATION_LB_POLICY: lb_policy, ANNOTATION_DATAPLANE: dataplane}
        patch = {"metadata": {"annotations": annotations}}
        api.registry.patch(
            SERVICES, "default", "web", "application/merge-patch+json", json.dumps(patch).encode()
        )
        deadline = time.monotonic() + within
        while True:
            state = await self.balancer_state()
            kernel = state.get("kernel")
            in_kernel = bool(kernel and kernel.get("written"))
            if state.get("policy") == lb_policy and in_kernel == (dataplane == "kernel"):
                return
            if time.monotonic() > deadline:
                raise DemoSetupError(f"node-1's rapproxy did not apply policy {policy!r}")
            await asyncio.sleep(0.1)

    async def balancer_state(self) -> JsonObject:
        """Node-1's balancer view of Service web plus its selection counters, and its kernel
        mode state (`kernel`: None while web is relayed)."""
        node1 = self.require_edge().node("node-1")
        state = await node1.call(debug_state, "http://127.0.0.1:10249/debug/state")
        balancer = find_balancer(state) or {}
        services = balancer.get("services") or {}
        web: JsonObject = next((v for k, v in services.items() if "default/web" in k), {})
        kernel = balancer.get("kernel") or {}
        web_kernel = next((v for k, v in kernel.items() if "default/web" in k), None)
        return {**web, "selections": balancer.get("selections") or {}, "kernel": web_kernel}

    async def kernel_connections(self) -> dict[str, int]:
        """New connections node-1's kernel DNATed to each endpoint IP (its RAPPROXY-SEP rules'
        packet counters: nat sees only a connection's first packet). Counters restart when
        rapproxy rewrites an endpoint chain (a periodic full resync, an endpoint change)."""
        node1 = self.require_edge().node("node-1")
        saved = await node1.namespace.exec(["iptables-save", "-c", "-t", "nat"])
        counts: dict[str, int] = {}
        for line in saved.stdout.splitlines():
            if not line.startswith("[") or "-A RAPPROXY-SEP-" not in line or "DNAT" not in line:
                continue
            packets = int(line[1:].split(":", 1)[0])
            destination = line.rsplit("--to-destination ", 1)[-1].split()[0]
            ip = destination.rsplit(":", 1)[0]
            counts[ip] = counts.get(ip, 0) + packets
        return counts

    # -- overload and failure -------------------------------------------------------------------

    async def overload_node1(self, within: float = 20.0) -> str:
        """Make node-1 overloaded; returns how, for the report."""
        return await self.overload_node("node-1", within)

    async def relieve_node1(self, within: float = 20.0) -> None:
        await self.relieve_node("node-1", within)

    async def overload_node(self, node: str, within: float = 20.0) -> str:
        """Make `node` overloaded (capacity cut, a CPU-bound neighbour); returns how."""
        if self.injected_load:
            self.write_injected_load(node, 0.95)
            how = "injected load figure 0.95 (no cgroups on this host: CPU not really capped)"
        else:
            edge = self.require_edge()
            edge.node(node).set_cpu_limit(OVERLOADED_CPUS)
            api = self.require_api()
            api.registry.create(PODS, "default", hog_manifest(node))
            how = (
                f"{node} capped to {OVERLOADED_CPUS:g} CPU and a CPU-bound neighbour pod "
                f"started there (real CPU contention, measured from {node}'s cgroup)"
            )
        await until(lambda: self.node_load(node) > 0.85, within, f"{node}'s load above 0.85")
        await self.until_node1_sees(node, overloaded=True, within=within)
        return how

    async def relieve_node(self, node: str, within: float = 20.0) -> None:
        if self.injected_load:
            self.write_injected_load(node, 0.1)
        else:
            api = self.require_api()
            with contextlib.suppress(Exception):
                api.registry.delete(PODS, "default", HOG_POD, DeleteOptions(grace_period_seconds=1))
            await until(
                lambda: api.store.get(PODS, "default", HOG_POD) is None, within, "hog pod gone"
            )
            self.require_edge().node(node).set_cpu_limit(self.options.node_cpus)
        await until(lambda: self.node_load(node) < 0.5, within, f"{node}'s load below 0.5")
        await self.until_node1_sees(node, overloaded=False, within=within)

    async def until_node1_sees(self, node: str, overloaded: bool, within: float) -> None:
        """Until node-1's rapproxy, through its own telemetry, judges `node` (not) overloaded.

        The load file is read once per telemetry interval and the verdict has hysteresis, so
        the figure crossing the threshold is not yet the daemon acting on it. For node-1
        itself it also waits for the gradual local share of `rap-aimd` (shared by every
        service on the node) to have moved: most new connections sent away when overloaded,
        the whole share taken back when healthy, so that variant is measured settled.
        """
        node1 = self.require_edge().node("node-1")
        deadline = time.monotonic() + within
        while True:
            state = await node1.call(debug_state, "http://127.0.0.1:10249/debug/state")
            telemetry = (state.get("rap") or {}).get("telemetry") or {}
            verdict = ((telemetry.get("nodes") or {}).get(node) or {}).get("overloaded")
            share = telemetry.get("local_share")
            if not isinstance(share, int | float):
                share = -1.0
            settled = node != "node-1" or (0 <= share <= 0.25 if overloaded else share == 1.0)
            if verdict is overloaded and settled:
                return
            if time.monotonic() > deadline:
                state_name = "overloaded" if overloaded else "healthy"
                raise DemoSetupError(
                    f"node-1's rapproxy did not see {node} {state_name} in {within:g} s"
                )
            await asyncio.sleep(0.1)

    def pod_process(self, pod: JsonObject) -> int:
        """PID of the pod's main container process, from its node's runtime."""
        node = pod["spec"]["nodeName"]
        uid = pod["metadata"]["uid"]
        for handle in self.require_edge().runtime_for(node).pods:
            if isinstance(handle, ProcessPodHandle) and handle.uid == uid:
                process = handle.processes.get("web")
                if process is not None and process.returncode is None:
                    return process.pid
        raise DemoSetupError(f"pod {pod['metadata']['name']}: no running process on {node}")

    # -- access -----------------------------------------------------------------------------------

    def require_edge(self) -> EdgeCluster:
        if self.edge is None:
            raise DemoSetupError("the edge cluster is not built")
        return self.edge

    def require_api(self) -> EmulatedApiServer:
        if self.api is None:
            raise DemoSetupError("the API server is not running")
        return self.api


def find_balancer(state: Any) -> JsonObject | None:
    """The balancer section of `/debug/state`, wherever the daemon nests it."""
    if isinstance(state, dict):
        if "services" in state and "selections" in state:
            return state
        for value in state.values():
            found = find_balancer(value)
            if found is not None:
                return found
    return None


def pod_ready(pod: JsonObject) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def service_manifest(policy: str) -> JsonObject:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "web",
            "namespace": "default",
            "annotations": {ANNOTATION_LB_POLICY: policy},
        },
        "spec": {
            "clusterIP": CLUSTER_IP,
            "selector": {LABEL_BPS: BPS_NAME, LABEL_ROLE: Role.PRIMARY.value},
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def bps_manifest(work_ms: float) -> JsonObject:
    """Three primaries (one per node when spread allows), one hot and one cold backup.

    `restartPolicy: Never`: a killed backend process fails its pod, which is what the
    BackupPodSet fails over from (with `Always` the kubelet would restart it in place).
    """
    backend = {
        "name": "web",
        "image": "rapproxy/backend:demo",  # no images here: the command runs on the host
        "command": [sys.executable, "-m", "rapproxy.testing.backend"],
        "args": [
            "--name",
            "$(POD_NAME)",
            "--http",
            "$(POD_IP):8080",
            "--work-ms",
            f"{work_ms:g}",
        ],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    }
    return {
        "apiVersion": "rapproxy.io/v1alpha1",
        "kind": "BackupPodSet",
        "metadata": {"name": BPS_NAME, "namespace": "default"},
        "spec": {
            "replicas": 3,
            "hotBackups": 1,
            "coldBackups": 1,
            "activation": {"port": 9901, "timeoutSeconds": 5},
            "placement": {"spreadRoles": True},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"restartPolicy": "Never", "containers": [backend]},
            },
        },
    }


def hog_manifest(node: str) -> JsonObject:
    """A CPU-bound pod pinned to `node`: the noisy neighbour that overloads it."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": HOG_POD, "namespace": "default", "labels": {"app": "hog"}},
        "spec": {
            "nodeName": node,
            "containers": [
                {
                    "name": "hog",
                    "image": "busybox",
                    "command": [sys.executable, "-c", "while True: pass"],
                }
            ],
        },
    }
