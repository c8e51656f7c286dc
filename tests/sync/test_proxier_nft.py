"""The Proxier with the nftables kernel backend, without the kernel: the order of its writes.

Stand-in runners record what they were asked to write, in one shared log, so a test can say
which path a Service had at every step of a mode switch. The real thing, under load, is
tests/integration/test_kernel_switch_netns.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import pytest

from rapproxy.balancer.rap import rap_policy_factory
from rapproxy.config import RapproxyConfiguration, from_mapping
from rapproxy.model.service import L4Protocol, ServicePortName
from rapproxy.model.telemetry import NodeStats, RapSettings, TelemetryTracker
from rapproxy.rules.kernel import KernelTarget, NodeSplit
from rapproxy.rules.nft_apply import NftWriteResult
from rapproxy.rules.render import RedirectTarget, RuleConfig
from rapproxy.sync.proxier import KernelWriteError, Proxier

WEB = ServicePortName("default", "web", "", L4Protocol.TCP)
API = ServicePortName("default", "api", "", L4Protocol.TCP)
Log = list[tuple[str, Any]]


def objects(name: str, ip: str, mode: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    annotations = {"rapproxy.io/dataplane": mode} if mode else {}
    service = {
        "metadata": {"namespace": "default", "name": name, "annotations": annotations},
        "spec": {"clusterIP": ip, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    endpoint_slice = {
        "metadata": {
            "namespace": "default",
            "name": f"{name}-abc",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [{"port": 8080}],
        "endpoints": [{"addresses": ["10.244.0.1"], "nodeName": "node"}],
    }
    return service, endpoint_slice


class Redirects:
    """Stands in for IptablesRunner: the userspace redirects."""

    family = 4

    def __init__(self, log: Log) -> None:
        self.log = log

    async def sync(
        self,
        targets: Sequence[RedirectTarget],
        config: RuleConfig,
        *,
        repair_jumps: bool = True,
        kernel: Sequence[KernelTarget] = (),
    ) -> bool:
        assert not kernel, "kernel mode is not iptables' job with the nftables backend"
        self.log.append(("redirects", {t.service_port.name for t in targets}))
        return True


class Table:
    """Stands in for NftRunner: keeps what it was told, refuses the ports in `refuse`."""

    family = 4

    def __init__(self, log: Log) -> None:
        self.log = log
        self.held: dict[ServicePortName, KernelTarget] = {}
        self.refuse: set[ServicePortName] = set()
        self.splits: dict[str, NodeSplit] = {}
        self.split_writes: list[list[NodeSplit]] = []
        self.split_written = asyncio.Event()
        self.onlys: list[set[ServicePortName] | None] = []  # each sync's `only`
        self.needs_rebuild = True  # as NftRunner: until the first write

    async def sync(
        self,
        kernel: Sequence[KernelTarget],
        config: RuleConfig,
        *,
        splits: Mapping[str, NodeSplit] | None = None,
        remove: bool = True,
        verify: bool = False,
        only: Collection[ServicePortName] | None = None,
    ) -> NftWriteResult:
        self.splits.update(splits or {})
        wanted = {t.service_port.name: t for t in kernel}
        assert only is None or wanted.keys() <= set(only)
        self.onlys.append(None if only is None else set(only))
        self.needs_rebuild = False
        failed: dict[ServicePortName, str] = {}
        for name, target in wanted.items():
            if name in self.refuse:
                failed[name] = "Error: Could not process rule: Device or resource busy"
            else:
                self.held[name] = target
        if remove:
            candidates = self.held if only is None else [n for n in only if n in self.held]
            for name in [n for n in candidates if n not in wanted and n not in self.refuse]:
                del self.held[name]
        self.log.append(("nft", set(self.held)))
        return NftWriteResult(True, failed)

    async def verify(self) -> bool:
        return not self.needs_rebuild

    async def update_weights(
        self, kernel: Sequence[KernelTarget], config: RuleConfig
    ) -> NftWriteResult:
        return NftWriteResult()

    async def update_splits(self, splits: Sequence[NodeSplit], config: RuleConfig) -> bool:
        self.split_writes.append(list(splits))
        self.split_written.set()
        self.splits.update((s.key, s) for s in splits if s.key in self.splits)
        return True


def proxier(log: Log, table: Table) -> Proxier:
    config: RapproxyConfiguration = from_mapping({"dataplane": {"kernelBackend": "nftables"}})
    return Proxier(config, "node", iptables=[Redirects(log)], nftables=[table])  # type: ignore[list-item]


async def apply(p: Proxier, mode: str | None) -> None:
    service, endpoint_slice = objects("web", "10.96.0.10", mode)
    p.tracker.service_updated(service)
    p.tracker.slice_updated(endpoint_slice)
    await p.sync()


def paths(log: Log) -> list[set[str]]:
    """After each write, which paths WEB had: 'kernel' (nft entry), 'relay' (redirect)."""
    nft: set[ServicePortName] = set()
    redirects: set[ServicePortName] = set()
    out = []
    for kind, names in log:
        if kind == "nft":
            nft = names
        else:
            redirects = names
        out.append(
            {path for path, has in (("kernel", WEB in nft), ("relay", WEB in redirects)) if has}
        )
    return out


@pytest.mark.parametrize(("before", "after"), [(None, "kernel"), ("kernel", None)])
async def test_a_mode_switch_adds_the_new_path_before_it_removes_the_old(
    before: str | None, after: str | None
) -> None:
    log: Log = []
    table = Table(log)
    p = proxier(log, table)
    await apply(p, before)
    start = len(log)
    await apply(p, after)
    steps = paths(log)[start - 1 :]  # from the state before the switch
    assert all(steps), f"a write left the Service without a path: {steps}"
    assert steps[-1] == ({"kernel"} if after else {"relay"})


async def test_a_refused_port_fails_the_sync_by_name_after_the_others_are_written() -> None:
    log: Log = []
    table = Table(log)
    p = proxier(log, table)
    table.refuse.add(API)
    for name, ip in (("web", "10.96.0.10"), ("api", "10.96.0.11")):
        service, endpoint_slice = objects(name, ip, "kernel")
        p.tracker.service_updated(service)
        p.tracker.slice_updated(endpoint_slice)
    with pytest.raises(KernelWriteError, match="default/api"):
        await p.sync()
    assert set(table.held) == {WEB}
    written: Mapping[ServicePortName, KernelTarget] = p._applied_kernel or {}
    assert set(written) == {WEB}  # /debug/state and metrics show what is in force
    state = p.describe()
    assert state["kernel_backend"] == "nftables"
    assert state["kernel"][str(API)]["written"] is False
    assert state["kernel"][str(WEB)]["weights"] == {"10.244.0.1:8080": 1.0}
    table.refuse.clear()
    await p.sync()  # the retry writes it
    assert set(table.held) == {WEB, API}


NOW = 100.0


def layout_proxier(
    services: int, *, real_rap: bool = False, **dataplane: object
) -> tuple[Proxier, Table, TelemetryTracker]:
    """Kernel-mode Services with endpoints on this node and one peer (one layout), telemetry
    fresh and healthy; synced by the caller. `real_rap`: the rap policy decides from it."""
    settings = RapSettings()
    telemetry = TelemetryTracker("node", settings)
    telemetry.record_local(NodeStats("node", 0.2, 0.2, NOW))
    telemetry.record_peer("peer", NodeStats("peer", 0.1, 0.2, NOW), 0.001)
    config = from_mapping(
        {
            "dataplane": {
                "mode": "kernel",
                "kernelBackend": "nftables",
                "kernelSampleShare": 0,
                **dataplane,
            }
        }
    )
    log: Log = []
    table = Table(log)
    p = Proxier(
        config,
        "node",
        iptables=[Redirects(log)],  # type: ignore[list-item]
        nftables=[table],  # type: ignore[list-item]
        clock=lambda: NOW,
        telemetry=telemetry.snapshot,
        rap_settings=settings,
        policy_factory=rap_policy_factory(telemetry.snapshot, settings, random.Random(1))
        if real_rap
        else None,
    )
    for index in range(services):
        service, endpoint_slice = objects(f"s{index}", f"10.96.1.{index}", None)
        endpoint_slice["endpoints"] = [
            {"addresses": ["10.244.0.1"], "nodeName": "node"},
            {"addresses": [f"10.244.1.{index}"], "nodeName": "peer"},
        ]
        p.tracker.service_updated(service)
        p.tracker.slice_updated(endpoint_slice)
    return p, table, telemetry


async def test_a_telemetry_sample_recomputes_the_weights_without_waiting_for_the_period() -> None:
    p, table, telemetry = layout_proxier(3, weightPeriod=60)
    telemetry.on_change.append(p.telemetry_changed)
    await p.sync()
    weights = asyncio.create_task(p.run_weights())
    try:
        telemetry.record_local(NodeStats("node", 0.95, 0.2, NOW))
        telemetry.record_local(NodeStats("node", 0.95, 0.2, NOW))
        async with asyncio.timeout(5):  # the period is a minute
            await table.split_written.wait()
    finally:
        weights.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await weights
    (split,) = table.splits.values()
    assert split.shares[0] < 1.0


async def test_a_telemetry_move_rewrites_one_shared_split_not_the_services_of_its_layout() -> None:
    """200 Services with endpoints on the same two nodes: one node split; an overload moves
    it, and no Service's target (its chains) changes."""
    now = NOW
    p, table, telemetry = layout_proxier(200)
    await p.sync()
    assert len(table.held) == 200 and len(table.splits) == 1
    (before,) = table.splits.values()
    assert before.shares == (1.0, 0.0)
    targets = dict(p._kernel)

    telemetry.record_local(NodeStats("node", 0.95, 0.2, now))
    telemetry.record_local(NodeStats("node", 0.95, 0.2, now))
    assert await p.refresh_weights() == 200
    assert [[s.key for s in write] for write in table.split_writes] == [[before.key]]
    (after,) = table.splits.values()
    assert after.shares == pytest.approx((0.49, 0.51))
    assert p._kernel == targets and all(p._kernel[n] is t for n, t in targets.items())
    state = p.describe_kernel()["default/s7:"]
    assert state["weights"] == {"10.244.0.1:8080": 0.49, "10.244.1.7:8080": 0.51}
    assert state["decision"] != "local"
    assert await p.refresh_weights() == 0 and len(table.split_writes) == 1


async def test_after_the_first_write_a_sync_hands_nft_only_the_changed_service_ports() -> None:
    log: Log = []
    table = Table(log)
    p = proxier(log, table)
    for name, ip in (("web", "10.96.0.10"), ("api", "10.96.0.11")):
        service, endpoint_slice = objects(name, ip, "kernel")
        p.tracker.service_updated(service)
        p.tracker.slice_updated(endpoint_slice)
    await p.sync()
    assert table.onlys[-1] is None and set(table.held) == {WEB, API}  # the first: everything
    service, endpoint_slice = objects("api", "10.96.0.11", "kernel")
    endpoint_slice["endpoints"][0]["addresses"] = ["10.244.0.9"]
    p.tracker.slice_updated(endpoint_slice)
    await p.sync()
    assert table.onlys[-2:] == [{API}, {API}]
    assert [e.ip for e in table.held[API].cluster] == ["10.244.0.9"]
    assert (p._applied_kernel or {})[API] is table.held[API]
    p.tracker.service_deleted(service)
    await p.sync()
    assert set(table.held) == {WEB} and set(p._applied_kernel or {}) == {WEB}
    table.refuse.add(WEB)  # refused: retried by name on the next sync, however small
    service, endpoint_slice = objects("web", "10.96.0.10", "kernel")
    endpoint_slice["endpoints"][0]["addresses"] = ["10.244.0.7"]
    p.tracker.slice_updated(endpoint_slice)
    with pytest.raises(KernelWriteError):
        await p.sync()
    table.refuse.clear()
    await p.sync()
    assert table.onlys[-1] == {WEB}
    assert [e.ip for e in table.held[WEB].cluster] == ["10.244.0.7"]
    table.needs_rebuild = True  # the runner lost track: everything again
    await p.sync()
    assert table.onlys[-1] is None


async def test_a_layouts_sampled_split_counts_the_decisions_of_all_its_services() -> None:
    """Sampling: what the proxy decided for either Service of the layout sets the one split."""
    p, table, telemetry = layout_proxier(2, real_rap=True, kernelSampleShare=0.2)
    await p.sync()
    telemetry.record_local(NodeStats("node", 0.95, 0.2, NOW))
    telemetry.record_local(NodeStats("node", 0.95, 0.2, NOW))
    assert await p.refresh_weights() == 2  # sampling starts, all local: where rap starts
    (split,) = table.splits.values()
    assert split.sample_share == 0.2 and split.shares == (1.0, 0.0)
    # The shared local pod answers in 200 ms, each Service's remote one in 1 ms.
    for ip, seconds in (("10.244.0.1", 0.2), ("10.244.1.0", 0.001), ("10.244.1.1", 0.001)):
        for _ in range(3):
            queued = p.balancer.connection_opened((ip, 8080), 0.0005, NOW)
            p.balancer.first_response((ip, 8080), 0.0005, seconds, NOW, queued)
            p.balancer.connection_closed((ip, 8080), awaiting=False)
    decided: Counter[str] = Counter()
    for index in range(2):  # 5 decisions each: neither alone reaches MIN_SAMPLES (8)
        key = p.service_for("TCP", f"10.96.1.{index}", 80)
        assert key is not None
        for _ in range(5):
            backend = p.choose(key, "10.200.0.1", frozenset())
            assert backend is not None
            decided["local" if backend.ip == "10.244.0.1" else "remote"] += 1
    assert await p.refresh_weights() == 2
    (split,) = table.splits.values()
    assert split.shares[0] == pytest.approx(decided["local"] / 10)
    assert split.shares[0] < 0.5
