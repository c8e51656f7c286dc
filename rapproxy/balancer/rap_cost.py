"""RAP's default policy: stay local until the local pods queue, then spill by expected cost.

Why not utilization (the design's first form, kept as `rap-aimd` and `rap-switch` in rap.py):
utilization cannot tell a node that is busy from one that is overloaded, and it arrives a
telemetry period late. Measured in the emulated edge cluster, both cost RAP the cases it exists
for: a node at 99 % CPU with two clients and no queue spilled them over the WAN (0.47x
local-only), and under heavy load the spilled traffic herded between remotes on half-second-old
verdicts (0.74x round-robin). This policy decides from what the relay measures itself
(signals.py), with telemetry only as the prior for what it has not measured.

**Expected cost.** For every endpoint the policy predicts how long a new connection would take
to its first response byte:

    cost(e) = 2 * rtt(e) + server_time(e, in_flight(e) + 1)

`rtt` is the endpoint's measured connect time (a connection pays one round trip to connect and
one for the request); `server_time` reads the endpoint's measured latency-against-load curve
(signals.py) at this proxy's requests in flight to it (connections awaiting a response, not
merely open: see `Balancer.first_response`) plus the new one, an exact and current count, so a
queue shows in the cost the moment it forms. A **stall** shows at once too: an endpoint with
requests of ours awaiting a response that has answered none of them for `s` seconds
(`Balancer.stalled_for`) costs at least what is left of that silence, plus one request's share
of its curve, whatever the curve says. What is left is read from the endpoint's own recent
silences (`EndpointSignal.residual`): a pod throttled by its CPU quota, silent for 85 ms of
every 100, has far to go 5 ms into a silence and little 75 ms in, so new connections leave
early in a stall and stay late in one; a silence longer than any on record is expected to last
as long again. Its averages learn of a stall only from the requests caught in it, once it is
over; the silence says so while it happens. An endpoint without fresh figures of
its own falls back to priors: the node's telemetry round trip, and the smallest unloaded
service time measured among the service's endpoints, per connection in flight (multiplied by
`OVERLOADED_PENALTY` when telemetry says the node is overloaded). Own figures older than
`signal_hold` blend into the prior over another `signal_hold`, so an endpoint that was slow is
tried again once nothing has been heard of it — unless telemetry still calls its node
overloaded: then time alone does not forgive a slow figure (in the grid, re-trying a throttled
remote pod every few seconds brought its 90 ms stalls into the p99 of mostly local traffic).

**Spill only from an overloaded node** (`spill_needs_overload`, on by default). A local queue
on a node whose telemetry shows CPU to spare is the clients' own concurrency: sent to another
node's pod it queues there as well, a round trip further, and adds that node's work to
whatever it is doing. Measured in the edge grid, with a healthy node-1, spilling such a queue
never served more and raised the p99 by up to 1.4x. So while the local node's fresh
telemetry says *not overloaded* (below `overload_threshold`, or back below
`exit_threshold`), every connection stays local and no remote is even priced. With no fresh
figure of the local node the queue alone decides. A node that is overloaded but keeps up
(two clients on a saturated pod) still stays local: overload permits spilling, the costs
decide it.

**Local first, with hysteresis.** The cheapest local endpoint is compared with one remote
endpoint chosen by power of two choices (below). While the policy is *local*, every connection
stays local unless the local cost exceeds the remote one by `spill_margin`; then it is
*spilling*: each connection goes to whichever of the two is cheaper, so local pods stay as busy
as they can be without their queue costing more than the WAN does, and only the excess leaves.
It returns to *local* once the queue has drained — the local endpoint has nothing of ours in
flight — and its cost is back within the margin (or at once when the node is no longer
overloaded). The band is one-sided on purpose: spilling needs a clear advantage, returning
only an empty queue. Tried the other way (return only once local is cheaper by the margin),
two clients on a stalling pod 8 ms from the nearest peer stayed spilled and served 0.89x-0.95x
`local-only`. A node that is busy but keeps up (two clients on a saturated pod) never
queues enough to spill; one whose pods queue spills the moment the queue costs more than a
round trip. While spilling, an idle local endpoint not
heard of for `PROBE_AFTER` gets one connection, so a local pod that recovered is noticed even
when none of the traffic goes its way.

**Herd-free spill.** The remote endpoint is the cheaper of two drawn at random from the
endpoints of the `top_k` nodes whose cheapest endpoint costs least (measured where fresh, else
the priors; ranked again with each plan), never the cluster's single best:
costs include this proxy's in-flight count, which rises with every connection it sends, and
measured service times, which rise within a few responses of a remote starting to queue, so
proxies acting on the same stale telemetry spread instead of stampeding.

**No data at all** (no fresh telemetry and nothing measured for any candidate) → plain
round-robin, kube-proxy's behaviour, as design §3.4 asks.

Cost: the plan (grouping, priors, the pool) is cached per candidate list and telemetry
snapshot for at most `PLAN_TTL`; a decision prices up to `LOCAL_SCAN` local endpoints (two
drawn at random where there are more) and two remote ones.
"""

from __future__ import annotations

import collections
import enum
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rapproxy.balancer.policy import Choice, Placement, SelectionContext
from rapproxy.balancer.signals import EndpointKey, EndpointSignals
from rapproxy.model.endpoints import Endpoint
from rapproxy.model.service import LbPolicy
from rapproxy.model.telemetry import RapSettings, TelemetryView

__all__ = ["CostRapPolicy", "RegimeChange", "ViewProvider"]

ViewProvider = Callable[[], TelemetryView]
"""Returns the latest telemetry snapshot; must be cheap and must not do I/O."""

Stalled = Callable[[Endpoint, float], float]
"""Seconds an endpoint has had requests awaiting a response without answering any."""

DEFAULT_SERVICE = 0.001  # s per request assumed before anything of the service was measured
UNKNOWN_RTT = 0.1  # s assumed for a node with no fresh telemetry when no node's RTT is known
OVERLOADED_PENALTY = 4.0  # prior service time x this for a node telemetry calls overloaded
PLAN_TTL = 1.0  # s; the plan is rebuilt at least this often (priors follow the measurements)
RECENT_DECISIONS = 16  # kept for /debug/state
PROBE_AFTER = 0.5  # s without a local sample before an idle local endpoint is probed
LOCAL_SCAN = 3  # up to this many local endpoints are all compared; more: power of two choices

_REASON_ONLY_LOCAL = "rap: no remote endpoint"
_REASON_NO_LOCAL = "rap: no local endpoint"
_REASON_LOCAL = "rap: local endpoints keep up"
_REASON_SPILL = "rap: local queue costs more than a remote round trip"
_REASON_SPILL_LOCAL = "rap: spilling, local endpoint cheaper"
_REASON_RETURN = "rap: local queue drained"
_REASON_NO_DATA = "rap: no data, round-robin"
_REASON_PROBE = "rap: spilling, probing the idle local endpoint"
_REASON_NOT_OVERLOADED = "rap: local node not overloaded"


class RegimeChange(enum.StrEnum):
    """How the policy's local/spilling state moved on a decision (counted, for tests)."""

    NONE = "none"
    SPILL = "spill"
    RETURN = "return"


@dataclass(frozen=True, slots=True)
class _Prior:
    """What is assumed of a node's endpoints where nothing of their own is known."""

    rtt: float
    rtt_source: str  # "local", "telemetry", "unknown"
    penalty: float


@dataclass(slots=True)
class _Plan:
    candidates: Sequence[Endpoint]
    view: TelemetryView
    local_node: str
    valid_until: float
    round_robin: bool
    local: tuple[Endpoint, ...]
    pool: tuple[Endpoint, ...]
    remote_floor: float  # no remote endpoint in the pool costs less: its two round trips
    priors: dict[str | None, _Prior]
    baseline: float  # prior service time per request (s)
    # Spilling allowed: the local node is overloaded by fresh telemetry, or nothing fresh is
    # known of it, or `spill_needs_overload` is off.
    may_spill: bool


class CostRapPolicy:
    """One instance per service port (the Balancer makes one through `rap_policy_factory`)."""

    name = LbPolicy.RAP

    def __init__(
        self,
        view: ViewProvider,
        settings: RapSettings | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._view = view
        self.settings = settings or RapSettings()
        self._rng = rng or random.Random()
        self._hold = self.settings.signal_hold
        self._plan: _Plan | None = None
        self._cursor = 0
        self.spilling = False
        self.regime_changes = 0
        self.last_change = RegimeChange.NONE
        self.reasons: collections.Counter[str] = collections.Counter()
        self._recent: collections.deque[tuple[float, str, str, str, float, float]] = (
            collections.deque(maxlen=RECENT_DECISIONS)
        )

    # -- the connection path ------------------------------------------------------------------

    def choose(self, candidates: Sequence[Endpoint], context: SelectionContext) -> Choice | None:
        if not candidates:
            return None
        now = context.now
        plan = self._plan_for(candidates, context.where.node_name, now, context.signals)
        self.last_change = RegimeChange.NONE
        if plan.round_robin:
            index = self._cursor % len(candidates)
            self._cursor = index + 1
            endpoint = candidates[index]
            local = endpoint.node_name == plan.local_node
            placement = Placement.LOCAL if local else Placement.REMOTE
            return self._record(
                now, endpoint, placement, _REASON_NO_DATA, costs=(math.nan, math.nan)
            )

        signals = context.signals
        active = context.requests_in_flight or context.active_connections
        stalled = context.stalled_for
        if not plan.may_spill and plan.local:
            # Whatever the local queue costs, a node with CPU to spare keeps its traffic (see
            # `spill_needs_overload`): nothing to price but the local endpoints, and a lone one
            # not even that (the healthy node's common case, on every connection).
            if self.spilling:
                self._change(RegimeChange.RETURN)
            local_endpoint: Endpoint | None
            if len(plan.local) == 1:
                local_endpoint, local_cost = plan.local[0], math.nan
            else:
                local_endpoint, local_cost = self._cheapest_local(
                    plan, signals, active, stalled=stalled, now=now
                )
            return self._record(
                now,
                local_endpoint,
                Placement.LOCAL,
                _REASON_NOT_OVERLOADED,
                costs=(local_cost, math.nan),
            )
        local_endpoint, local_cost = self._cheapest_local(
            plan, signals, active, stalled=stalled, now=now
        )
        if not plan.pool:
            return self._record(
                now,
                local_endpoint,
                Placement.LOCAL,
                _REASON_ONLY_LOCAL,
                costs=(local_cost, math.nan),
            )
        margin = 1.0 + self.settings.spill_margin
        # No remote connection can cost less than its two round trips: a local endpoint cheaper
        # than that needs no remote priced (the common, healthy case).
        if (
            not self.spilling
            and local_endpoint is not None
            and local_cost <= plan.remote_floor * margin
        ):
            return self._record(
                now,
                local_endpoint,
                Placement.LOCAL,
                _REASON_LOCAL,
                costs=(local_cost, plan.remote_floor),
            )
        remote_endpoint, remote_cost = self._draw_remote(
            plan, signals, active, stalled=stalled, now=now
        )
        if local_endpoint is None:
            return self._record(
                now,
                remote_endpoint,
                Placement.REMOTE,
                _REASON_NO_LOCAL,
                costs=(math.nan, remote_cost),
            )

        if self.spilling and local_cost > remote_cost * margin and active(local_endpoint) == 0:
            record = signals.get(key_of(local_endpoint)) if signals is not None else None
            if record is None or now - record.service_at > PROBE_AFTER:
                # Spilling keeps traffic off a slow local pod, which then has nothing new to
                # say: one connection now and then keeps its figures current.
                return self._record(
                    now,
                    local_endpoint,
                    Placement.LOCAL,
                    _REASON_PROBE,
                    costs=(local_cost, remote_cost),
                )
        if not self.spilling:
            if local_cost <= remote_cost * margin:
                return self._record(
                    now,
                    local_endpoint,
                    Placement.LOCAL,
                    _REASON_LOCAL,
                    costs=(local_cost, remote_cost),
                )
            self._change(RegimeChange.SPILL)
            return self._record(
                now,
                remote_endpoint,
                Placement.REMOTE,
                _REASON_SPILL,
                costs=(local_cost, remote_cost),
            )
        local_idle = active(local_endpoint) == 0
        if local_idle and local_cost <= remote_cost * margin:
            self._change(RegimeChange.RETURN)
            return self._record(
                now,
                local_endpoint,
                Placement.LOCAL,
                _REASON_RETURN,
                costs=(local_cost, remote_cost),
            )
        if local_cost <= remote_cost:
            return self._record(
                now,
                local_endpoint,
                Placement.LOCAL,
                _REASON_SPILL_LOCAL,
                costs=(local_cost, remote_cost),
            )
        return self._record(
            now, remote_endpoint, Placement.REMOTE, _REASON_SPILL, costs=(local_cost, remote_cost)
        )

    def _change(self, change: RegimeChange) -> None:
        self.spilling = change is RegimeChange.SPILL
        self.regime_changes += 1
        self.last_change = change

    def _record(
        self,
        now: float,
        endpoint: Endpoint | None,
        placement: Placement,
        reason: str,
        *,
        costs: tuple[float, float],
    ) -> Choice | None:
        """Count and remember a decision; `costs`: the local and remote costs it compared."""
        if endpoint is None:
            return None
        self.reasons[reason] += 1
        self._recent.append((now, endpoint.address, placement.value, reason, *costs))
        return Choice(endpoint, placement, reason)

    def _cheapest_local(
        self,
        plan: _Plan,
        signals: EndpointSignals | None,
        active: Callable[[Endpoint], int],
        *,
        stalled: Stalled | None,
        now: float,
    ) -> tuple[Endpoint | None, float]:
        """The cheaper local endpoint: all compared when there are up to `LOCAL_SCAN` (ties
        round-robin, the scan rotates), else the cheaper of two drawn at random."""
        local = plan.local
        count = len(local)
        if count == 0:
            return None, math.inf
        if count == 1:
            return local[0], self._cost(local[0], plan, signals, active, stalled=stalled, now=now)
        if count > LOCAL_SCAN:
            return self._cheaper_of_two(local, plan, signals, active, stalled=stalled, now=now)
        start = self._cursor % count
        best: Endpoint | None = None
        best_cost = math.inf
        for offset in range(count):
            endpoint = local[(start + offset) % count]
            cost = self._cost(endpoint, plan, signals, active, stalled=stalled, now=now)
            if cost < best_cost:
                best, best_cost = endpoint, cost
        self._cursor = start + 1
        return best, best_cost

    def _cheaper_of_two(
        self,
        endpoints: Sequence[Endpoint],
        plan: _Plan,
        signals: EndpointSignals | None,
        active: Callable[[Endpoint], int],
        *,
        stalled: Stalled | None,
        now: float,
    ) -> tuple[Endpoint, float]:
        """Power of two choices, the two sampled without replacement."""
        random = self._rng.random  # int(random() * n): randrange costs several times more
        count = len(endpoints)
        first = int(random() * count)
        second = int(random() * (count - 1))
        if second >= first:
            second += 1
        a, b = endpoints[first], endpoints[second]
        cost_a = self._cost(a, plan, signals, active, stalled=stalled, now=now)
        cost_b = self._cost(b, plan, signals, active, stalled=stalled, now=now)
        return (a, cost_a) if cost_a <= cost_b else (b, cost_b)

    def _draw_remote(
        self,
        plan: _Plan,
        signals: EndpointSignals | None,
        active: Callable[[Endpoint], int],
        *,
        stalled: Stalled | None,
        now: float,
    ) -> tuple[Endpoint, float]:
        pool = plan.pool
        if len(pool) == 1:
            return pool[0], self._cost(pool[0], plan, signals, active, stalled=stalled, now=now)
        return self._cheaper_of_two(pool, plan, signals, active, stalled=stalled, now=now)

    def _cost(
        self,
        endpoint: Endpoint,
        plan: _Plan,
        signals: EndpointSignals | None,
        active: Callable[[Endpoint], int],
        *,
        stalled: Stalled | None,
        now: float,
    ) -> float:
        """Predicted seconds from dial to first response byte for a new connection."""
        # On the connection path: the fresh case is inlined, the stale one blends (_blend).
        prior = plan.priors[endpoint.node_name]
        rtt = prior.rtt
        in_flight = active(endpoint) + 1  # with the new connection
        server = plan.baseline * prior.penalty * in_flight
        record = signals.records.get((endpoint.ip, endpoint.port)) if signals is not None else None
        if record is not None:
            hold = self._hold
            if record.connect_samples:
                age = now - record.connect_at
                rtt = record.connect if age <= hold else _blend(record.connect, rtt, age, hold)
            if record.curve:
                measured = record.server_time(in_flight)
                age = now - record.service_at
                if age <= hold or (prior.penalty > 1.0 and measured > server):
                    server = measured  # fresh, or slow on a node telemetry still calls overloaded
                else:
                    server = _blend(measured, server, age, hold)
        if stalled is not None:
            silent = stalled(endpoint, now)
            if silent > 0.0:
                # Requests of ours have had no answer for `silent` seconds: whatever the curve
                # says, the new one waits out what is left of that silence, then its turn.
                rest = record.residual(silent) if record is not None else silent
                server = max(server, rest + server / in_flight)
        return 2.0 * rtt + server

    # -- per-snapshot work --------------------------------------------------------------------

    def _plan_for(
        self,
        candidates: Sequence[Endpoint],
        local_node: str,
        now: float,
        signals: EndpointSignals | None,
    ) -> _Plan:
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
        plan = _make_plan(candidates, view, local_node, now, self.settings, signals=signals)
        self._plan = plan
        return plan

    # -- explainability -----------------------------------------------------------------------

    def explain(
        self,
        candidates: Sequence[Endpoint],
        now: float,
        local_node: str | None = None,
        context: SelectionContext | None = None,
    ) -> dict[str, Any]:
        """Every endpoint's signals and predicted cost, and the last decisions with their costs."""
        view = self._view()
        node = local_node if local_node is not None else view.local_node
        signals = context.signals if context is not None else None
        stalled = context.stalled_for if context is not None else None
        active: Callable[[Endpoint], int] = (
            (context.requests_in_flight or context.active_connections)
            if context is not None
            else (lambda _e: 0)
        )
        plan = _make_plan(candidates, view, node, now, self.settings, signals=signals)
        local_peer = view.nodes.get(node)
        in_pool = set(plan.pool)
        endpoints: dict[str, Any] = {}
        for endpoint in candidates:
            prior = plan.priors[endpoint.node_name]
            measured = (
                signals.describe((endpoint.ip, endpoint.port), now) if signals is not None else None
            )
            endpoints[endpoint.address] = {
                "node": endpoint.node_name,
                "local": endpoint.node_name == node,
                "in_spill_pool": endpoint in in_pool,
                "in_flight": active(endpoint),
                "stalled_seconds": (
                    round(stalled(endpoint, now), 6) if stalled is not None else None
                ),
                "measured": measured,
                "prior_rtt_seconds": round(prior.rtt, 6),
                "prior_rtt_from": prior.rtt_source,
                "prior_service_seconds": round(plan.baseline * prior.penalty, 6),
                "expected_cost_seconds": (
                    None
                    if plan.round_robin
                    else round(
                        self._cost(endpoint, plan, signals, active, stalled=stalled, now=now), 6
                    )
                ),
            }
        recent = [
            {
                "age_seconds": round(now - at, 3),
                "endpoint": address,
                "placement": placement,
                "reason": reason,
                "local_cost_seconds": None if math.isnan(lc) else round(lc, 6),
                "remote_cost_seconds": None if math.isnan(rc) else round(rc, 6),
            }
            for at, address, placement, reason, lc, rc in reversed(self._recent)
        ]
        local_recent = sum(1 for entry in self._recent if entry[2] == Placement.LOCAL.value)
        return {
            "policy": self.name.value,
            "decision": (
                "round-robin (no data)"
                if plan.round_robin
                else ("spilling" if self.spilling else "local")
            ),
            "local_node": node,
            "local_overloaded": local_peer.overloaded if local_peer is not None else None,
            "may_spill": plan.may_spill,
            "local_queueing": self.spilling,
            "local_share": (local_recent / len(self._recent)) if self._recent else None,
            "spill_margin": self.settings.spill_margin,
            "regime_changes": self.regime_changes,
            "baseline_service_seconds": round(plan.baseline, 6),
            "telemetry_version": view.version,
            "endpoints": endpoints,
            "reasons": dict(self.reasons),
            "recent": recent,
        }


def key_of(endpoint: Endpoint) -> EndpointKey:
    return (endpoint.ip, endpoint.port)


def _blend(value: float, prior: float, age: float, hold: float) -> float:
    """Own figure while younger than `hold`, then sliding back to the prior over `hold`."""
    if age <= hold:
        return value
    weight = math.exp(-(age - hold) / hold)
    return prior + (value - prior) * weight


def _make_plan(
    candidates: Sequence[Endpoint],
    view: TelemetryView,
    local_node: str,
    now: float,
    settings: RapSettings,
    *,
    signals: EndpointSignals | None,
) -> _Plan:
    grouped: dict[str | None, list[Endpoint]] = {}
    for endpoint in candidates:
        grouped.setdefault(endpoint.node_name, []).append(endpoint)
    local = tuple(grouped.get(local_node, ()))

    fresh = {n for n in grouped if n is not None and view.is_fresh(n, now)}
    local_fresh = view.is_fresh(local_node, now)
    local_peer = view.nodes.get(local_node)
    may_spill = (
        not settings.spill_needs_overload
        or not local_fresh
        or (local_peer is not None and local_peer.overloaded)
    )
    valid_until = min(
        [now + PLAN_TTL, *(view.fresh_until(n) for n in fresh)]
        + ([view.fresh_until(local_node)] if local_fresh else [])
    )

    # Service-time prior, per request: the smallest fresh unloaded figure among these endpoints.
    baseline = math.inf
    measured_any = False
    if signals is not None:
        hold = settings.signal_hold
        for endpoint in candidates:
            record = signals.get((endpoint.ip, endpoint.port))
            if record is None:
                continue
            measured_any = True
            if record.curve and now - record.service_at <= hold:
                load, latency = record.curve[0]
                baseline = min(baseline, latency / load)
    if baseline == math.inf:
        baseline = DEFAULT_SERVICE
    round_robin = not fresh and not local_fresh and not measured_any

    known_rtts = [
        rtt for n in fresh if n != local_node and (rtt := view.nodes[n].rtt_floor) is not None
    ]
    unknown_rtt = 2.0 * max(known_rtts) if known_rtts else UNKNOWN_RTT
    priors: dict[str | None, _Prior] = {}
    ranked: list[tuple[float, str, str | None]] = []
    floors: dict[str | None, float] = {}  # per node: its endpoints' smallest 2 x round trip
    for node, endpoints in grouped.items():
        if node == local_node:
            priors[node] = _Prior(0.0, "local", 1.0)
            continue
        peer = view.nodes.get(node) if node is not None else None
        peer_rtt = peer.rtt_floor if peer is not None else None
        if node in fresh and peer_rtt is not None:
            penalty = OVERLOADED_PENALTY if peer is not None and peer.overloaded else 1.0
            prior = _Prior(peer_rtt, "telemetry", penalty)
        else:
            prior = _Prior(unknown_rtt, "unknown", 1.0)
        priors[node] = prior
        # A node's rank: its cheapest endpoint with nothing in flight, as measured where its
        # figures are fresh, as assumed where they are not.
        assumed = 2.0 * prior.rtt + baseline * prior.penalty
        hold = settings.signal_hold
        cheapest = math.inf
        floor = 2.0 * prior.rtt
        for endpoint in endpoints:
            record = signals.get((endpoint.ip, endpoint.port)) if signals is not None else None
            if record is not None and record.connect_samples:
                # Whatever its age: a cost blends the measured round trip with the prior, so
                # the smaller of the two bounds it from below.
                floor = min(floor, 2.0 * record.connect)
            if record is None or not record.curve:
                cheapest = min(cheapest, assumed)
                continue
            rtt = record.connect if record.connect_samples else prior.rtt
            measured = 2.0 * rtt + record.server_time(1)
            if now - record.service_at > hold and not (prior.penalty > 1.0 and measured > assumed):
                measured = assumed
            cheapest = min(cheapest, measured)
        floors[node] = floor
        ranked.append((cheapest, str(node), node))
    ranked.sort()
    pool = tuple(endpoint for _, _, node in ranked[: settings.top_k] for endpoint in grouped[node])
    return _Plan(
        candidates=candidates,
        view=view,
        local_node=local_node,
        valid_until=valid_until,
        round_robin=round_robin,
        local=local,
        pool=pool,
        remote_floor=min((floors[e.node_name] for e in pool), default=math.inf),
        priors=priors,
        baseline=baseline,
        may_spill=may_spill,
    )
