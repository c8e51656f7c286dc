"""RAP as the design first described it: verdicts from node utilization (`rap-aimd`, `rap-switch`).

These are the named variants the default policy (`rap`, rap_cost.py) is measured against. Both
decide from CPU and memory utilization alone, which cannot tell a node that is busy from one
that is overloaded (docs/limits.md); `rap` decides from what the relay measures instead.

* `rap-switch` is the paper's switch: every new connection local while the node is below the
  overload threshold, all of them to the single best-scored node once it is above.
* `rap-aimd` keeps a gradual local share (below) and spreads spilled traffic over the `top_k`
  best nodes at random in proportion to their score.

Design §3.4, for one service port:

1. **Local first.** Usable local endpoints and a local node that is not overloaded → least active
   connections among the local endpoints, round-robin on ties. A node that is or just was
   overloaded keeps only its *local share* of new connections (the telemetry's AIMD answer to
   "how much can I still take", `model.telemetry.next_local_share`) and spills the rest — a
   departure from the paper's all-or-nothing switch, which makes a busy node's traffic swing
   between all-local and all-remote (docs/architecture.md).
2. **Best remote.** Otherwise every other node with usable endpoints and fresh, non-overloaded
   figures is scored
   `w_cpu·availCPU(n)/max availCPU + w_mem·availMem(n)/max availMem + w_rtt·minRTT/RTT(n)`
   (avail = 1 - utilization, maxima and minimum over those nodes). One of the `top_k` best is
   drawn **at random in proportion to its score** — never the bare argmax: every proxy in the
   cluster sees the same, slightly old figures, and all of them choosing the single best node
   would overload it within one telemetry period (a stampede), then all leave it together.
   Nodes without fresh data rank below every fresh node but stay eligible. Inside the drawn node
   the endpoint is chosen as in step 1. If nothing is left (everything with data is overloaded,
   this node included), least connections across all candidates (`Placement.FALLBACK`).
3. **No data at all** (no node, this one included, has fresh figures) → plain round-robin, which
   is exactly kube-proxy's behaviour: RAP without telemetry must not be worse than kube-proxy.

What the seed implementation got wrong and this one does not: no I/O on the connection path (the
view comes from an injected provider returning an immutable snapshot); thresholds compare
utilization fractions, not raw millicores; *more available* resources score higher; RTT is
measured, not random; endpoints keep their ports.

Cost: grouping endpoints by node, overload verdicts and scores are computed once per (candidate
list, telemetry snapshot) and cached — a decision itself is a weighted draw among `top_k` nodes
and a scan of one node's endpoints. The cache is also dropped when the earliest fresh figure in it
turns stale, because freshness depends on time, not only on the snapshot.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from rapproxy.balancer.balancer import PolicyFactory, basic_policy_factory
from rapproxy.balancer.policy import Choice, Placement, Policy, SelectionContext
from rapproxy.balancer.rap_cost import CostRapPolicy, ViewProvider
from rapproxy.model.endpoints import Endpoint
from rapproxy.model.service import LbPolicy
from rapproxy.model.telemetry import RapSettings, TelemetryView

__all__ = [
    "NodeShares",
    "RapDecision",
    "RapSettings",
    "UtilizationRapPolicy",
    "ViewProvider",
    "rap_policy_factory",
]


_ALL = "\x00all"  # cursor key for fallback and round-robin across every candidate
_MIN_RTT = 1e-6  # seconds; a 0 RTT (clock granularity) must not divide by zero


class RapDecision(enum.StrEnum):
    """What the policy does for the next connection of a service, as shown in `/debug/state`."""

    LOCAL = "local"
    SPILL = "spill"  # local with probability local_share, else remote
    REMOTE = "remote"
    FALLBACK = "fallback"
    ROUND_ROBIN = "round-robin (no telemetry)"


@dataclass(frozen=True, slots=True)
class _NodeScore:
    node: str | None
    score: float | None
    fresh: bool
    overloaded: bool
    weight: float
    in_top_k: bool


@dataclass(slots=True)
class _Plan:
    """Everything a decision needs that depends only on the candidates and the snapshot."""

    candidates: Sequence[Endpoint]
    view: TelemetryView
    local_node: str
    valid_until: float
    decision: RapDecision
    local: tuple[Endpoint, ...]
    groups: dict[str | None, tuple[Endpoint, ...]]
    top_nodes: tuple[str | None, ...]
    cumulative: tuple[float, ...]
    local_overloaded: bool
    scores: tuple[_NodeScore, ...]
    local_share: float


class UtilizationRapPolicy:
    """One instance per service port (the Balancer makes one through `rap_policy_factory`).

    `name` is `LbPolicy.RAP_AIMD` (the tracker's gradual local share, score-weighted spill over
    the top nodes) or `LbPolicy.RAP_SWITCH` (all local or all to the best node, by the node's
    overload verdict).
    """

    def __init__(
        self,
        view: ViewProvider,
        settings: RapSettings | None = None,
        rng: random.Random | None = None,
        *,
        variant: LbPolicy = LbPolicy.RAP_AIMD,
    ) -> None:
        if variant not in (LbPolicy.RAP_AIMD, LbPolicy.RAP_SWITCH):
            raise ValueError(f"UtilizationRapPolicy: {variant} is not a utilization variant")
        self.name: LbPolicy = variant
        self._view = view
        settings = settings or RapSettings()
        if variant is LbPolicy.RAP_SWITCH:
            settings = replace(settings, top_k=1)
        self.settings = settings
        self._rng = rng or random.Random()
        self._plan: _Plan | None = None
        self._cursors: dict[str | None, int] = {}

    # -- the connection path ------------------------------------------------------------------

    def choose(self, candidates: Sequence[Endpoint], context: SelectionContext) -> Choice | None:
        if not candidates:
            return None
        plan = self._plan_for(candidates, context.where.node_name, context.now)
        active = context.active_connections
        decision = plan.decision
        if decision is RapDecision.LOCAL:
            endpoint = self._least_connections(plan.local_node, plan.local, active)
            return Choice(endpoint, Placement.LOCAL, "rap: local node not overloaded")
        if decision is RapDecision.SPILL and self._rng.random() < plan.local_share:
            endpoint = self._least_connections(plan.local_node, plan.local, active)
            return Choice(endpoint, Placement.LOCAL, "rap: within the busy local node's share")
        if decision is RapDecision.REMOTE or decision is RapDecision.SPILL:
            node = self._draw(plan)
            endpoint = self._least_connections(node, plan.groups[node], active)
            return Choice(endpoint, Placement.REMOTE, f"rap: spilled to {node}")
        if decision is RapDecision.FALLBACK:
            endpoint = self._least_connections(_ALL, candidates, active)
            return Choice(endpoint, Placement.FALLBACK, "rap: every node overloaded")
        index = self._cursors.get(_ALL, 0) % len(candidates)
        self._cursors[_ALL] = index + 1
        endpoint = candidates[index]
        placement = Placement.LOCAL if endpoint.node_name == plan.local_node else Placement.REMOTE
        return Choice(endpoint, placement, "rap: no telemetry, round-robin")

    def _draw(self, plan: _Plan) -> str | None:
        nodes = plan.top_nodes
        if len(nodes) == 1:
            return nodes[0]
        cumulative = plan.cumulative
        target = self._rng.random() * cumulative[-1]
        for node, bound in zip(nodes, cumulative, strict=True):
            if target < bound:
                return node
        return nodes[-1]

    def _least_connections(
        self,
        key: str | None,
        endpoints: Sequence[Endpoint],
        active: Callable[[Endpoint], int],
    ) -> Endpoint:
        """Fewest active connections; ties go round-robin (the scan starts after the last pick)."""
        count = len(endpoints)
        start = self._cursors.get(key, 0) % count
        best_offset = 0
        best_active = -1
        for offset in range(count):
            n = active(endpoints[(start + offset) % count])
            if best_active < 0 or n < best_active:
                best_offset, best_active = offset, n
                if n == 0:
                    break
        index = (start + best_offset) % count
        self._cursors[key] = index + 1
        return endpoints[index]

    # -- per-snapshot work --------------------------------------------------------------------

    def _plan_for(self, candidates: Sequence[Endpoint], local_node: str, now: float) -> _Plan:
        view = self._view()
        plan = self._plan
        if (
            plan is not None
            and plan.view is view
            and plan.candidates is candidates
            and plan.local_node == local_node
            and now < plan.valid_until
        ):
            return plan
        plan = _make_plan(candidates, view, local_node, now, self.settings, switch=self._switch)
        self._plan = plan
        return plan

    @property
    def _switch(self) -> bool:
        return self.name is LbPolicy.RAP_SWITCH

    # -- explainability -----------------------------------------------------------------------

    def explain(
        self,
        candidates: Sequence[Endpoint],
        now: float,
        local_node: str | None = None,
        context: SelectionContext | None = None,
    ) -> dict[str, Any]:
        """The current decision and every node's score and input ages, for `/debug/state`.

        Pure data (no prometheus types): the exporter turns `nodes[*].score`, `rtt_seconds` and
        `age_seconds` into the `rapproxy_node_score` and telemetry gauges.
        """
        view = self._view()
        node = local_node if local_node is not None else view.local_node
        plan = _make_plan(
            candidates, view, node, now, self.settings, switch=self._switch, score_always=True
        )
        nodes: dict[str, Any] = {}
        by_name = {s.node: s for s in plan.scores}
        for name, endpoints in sorted(plan.groups.items(), key=lambda item: str(item[0])):
            peer = view.nodes.get(name) if name is not None else None
            score = by_name.get(name)
            nodes[str(name)] = {
                "endpoints": len(endpoints),
                "local": name == node,
                "fresh": name is not None and view.is_fresh(name, now),
                "overloaded": peer.overloaded if peer is not None else None,
                "cpu": None if peer is None or peer.stats is None else peer.stats.cpu,
                "memory": None if peer is None or peer.stats is None else peer.stats.memory,
                "age_seconds": None if peer is None else peer.age(now),
                "rtt_seconds": None if peer is None else peer.rtt,
                "last_error": None if peer is None else peer.last_error,
                "score": None if score is None else score.score,
                "weight": None if score is None else score.weight,
                "in_top_k": False if score is None else score.in_top_k,
            }
        return {
            "policy": self.name.value,
            "decision": plan.decision.value,
            "local_node": node,
            "local_overloaded": plan.local_overloaded,
            "local_share": plan.local_share,
            "telemetry_version": view.version,
            "nodes": nodes,
        }


def _make_plan(
    candidates: Sequence[Endpoint],
    view: TelemetryView,
    local_node: str,
    now: float,
    settings: RapSettings,
    *,
    switch: bool,
    score_always: bool = False,
) -> _Plan:
    """The decision for these candidates; `score_always` scores remote nodes even when the
    decision is local (for `explain`: operators want to see where traffic *would* spill).
    `switch`: the local share is all or nothing by the overload verdict (the paper's switch)."""
    grouped: dict[str | None, list[Endpoint]] = {}
    for endpoint in candidates:
        grouped.setdefault(endpoint.node_name, []).append(endpoint)
    groups = {node: tuple(endpoints) for node, endpoints in grouped.items()}
    local = groups.get(local_node, ())

    fresh = {n for n in groups if n is not None and view.is_fresh(n, now)}
    local_fresh = view.is_fresh(local_node, now)
    valid_until = min(
        (view.fresh_until(n) for n in fresh | ({local_node} if local_fresh else set())),
        default=math.inf,
    )
    local_peer = view.nodes.get(local_node)
    # Stale figures of our own node count as unknown, and unknown is not overloaded: staying local
    # is kube-proxy-with-locality behaviour, never worse than spreading blindly.
    local_overloaded = local_fresh and local_peer is not None and local_peer.overloaded
    if not local_fresh:
        local_share = 1.0
    elif switch:
        local_share = 0.0 if local_overloaded else 1.0
    else:
        local_share = view.local_share

    def plan(
        decision: RapDecision,
        top: tuple[str | None, ...] = (),
        cumulative: tuple[float, ...] = (),
        scores: tuple[_NodeScore, ...] = (),
    ) -> _Plan:
        return _Plan(
            candidates=candidates,
            view=view,
            local_node=local_node,
            valid_until=valid_until,
            decision=decision,
            local=local,
            groups=groups,
            top_nodes=top,
            cumulative=cumulative,
            local_overloaded=local_overloaded,
            scores=scores,
            local_share=local_share if local else 0.0,
        )

    if not fresh and not local_fresh:
        return plan(RapDecision.ROUND_ROBIN)
    # The share, not the overload verdict, decides: a node leaving overload (below the exit
    # threshold) takes its traffic back step by step; the verdict is kept for operators.
    stays_local = bool(local) and local_share >= 1.0
    if stays_local and not score_always:
        return plan(RapDecision.LOCAL)

    remote = [n for n in groups if n != local_node]
    scorable: list[str] = []
    unknown: list[str | None] = []
    overloaded: list[str] = []
    for node in remote:
        if node is not None and node in fresh:
            peer = view.nodes[node]
            (overloaded if peer.overloaded else scorable).append(node)
        else:
            unknown.append(node)
    raw = _scores(scorable, view, settings)
    ranked_fresh = sorted(scorable, key=lambda n: (-raw[n], n))
    ranked_unknown = sorted(unknown, key=str)
    top: list[str | None] = [*ranked_fresh, *ranked_unknown][: settings.top_k]
    if not top:
        scores = tuple(_NodeScore(n, None, True, True, 0.0, False) for n in overloaded)
        return plan(RapDecision.LOCAL if stays_local else RapDecision.FALLBACK, scores=scores)

    fresh_in_top = [raw[n] for n in top if n is not None and n in raw]
    unknown_weight = settings.unknown_weight * min(fresh_in_top) if fresh_in_top else 1.0
    weights = [raw[n] if n is not None and n in raw else unknown_weight for n in top]
    if sum(weights) <= 0:
        weights = [1.0] * len(top)
    cumulative: list[float] = []
    total = 0.0
    for weight in weights:
        total += weight
        cumulative.append(total)
    top_set = set(top)
    scores = tuple(
        [
            _NodeScore(n, raw[n], True, False, raw[n] if n in top_set else 0.0, n in top_set)
            for n in ranked_fresh
        ]
        + [
            _NodeScore(n, None, False, False, unknown_weight if n in top_set else 0.0, n in top_set)
            for n in ranked_unknown
        ]
        + [_NodeScore(n, None, True, True, 0.0, False) for n in overloaded]
    )
    if stays_local:
        return plan(RapDecision.LOCAL, scores=scores)
    decision = RapDecision.SPILL if local and local_share > 0 else RapDecision.REMOTE
    return plan(decision, tuple(top), tuple(cumulative), scores)


@dataclass(frozen=True, slots=True)
class NodeShares:
    """`rap-aimd`'s decision for a candidate list as fractions, for a data plane that cannot ask
    per connection (the kernel fast path, balancer/kernel_weights.py).

    `local_share` of new connections go to the local node's endpoints; the rest is split over
    `remote` (node → relative weight, the score-weighted top nodes). `spread_evenly` means no
    telemetry or every node overloaded: every candidate gets the same share.
    """

    decision: RapDecision
    local_share: float
    remote: tuple[tuple[str | None, float], ...]

    @property
    def spread_evenly(self) -> bool:
        return self.decision in (RapDecision.ROUND_ROBIN, RapDecision.FALLBACK)


def node_shares(
    candidates: Sequence[Endpoint],
    view: TelemetryView,
    local_node: str,
    now: float,
    settings: RapSettings,
) -> NodeShares:
    """The split `UtilizationRapPolicy` (rap-aimd) would draw from, as numbers."""
    plan = _make_plan(candidates, view, local_node, now, settings, switch=False)
    weights: list[float] = []
    previous = 0.0
    for bound in plan.cumulative:
        weights.append(bound - previous)
        previous = bound
    remote = tuple(zip(plan.top_nodes, weights, strict=True))
    if plan.decision is RapDecision.LOCAL:
        return NodeShares(plan.decision, 1.0, ())
    if plan.decision is RapDecision.REMOTE:
        return NodeShares(plan.decision, 0.0, remote)
    if plan.decision is RapDecision.SPILL:
        return NodeShares(plan.decision, plan.local_share, remote)
    return NodeShares(plan.decision, 0.0, ())


def _scores(nodes: Sequence[str], view: TelemetryView, settings: RapSettings) -> dict[str, float]:
    """The design's normalized score; maxima/minimum are taken over the nodes being compared."""
    if not nodes:
        return {}
    avail_cpu: dict[str, float] = {}
    avail_mem: dict[str, float] = {}
    rtt: dict[str, float] = {}
    for node in nodes:
        peer = view.nodes[node]
        assert peer.stats is not None  # fresh nodes have figures
        avail_cpu[node] = 1.0 - peer.stats.cpu
        avail_mem[node] = 1.0 - peer.stats.memory
        rtt[node] = max(peer.rtt if peer.rtt is not None else _MIN_RTT, _MIN_RTT)
    max_cpu = max(avail_cpu.values())
    max_mem = max(avail_mem.values())
    min_rtt = min(rtt.values())
    out: dict[str, float] = {}
    for node in nodes:
        score = settings.w_rtt * min_rtt / rtt[node]
        if max_cpu > 0:
            score += settings.w_cpu * avail_cpu[node] / max_cpu
        if max_mem > 0:
            score += settings.w_mem * avail_mem[node] / max_mem
        out[node] = score
    return out


def rap_policy_factory(
    view: ViewProvider,
    settings: RapSettings | None = None,
    rng: random.Random | None = None,
) -> PolicyFactory:
    """A `Balancer` policy factory: the RAP policies by name, the basic policies otherwise."""
    source = rng or random.Random()
    basic = basic_policy_factory(source)
    resolved = settings or RapSettings()

    def make(kind: LbPolicy) -> Policy:
        if kind is LbPolicy.RAP:
            return CostRapPolicy(view, resolved, source)
        if kind is LbPolicy.RAP_AIMD or kind is LbPolicy.RAP_SWITCH:
            return UtilizationRapPolicy(view, resolved, source, variant=kind)
        return basic(kind)

    return make
