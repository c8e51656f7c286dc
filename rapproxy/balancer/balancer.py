"""The Balancer: per-service selection state and the full decision for a new connection.

For each connection the decision runs, in order:

1. categorize the endpoints (ready → serving-terminating, topology, traffic policy — computed
   once per snapshot, not per connection);
2. drop endpoints already tried for this connection and those the outlier detector ejected;
3. honour ClientIP affinity when the sticky endpoint is still a candidate;
4. otherwise ask the service's policy.

The Balancer is the single owner of that mutable state. It is fed whole `ServiceTable` snapshots;
state for services whose endpoints did not change survives the swap, so a sync never resets
round-robin cursors or affinity for unrelated services.

Outlier records are per endpoint address, not per service, and must not outlive the endpoint: an
address that comes back (a new pod given a recycled IP) starts with a clean record. The Balancer
therefore counts how many services hold each address and drops an address's record as soon as
the last one lets go of it. That keeps the records correct on every incremental update, so no
update ever has to walk the whole table to prune them (in a 10k-Service cluster such a walk cost
a periodic resync hundreds of milliseconds on the event loop).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rapproxy.balancer.affinity import AffinityTable
from rapproxy.balancer.categorize import Categorized, Locality, categorize
from rapproxy.balancer.outlier import OutlierDetector, OutlierSettings
from rapproxy.balancer.policy import (
    Choice,
    LeastConnections,
    LocalOnly,
    Placement,
    Policy,
    RandomChoice,
    RoundRobin,
    SelectionContext,
)
from rapproxy.balancer.signals import EndpointSignals
from rapproxy.model.endpoints import Endpoint
from rapproxy.model.service import LbPolicy, ServicePortName
from rapproxy.model.table import ServiceEntry, ServiceTable

EndpointKey = tuple[str, int]
PolicyFactory = Callable[[LbPolicy], Policy]


def key_of(endpoint: Endpoint) -> EndpointKey:
    return (endpoint.ip, endpoint.port)


def basic_policy_factory(rng: random.Random) -> PolicyFactory:
    """Policies that need nothing but a random source. RAP is added by the caller when wired."""

    def make(kind: LbPolicy) -> Policy:
        if kind is LbPolicy.RANDOM:
            return RandomChoice(rng)
        if kind is LbPolicy.LEAST_CONN:
            return LeastConnections(rng)
        if kind is LbPolicy.LOCAL_ONLY:
            return LocalOnly()
        return RoundRobin()

    return make


@dataclass(slots=True)
class _ServiceState:
    entry: ServiceEntry
    categorized: Categorized
    kind: LbPolicy  # what was asked for; `policy.name` differs when the factory substitutes
    policy: Policy
    affinity: AffinityTable | None
    by_key: dict[EndpointKey, Endpoint] = field(default_factory=dict)


class ChoiceTally:
    """The policy's choices by node, counted for the kernel fast path (its sampled split)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str | None, int] = {}

    def take(self) -> dict[str | None, int]:
        """The counts so far; counting starts again from zero."""
        counts, self.counts = self.counts, {}
        return counts


class Balancer:
    def __init__(
        self,
        where: Locality,
        *,
        default_policy: LbPolicy = LbPolicy.ROUND_ROBIN,
        policy_factory: PolicyFactory | None = None,
        rng: random.Random | None = None,
        outliers: OutlierSettings | None = None,
        signals: EndpointSignals | None = None,
    ) -> None:
        self.where = where
        self.default_policy = default_policy
        self._rng = rng or random.Random()
        self._make_policy = policy_factory or basic_policy_factory(self._rng)
        self._services: dict[ServicePortName, _ServiceState] = {}
        # How many services list each endpoint address (keys shared with `_ServiceState.by_key`).
        self._endpoint_refs: dict[EndpointKey, int] = {}
        self._outliers = OutlierDetector(outliers)
        self.signals = signals if signals is not None else EndpointSignals()
        self._active: defaultdict[EndpointKey, int] = defaultdict(int)
        # Of those, the ones awaiting a response: what queues at the pod (see `first_response`).
        self._awaiting: defaultdict[EndpointKey, int] = defaultdict(int)
        # Per endpoint with requests awaiting a response: when it last made progress (answered
        # one, or was handed work while idle). See `stalled_for`.
        self._progress_at: dict[EndpointKey, float] = {}
        self.selections: defaultdict[Placement, int] = defaultdict(int)
        # Per service whose decisions are counted: choices per node since the last `take_tally`
        # (the kernel fast path's sample, balancer/kernel_weights.py). Empty: nothing counted.
        self._tallies: dict[ServicePortName, ChoiceTally] = {}
        # The snapshot the state reflects; None until the first update, or after one failed.
        self.table: ServiceTable | None = None

    # -- snapshot updates ---------------------------------------------------------------------

    def update(self, table: ServiceTable, changed: Iterable[ServicePortName] | None = None) -> None:
        """Swap in a new snapshot, keeping state of services whose entry did not change.

        `changed` names every port whose entry may differ from `self.table` (the snapshot of the
        previous update); only those are visited, so an endpoint change costs O(that service),
        not O(cluster). Without it (the first update, or when the caller cannot tell what
        changed) every service is compared.
        """
        self.table = None  # until this update is complete: a failed one forces a whole one next
        if changed is None:
            self._update_whole(table)
        else:
            self._update_changed(table, changed)
        self.table = table

    def _update_whole(self, table: ServiceTable) -> None:
        services: dict[ServicePortName, _ServiceState] = {}
        refs: dict[EndpointKey, int] = {}
        for name in table:
            entry = table.entries[name]
            previous = self._services.get(name)
            if previous is not None and previous.entry == entry:
                state = previous
            else:
                state = self._new_state(entry, previous)
            services[name] = state
            for key in state.by_key:
                refs[key] = refs.get(key, 0) + 1
        self._services = services
        self._endpoint_refs = refs
        self._outliers.retain(refs)
        self.signals.retain(refs)

    def _update_changed(self, table: ServiceTable, changed: Iterable[ServicePortName]) -> None:
        released: list[EndpointKey] = []
        for name in changed:
            entry = table.entries.get(name)
            previous = self._services.get(name)
            if entry is None:
                if previous is not None:
                    del self._services[name]
                    self._release(previous, released)
            elif previous is None or previous.entry != entry:
                state = self._services[name] = self._new_state(entry, previous)
                self._hold(state)
                if previous is not None:
                    self._release(previous, released)
        # Checked after the loop: an address can move from one service to another in one update.
        gone = [key for key in released if key not in self._endpoint_refs]
        self._outliers.forget(gone)
        self.signals.forget(gone)

    def _hold(self, state: _ServiceState) -> None:
        refs = self._endpoint_refs
        for key in state.by_key:
            refs[key] = refs.get(key, 0) + 1

    def _release(self, state: _ServiceState, released: list[EndpointKey]) -> None:
        refs = self._endpoint_refs
        for key in state.by_key:
            remaining = refs.get(key, 0) - 1
            if remaining > 0:
                refs[key] = remaining
            else:
                refs.pop(key, None)
                released.append(key)

    def _new_state(self, entry: ServiceEntry, previous: _ServiceState | None) -> _ServiceState:
        kind = entry.port.lb_policy or self.default_policy
        policy = (
            previous.policy
            if previous is not None and previous.kind is kind
            else self._make_policy(kind)
        )
        timeout = entry.port.affinity_timeout_seconds
        affinity: AffinityTable | None = None
        if timeout is not None:
            if previous is not None and previous.affinity is not None:
                affinity = previous.affinity
                affinity.timeout_seconds = timeout
            else:
                affinity = AffinityTable(timeout)
            affinity.retain_endpoints({key_of(e) for e in entry.endpoints})
        return _ServiceState(
            entry=entry,
            categorized=categorize(entry.endpoints, self.where),
            kind=kind,
            policy=policy,
            affinity=affinity,
            by_key={key_of(e): e for e in entry.endpoints},
        )

    # -- the connection path ------------------------------------------------------------------

    def has_endpoints(self, name: ServicePortName) -> bool:
        state = self._services.get(name)
        return state is not None and bool(state.categorized.cluster or state.categorized.local)

    def choose(
        self,
        name: ServicePortName,
        client_ip: str,
        now: float,
        *,
        external: bool = False,
        tried: frozenset[EndpointKey] = frozenset(),
    ) -> Choice | None:
        state = self._services.get(name)
        if state is None:
            return None
        port = state.entry.port
        local_only = port.external_traffic_local if external else port.internal_traffic_local
        candidates: Sequence[Endpoint] = state.categorized.for_traffic(local_only)
        if tried:
            candidates = [e for e in candidates if key_of(e) not in tried]
        candidates = self._outliers.filter(candidates, now)
        if not candidates:
            return None

        if state.affinity is not None:
            sticky = state.affinity.lookup(client_ip, now)
            if sticky is not None and sticky not in tried:
                endpoint = state.by_key.get(sticky)
                if endpoint is not None and endpoint in candidates:
                    state.affinity.remember(client_ip, sticky, now)
                    placement = (
                        Placement.LOCAL
                        if endpoint.node_name == self.where.node_name
                        else Placement.REMOTE
                    )
                    self.selections[placement] += 1
                    return Choice(endpoint, placement, "session affinity (ClientIP)")

        context = SelectionContext(
            name,
            client_ip,
            now,
            self.where,
            self.active_connections,
            self.signals,
            self.requests_in_flight,
            self.stalled_for,
        )
        choice = state.policy.choose(candidates, context)
        if choice is None:
            return None
        if state.affinity is not None:
            state.affinity.remember(client_ip, key_of(choice.endpoint), now)
        self.selections[choice.placement] += 1
        if self._tallies:
            tally = self._tallies.get(name)
            if tally is not None:
                node = choice.endpoint.node_name
                tally.counts[node] = tally.counts.get(node, 0) + 1
        return choice

    # -- decision counts for the kernel fast path -----------------------------------------------

    def count_choices(self, name: ServicePortName, into: ChoiceTally | None = None) -> ChoiceTally:
        """Count the policy's choices for `name` by node, into `into` (several service ports
        may share one: a kernel layout's) or a tally of its own (kept if it has one)."""
        if into is not None:
            self._tallies[name] = into
            return into
        return self._tallies.setdefault(name, ChoiceTally())

    def stop_counting(self, name: ServicePortName) -> None:
        self._tallies.pop(name, None)

    def take_tally(self, name: ServicePortName) -> dict[str | None, int]:
        """The choices counted into `name`'s tally since it was last taken; counting goes on."""
        tally = self._tallies.get(name)
        return {} if tally is None else tally.take()

    def dial_failed(
        self, name: ServicePortName, endpoint: EndpointKey, client_ip: str, now: float
    ) -> None:
        """A dial failed: feed outlier detection and reset the client's affinity."""
        # A connection may have picked the endpoint just before a sync removed it. Recording
        # that failure would leave a record nothing prunes, waiting for the address to return.
        if endpoint in self._endpoint_refs:
            self._outliers.record_failure(endpoint, now)
        state = self._services.get(name)
        if state is not None and state.affinity is not None:
            state.affinity.forget_client(client_ip)

    def connection_opened(
        self, endpoint: EndpointKey, connect_seconds: float | None = None, now: float = 0.0
    ) -> int:
        """A dial succeeded (after `connect_seconds`, when the caller measured it).

        The connection counts as open, and as a request in flight until it is answered
        (`first_response`, `response_started`) or closed. Returns the requests in flight to
        the endpoint now, this one included: the queue it joins, which its latency sample is
        filed under (`first_response`).
        """
        self._active[endpoint] += 1
        self._begin_request(endpoint, now)
        self._outliers.record_success(endpoint)
        if connect_seconds is not None and endpoint in self._endpoint_refs:
            self.signals.connected(endpoint, connect_seconds, now)
        return self._awaiting[endpoint]

    def first_response(
        self,
        endpoint: EndpointKey,
        connect_seconds: float,
        response_seconds: float,
        now: float,
        queued: int | None = None,
    ) -> None:
        """The first byte of a response arrived `response_seconds` after the request left.

        Fed to the endpoint's signals under `queued`, the requests in flight when this one was
        sent (what `connection_opened` returned; without it, those in flight now, this one
        included), and this request is answered. An address no service holds any more
        (removed while the connection was open) is not recorded: nothing would prune it.

        Why the queue it joined and not the one at its answer: the policy asks what a request
        joining a queue of `n` will wait. The two differ most for a pod that stalls: the
        request answered last, alone in flight, is the one that waited out the stall behind
        the others, and filed under one in flight it made the pod's unloaded level look two
        or three times slower than its mean (seen in the edge grid: 30-40 ms against 16 ms).

        Why requests in flight and not open connections: with one connection per request, the
        pod answers, then closes; the client has its response and opens the next connection
        before the pod's FIN reaches the relay (on a busy machine, often). Counted by open
        connections the pod looks one deep in queue to that next connection, and a sequential
        client on an idle pod was priced at twice its service time and spilled.
        """
        if endpoint in self._endpoint_refs:
            in_flight = queued if queued is not None else self._awaiting.get(endpoint, 0)
            self.signals.responded(endpoint, connect_seconds, response_seconds, in_flight, now)
        self._answer(endpoint, now)

    def response_started(self, endpoint: EndpointKey, now: float) -> None:
        """A response began that is not timed (a later request on the connection, or a server
        that spoke first): that request is answered."""
        self._answer(endpoint, now)

    def request_started(self, endpoint: EndpointKey, now: float) -> None:
        """An answered connection sent more: a request in flight again (keep-alive)."""
        self._begin_request(endpoint, now)

    def connection_closed(self, endpoint: EndpointKey, awaiting: bool = True) -> None:
        """A connection ended; `awaiting`: its last request was still unanswered."""
        _decrement(self._active, endpoint)
        if awaiting:
            self._answer(endpoint, None)

    def _begin_request(self, endpoint: EndpointKey, now: float) -> None:
        awaiting = self._awaiting
        if endpoint not in awaiting:  # idle until now: its clock of progress starts here
            self._progress_at[endpoint] = now
        awaiting[endpoint] += 1

    def _answer(self, endpoint: EndpointKey, now: float | None) -> None:
        """A request stopped awaiting its response (`now`: answered then; None: closed)."""
        since = self._progress_at.get(endpoint)
        if now is not None and since is not None and endpoint in self._endpoint_refs:
            self.signals.silence_ended(endpoint, max(0.0, now - since))
        _decrement(self._awaiting, endpoint)
        if endpoint not in self._awaiting:
            self._progress_at.pop(endpoint, None)
        elif now is not None:
            self._progress_at[endpoint] = now

    def stalled_for(self, endpoint: Endpoint, now: float) -> float:
        """Seconds `endpoint` has had requests of ours awaiting a response without answering
        any (0 with none awaiting).

        A pod that keeps up answers one of its queue every service time; one stalled (CPU quota
        spent, a GC pause, a lock) answers none, whatever its averages say. The relay sees this
        at once and at no cost, while a latency figure shows it only when the stall is over.
        """
        since = self._progress_at.get(key_of(endpoint))
        return 0.0 if since is None else max(0.0, now - since)

    def active_connection_counts(self) -> dict[str, int]:
        """`ip:port` → open connections, as peers read it from the telemetry endpoint."""
        return {
            (f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"): n
            for (ip, port), n in self._active.items()
        }

    def active_connections(self, endpoint: Endpoint) -> int:
        return self._active.get(key_of(endpoint), 0)

    def requests_in_flight(self, endpoint: Endpoint) -> int:
        """Connections to `endpoint` awaiting a response: the queue this proxy adds to."""
        return self._awaiting.get(key_of(endpoint), 0)

    def expire_affinity(self, now: float) -> int:
        return sum(
            s.affinity.expire(now) for s in self._services.values() if s.affinity is not None
        )

    # -- explainability -----------------------------------------------------------------------

    def describe(self, now: float) -> dict[str, Any]:
        """What the balancer believes, for `/debug/state`."""
        services = {}
        for name, state in sorted(self._services.items()):
            services[str(name)] = {
                "policy": state.policy.name.value,
                "endpoints": [e.address for e in state.entry.endpoints],
                "usable": [e.address for e in state.categorized.cluster],
                "local": [e.address for e in state.categorized.local],
                "affinity_clients": len(state.affinity) if state.affinity is not None else None,
            }
            explain = getattr(state.policy, "explain", None)
            if callable(explain):
                context = SelectionContext(
                    name,
                    "",
                    now,
                    self.where,
                    self.active_connections,
                    self.signals,
                    self.requests_in_flight,
                    self.stalled_for,
                )
                services[str(name)]["decision"] = explain(
                    state.categorized.cluster, now, self.where.node_name, context
                )
        return {
            "node": self.where.node_name,
            "zone": self.where.zone,
            "services": services,
            "ejected": [f"{ip}:{port}" for ip, port in self._outliers.ejected(now)],
            "active_connections": {
                f"{ip}:{port}": n for (ip, port), n in sorted(self._active.items())
            },
            "requests_in_flight": {
                f"{ip}:{port}": n for (ip, port), n in sorted(self._awaiting.items())
            },
            "selections": {p.value: n for p, n in self.selections.items()},
        }


def _decrement(counts: defaultdict[EndpointKey, int], endpoint: EndpointKey) -> None:
    remaining = counts.get(endpoint, 0) - 1
    if remaining > 0:
        counts[endpoint] = remaining
    else:
        counts.pop(endpoint, None)
