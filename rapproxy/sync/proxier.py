"""The Proxier: one node's data plane, brought in line with the desired state by one sync.

kube-proxy's shape, in one place:

    informer handlers → ChangeTracker (record only)
                          ↓ request()
                     BoundedRunner (coalesce, min/max interval, retry)
                          ↓ sync()
    snapshot → Balancer.update → UDP sockets reconciled → iptables chains rewritten → stale UDP
    conntrack entries deleted → health and metrics updated

The sync is a full, idempotent render of the desired state, so a periodic resync repairs anything
that drifted (a rule deleted by hand, a crashed predecessor's leftovers). Rules are rewritten only
when the set of redirects changed, or on the periodic resync (which also repairs the jumps from
the built-in chains); endpoint-only changes touch memory only, which is what makes them fast.
Within a sync, the in-memory state (routes, backends, redirect targets, the Balancer, the table
itself) is updated only for the service ports the tracker reports as changed, so an endpoint
change in a 10k-Service cluster costs what one service costs, not what the cluster costs
(measured in `benchmarks/scale/`) — on the periodic full resync too, which re-renders and
rewrites every rule (in a worker thread and a subprocess, off the event loop) but leaves memory
alone.

Writing 10k rules takes a second or two, and the runner never runs two syncs at once, so a change
recorded meanwhile would wait for the write. It does not: while the rules are being written the
sync applies every newly recorded change to memory at once (`_absorb`), which is all an endpoint
change needs. What a change needs beyond memory — a rule for a new or changed service port, a
UDP socket — is done by the next sync, which the runner was asked for when the change was
recorded; programming latency and /healthz staleness count until then.

Kernel-mode Services (`dataplane.mode`, annotation `rapproxy.io/dataplane`) are forwarded by
DNAT rules instead of the relay (rules/kernel.py). Their rules name their endpoints, so for them
an endpoint change is a rules change; their probabilities are RAP's weights
(balancer/kernel_weights.py), recomputed every `dataplane.weightPeriod` by `refresh_weights`
once per node layout, which rewrites only what moved by more than `dataplane.weightThreshold`:
with nftables the layout's shared node split (one chain however many Services share it,
rules/nftables.py), otherwise the weighted chains of the Services whose weights moved, in one
transaction. Every rules write (sync or weights) holds
`_rules_lock`, so the two never interleave and the kernel always holds what was last written.
A kernel Service's UDP socket and the TCP listener stay: they are its fallback when a traffic
policy leaves it no endpoint, and what makes a switch back to userspace mode instant.

The Proxier is also the relay's `BackendSelector`: the relay asks it, per new connection, which
service an intercepted destination is and which backend to dial — answered from the in-memory
snapshot and the Balancer, never from the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rapproxy.balancer.balancer import Balancer, ChoiceTally, PolicyFactory
from rapproxy.balancer.categorize import Locality, categorize
from rapproxy.balancer.kernel_weights import (
    SAMPLE_BLEND,
    KernelWeights,
    Layout,
    blend,
    kernel_weights,
    layout_of,
    node_slots,
    observed_split,
    relabel,
    shares_moved,
    slot_shares,
    slot_shares_moved,
    split_weights,
    uniform_weights,
    weights_moved,
)
from rapproxy.balancer.signals import EndpointSignals
from rapproxy.config import RapproxyConfiguration, RelayEngine, parse_port_range
from rapproxy.dataplane.handover import listener_name
from rapproxy.dataplane.native import NativeTcpRelayServer
from rapproxy.dataplane.routing import Backend
from rapproxy.dataplane.stats import RelayStats, RelayStatsSnapshot, merge_snapshots
from rapproxy.dataplane.tcp import TcpRelayServer, TcpRelaySettings
from rapproxy.dataplane.udp import UdpRelaySettings, UdpServicePort
from rapproxy.http.health import HealthState
from rapproxy.http.metrics import ProxyMetrics
from rapproxy.model.endpoints import Endpoint
from rapproxy.model.service import (
    DataplaneMode,
    L4Protocol,
    LbPolicy,
    ServicePort,
    ServicePortName,
)
from rapproxy.model.table import Destination, ServiceEntry, ServiceTable
from rapproxy.model.telemetry import RapSettings, TelemetryView
from rapproxy.rules.apply import IptablesRunner
from rapproxy.rules.conntrack import delete_udp_entries
from rapproxy.rules.kernel import (
    KernelConfig,
    KernelRenderError,
    KernelTarget,
    NodeSplit,
    SplitRef,
    WeightedEndpoint,
    layout_hash,
    split_shares,
)
from rapproxy.rules.nft_apply import NftRunner
from rapproxy.rules.render import RedirectTarget, RuleConfig
from rapproxy.sync.tracker import ChangeTracker, TableChange

log = logging.getLogger(__name__)

EXTERNAL_SUFFIX = " (external)"
_RAP_POLICIES = (LbPolicy.RAP, LbPolicy.RAP_AIMD, LbPolicy.RAP_SWITCH)
_SAMPLED = "sampled: the proxy's rap decisions on a sample of connections"
# nftables backend: service ports per weight transaction. The rules lock is released between
# two, so an endpoint change waits for one batch (~0.2 s of nft at 10k Services), not for all.
NFT_WEIGHT_BATCH = 500


class KernelWriteError(RuntimeError):
    """Some kernel-mode service ports could not be written; the others were. Names each."""


class PortRangeExhausted(RuntimeError):
    """Every port of proxy.udpPortRange is taken; the message names the service port."""


# What a kernel Service's weights depend on besides telemetry: its policy, the node of each
# cluster-wide candidate, and whether it may be sampled (no ClientIP affinity).
KernelLayout = tuple[LbPolicy, Layout, bool]


def _split_key(layout: KernelLayout) -> str:
    policy, nodes, sampleable = layout
    return layout_hash((policy.value, int(sampleable), *nodes))


@dataclass(frozen=True, slots=True)
class _KernelCandidates:
    """A kernel-mode entry's categorized endpoints and its weight layout (policy, nodes)."""

    entry: ServiceEntry
    cluster: tuple[Endpoint, ...]
    local: tuple[Endpoint, ...]
    layout: KernelLayout


@dataclass(frozen=True, slots=True)
class _RouteKey:
    destination: Destination
    key: str


class UdpPortAllocator:
    """Stable ports for UDP service ports: a service keeps its port across syncs."""

    def __init__(self, ports: range) -> None:
        self._ports = ports
        self._by_name: dict[ServicePortName, int] = {}

    def get(self, name: ServicePortName) -> int | None:
        return self._by_name.get(name)

    def allocate(self, name: ServicePortName, skip: set[int] = frozenset()) -> int:  # type: ignore[assignment]
        taken = set(self._by_name.values()) | skip
        for port in self._ports:
            if port not in taken:
                self._by_name[name] = port
                return port
        raise PortRangeExhausted(
            f"{name}: no free port left in {self._ports.start}-{self._ports.stop - 1}"
        )

    def adopt(self, name: ServicePortName, port: int) -> bool:
        """Give `name` this port (a predecessor's socket's); False when out of range or taken."""
        if port not in self._ports or port in self._by_name.values():
            return False
        self._by_name[name] = port
        return True

    def release(self, name: ServicePortName) -> None:
        self._by_name.pop(name, None)


def udp_socket_name(name: ServicePortName) -> str:
    """The handover name of a UDP service port's socket."""
    return f"udp {name}"


class Proxier:
    def __init__(
        self,
        config: RapproxyConfiguration,
        node_name: str,
        *,
        iptables: Sequence[IptablesRunner] = (),
        nftables: Sequence[NftRunner] = (),
        policy_factory: PolicyFactory | None = None,
        metrics: ProxyMetrics | None = None,
        zone: str | None = None,
        netns: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        telemetry: Callable[[], TelemetryView] | None = None,
        rap_settings: RapSettings | None = None,
        udp: bool = True,
    ) -> None:
        self.config = config
        self.node_name = node_name
        self._clock = clock
        self._wall_clock = wall_clock
        self._netns = netns
        self._telemetry = telemetry
        self._rap_settings = rap_settings or RapSettings()
        self._locality = Locality(node_name, zone)
        self.tracker = ChangeTracker(config.service_proxy_name, clock=wall_clock)
        self.balancer = Balancer(
            Locality(node_name, zone),
            default_policy=config.proxy.lb_policy,
            policy_factory=policy_factory,
            signals=EndpointSignals(
                rise=config.rap.latency_rise,
                fall=config.rap.latency_fall,
                hold=config.rap.signal_hold,
            ),
        )
        self.stats = RelayStats()
        self.metrics = metrics or ProxyMetrics()
        # Other processes relaying for this node (workers): their latest counters, summed in.
        self.other_stats: Callable[[], Sequence[RelayStatsSnapshot]] = tuple
        self.other_selections: Callable[[], Sequence[Mapping[str, int]]] = tuple
        self.metrics.watch_live(self.node_stats, self._selection_counts)
        self.metrics.watch_kernel(self._kernel_weight_rows)
        self.health = HealthState(sync_period=config.iptables.sync_period)
        self.iptables = list(iptables)
        # Kernel mode's nft tables (dataplane.kernelBackend: nftables); empty: kernel mode
        # rides in the iptables transactions.
        self.nftables = list(nftables)
        dataplane = config.dataplane
        self.rule_config = RuleConfig(
            node_port_cidrs=config.iptables.node_port_addresses,
            kernel=KernelConfig(
                masquerade_all=dataplane.masquerade_all,
                cluster_cidrs=dataplane.cluster_cidrs,
                masquerade_bit=dataplane.masquerade_bit,
                node_mark_mask=dataplane.node_mark_mask,
            ),
        )
        proxy = config.proxy
        relay_server = (
            NativeTcpRelayServer if proxy.relay_engine is RelayEngine.NATIVE else TcpRelayServer
        )
        self.tcp: TcpRelayServer | NativeTcpRelayServer = relay_server(
            self,
            settings=TcpRelaySettings(
                dial_timeouts=proxy.dial_timeouts,
                idle_timeout=proxy.idle_timeout,
                max_connections=proxy.max_connections,
                # The fallback when no predecessor hands its listener over (see handover): a
                # successor can still bind beside a running instance.
                reuse_port=True,
            ),
            stats=self.stats,
        )
        self._udp_settings = UdpRelaySettings(
            idle_timeout=proxy.udp_idle_timeout, max_flows=proxy.max_udp_flows
        )
        self._serve_udp = udp  # False in a worker: UDP service sockets live in the main process
        self.udp: dict[ServicePortName, UdpServicePort] = {}
        self._inherited_udp: dict[str, socket.socket] = {}
        self._udp_ports = UdpPortAllocator(
            parse_port_range(proxy.udp_port_range, "proxy.udpPortRange")
        )
        # Derived from the table, kept up to date per changed service port (`_derive`):
        self._derived_table = ServiceTable()
        self._routes: dict[str, Destination] = {}
        self._route_keys: dict[tuple[ServicePortName, bool], str] = {}
        self._backends: dict[tuple[str, int], Backend] = {}
        self._backend_refs: Counter[tuple[str, int]] = Counter()
        self._udp_wanted: dict[ServicePortName, ServicePort] = {}
        self._port_counts: Counter[L4Protocol] = Counter()
        self._targets: dict[ServicePortName, RedirectTarget] = {}  # desired redirects
        self._applied_targets: dict[ServicePortName, RedirectTarget] | None = None  # in the kernel
        # Kernel mode: the entries of kernel-mode service ports, their desired and written rules,
        # the weights in force and when they last changed (wall clock).
        self._kernel_wanted: dict[ServicePortName, ServiceEntry] = {}
        self._kernel: dict[ServicePortName, KernelTarget] = {}
        self._applied_kernel: dict[ServicePortName, KernelTarget] | None = None
        # nftables: the kernel-mode service ports set or removed since the last write, and
        # those nft refused then; a sync compares only these (`NftRunner.sync`'s `only`).
        self._kernel_changed: set[ServicePortName] = set()
        self._nft_retry: set[ServicePortName] = set()
        self._nft_written_only: set[ServicePortName] | None = None  # the last write's `only`
        self._weights: dict[ServicePortName, KernelWeights] = {}
        # The layout-wide weights each Service's were relabelled from (`refresh_weights`
        # judges a layout's move once per basis), and each entry's categorized candidates.
        self._weight_basis: dict[ServicePortName, KernelWeights] = {}
        self._kernel_candidates: dict[ServicePortName, _KernelCandidates] = {}
        self._weights_changed_at: dict[ServicePortName, float] = {}
        # Services whose weights follow the proxy's decisions on a sample of their connections
        # (while this node is overloaded): the smoothed split per node, per layout.
        self._sampled_split: dict[KernelLayout, dict[str | None, float]] = {}
        self._sample_unobserved: set[KernelLayout] = set()  # still on the starting split
        # Per layout: the weights last computed (positional) and, with nftables, the node
        # split its Services share (rules/kernel.py's NodeSplit) and when it last changed.
        self._layout_weights: dict[KernelLayout, KernelWeights] = {}
        self._splits: dict[KernelLayout, NodeSplit] = {}
        self._split_changed_at: dict[str, float] = {}
        # Per layout: its kernel-mode service ports (kept by `_candidates`), and while it
        # samples, the tally their choices are counted into.
        self._layout_members: dict[KernelLayout, dict[ServicePortName, None]] = {}
        self._layout_tallies: dict[KernelLayout, ChoiceTally] = {}
        self._rules_lock = asyncio.Lock()
        self._weights_due = asyncio.Event()  # set by `telemetry_changed`
        # Asked for when a weight change cannot be written alone (its endpoints changed too).
        self.request_sync: Callable[[], None] | None = None
        self._last_full_sync = -float("inf")
        self._change_noted = asyncio.Event()  # set by note_change; wakes `_absorb` mid-write
        # When the oldest change applied to memory mid-write, but not yet to rules or UDP
        # sockets, was recorded (wall clock); the next sync finishes it.
        self._unfinished_since: float | None = None
        self.last_sync_error: str | None = None
        self.extra_state: dict[str, Callable[[float], Any]] = {}

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(
        self,
        listen: Sequence[tuple[str, int]] | None = None,
        *,
        inherited: Mapping[tuple[str, int], socket.socket] | None = None,
        inherited_udp: Mapping[str, socket.socket] | None = None,
        accept: bool = True,
    ) -> None:
        """Open the TCP listener. `inherited` holds the listening sockets a predecessor handed
        over, `inherited_udp` its UDP service sockets by `udp_socket_name`: the first sync serves
        each on its old port (the rules stay the same) and closes those no longer wanted.
        `accept=False`: accept no TCP connection before `tcp.start_accepting()`."""
        if listen is None:
            listen = [(self.config.proxy.listen_address, self.config.proxy.tcp_port)]
        self._inherited_udp = dict(inherited_udp or {})
        await self.tcp.start(listen, inherited=inherited, accept=accept)

    def listening_descriptors(self) -> dict[str, int]:
        """Every socket a successor should take over, by handover name, while serving."""
        offered = {
            listener_name("tcp", host, port): fd
            for (host, port), fd in self.tcp.listening_descriptors().items()
        }
        for name, relay in self.udp.items():
            fd = relay.socket_descriptor()
            if fd is not None:
                offered[udp_socket_name(name)] = fd
        return offered

    def stop_accepting(self) -> None:
        """Drain, step one: no new TCP connections nor UDP datagrams are read here; what is
        open keeps relaying. A successor sharing the sockets takes the new ones."""
        self.tcp.stop_accepting()
        for relay in self.udp.values():
            relay.stop_reading()

    async def aclose(self) -> None:
        await self.tcp.aclose()
        for port in self.udp.values():
            await port.aclose()
        self.udp.clear()
        self._close_inherited_udp()

    def _close_inherited_udp(self) -> None:
        for name, sock in self._inherited_udp.items():
            log.info("closing the handed-over UDP socket %s: no such service port here", name)
            sock.close()
        self._inherited_udp.clear()

    async def cleanup_rules(self) -> None:
        for runner in self.iptables:
            await runner.cleanup()
        for nft in self.nftables:
            await nft.cleanup()

    # -- the sync -----------------------------------------------------------------------------

    async def sync(self) -> None:
        """Bring rules and data plane in line with the recorded state; raises on failure."""
        try:
            await self._sync()
        except Exception as error:
            self.metrics.sync_failures.inc()
            self.last_sync_error = f"{type(error).__name__}: {error}"
            raise
        self.last_sync_error = None

    async def _sync(self) -> None:
        started = self._clock()
        queued_at = self.tracker.first_pending_at
        unfinished_since, self._unfinished_since = self._unfinished_since, None
        change = self.tracker.take_change()
        table = change.table
        full = started - self._last_full_sync >= self.config.iptables.sync_period
        self._apply_to_memory(change, forget_all_stale_stats=full)
        stale_udp = await self._reconcile_udp() if self._serve_udp else []
        self._refresh_udp_targets()
        failed: Mapping[ServicePortName, str] = {}
        async with self._rules_lock:
            previous_targets = self._applied_targets or {}
            previous_kernel = self._applied_kernel or {}
            if self.nftables:
                failed = await self._write_nftables(full, previous_kernel)
            changes = (
                None if full or not self.iptables or self.nftables else self._kernel_chain_changes()
            )
            if changes:
                try:
                    for runner in self.iptables:
                        await runner.update_kernel(changes, self.rule_config)
                except KernelRenderError as error:  # an entry rule changes: the full write
                    log.info("kernel chains alone cannot be rewritten (%s): writing all", error)
                else:
                    applied = dict(previous_kernel)
                    applied.update((wanted.service_port.name, wanted) for _, wanted in changes)
                    self._applied_kernel = applied
            if self.nftables:
                pass  # written above, redirects included
            elif self.iptables and (
                full
                or self._targets != self._applied_targets
                or self._kernel != self._applied_kernel
            ):
                written = dict(self._targets)
                written_kernel = dict(self._kernel)
                await self._write_rules_absorbing(written, written_kernel, repair_jumps=full)
                self._applied_targets = written
                self._applied_kernel = written_kernel
            elif not self.iptables:
                self._applied_targets = dict(self._targets)
                self._applied_kernel = dict(self._kernel)
            stale_udp.extend(
                _stale_kernel_udp(
                    previous_targets,
                    previous_kernel,
                    self._applied_kernel or {},
                    names=self._nft_written_only if self.nftables else None,
                )
            )
        if full:
            self._last_full_sync = started
        if self._serve_udp:
            for address, port in stale_udp:
                await self._forget_udp_flows(address, port)
        self.balancer.expire_affinity(started)
        now_wall = self._wall_clock()
        self.health.last_applied = now_wall
        self.health.oldest_pending = _earliest(
            self.tracker.first_pending_at, self._unfinished_since
        )
        self.metrics.sync_duration.observe(self._clock() - started)
        self.metrics.last_sync.set(now_wall)
        self.metrics.changes_pending.set(self.tracker.pending)
        programmed_since = _earliest(queued_at if change.services else None, unfinished_since)
        if programmed_since is not None:
            self.metrics.programming_latency.observe(max(0.0, now_wall - programmed_since))
        for kind in ("Service", "EndpointSlice"):
            self.metrics.rejected_objects.labels(kind).set(
                sum(1 for error in self.tracker.errors.values() if error.kind == kind)
            )
        for protocol in (L4Protocol.TCP, L4Protocol.UDP):
            self.metrics.service_ports.labels(protocol.value).set(self._port_counts[protocol])
        if change.services:
            log.info(
                "synced %d service ports (%d services changed) in %.1f ms",
                len(table),
                len(change.services),
                (self._clock() - started) * 1000,
            )
        if failed:
            raise KernelWriteError(
                f"{len(failed)} kernel-mode service port(s) not written (the others were; "
                "retried): " + "; ".join(f"{name}: {error}" for name, error in failed.items())
            )

    async def _write_nftables(
        self, full: bool, previous_kernel: Mapping[ServicePortName, KernelTarget]
    ) -> dict[ServicePortName, str]:
        """Kernel mode in nft, redirects in iptables, ordered so no new connection is lost.

        A Service switching to kernel mode gets its nft entry before its redirect goes (nft's
        DNAT at priority -101 wins over the REDIRECT at -100 while both exist); one switching to
        userspace keeps its nft entry until its redirect is in place. So: nft additions and
        changes, then the iptables write, then nft removals. Returns the service ports nft
        refused (left as they were; the others are written).
        """
        changed, self._kernel_changed = self._kernel_changed | self._nft_retry, set()
        if full:  # the periodic check: a flushed ruleset took the table, so rebuild it
            for nft in self.nftables:
                await nft.verify()
        # Only what changed, also on the periodic full sync: the runner's record of what it
        # wrote is what a full comparison would compare with, and at 10k Services that
        # comparison held every change arriving meanwhile by ~0.3 s of Python.
        partial = not any(nft.needs_rebuild for nft in self.nftables)
        only = changed if partial else None
        self._nft_written_only = only
        if only is not None:
            wanted = [self._kernel[name] for name in only if name in self._kernel]
        else:
            wanted = list(self._kernel.values())
        splits = {split.key: split for split in self._splits.values()}
        failed: dict[ServicePortName, str] = {}
        for nft in self.nftables:
            failed.update(
                (
                    await nft.sync(wanted, self.rule_config, splits=splits, remove=False, only=only)
                ).failed
            )
        if self.iptables and (full or self._targets != self._applied_targets):
            written = dict(self._targets)
            await self._write_rules_absorbing(written, dict(self._kernel), repair_jumps=full)
            self._applied_targets = written
        elif not self.iptables:
            self._applied_targets = dict(self._targets)
        for nft in self.nftables:
            failed.update(
                (await nft.sync(wanted, self.rule_config, splits=splits, only=only)).failed
            )
        self._nft_retry = set(failed)
        now_wall = self._wall_clock()
        if only is not None:  # what is in force: the last write's, with what changed in it
            applied = dict(previous_kernel)
            written_now = {target.service_port.name: target for target in wanted}
            for name in only:
                target = written_now.get(name)  # not self._kernel: `_absorb` may be ahead
                if name in failed:
                    continue
                if target is None:
                    applied.pop(name, None)
                    continue
                if name not in applied:
                    self._weights_changed_at.setdefault(name, now_wall)
                applied[name] = target
        else:
            applied = {}
            for name, target in self._kernel.items():
                if name not in failed:
                    applied[name] = target
                elif name in previous_kernel:
                    applied[name] = previous_kernel[name]
            for name, target in previous_kernel.items():
                if name not in self._kernel and name in failed:
                    applied[name] = target
            for name in applied.keys() - previous_kernel.keys():
                self._weights_changed_at.setdefault(name, now_wall)
        self._applied_kernel = applied
        for key in self._splits_in_force():
            self._split_changed_at.setdefault(key, now_wall)
        return failed

    def note_change(self) -> None:
        """Called by sources after recording a change: keeps /healthz's staleness honest, and
        lets a sync that is writing rules apply the change to memory without waiting."""
        if self.health.oldest_pending is None:
            self.health.oldest_pending = self.tracker.first_pending_at
        self._change_noted.set()

    def _apply_to_memory(self, change: TableChange, *, forget_all_stale_stats: bool) -> None:
        # Incremental also on the periodic full resync: it repairs the kernel's rules, and the
        # Balancer's memory cannot drift (it keeps its outlier records pruned as it goes). Only
        # a Balancer that missed a step (an update that failed) compares the whole table.
        one_step = change.previous is self.balancer.table
        self.balancer.update(change.table, change.ports if one_step else None)
        self._derive(change, forget_all_stale_stats=forget_all_stale_stats)

    async def _write_rules_absorbing(
        self,
        written: dict[ServicePortName, RedirectTarget],
        written_kernel: dict[ServicePortName, KernelTarget],
        *,
        repair_jumps: bool,
    ) -> None:
        """Write `written` to every family's rules; meanwhile `_absorb` what gets recorded."""

        async def write() -> None:
            targets = list(written.values())
            # With the nftables backend kernel mode is not in the iptables transaction.
            kernel = [] if self.nftables else list(written_kernel.values())
            for runner in self.iptables:
                if kernel:
                    await runner.sync(
                        targets, self.rule_config, repair_jumps=repair_jumps, kernel=kernel
                    )
                else:  # the runner's userspace-only call, unchanged
                    await runner.sync(targets, self.rule_config, repair_jumps=repair_jumps)

        writing = asyncio.create_task(write(), name="rules-write")
        try:
            while True:
                self._change_noted.clear()
                if self.tracker.pending:
                    self._absorb(written, written_kernel)
                if writing.done():
                    break
                noted = asyncio.create_task(self._change_noted.wait())
                try:
                    await asyncio.wait((writing, noted), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    noted.cancel()
        finally:
            if not writing.done():  # cancelled (shutdown), or absorbing failed
                writing.cancel()
                await asyncio.wait((writing,))
            if not writing.cancelled():
                writing.exception()  # retrieved, so never logged as lost; raised just below
        await writing  # its error, if any, fails the sync; the runner retries

    def _absorb(
        self,
        written: dict[ServicePortName, RedirectTarget],
        written_kernel: dict[ServicePortName, KernelTarget],
    ) -> None:
        """Apply the changes recorded since the rules write began to memory, now.

        That finishes an endpoint change. One that also changes what the rules or the UDP
        sockets should be is finished by the next sync; until then it counts as unfinished.
        """
        queued_at = self.tracker.first_pending_at
        change = self.tracker.take_change()
        self._apply_to_memory(change, forget_all_stale_stats=False)
        self._refresh_udp_targets()
        finished = (
            self._targets == written
            and self._kernel == written_kernel
            and self._udp_wanted.keys() == self.udp.keys()
        )
        if not finished:
            self._unfinished_since = _earliest(self._unfinished_since, queued_at)
        elif queued_at is not None and change.services:
            self.metrics.programming_latency.observe(max(0.0, self._wall_clock() - queued_at))
        log.info(
            "applied %d changed services to memory while rules were being written%s",
            len(change.services),
            "" if finished else "; their rules follow in the next sync",
        )

    def _derive(self, change: TableChange, *, forget_all_stale_stats: bool) -> None:
        """Bring routes, backends and redirect targets from `_derived_table` to `change.table`.

        Only the changed service ports are visited. Should the two tables not be one step
        apart (a sync that failed half-way), the difference is found by comparing them whole.
        """
        old, new = self._derived_table, change.table
        names: Iterable[ServicePortName] = change.ports
        if change.previous is not old:
            names = {
                n for n in old.entries.keys() | new.entries.keys() if old.get(n) is not new.get(n)
            }
        for name in names:
            self._derive_one(name, old.get(name), new.get(name))
        self._derived_table = new
        if forget_all_stale_stats:
            for key in set(self.stats.snapshot().services) - set(self._routes):
                self.stats.forget(key)

    def _derive_one(
        self, name: ServicePortName, old: ServiceEntry | None, new: ServiceEntry | None
    ) -> None:
        if old is new:
            return
        if old is not None:
            for endpoint in old.endpoints:
                address = (endpoint.ip, endpoint.port)
                self._backend_refs[address] -= 1
                if self._backend_refs[address] <= 0:
                    del self._backend_refs[address]
                    self._backends.pop(address, None)
        if new is not None:
            for endpoint in new.endpoints:
                address = (endpoint.ip, endpoint.port)
                self._backend_refs[address] += 1
                if address not in self._backends:
                    self._backends[address] = Backend(endpoint.ip, endpoint.port)
        if new is None:
            self._port_counts[name.protocol] -= 1
            self._udp_wanted.pop(name, None)
            self._targets.pop(name, None)
            self._forget_kernel(name)
            for external in (False, True):
                key = self._route_keys.pop((name, external), None)
                if key is not None:
                    self._routes.pop(key, None)
                    self.stats.forget(key)
            return
        if old is None:
            self._port_counts[name.protocol] += 1
            for external in (False, True):
                key = str(name) + (EXTERNAL_SUFFIX if external else "")
                if name.protocol is L4Protocol.UDP:
                    key += "/UDP"
                self._routes[key] = Destination(name, external)
                self._route_keys[(name, external)] = key
        kernel_mode = (new.port.dataplane or self.config.dataplane.mode) is DataplaneMode.KERNEL
        if kernel_mode:
            self._kernel_wanted[name] = new
            self._drop_kernel(name)  # rebuilt below (TCP) or once its socket is open (UDP)
        else:
            self._forget_kernel(name)
        if name.protocol is L4Protocol.TCP:
            if kernel_mode:
                self._targets.pop(name, None)
                self._refresh_kernel(name, self.config.proxy.tcp_port)
                return
            target = RedirectTarget(new.port, self.config.proxy.tcp_port)
            if self._targets.get(name) != target:
                self._targets[name] = target
        elif name.protocol is L4Protocol.UDP:
            self._udp_wanted[name] = new.port

    def _refresh_udp_targets(self) -> None:
        """UDP redirects point at each service port's own socket, known once it is open."""
        for name, port in self._udp_wanted.items():
            relay = self.udp.get(name)
            if relay is None:
                self._targets.pop(name, None)
                self._drop_kernel(name)
                continue
            if name in self._kernel_wanted:
                self._targets.pop(name, None)
                current = self._kernel.get(name)
                if current is None or current.fallback_port != relay.address[1]:
                    self._refresh_kernel(name, relay.address[1])
                continue
            target = RedirectTarget(port, relay.address[1])
            if self._targets.get(name) != target:
                self._targets[name] = target

    # -- kernel mode ----------------------------------------------------------------------------

    def _set_kernel(self, name: ServicePortName, target: KernelTarget) -> None:
        self._kernel[name] = target
        self._kernel_changed.add(name)

    def _drop_kernel(self, name: ServicePortName) -> None:
        if self._kernel.pop(name, None) is not None:
            self._kernel_changed.add(name)

    def _forget_kernel(self, name: ServicePortName) -> None:
        self._kernel_wanted.pop(name, None)
        self._drop_kernel(name)
        self._weights.pop(name, None)
        self._weight_basis.pop(name, None)
        self._weights_changed_at.pop(name, None)
        cached = self._kernel_candidates.pop(name, None)
        if cached is not None:
            self._leave_layout(name, cached.layout)

    def _refresh_kernel(self, name: ServicePortName, fallback_port: int) -> None:
        """(Re)build a kernel-mode service port's rules target, with freshly computed weights.

        A Service drawn by a node split names its layout's split; a layout new to this node
        gets its first split here, and the period's `refresh_weights` moves it after that."""
        entry = self._kernel_wanted[name]
        candidates = self._candidates(name, entry)
        layout = candidates.layout
        basis = self._compute_weights(candidates, self._clock())
        weights = relabel(basis, candidates.cluster)
        sample_share = 0.0
        split = self._sampled_split.get(layout)
        if split is not None:  # keep sampling through an endpoint change
            sampled = split_weights(candidates.cluster, split, self.node_name, _SAMPLED)
            if sampled is not None:
                weights = sampled
                sample_share = self.config.dataplane.kernel_sample_share
        if self._uses_split(candidates):
            if layout not in self._splits:
                self._set_split(layout, candidates, weights, sample_share)
            self._set_kernel(name, self._kernel_target(candidates, weights, fallback_port))
            return
        if weights_moved(self._weights.get(name), weights, 0.0):
            self._weights_changed_at[name] = self._wall_clock()
        self._weights[name] = weights
        self._weight_basis[name] = weights  # positional for the layout, as `refresh_weights`'
        self._set_kernel(
            name, self._kernel_target(candidates, weights, fallback_port, sample_share)
        )

    def _kernel_chain_changes(self) -> list[tuple[KernelTarget, KernelTarget]] | None:
        """(written, wanted) for every kernel-mode service port whose rules differ, when only
        such chains need writing: no redirect and no kernel-mode port came or went. None: a
        whole write is needed (or nothing was written yet)."""
        applied = self._applied_kernel
        if (
            applied is None
            or self._applied_targets is None
            or self._targets != self._applied_targets
            or self._kernel.keys() != applied.keys()
        ):
            return None
        return [
            (applied[name], wanted)
            for name, wanted in self._kernel.items()
            if applied[name] != wanted
        ]

    def _candidates(self, name: ServicePortName, entry: ServiceEntry) -> _KernelCandidates:
        """The entry's categorized endpoints and weight layout, kept until the entry changes."""
        cached = self._kernel_candidates.get(name)
        if cached is not None and cached.entry is entry:
            return cached
        categorized = categorize(entry.endpoints, self._locality)
        policy = entry.port.lb_policy or self.config.proxy.lb_policy
        candidates = _KernelCandidates(
            entry,
            categorized.cluster,
            categorized.local,
            (policy, layout_of(categorized.cluster), entry.port.affinity_timeout_seconds is None),
        )
        self._kernel_candidates[name] = candidates
        if cached is None or cached.layout != candidates.layout:
            if cached is not None:
                self._leave_layout(name, cached.layout)
            self._layout_members.setdefault(candidates.layout, {})[name] = None
            tally = self._layout_tallies.get(candidates.layout)
            if tally is not None:  # the layout samples: count this one's choices too
                self.balancer.count_choices(name, into=tally)
        return candidates

    def _leave_layout(self, name: ServicePortName, layout: KernelLayout) -> None:
        members = self._layout_members.get(layout)
        if members is not None:
            members.pop(name, None)
            if not members:
                del self._layout_members[layout]
        self.balancer.stop_counting(name)

    def _compute_weights(self, candidates: _KernelCandidates, now: float) -> KernelWeights:
        """RAP's shares for the cluster-wide endpoints; even ones for a non-RAP policy."""
        policy = candidates.layout[0]
        cluster = candidates.cluster
        if self._telemetry is None:
            return uniform_weights(cluster, "even (no telemetry)")
        if policy not in _RAP_POLICIES:
            return uniform_weights(cluster, f"even (policy {policy.value})")
        return kernel_weights(cluster, self._telemetry(), self.node_name, now, self._rap_settings)

    def _uses_split(self, candidates: _KernelCandidates) -> bool:
        """Whether the entry's node is drawn by its layout's shared split (nftables, and no
        more nodes than the mark field tells apart) rather than by weights of its own."""
        cluster = candidates.cluster
        if not self.nftables or not cluster:
            return False
        # One family: a split is drawn in each family's table, and a dual-stack Service's nodes
        # differ per family (a node with only IPv6 endpoints would be drawn for IPv4 too).
        v6 = ":" in cluster[0].ip
        if any((":" in e.ip) != v6 for e in cluster):
            return False
        return len(set(candidates.layout[1])) <= self.rule_config.kernel.node_slots

    def _set_split(
        self,
        layout: KernelLayout,
        candidates: _KernelCandidates,
        weights: KernelWeights,
        sample_share: float,
    ) -> NodeSplit:
        """Make `weights` (positional for `layout`) the layout's wanted split."""
        _, slots = node_slots(layout[1])
        split = NodeSplit(_split_key(layout), slot_shares(weights, slots), sample_share)
        self._splits[layout] = split
        self._layout_weights[layout] = weights
        return split

    def _kernel_target(
        self,
        candidates: _KernelCandidates,
        weights: KernelWeights,
        fallback_port: int,
        sample_share: float = 0.0,
    ) -> KernelTarget:
        local = tuple(WeightedEndpoint(e.ip, e.port, 1.0) for e in candidates.local)
        if self._uses_split(candidates):  # weights live in the split: the target never moves
            _, slots = node_slots(candidates.layout[1])
            return KernelTarget(
                service_port=candidates.entry.port,
                cluster=tuple(WeightedEndpoint(e.ip, e.port, 1.0) for e in candidates.cluster),
                local=local,
                fallback_port=fallback_port,
                split=SplitRef(_split_key(candidates.layout), slots),
            )
        return KernelTarget(
            service_port=candidates.entry.port,
            cluster=tuple(WeightedEndpoint(s.ip, s.port, s.share) for s in weights.shares),
            local=local,
            fallback_port=fallback_port,
            sample_share=sample_share,
        )

    def _layout_wants_sample(
        self, layout: KernelLayout, view: TelemetryView | None, now: float
    ) -> bool:
        """Whether the proxy should decide a sample of the connections of Services of this
        layout: policy `rap` without ClientIP affinity, this node fresh and overloaded (the only
        time `rap` spills), and endpoints here and elsewhere to choose between."""
        if view is None or self.config.dataplane.kernel_sample_share <= 0:
            return False
        if layout[0] is not LbPolicy.RAP or not layout[2]:
            return False
        local_peer = view.nodes.get(self.node_name)
        if local_peer is None or not local_peer.overloaded:
            return False
        if not view.is_fresh(self.node_name, now):
            return False
        nodes = set(layout[1])
        return self.node_name in nodes and len(nodes) > 1

    def _sampled_weights(
        self,
        layout: KernelLayout,
        candidates: _KernelCandidates,
        basis: KernelWeights,
        tally: Mapping[str | None, int],
    ) -> KernelWeights:
        """The split the proxy gave this period's sampled connections of the layout's Services
        (`tally`), smoothed over periods; positional for the layout.

        Until the first period with enough decisions, everything stays local (where `rap`
        starts); that first split is then taken whole, and later ones are blended in. Tried
        in the edge grid's 5-second runs: starting from `rap-aimd`'s split, which has often
        shrunk to nothing by the time a node is overloaded, left two clients at 10 ms to the
        peers at 0.53x userspace `rap` (which stays local there); blending from all-local
        took 0.61x at 1 ms (where `rap` spills). Too few decisions: the written split stands.

        One split per layout, not per Service: the Services of a layout share their nodes, so
        what their sampled connections found (a queue, a stall, a slow node) is the nodes',
        and a layout's many Services decide more connections per period than one.
        """
        observed = observed_split(tally)
        previous = self._sampled_split.get(layout)
        current = self._layout_weights.get(layout)
        if observed is None:
            if previous is not None and current is not None and current.decision == _SAMPLED:
                return current  # nothing new was decided: what is written stands
            if previous is None:
                self._sample_unobserved.add(layout)
            split = previous or {self.node_name: 1.0}
        elif previous is None or layout in self._sample_unobserved:
            split = observed
            self._sample_unobserved.discard(layout)
        else:
            split = blend(previous, observed, SAMPLE_BLEND)
        self._sampled_split[layout] = split
        weights = split_weights(candidates.cluster, split, self.node_name, _SAMPLED)
        weights = weights if weights is not None else relabel(basis, candidates.cluster)
        self._layout_weights[layout] = weights
        return weights

    def _layout_tally(self, layout: KernelLayout) -> ChoiceTally:
        """The choices made for the layout's Services, counted into one tally from now on."""
        tally = self._layout_tallies.get(layout)
        if tally is None:
            tally = self._layout_tallies[layout] = ChoiceTally()
            for name in self._layout_members.get(layout, {}):
                self.balancer.count_choices(name, into=tally)
        return tally

    def _stop_sampling(self, layout: KernelLayout) -> None:
        self._sampled_split.pop(layout, None)
        self._sample_unobserved.discard(layout)
        if self._layout_tallies.pop(layout, None) is not None:
            for name in self._layout_members.get(layout, {}):
                self.balancer.stop_counting(name)

    async def refresh_weights(self) -> int:
        """Recompute every kernel Service's weights; write those that moved. Returns how many
        service ports' weights moved.

        Weights are computed once per layout (policy, the node of each candidate, affinity or
        not: balancer/kernel_weights.py), from telemetry or, while this node samples, from the
        proxy's decisions on the layout's sampled connections. With nftables a layout's
        Services share one node split: a move rewrites that chain alone, whatever the number of
        Services. Otherwise only the moved Services' weighted chains are rewritten, all in one
        transaction per family (in batches with nftables); a Service whose rules differ from the
        written ones in more than weights (an endpoint change not yet synced) is left to the
        sync, which is asked for.
        """
        threshold = self.config.dataplane.weight_threshold
        sample_share = self.config.dataplane.kernel_sample_share
        # nftables: the new targets wait here until their batch is written (`_write_nft_weights`),
        # so a sync in between writes only what it changed, not every moved Service's weights.
        pending: dict[ServicePortName, KernelTarget] = {}
        async with self._rules_lock:
            started = time.monotonic()
            now = self._clock()
            view = self._telemetry() if self._telemetry is not None else None
            members = self._layout_members
            for layout in [layout for layout in self._splits if layout not in members]:
                self._forget_layout(layout)
            moved: list[ServicePortName] = []  # service ports with weights of their own
            splits: list[NodeSplit] = []
            split_ports = 0  # service ports drawn by the moved splits
            for layout, names in list(members.items()):
                first_name = next((name for name in names if name in self._kernel), None)
                if first_name is None:  # UDP ports whose sockets are not open yet
                    continue
                first = self._candidates(first_name, self._kernel_wanted[first_name])
                basis = self._compute_weights(first, now)
                if self._layout_wants_sample(layout, view, now):
                    tally = self._layout_tally(layout).take()
                    weights = self._sampled_weights(layout, first, basis, tally)
                    share = sample_share
                else:
                    if layout in self._sampled_split or layout in self._layout_tallies:
                        self._stop_sampling(layout)
                    weights, share = basis, 0.0
                    self._layout_weights[layout] = basis
                if self._uses_split(first):
                    _, slots = node_slots(layout[1])
                    old = self._splits.get(layout)
                    new_shares = slot_shares(weights, slots)
                    if (
                        old is not None
                        and old.sample_share == share
                        and not slot_shares_moved(old.shares, new_shares, threshold)
                    ):
                        continue
                    splits.append(self._set_split(layout, first, weights, share))
                    split_ports += len(names)
                    continue
                verdicts: dict[tuple[int, float], bool] = {}
                for name in list(names):
                    target = self._kernel.get(name)
                    if target is None:
                        continue
                    candidates = self._candidates(name, self._kernel_wanted[name])
                    previous = self._weight_basis.get(name)
                    verdict_key = (id(previous), target.sample_share)
                    verdict = verdicts.get(verdict_key)
                    if verdict is None:
                        verdict = verdicts[verdict_key] = share != target.sample_share or (
                            weights is not previous and shares_moved(previous, weights, threshold)
                        )
                    if not verdict:
                        continue
                    self._weights[name] = relabel(weights, candidates.cluster)
                    self._weight_basis[name] = weights
                    new = self._kernel_target(
                        candidates, self._weights[name], target.fallback_port, share
                    )
                    if self.nftables:
                        pending[name] = new
                    else:
                        self._set_kernel(name, new)
                    moved.append(name)
            if splits:
                await self._write_splits(splits, split_ports, started)
            if not moved:
                return split_ports
            if self.nftables:
                await self._write_nft_weights(moved, pending, started)
                return split_ports + len(moved)
            applied = self._applied_kernel
            updates: list[KernelTarget] = []
            needs_sync = False
            for name in moved:
                target = self._kernel[name]
                written = None if applied is None else applied.get(name)
                if written is not None and _same_paths(written, target):
                    updates.append(target)
                else:
                    needs_sync = True
            for runner in self.iptables:
                await runner.update_weights(updates, self.rule_config)
            if applied is not None:
                for target in updates:
                    applied[target.service_port.name] = target
            changed_at = self._wall_clock()
            for target in updates:
                self._weights_changed_at[target.service_port.name] = changed_at
            if updates and self.iptables:
                self.metrics.kernel_weight_writes.inc()
                self.metrics.kernel_weight_write_duration.observe(time.monotonic() - started)
        if needs_sync and self.request_sync is not None:
            self.request_sync()
        return split_ports + len(moved)

    def _forget_layout(self, layout: KernelLayout) -> None:
        """No Service has this layout any more: its split goes (the next sync deletes the
        chain once no written Service jumps to it)."""
        split = self._splits.pop(layout, None)
        if split is not None:
            self._split_changed_at.pop(split.key, None)
        self._layout_weights.pop(layout, None)
        self._stop_sampling(layout)

    async def _write_splits(self, splits: list[NodeSplit], ports: int, started: float) -> None:
        """Write moved node splits (held under the rules lock). A failure is logged and a sync
        asked for: the runner then rebuilds its table, with the splits as they are wanted."""
        wrote = False
        try:
            for nft in self.nftables:
                wrote = await nft.update_splits(splits, self.rule_config) or wrote
        except Exception as error:
            log.warning("kernel node splits not written (the sync rebuilds): %s", error)
            if self.request_sync is not None:
                self.request_sync()
            return
        changed_at = self._wall_clock()
        for split in splits:
            self._split_changed_at[split.key] = changed_at
        if wrote:
            self._weight_write_done(started, ports, f"{len(splits)} node splits")

    async def _write_nft_weights(
        self,
        moved: list[ServicePortName],
        pending: dict[ServicePortName, KernelTarget],
        started: float,
    ) -> int:
        """Write `pending` weights in batches of NFT_WEIGHT_BATCH, each under the rules lock.

        Called holding the lock, returns holding it; between batches the lock is free, so a sync
        (an endpoint change) runs in between rather than after every batch. A Service the sync
        rebuilt meanwhile (other endpoints) is skipped: the sync wrote fresh weights for it.
        """
        needs_sync = False
        wrote = False
        written_count = batches = 0
        for start in range(0, len(moved), NFT_WEIGHT_BATCH):
            if start:
                self._rules_lock.release()
                try:
                    await asyncio.sleep(0)  # let a waiting sync take the lock
                finally:
                    await self._rules_lock.acquire()
            applied = self._applied_kernel
            updates: list[KernelTarget] = []
            for name in moved[start : start + NFT_WEIGHT_BATCH]:
                current, new = self._kernel.get(name), pending[name]
                if current is None or not _same_paths(current, new):
                    continue
                self._set_kernel(name, new)
                written = None if applied is None else applied.get(name)
                if written is not None and _same_paths(written, new):
                    updates.append(new)
                else:
                    needs_sync = True
            if not updates:
                continue
            failed: dict[ServicePortName, str] = {}
            for nft in self.nftables:
                failed.update((await nft.update_weights(updates, self.rule_config)).failed)
            changed_at = self._wall_clock()
            for target in updates:
                name = target.service_port.name
                if name in failed:
                    needs_sync = True
                    continue
                if applied is not None:
                    applied[name] = target
                self._weights_changed_at[name] = changed_at
                written_count += 1
            batches += 1
            if failed:
                log.warning(
                    "kernel weights of %d service ports not written (the sync retries): %s",
                    len(failed),
                    "; ".join(f"{n}: {e}" for n, e in list(failed.items())[:5]),
                )
            wrote = True
        if wrote:
            self._weight_write_done(started, written_count, f"{batches} batches")
        if needs_sync and self.request_sync is not None:
            self.request_sync()
        return len(moved)

    def _weight_write_done(self, started: float, ports: int, how: str) -> None:
        """Count and time a weight write in the metrics, and log it (the scale benchmark reads
        this line)."""
        elapsed = time.monotonic() - started
        self.metrics.kernel_weight_writes.inc()
        self.metrics.kernel_weight_write_duration.observe(elapsed)
        log.info("kernel weights of %d service ports written in %.3f s (%s)", ports, elapsed, how)

    def telemetry_changed(self) -> None:
        """A telemetry sample arrived: `run_weights` recomputes the weights now."""
        self._weights_due.set()

    async def run_weights(self) -> None:
        """`refresh_weights` after every telemetry change (`telemetry_changed`), and at least
        every `dataplane.weightPeriod`. Changes during a refresh make one more. Failures are
        logged and retried.

        Waiting for a period after the sample put up to a period (1 s) between the telemetry
        and the weights; per layout a refresh is cheap enough to run on every sample."""
        period = self.config.dataplane.weight_period
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period):
                    await self._weights_due.wait()
            self._weights_due.clear()
            if not self._kernel_wanted:
                continue
            try:
                await self.refresh_weights()
            except Exception as error:  # one failed write must not end the loop
                log.warning("kernel weight update failed (next period retries): %s", error)

    def _kernel_weight_rows(self) -> list[tuple[str, str, float, float | None]]:
        """(service, endpoint, share in force, last change) for the metrics exporter."""
        applied = self._applied_kernel or {}
        splits = self._splits_in_force()
        rows: list[tuple[str, str, float, float | None]] = []
        for name, target in sorted(applied.items()):
            shares, changed = self._in_force(name, target, splits)
            for endpoint, share in zip(target.cluster, shares, strict=True):
                address = (
                    f"[{endpoint.ip}]:{endpoint.port}"
                    if ":" in endpoint.ip
                    else (f"{endpoint.ip}:{endpoint.port}")
                )
                rows.append((str(name), address, share, changed))
        return rows

    def describe_kernel(self) -> dict[str, Any]:
        """Kernel-mode service ports: the weights written (in force), why, and since when."""
        applied = self._applied_kernel or {}
        splits = self._splits_in_force()
        out: dict[str, Any] = {}
        for name in sorted(self._kernel_wanted):
            target = applied.get(name)
            weights = self._weights.get(name)
            candidates = self._kernel_candidates.get(name)
            if target is not None and target.split is not None and candidates is not None:
                weights = self._layout_weights.get(candidates.layout)
            shares, changed = ([], None) if target is None else self._in_force(name, target, splits)
            split = None if target is None or target.split is None else splits.get(target.split.key)
            out[str(name)] = {
                "written": target is not None and target == self._kernel.get(name),
                "weights": {}
                if target is None
                else {
                    f"{e.ip}:{e.port}": round(share, 6)
                    for e, share in zip(target.cluster, shares, strict=True)
                },
                "node_split": None
                if split is None
                else {"key": split.key, "sample_share": split.sample_share},
                "local_endpoints": []
                if target is None
                else [f"{e.ip}:{e.port}" for e in target.local],
                "decision": None if weights is None else weights.decision,
                "local_share": None if weights is None else weights.local_share,
                "weights_changed_at": changed,
            }
        return out

    def _splits_in_force(self) -> Mapping[str, NodeSplit]:
        """The node splits the kernel holds (the first family's runner), by key."""
        return self.nftables[0].splits if self.nftables else {}

    def _in_force(
        self, name: ServicePortName, target: KernelTarget, splits: Mapping[str, NodeSplit]
    ) -> tuple[list[float], float | None]:
        """A written target's share per cluster endpoint, and when it last changed."""
        if target.split is not None:
            split = splits.get(target.split.key)
            if split is None:
                return [0.0] * len(target.cluster), None
            return split_shares(target, split), self._split_changed_at.get(split.key)
        total = sum(e.weight for e in target.cluster) or 1.0
        shares = [e.weight / total for e in target.cluster]
        return shares, self._weights_changed_at.get(name)

    async def _reconcile_udp(self) -> list[tuple[str | None, int]]:
        """Open a socket per UDP service port, close the ones gone; return stale conntrack keys."""
        stale: list[tuple[str | None, int]] = []
        wanted = self._udp_wanted
        for name in [n for n in self.udp if n not in wanted]:
            await self.udp.pop(name).aclose()
            self._udp_ports.release(name)
            previous = self._previous_port(name)
            if previous is not None:
                stale.extend(_udp_destinations(previous))
        for name, port in wanted.items():
            if name in self.udp:
                previous = self._previous_port(name)
                if previous is not None and previous != port:
                    stale.extend(_udp_destinations(previous))
                continue
            key = self._route_keys[(name, False)]
            adopted = await self._adopt_udp(name, key)
            if adopted is not None:
                self.udp[name] = adopted
                continue
            skip: set[int] = set()
            while True:
                number = self._udp_ports.allocate(name, skip)
                relay = UdpServicePort(self, key, settings=self._udp_settings, stats=self.stats)
                try:
                    await relay.start((self.config.proxy.listen_address, number))
                except OSError as error:
                    log.warning(
                        "UDP port %d for %s is unusable (%s); trying the next", number, name, error
                    )
                    skip.add(number)
                    continue
                break
            self.udp[name] = relay
        # The first sync saw every service port there is: the rest of the inheritance is stale.
        self._close_inherited_udp()
        return stale

    async def _adopt_udp(self, name: ServicePortName, key: str) -> UdpServicePort | None:
        """Serve the predecessor's socket for `name`, if it handed one over that fits."""
        sock = self._inherited_udp.pop(udp_socket_name(name), None)
        if sock is None:
            return None
        host, port = sock.getsockname()[:2]
        if host != self.config.proxy.listen_address or not self._udp_ports.adopt(name, port):
            log.info("not adopting the handed-over UDP socket of %s on %s:%d", name, host, port)
            sock.close()
            return None
        relay = UdpServicePort(self, key, settings=self._udp_settings, stats=self.stats)
        await relay.start((host, port), inherited=sock)
        return relay

    def _previous_port(self, name: ServicePortName) -> ServicePort | None:
        target = (self._applied_targets or {}).get(name)
        return target.service_port if target is not None else None

    async def _forget_udp_flows(self, address: str | None, port: int) -> None:
        try:
            deleted = await delete_udp_entries(address, port, netns=self._netns)
        except Exception as error:  # conntrack trouble must never fail the sync
            log.warning(
                "could not delete UDP conntrack entries for %s:%d: %s", address or "*", port, error
            )
            return
        if deleted:
            log.info(
                "deleted %d stale UDP conntrack entries for %s:%d", deleted, address or "*", port
            )

    # -- BackendSelector (the relay's questions) -----------------------------------------------

    def service_for(
        self, protocol: Literal["TCP", "UDP"], dst_ip: str, dst_port: int
    ) -> str | None:
        destination = self.tracker.table.resolve(L4Protocol(protocol), dst_ip, dst_port)
        if destination is None:
            return None
        return self._route_keys.get((destination.name, destination.external))

    def choose(self, service: str, client_ip: str, tried: frozenset[Backend]) -> Backend | None:
        destination = self._routes.get(service)
        if destination is None:
            return None
        tried_keys = frozenset((b.ip, b.port) for b in tried) if tried else frozenset()
        choice = self.balancer.choose(
            destination.name,
            client_ip,
            self._clock(),
            external=destination.external,
            tried=tried_keys,
        )
        if choice is None:
            return None
        key = (choice.endpoint.ip, choice.endpoint.port)
        return self._backends.get(key) or Backend(*key)

    def dial_failed(self, service: str, backend: Backend, client_ip: str) -> None:
        destination = self._routes.get(service)
        if destination is not None:
            self.balancer.dial_failed(
                destination.name, (backend.ip, backend.port), client_ip, self._clock()
            )

    def connection_opened(
        self, service: str, backend: Backend, connect_seconds: float | None = None
    ) -> int:
        return self.balancer.connection_opened(
            (backend.ip, backend.port), connect_seconds, self._clock()
        )

    def first_response(
        self,
        service: str,
        backend: Backend,
        connect_seconds: float,
        response_seconds: float,
        queued: int | None = None,
    ) -> None:
        self.balancer.first_response(
            (backend.ip, backend.port), connect_seconds, response_seconds, self._clock(), queued
        )

    def response_started(self, service: str, backend: Backend) -> None:
        self.balancer.response_started((backend.ip, backend.port), self._clock())

    def request_started(self, service: str, backend: Backend) -> None:
        self.balancer.request_started((backend.ip, backend.port), self._clock())

    def connection_closed(self, service: str, backend: Backend, awaiting: bool = True) -> None:
        self.balancer.connection_closed((backend.ip, backend.port), awaiting)

    # -- explainability -----------------------------------------------------------------------

    def _selection_counts(self) -> dict[str, int]:
        counts = {placement.value: count for placement, count in self.balancer.selections.items()}
        for other in self.other_selections():
            for placement, count in other.items():
                counts[placement] = counts.get(placement, 0) + count
        return counts

    def own_selection_counts(self) -> dict[str, int]:
        """This process's balancer decisions by placement (a worker reports these)."""
        return {placement.value: count for placement, count in self.balancer.selections.items()}

    def node_stats(self) -> RelayStatsSnapshot:
        """The relay counters of every process serving this node (this one and its workers)."""
        others = self.other_stats()
        if not others:
            return self.stats.snapshot()
        return merge_snapshots([self.stats.snapshot(), *others])

    def describe(self) -> dict[str, Any]:
        now = self._clock()
        state = self.balancer.describe(now)
        state["udp_ports"] = {str(n): p.address[1] for n, p in sorted(self.udp.items())}
        state["tcp_listeners"] = [f"{h}:{p}" for h, p in self.tcp.addresses]
        own = self.stats.snapshot()
        state["tcp_here"] = {  # this process's share when worker processes relay beside it
            "active": own.tcp_active,
            "connections": sum(c.tcp_connections_total for c in own.services.values()),
        }
        state["rejected_objects"] = self.tracker.describe_errors()
        state["changes_pending"] = self.tracker.pending
        state["last_sync_error"] = self.last_sync_error
        state["kernel"] = self.describe_kernel()
        state["kernel_backend"] = self.config.dataplane.kernel_backend.value
        for name, describe in self.extra_state.items():
            state[name] = describe(now)
        return state


def _earliest(*times: float | None) -> float | None:
    known = [t for t in times if t is not None]
    return min(known) if known else None


def _same_paths(a: KernelTarget, b: KernelTarget) -> bool:
    """Whether two targets differ at most in weights (then a weights-only write suffices)."""
    return (
        a.service_port == b.service_port
        and a.local == b.local
        and a.fallback_port == b.fallback_port
        and a.split == b.split
        and [(e.ip, e.port) for e in a.cluster] == [(e.ip, e.port) for e in b.cluster]
    )


def _stale_kernel_udp(
    old_targets: dict[ServicePortName, RedirectTarget],
    old_kernel: Mapping[ServicePortName, KernelTarget],
    new_kernel: Mapping[ServicePortName, KernelTarget],
    names: Collection[ServicePortName] | None = None,
) -> list[tuple[str | None, int]]:
    """UDP conntrack keys to forget after a write touching kernel-mode service ports.

    A UDP flow keeps the DNAT decision of its first datagram for as long as it keeps sending, so
    when an endpoint it may be pinned to goes away, or the port switches mode either way, the
    service's entries are deleted and the next datagram is NATed by the current rules. All of
    the port's flows, not only the removed endpoint's: coarser than kube-proxy (which filters by
    the reply source), simpler, and harmless for UDP (docs/limits.md). `names`: only these
    can have changed (None: any).
    """
    stale: list[tuple[str | None, int]] = []
    if names is not None:
        old_kernel = {n: old_kernel[n] for n in names if n in old_kernel}
        new_kernel = {n: new_kernel[n] for n in names if n in new_kernel}
    for name, old in old_kernel.items():
        if name.protocol is not L4Protocol.UDP:
            continue
        new = new_kernel.get(name)
        endpoints_before = {(e.ip, e.port) for e in (*old.cluster, *old.local)}
        endpoints_after = (
            set() if new is None else {(e.ip, e.port) for e in (*new.cluster, *new.local)}
        )
        if new is None or not endpoints_before <= endpoints_after:
            stale.extend(_udp_destinations(old.service_port))
    for name in new_kernel:
        if name.protocol is L4Protocol.UDP and name in old_targets and name not in old_kernel:
            stale.extend(_udp_destinations(old_targets[name].service_port))
    return stale


def _udp_destinations(port: ServicePort) -> list[tuple[str | None, int]]:
    destinations: list[tuple[str | None, int]] = [(ip, port.port) for ip in port.cluster_ips]
    destinations.extend((ip, port.port) for ip in port.external_addresses)
    if port.node_port is not None:
        destinations.append((None, port.node_port))
    return destinations
