"""RAP at run time: the pieces of the telemetry exchange assembled for one daemon.

The daemon owns one `RapRuntime`. It holds the `TelemetryTracker` (the single owner of telemetry
state), the policy factory the `Balancer` builds RAP policies from, the collector that samples
this node, and — when a shared token is configured — the endpoint peers poll and the poller that
polls them. `NodeDirectory` is the cluster's node list as the informers (or static files) report
it: who the peers are, and which source addresses may ask for our figures.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from rapproxy.balancer.balancer import PolicyFactory
from rapproxy.balancer.rap import rap_policy_factory
from rapproxy.config import RapproxyConfiguration
from rapproxy.model.errors import InvalidObject
from rapproxy.model.node import NodeInfo, parse_node
from rapproxy.model.telemetry import NodeStats, RapSettings, TelemetryTracker
from rapproxy.telemetry.collector import Collector, probe_from_spec
from rapproxy.telemetry.poller import PeerPoller, PeerTarget
from rapproxy.telemetry.server import TELEMETRY_PATH, TelemetryEndpoint, TokenFile

log = logging.getLogger(__name__)


def rap_settings(config: RapproxyConfiguration) -> RapSettings:
    """The policy's settings from the configuration file's `rap` section."""
    rap = config.rap
    return RapSettings(
        overload_threshold=rap.overload_threshold,
        exit_threshold=rap.exit_threshold,
        w_cpu=rap.weights.cpu,
        w_mem=rap.weights.memory,
        w_rtt=rap.weights.rtt,
        top_k=rap.top_candidates,
        telemetry_interval=rap.telemetry_interval,
        stale_after_periods=float(rap.stale_after_periods),
        rtt_alpha=rap.rtt_ewma_alpha,
        spill_backoff=rap.spill_backoff,
        spill_margin=rap.spill_margin,
        latency_rise=rap.latency_rise,
        latency_fall=rap.latency_fall,
        signal_hold=rap.signal_hold,
        spill_needs_overload=rap.spill_needs_overload,
        spill_recovery=rap.spill_recovery,
        poll_timeout=min(0.5, rap.telemetry_interval),
    )


@dataclass
class NodeDirectory:
    """Nodes by name, updated from Node objects; answers the telemetry exchange's questions."""

    local_node: str
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    listed: asyncio.Event = field(default_factory=asyncio.Event)

    def upsert(self, obj: Mapping[str, Any]) -> None:
        try:
            node = parse_node(obj)
        except InvalidObject as error:
            log.warning("skipping invalid Node: %s", error)
            return
        self.nodes[node.name] = node

    def delete(self, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        self.nodes.pop(str(meta.get("name")), None)

    def replace_all(self, objects: Any) -> None:
        self.nodes.clear()
        for obj in objects:
            self.upsert(obj)
        self.listed.set()

    def is_node_ip(self, address: str) -> bool:
        return any(address in node.addresses for node in self.nodes.values())

    def local_address(self) -> str | None:
        node = self.nodes.get(self.local_node)
        return node.primary_address if node is not None else None

    def peer_targets(self, port: int) -> list[PeerTarget]:
        return [
            PeerTarget(node.name, node.primary_address, port)
            for node in self.nodes.values()
            if node.name != self.local_node and node.primary_address is not None
        ]


class RapRuntime:
    def __init__(self, config: RapproxyConfiguration, node_name: str) -> None:
        self.config = config
        self.settings = rap_settings(config)
        self.tracker = TelemetryTracker(node_name, self.settings)
        self.policy_factory: PolicyFactory = rap_policy_factory(
            self.tracker.snapshot, self.settings, random.Random()
        )
        self.collector = Collector(node_name, probe_from_spec(config.rap.load_source))
        self.nodes = NodeDirectory(node_name)
        self.tokens = TokenFile(config.rap.token_file) if config.rap.token_file else None
        self.endpoint: TelemetryEndpoint | None = None

    def routes(
        self, active_connections: Callable[[], Mapping[str, int]]
    ) -> list[tuple[str, str, Callable[..., Any]]]:
        """The telemetry route for the health server; none without a token."""
        if self.tokens is None:
            return []
        self.endpoint = TelemetryEndpoint(
            stats=lambda: self.collector.latest,
            active_connections=active_connections,
            token=self.tokens.current,
            is_node_ip=self.nodes.is_node_ip,
        )
        return [("GET", TELEMETRY_PATH, self.endpoint.handle)]

    def tasks(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        """Long-running work: sampling this node, and polling peers when a token is set."""
        interval = self.settings.telemetry_interval

        async def sample() -> None:
            await self.collector.run(self.record_local, interval)

        work: list[Callable[[], Coroutine[Any, Any, None]]] = [sample]
        if self.tokens is not None:
            tokens = self.tokens

            async def poll() -> None:
                await self.nodes.listed.wait()  # the source address is the node's own IP
                poller = PeerPoller(
                    self.tracker,
                    targets=lambda: self.nodes.peer_targets(self.config.rap.telemetry_port),
                    token=tokens.current,
                    source_address=self.nodes.local_address(),
                )
                try:
                    await poller.run()
                finally:
                    await asyncio.shield(poller.close())

            work.append(poll)
        else:
            log.info("rap.tokenFile is empty: peer telemetry off; RAP sees only this node")
        return work

    def record_local(self, stats: NodeStats) -> None:
        """This node's sample into the tracker; a change of its overloaded state is logged
        (the moment RAP starts or stops spilling)."""
        before = self.tracker.snapshot().nodes.get(self.tracker.local_node)
        self.tracker.record_local(stats)
        after = self.tracker.snapshot().nodes.get(self.tracker.local_node)
        was = before is not None and before.overloaded
        if after is not None and after.overloaded != was:
            log.info(
                "this node is %s (cpu %.2f, memory %.2f)",
                "overloaded" if after.overloaded else "no longer overloaded",
                stats.cpu,
                stats.memory,
            )

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "peers": sorted(self.nodes.nodes),
            "telemetry": self.tracker.snapshot().describe(now),
        }
