"""The emulated edge cluster: nodes far apart on a WAN, each with its own CPU capacity.

`EdgeCluster` builds, as one async context manager, everything the demo and the benchmarks run
on, and removes all of it on exit, also when building or the body fails midway:

* `node-1` … `node-N`, each a network namespace linked to the WAN router (`wan.py`) with
  address 10.10.i.2 (its `ip`, the node's InternalIP), pod CIDR 10.244.i.0/24 routed to it, and
  its own cgroup with an optional CPU cap (`cgroups.py`);
* optional `client-k` namespaces on the same WAN (10.10.(100+k).2), for load generators that
  stand outside every node;
* the one-way delay between any two sites (`DelayMatrix`), and per-site link bandwidth,
  both changeable while the cluster runs;
* a pod runtime per node (`runtime.py`) for the emulated kubelet, and the node addressing it
  needs (`kubelet_configs`).

Inside a node, ClusterIPs get `ip route add local <service CIDR> dev lo` (connect() to a ClusterIP
must reach the nat OUTPUT chain instead of failing with "Network is unreachable"), or, with
`service_route="uplink"`, a route via the node's WAN gateway — what an iptables-mode kube-proxy
baseline needs to DNAT to a remote pod (references: facts seen on these machines). A node's own
pod CIDR is `unreachable` except the live pods' addresses, so a deleted pod's IP fails fast.

The router's 10.10.0.1 (`CONTROL_IP`) is reachable from every site without WAN delay: serve
control-plane things there, e.g. the emulated API server with `socket_factory=cluster.router_socket`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from rapproxy.testing.apiserver.controlplane import KubeletConfig
from rapproxy.testing.edge.cgroups import (
    CgroupUnavailable,
    EdgeCgroups,
    NodeCgroup,
    NodeProbe,
    detect_layout,
    launch_argv,
)
from rapproxy.testing.edge.delays import DelayMatrix
from rapproxy.testing.edge.runtime import ProcessRuntime
from rapproxy.testing.edge.wan import CONTROL_IP, Wan, WanLink
from rapproxy.testing.netns import Namespace

log = logging.getLogger(__name__)

SERVICE_CIDR = "10.96.0.0/16"
CLIENT_INDEX_BASE = 100
_TERM_GRACE_SECONDS = 2.0


class EdgeClusterError(RuntimeError):
    """The cluster cannot be built as asked; the message names the setting."""


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node to build: its name, CPU cap in cores (None: uncapped) and link bandwidth."""

    name: str
    cpus: float | None = None
    bandwidth_mbit: float | None = None
    zone: str | None = None
    labels: Mapping[str, str] | None = None


class Site:
    """A namespace on the WAN (a node or a client)."""

    def __init__(self, name: str, index: int, namespace: Namespace, link: WanLink) -> None:
        self.name = name
        self.index = index
        self.namespace = namespace
        self.link = link
        self._processes: list[asyncio.subprocess.Process] = []

    @property
    def ip(self) -> str:
        """The site's WAN address (10.10.i.2)."""
        return self.link.site_ip

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket living in this site's namespace, usable from this process's event loop."""
        return self.namespace.socket(family, type)

    async def call(self, function: Any, *args: Any) -> Any:
        """Run a module-level function inside the site (see `Namespace.call`)."""
        return await self.namespace.call(function, *args)

    def _launch(self, argv: Sequence[str]) -> list[str]:
        return ["nsenter", f"--net={self.namespace.path}", "--", *argv]

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
        """Start `argv` inside the site (and, for a node, inside its cgroup); killed on exit.

        Entered with `nsenter --net`, not `ip netns exec`: /sys (so /sys/fs/cgroup) stays the
        host's, and /sys/class/net is the host's view too; use netlink (`ip`) for interfaces.
        """
        process = await asyncio.create_subprocess_exec(
            *self._launch(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=start_new_session,
        )
        self._processes = [p for p in self._processes if p.returncode is None]
        self._processes.append(process)
        return process

    async def _stop_processes(self) -> None:
        live = [p for p in self._processes if p.returncode is None]
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        if live:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(p.wait() for p in live)), _TERM_GRACE_SECONDS
                )
        for process in live:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), _TERM_GRACE_SECONDS)


class EdgeClient(Site):
    """A load-generator namespace on the WAN, outside every node."""


class EdgeNode(Site):
    """One emulated node: namespace, WAN link, pod CIDR, cgroup (None when unavailable)."""

    def __init__(
        self,
        spec: NodeSpec,
        index: int,
        *,
        namespace: Namespace,
        link: WanLink,
        cgroup: NodeCgroup | None,
        pod_cidr: str,
    ) -> None:
        super().__init__(spec.name, index, namespace, link)
        self.spec = spec
        self.cgroup = cgroup
        self.pod_cidr = pod_cidr

    def _launch(self, argv: Sequence[str]) -> list[str]:
        if self.cgroup is None:
            return super()._launch(argv)
        return launch_argv(self.cgroup.procs_files, self.namespace.path, argv)

    async def add_pod_address(self, ip: str) -> None:
        await self.namespace.add_address("lo", f"{ip}/32")

    async def remove_pod_address(self, ip: str) -> None:
        await self.namespace.exec(["ip", "addr", "del", f"{ip}/32", "dev", "lo"], check=False)

    def set_cpu_limit(self, cpus: float | None) -> None:
        """Cap the node at `cpus` cores now (None lifts the cap)."""
        if self.cgroup is None:
            raise CgroupUnavailable(f"{self.name}: no cgroup on this host, cannot cap its CPU")
        self.cgroup.set_cpu_limit(cpus)

    def probe(self, memory_capacity_bytes: int | None = None) -> NodeProbe:
        """The node's CPU/memory utilization `Probe` for telemetry."""
        if self.cgroup is None:
            raise CgroupUnavailable(f"{self.name}: no cgroup on this host to measure")
        return NodeProbe(self.cgroup, memory_capacity_bytes)

    def kubelet_config(self, heartbeat_interval: float = 10.0) -> KubeletConfig:
        """Addressing for the emulated kubelet: pod CIDR, InternalIP, zone and labels."""
        return KubeletConfig(
            node_name=self.name,
            pod_cidr=self.pod_cidr,
            node_ip=self.ip,
            zone=self.spec.zone or f"zone-{self.name}",
            labels=dict(self.spec.labels or {}),
            heartbeat_interval=heartbeat_interval,
        )


class EdgeCluster:
    """N nodes (and optional clients) on an emulated WAN; `async with EdgeCluster(...) as c:`.

    `nodes` is a count (node-1..N, uncapped) or a list of names / `NodeSpec`s. With
    `require_cgroups=False` (the default) a host without usable cgroups still gets a cluster,
    without CPU caps, and `cgroups_unavailable` says why; asking for a cap there raises.
    `probe_period` replaces every readiness probe's periodSeconds (whole seconds, 10 by default,
    in Kubernetes) so experiments see readiness changes quickly; None honours the pod specs.
    `bias_ms` fixes the WAN forwarder's early-release bias instead of letting it track its own
    wake-up lateness.
    """

    def __init__(
        self,
        nodes: int | Sequence[str | NodeSpec] = 3,
        *,
        delays: DelayMatrix | None = None,
        clients: int = 0,
        service_cidr: str = SERVICE_CIDR,
        service_route: str = "local",
        require_cgroups: bool = False,
        bias_ms: float | None = None,
        probe_period: float | None = 1.0,
        workdir: Path | None = None,
    ) -> None:
        specs = (
            [NodeSpec(f"node-{i}") for i in range(1, nodes + 1)]
            if isinstance(nodes, int)
            else [n if isinstance(n, NodeSpec) else NodeSpec(n) for n in nodes]
        )
        if not 1 <= len(specs) < CLIENT_INDEX_BASE:
            raise EdgeClusterError(f"nodes: {len(specs)} nodes; 1..{CLIENT_INDEX_BASE - 1} fit")
        if len({s.name for s in specs}) != len(specs):
            raise EdgeClusterError(f"nodes: duplicate names in {[s.name for s in specs]}")
        if service_route not in ("local", "uplink"):
            raise EdgeClusterError(f"service_route: {service_route!r} is not local or uplink")
        ipaddress.ip_network(service_cidr)
        self.specs = specs
        self.initial_delays = delays or DelayMatrix()
        self.client_count = clients
        self.service_cidr = service_cidr
        self.service_route = service_route
        self.require_cgroups = require_cgroups
        self.bias_ms = bias_ms
        self.probe_period = probe_period
        self._given_workdir = workdir
        self.workdir = Path()
        self.nodes: list[EdgeNode] = []
        self.clients: list[EdgeClient] = []
        self.cgroups: EdgeCgroups | None = None
        self.cgroups_unavailable: str | None = None
        self.wan: Wan | None = None
        self._runtimes: dict[str, ProcessRuntime] = {}
        self._load_files: dict[str, tuple[NodeProbe, Path]] = {}
        self._load_feeder: asyncio.Task[None] | None = None
        self.load_interval = 0.5
        self._namespaces: list[Namespace] = []
        self.control_ip = CONTROL_IP

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> EdgeCluster:
        try:
            await self._build()
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

    async def _build(self) -> None:
        self.workdir = self._given_workdir or Path(tempfile.mkdtemp(prefix="rapproxy-edge-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.cgroups = EdgeCgroups.create(detect_layout())
        except CgroupUnavailable as error:
            if self.require_cgroups or any(s.cpus is not None for s in self.specs):
                raise
            self.cgroups_unavailable = str(error)
            log.warning("edge cluster without CPU caps: %s", error)
        self.wan = await Wan.create(self.workdir, bias_ms=self.bias_ms)
        for index, spec in enumerate(self.specs, start=1):
            self.nodes.append(await self._build_node(spec, index))
        for k in range(1, self.client_count + 1):
            namespace = await self._namespace(f"client-{k}")
            link = await self.wan.attach(f"client-{k}", namespace, CLIENT_INDEX_BASE + k)
            self.clients.append(EdgeClient(f"client-{k}", CLIENT_INDEX_BASE + k, namespace, link))
        await self.wan.set_delays(self.initial_delays)

    async def _namespace(self, tag: str) -> Namespace:
        namespace = await Namespace.create(tag)
        self._namespaces.append(namespace)
        return namespace

    async def _build_node(self, spec: NodeSpec, index: int) -> EdgeNode:
        assert self.wan is not None
        namespace = await self._namespace(spec.name)
        pod_cidr = f"10.244.{index}.0/24"
        link = await self.wan.attach(
            spec.name, namespace, index, prefixes=(pod_cidr,), bandwidth_mbit=spec.bandwidth_mbit
        )
        await namespace.exec(["ip", "route", "add", "unreachable", pod_cidr])
        if self.service_route == "local":
            await namespace.add_local_route(self.service_cidr)
        else:
            await namespace.add_route(self.service_cidr, via=link.router_ip)
        cgroup = self.cgroups.node(spec.name) if self.cgroups is not None else None
        if cgroup is not None and spec.cpus is not None:
            cgroup.set_cpu_limit(spec.cpus)
        return EdgeNode(
            spec, index, namespace=namespace, link=link, cgroup=cgroup, pod_cidr=pod_cidr
        )

    async def aclose(self) -> None:
        """Tear everything down: pods, processes, cgroups, namespaces, the WAN, the workdir.

        Every step runs even if an earlier one fails; the first error is raised at the end.
        """
        errors: list[BaseException] = []

        async def step(action: Any) -> None:
            try:
                result = action()
                if asyncio.iscoroutine(result):
                    await result
            except Exception as error:
                log.exception("edge cluster teardown step failed")
                errors.append(error)

        if self._load_feeder is not None:
            self._load_feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._load_feeder
            self._load_feeder = None
        for runtime in list(self._runtimes.values()):
            await step(runtime.aclose)
        self._runtimes.clear()
        for site in [*self.nodes, *self.clients]:
            await step(site._stop_processes)
        if self.cgroups is not None:
            await step(self.cgroups.remove)
        for namespace in reversed(self._namespaces):
            await step(namespace.aclose)
        self._namespaces.clear()
        if self.wan is not None:
            await step(self.wan.aclose)
        if self._given_workdir is None and self.workdir != Path():
            await step(lambda: shutil.rmtree(self.workdir, ignore_errors=True))
        if errors:
            raise errors[0]

    # -- access -------------------------------------------------------------------------------

    def node(self, name: str) -> EdgeNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r} (have {[n.name for n in self.nodes]})")

    def site(self, name: str) -> Site:
        for site in [*self.nodes, *self.clients]:
            if site.name == name:
                return site
        raise KeyError(f"no site {name!r}")

    @property
    def site_names(self) -> list[str]:
        return [site.name for site in [*self.nodes, *self.clients]]

    def router_socket(
        self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM
    ) -> socket.socket:
        """A socket in the router namespace: bind it to `control_ip` to serve every site."""
        assert self.wan is not None
        return self.wan.router.socket(family, type)

    # -- knobs --------------------------------------------------------------------------------

    async def set_delays(self, delays: DelayMatrix) -> None:
        """Replace every one-way delay (pairs not listed: none); applies to the next packet."""
        assert self.wan is not None
        await self.wan.set_delays(delays)

    async def set_delay(
        self, source: str, destination: str, one_way_ms: float, *, both_ways: bool = True
    ) -> None:
        """Change one pair's one-way delay (both directions unless told), keeping the others."""
        pairs = {(source, destination): one_way_ms}
        if both_ways:
            pairs[(destination, source)] = one_way_ms
        await self.set_delays(self.delays.merged(DelayMatrix(pairs)))

    @property
    def delays(self) -> DelayMatrix:
        assert self.wan is not None
        return self.wan.config.delays

    async def set_bandwidth(self, site: str, mbit: float | None) -> None:
        """Shape `site`'s WAN link (both directions) to `mbit` Mbit/s; None lifts it."""
        assert self.wan is not None
        await self.wan.set_bandwidth(site, self.site(site).namespace, mbit)

    async def wan_stats(self) -> dict[str, Any]:
        assert self.wan is not None
        return await self.wan.stats()

    # -- the emulated kubelet --------------------------------------------------------------------

    def kubelet_configs(self, heartbeat_interval: float = 10.0) -> list[KubeletConfig]:
        return [node.kubelet_config(heartbeat_interval) for node in self.nodes]

    def runtime_for(self, node_name: str) -> ProcessRuntime:
        """The pod runtime of `node_name` (one per node, stopped with the cluster)."""
        if node_name not in self._runtimes:
            self._runtimes[node_name] = ProcessRuntime(
                self.node(node_name),
                log_dir=self.workdir / "logs" / node_name,
                probe_period=self.probe_period,
            )
        return self._runtimes[node_name]

    def load_source(self, node_name: str) -> str:
        """A `rap.loadSource` for a rapproxy on `node_name`: `file:PATH` of a JSON figure.

        The cluster rewrites the file every `load_interval` seconds from the node's `NodeProbe`
        (CPU relative to the node's own cap). A daemon could read the node's cgroup itself
        (`cgroup:PATH`), but on a hybrid host the quota lives in the v1 tree, which
        `CgroupV2Probe` does not see, so it would divide by the host's CPUs instead.
        """
        if node_name not in self._load_files:
            path = self.workdir / "load" / f"{node_name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            probe = self.node(node_name).probe()
            self._load_files[node_name] = (probe, path)
            _write_load(probe, path)
        if self._load_feeder is None:
            self._load_feeder = asyncio.get_running_loop().create_task(
                self._feed_loads(), name="edge-load-files"
            )
        return f"file:{self._load_files[node_name][1]}"

    async def _feed_loads(self) -> None:
        while True:
            await asyncio.sleep(self.load_interval)  # the figure's refresh period
            for probe, path in list(self._load_files.values()):
                try:
                    _write_load(probe, path)
                except OSError as error:
                    log.warning("load file %s: %s", path, error)

    # -- checks ----------------------------------------------------------------------------------

    def leftovers(self) -> list[str]:
        """What of this cluster still exists (namespaces, cgroups, workdir); [] after exit."""
        left = [ns.name for ns in self._all_namespaces() if Path(ns.path).exists()]
        if self.cgroups is not None:
            left += [str(path) for path in self.cgroups.paths() if path.exists()]
        if self._given_workdir is None and self.workdir != Path() and self.workdir.exists():
            left.append(str(self.workdir))
        return left

    def _all_namespaces(self) -> list[Namespace]:
        sites = [site.namespace for site in [*self.nodes, *self.clients]]
        return sites + ([self.wan.router] if self.wan is not None else [])


def _write_load(probe: NodeProbe, path: Path) -> None:
    # Write-then-rename: the daemon's FileProbe must never read half a document.
    figures = probe.read()
    partial = path.with_suffix(".tmp")
    partial.write_text(
        json.dumps({"cpu": round(figures.cpu, 4), "memory": round(figures.memory, 4)})
    )
    os.replace(partial, path)
