"""Telemetry: what each node knows about every node's load and distance, as immutable snapshots.

The RAP policy decides from CPU and memory utilization and round-trip times that are gathered in
the background (the collector for this node, the peer poller for the others). This module holds
the values and the one mutable owner of them, `TelemetryTracker`, which turns samples into
`TelemetryView` snapshots. A policy reads a snapshot through a provider callable and never does
I/O on the connection path.

Three decisions live here rather than in the policy:

* **Ages use the receiver's clock only.** A peer reports how old its figures were when it answered
  (`age`); the receiver subtracts that from its own receive time. Clocks of different nodes are
  never compared, so clock skew cannot make data look fresh.
* **Overload has hysteresis, per node.** A node becomes overloaded when CPU or memory reaches
  `overload_threshold` and stops being overloaded only when both fall below `exit_threshold`.
  The state belongs to the node, not to a service: every service on this proxy sees the same
  verdict, and it changes only when a new sample arrives, so decisions do not flap between
  samples or between services.
* **Snapshots are versioned.** Every change bumps `version`; policies cache their per-snapshot work
  (endpoint grouping, scores) keyed by it, so scoring costs O(nodes) per telemetry update, not per
  connection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


class InvalidSettings(ValueError):
    """A RAP/telemetry setting out of range; `field` names it as the config file spells it."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class InvalidTelemetry(ValueError):
    """A peer's telemetry document that cannot be used; `field` names the offending key."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"telemetry {field}: {reason}")


@dataclass(frozen=True, slots=True)
class RapSettings:
    """Every knob of the RAP policy and the telemetry exchange, validated on construction.

    Utilizations are fractions (0..1). Weights are the `w_*` of the score
    `w_cpu·availCPU/max + w_mem·availMem/max + w_rtt·minRTT/RTT`. `top_k` nodes share spilled
    traffic at random in proportion to their score; `unknown_weight` is the weight of a node
    without fresh data, as a fraction of the weakest fresh candidate's score.

    `spill_backoff` and `spill_recovery` steer the local share of `rap-aimd` (see
    `next_local_share`): each local sample at or above `overload_threshold` multiplies it by
    `spill_backoff`, each below `exit_threshold` adds `spill_recovery`.

    `spill_margin`, `latency_rise`, `latency_fall`, `signal_hold` and `spill_needs_overload`
    belong to the default policy `rap` (balancer/rap_cost.py, balancer/signals.py).
    """

    overload_threshold: float = 0.8
    exit_threshold: float = 0.7
    w_cpu: float = 1.0
    w_mem: float = 1.0
    w_rtt: float = 1.0
    top_k: int = 3
    telemetry_interval: float = 1.0
    stale_after_periods: float = 3.0
    rtt_alpha: float = 0.3
    poll_timeout: float = 0.5
    unknown_weight: float = 0.25
    spill_backoff: float = 0.7
    spill_recovery: float = 0.1
    spill_margin: float = 0.25
    latency_rise: float = 0.05
    latency_fall: float = 0.05
    signal_hold: float = 2.0
    spill_needs_overload: bool = True

    def __post_init__(self) -> None:
        _fraction("overload_threshold", self.overload_threshold, allow_zero=False)
        _fraction("exit_threshold", self.exit_threshold, allow_zero=False)
        if self.exit_threshold > self.overload_threshold:
            raise InvalidSettings(
                "exit_threshold",
                f"{self.exit_threshold} must not exceed overload_threshold "
                f"{self.overload_threshold}",
            )
        for name in ("w_cpu", "w_mem", "w_rtt"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise InvalidSettings(name, f"{value!r} must be a finite number >= 0")
        if self.w_cpu + self.w_mem + self.w_rtt <= 0:
            raise InvalidSettings("w_cpu", "at least one weight must be positive")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise InvalidSettings("top_k", f"{self.top_k!r} must be an integer >= 1")
        for name in ("telemetry_interval", "poll_timeout", "stale_after_periods"):
            value = getattr(self, name)
            if not _finite(value) or value <= 0:
                raise InvalidSettings(name, f"{value!r} must be a finite number > 0")
        if self.poll_timeout > self.telemetry_interval:
            raise InvalidSettings(
                "poll_timeout",
                f"{self.poll_timeout} must not exceed telemetry_interval "
                f"{self.telemetry_interval} (polls of one round must not overlap the next)",
            )
        _fraction("rtt_alpha", self.rtt_alpha, allow_zero=False)
        _fraction("unknown_weight", self.unknown_weight, allow_zero=True)
        if not _finite(self.spill_backoff) or not 0 <= self.spill_backoff < 1:
            raise InvalidSettings(
                "spill_backoff", f"{self.spill_backoff!r} must be a number in [0, 1)"
            )
        _fraction("spill_recovery", self.spill_recovery, allow_zero=False)
        if not _finite(self.spill_margin) or not 0 <= self.spill_margin <= 10:
            raise InvalidSettings(
                "spill_margin", f"{self.spill_margin!r} must be a number in [0, 10]"
            )
        _fraction("latency_rise", self.latency_rise, allow_zero=False)
        _fraction("latency_fall", self.latency_fall, allow_zero=False)
        if not _finite(self.signal_hold) or self.signal_hold <= 0:
            raise InvalidSettings("signal_hold", f"{self.signal_hold!r} must be a number > 0")
        if not isinstance(self.spill_needs_overload, bool):
            raise InvalidSettings(
                "spill_needs_overload", f"{self.spill_needs_overload!r} must be true or false"
            )

    @property
    def stale_after(self) -> float:
        """Seconds after which a figure is treated as missing (design: 3 periods)."""
        return self.telemetry_interval * self.stale_after_periods


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fraction(name: str, value: object, *, allow_zero: bool) -> None:
    if not _finite(value):
        raise InvalidSettings(name, f"{value!r} must be a number between 0 and 1")
    assert isinstance(value, int | float)
    low_ok = value >= 0 if allow_zero else value > 0
    if not low_ok or value > 1:
        bound = "[0, 1]" if allow_zero else "(0, 1]"
        raise InvalidSettings(name, f"{value!r} must be in {bound}")


@dataclass(frozen=True, slots=True)
class PodStats:
    """One pod's usage on its node. Fractions of its limits when set, else of the node."""

    uid: str
    cpu: float | None
    memory: float | None
    cpu_limited: bool = False
    memory_limited: bool = False


@dataclass(frozen=True, slots=True)
class NodeStats:
    """One node's figures at `sampled_at` (the sampling node's monotonic clock)."""

    node_name: str
    cpu: float
    memory: float
    sampled_at: float
    pods: tuple[PodStats, ...] = ()

    def __post_init__(self) -> None:
        for name in ("cpu", "memory"):
            value = getattr(self, name)
            if not _finite(value) or not 0 <= value <= 1:
                raise InvalidTelemetry(name, f"{value!r} is not a utilization in [0, 1]")


def node_stats_to_json(
    stats: NodeStats, now: float, active_connections: Mapping[str, int]
) -> dict[str, Any]:
    """The `GET /rap/v1/telemetry` document: figures, their age, the proxy's connection counts."""
    return {
        "node": stats.node_name,
        "cpu": stats.cpu,
        "memory": stats.memory,
        "age": max(0.0, now - stats.sampled_at),
        "pods": [
            {
                "uid": p.uid,
                "cpu": p.cpu,
                "memory": p.memory,
                "cpuLimited": p.cpu_limited,
                "memoryLimited": p.memory_limited,
            }
            for p in stats.pods
        ],
        "activeConnections": dict(active_connections),
    }


@dataclass(frozen=True, slots=True)
class PeerReport:
    """A parsed telemetry document, placed on the receiver's clock."""

    stats: NodeStats
    active_connections: Mapping[str, int]


def parse_peer_report(doc: object, received_at: float) -> PeerReport:
    """Parse a peer's document; the figures are dated `received_at - age` on our clock."""
    if not isinstance(doc, Mapping):
        raise InvalidTelemetry("<document>", "must be a JSON object")
    node = doc.get("node")
    if not isinstance(node, str) or not node:
        raise InvalidTelemetry("node", "required non-empty string")
    age = doc.get("age")
    if not _finite(age) or age < 0:  # type: ignore[operator]
        raise InvalidTelemetry("age", f"{age!r} must be a number >= 0")
    assert isinstance(age, int | float)
    pods_raw = doc.get("pods") or []
    if not isinstance(pods_raw, list):
        raise InvalidTelemetry("pods", "must be a list")
    pods = []
    for i, raw in enumerate(pods_raw):
        if not isinstance(raw, Mapping) or not isinstance(raw.get("uid"), str):
            raise InvalidTelemetry(f"pods[{i}]", "must be an object with a uid")
        pods.append(
            PodStats(
                uid=raw["uid"],
                cpu=_optional_fraction(raw.get("cpu"), f"pods[{i}].cpu"),
                memory=_optional_fraction(raw.get("memory"), f"pods[{i}].memory"),
                cpu_limited=bool(raw.get("cpuLimited", False)),
                memory_limited=bool(raw.get("memoryLimited", False)),
            )
        )
    active_raw = doc.get("activeConnections") or {}
    if not isinstance(active_raw, Mapping) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in active_raw.items()
    ):
        raise InvalidTelemetry("activeConnections", "must map endpoint to an integer")
    stats = NodeStats(
        node_name=node,
        cpu=_required_float(doc.get("cpu"), "cpu"),
        memory=_required_float(doc.get("memory"), "memory"),
        sampled_at=received_at - float(age),
        pods=tuple(pods),
    )
    return PeerReport(stats, MappingProxyType(dict(active_raw)))


def _required_float(value: object, name: str) -> float:
    if not _finite(value):
        raise InvalidTelemetry(name, f"{value!r} is not a number")
    assert isinstance(value, int | float)
    return float(value)


def _optional_fraction(value: object, name: str) -> float | None:
    if value is None:
        return None
    number = _required_float(value, name)
    if not 0 <= number <= 1:
        raise InvalidTelemetry(name, f"{number!r} is not a utilization in [0, 1]")
    return number


RTT_FLOOR_SAMPLES = 10  # the windowed minimum of the poll round trip spans this many polls


@dataclass(frozen=True, slots=True)
class PeerView:
    """What this proxy believes about one node. `rtt` is an EWMA in seconds (None for self).

    `rtt_floor` is the smallest of the last `RTT_FLOOR_SAMPLES` poll round trips. A poll is an
    HTTP exchange with the peer's proxy: its round trip is the network's plus both event
    loops' and the peer's time to answer, which on a busy node is most of it (measured in the
    edge cluster: a 20 ms average against a 2.5 ms network round trip). The minimum over a
    window keeps the network's part and drops the rest, as TCP's and BBR's min-RTT filters
    do; it is what a new connection to the node pays to connect.
    """

    node_name: str
    stats: NodeStats | None
    rtt: float | None
    overloaded: bool
    last_error: str | None = None
    rtt_sample_count: int = 0
    rtt_recent: tuple[float, ...] = ()

    @property
    def rtt_floor(self) -> float | None:
        return min(self.rtt_recent) if self.rtt_recent else self.rtt

    def age(self, now: float) -> float | None:
        return None if self.stats is None else max(0.0, now - self.stats.sampled_at)


@dataclass(frozen=True, slots=True)
class TelemetryView:
    """An immutable snapshot of all telemetry; `version` changes whenever anything changes.

    `local_share` is the fraction of new connections this node keeps for its own endpoints
    (1.0 while it copes; see `next_local_share`).
    """

    version: int
    local_node: str
    stale_after: float
    nodes: Mapping[str, PeerView] = field(default_factory=lambda: MappingProxyType({}))
    local_share: float = 1.0

    def is_fresh(self, node: str, now: float) -> bool:
        """Figures exist, are younger than `stale_after`, and the last poll did not fail."""
        peer = self.nodes.get(node)
        if peer is None or peer.stats is None or peer.last_error is not None:
            return False
        if node != self.local_node and peer.rtt is None:
            return False
        return now - peer.stats.sampled_at <= self.stale_after

    def fresh_until(self, node: str) -> float:
        """The instant this node's figures turn stale (-inf when they already are unusable)."""
        peer = self.nodes.get(node)
        if peer is None or peer.stats is None or peer.last_error is not None:
            return -math.inf
        return peer.stats.sampled_at + self.stale_after

    def describe(self, now: float) -> dict[str, Any]:
        """Plain data for `/debug/state` and the metrics exporter (ages, RTTs, verdicts)."""
        out: dict[str, Any] = {}
        for name, peer in sorted(self.nodes.items()):
            out[name] = {
                "cpu": None if peer.stats is None else peer.stats.cpu,
                "memory": None if peer.stats is None else peer.stats.memory,
                "age_seconds": peer.age(now),
                "rtt_seconds": peer.rtt,
                "rtt_floor_seconds": peer.rtt_floor,
                "overloaded": peer.overloaded,
                "fresh": self.is_fresh(name, now),
                "last_error": peer.last_error,
            }
        return {
            "version": self.version,
            "local_node": self.local_node,
            "local_share": self.local_share,
            "nodes": out,
        }


EMPTY_VIEW = TelemetryView(version=0, local_node="", stale_after=3.0)


def is_overloaded(stats: NodeStats, was_overloaded: bool, settings: RapSettings) -> bool:
    """Hysteresis: enter at `overload_threshold`, leave only when both are below `exit_threshold`."""
    threshold = settings.exit_threshold if was_overloaded else settings.overload_threshold
    return stats.cpu >= threshold or stats.memory >= threshold


MIN_LOCAL_SHARE = 0.05  # below this the node keeps nothing: a trickle would only add latency


def next_local_share(share: float, stats: NodeStats, settings: RapSettings) -> float:
    """The local share after one local sample: multiplicative decrease, additive increase.

    An overloaded node does not know its excess demand — its utilization saturates at 1 — so
    it cannot compute how much to send away. Sending everything away at once (the paper's
    switch) empties the node, which then looks idle, takes everything back, and overloads again:
    with figures a telemetry period old, traffic swings between all-local and all-remote and
    the node's capacity is wasted half of the time. Instead the share shrinks by
    `spill_backoff` on each sample at or above the overload threshold, holds between the exit
    and overload thresholds, and grows by `spill_recovery` on each sample below the exit
    threshold (AIMD, as TCP's congestion window): the node settles where it is busy but not
    overloaded and only the excess spills.
    """
    load = max(stats.cpu, stats.memory)
    if load >= settings.overload_threshold:
        share *= settings.spill_backoff
        return share if share >= MIN_LOCAL_SHARE else 0.0
    if load < settings.exit_threshold:
        return min(1.0, share + settings.spill_recovery)
    return share


class TelemetryTracker:
    """The one mutable owner of telemetry state; hands out immutable `TelemetryView` snapshots.

    Fed by the collector (`record_local`) and the poller (`record_peer`, `record_failure`); read
    by policies through `snapshot` (cheap: the same object is returned until something changes).
    Pure: every method takes the time it should use.
    """

    def __init__(self, local_node: str, settings: RapSettings | None = None) -> None:
        self.local_node = local_node
        self.settings = settings or RapSettings()
        self._nodes: dict[str, PeerView] = {}
        self._version = 0
        self._snapshot: TelemetryView | None = None
        self.local_share = 1.0
        # Called after every new sample or failure (the kernel fast path recomputes its
        # weights at once rather than at its next period).
        self.on_change: list[Callable[[], None]] = []

    def _put(self, view: PeerView) -> None:
        self._nodes[view.node_name] = view
        self._version += 1
        self._snapshot = None
        for callback in self.on_change:
            callback()

    def record_local(self, stats: NodeStats) -> None:
        previous = self._nodes.get(self.local_node)
        overloaded = is_overloaded(
            stats, previous is not None and previous.overloaded, self.settings
        )
        self.local_share = next_local_share(self.local_share, stats, self.settings)
        self._put(PeerView(self.local_node, stats, None, overloaded))

    def record_peer(self, node: str, stats: NodeStats, rtt_sample: float) -> None:
        """A successful poll: new figures and one RTT sample folded into the EWMA."""
        previous = self._nodes.get(node)
        alpha = self.settings.rtt_alpha
        if previous is None or previous.rtt is None:
            rtt = rtt_sample
        else:
            rtt = alpha * rtt_sample + (1 - alpha) * previous.rtt
        overloaded = is_overloaded(
            stats, previous is not None and previous.overloaded, self.settings
        )
        count = 1 if previous is None else previous.rtt_sample_count + 1
        recent = (() if previous is None else previous.rtt_recent[-(RTT_FLOOR_SAMPLES - 1) :]) + (
            rtt_sample,
        )
        self._put(PeerView(node, stats, rtt, overloaded, None, count, recent))

    def record_failure(self, node: str, error: str) -> None:
        """A failed poll: the node is stale now, whatever the age of its last figures."""
        previous = self._nodes.get(node)
        if previous is None:
            self._put(PeerView(node, None, None, False, error))
        elif previous.last_error != error:
            self._put(
                PeerView(
                    node,
                    previous.stats,
                    previous.rtt,
                    previous.overloaded,
                    error,
                    previous.rtt_sample_count,
                    previous.rtt_recent,
                )
            )

    def retain(self, nodes: Iterable[str]) -> None:
        """Forget nodes that left the cluster (this node is always kept)."""
        keep = set(nodes) | {self.local_node}
        gone = [n for n in self._nodes if n not in keep]
        for name in gone:
            del self._nodes[name]
        if gone:
            self._version += 1
            self._snapshot = None

    def export(self) -> tuple[int, dict[str, PeerView], float]:
        """Everything `adopt` needs to mirror this tracker elsewhere (a worker process)."""
        return self._version, dict(self._nodes), self.local_share

    def adopt(self, version: int, nodes: Mapping[str, PeerView], local_share: float) -> None:
        """Become a mirror of another tracker's `export()`: the worker processes decide on the
        figures the main process collects, without sampling or polling themselves."""
        self._nodes = dict(nodes)
        self._version = version
        self.local_share = local_share
        self._snapshot = None

    @property
    def version(self) -> int:
        return self._version

    def snapshot(self) -> TelemetryView:
        if self._snapshot is None:
            self._snapshot = TelemetryView(
                version=self._version,
                local_node=self.local_node,
                stale_after=self.settings.stale_after,
                nodes=MappingProxyType(dict(self._nodes)),
                local_share=self.local_share,
            )
        return self._snapshot
