"""Balancing policies: given the usable endpoints of one service port, pick one.

Every policy has the same shape, `choose(candidates, context) -> Choice | None`, and keeps only
its own small state (a round-robin cursor). What the candidates are — categorized, affinity
already consulted, failed and ejected endpoints removed — is decided by the `Balancer`, so a
policy never has to know about kube-proxy's rules.

`Choice.placement` says whether the connection stays on this node; it is counted in metrics
(`rapproxy_backend_selections_total{locality}`) and `reason` is shown in `/debug/state`.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from rapproxy.balancer.categorize import Locality
from rapproxy.balancer.signals import EndpointSignals
from rapproxy.model.endpoints import Endpoint
from rapproxy.model.service import LbPolicy, ServicePortName


class Placement(enum.StrEnum):
    LOCAL = "local"
    REMOTE = "remote"
    FALLBACK = "fallback"


@dataclass(frozen=True, slots=True)
class Choice:
    endpoint: Endpoint
    placement: Placement
    reason: str


@dataclass(frozen=True, slots=True)
class SelectionContext:
    """What a policy may look at besides the candidates. Built once per decision."""

    service: ServicePortName
    client_ip: str
    now: float
    where: Locality
    active_connections: Callable[[Endpoint], int]
    signals: EndpointSignals | None = None  # what the relay measured per endpoint
    # Connections awaiting a response, per endpoint (None: count open connections instead).
    requests_in_flight: Callable[[Endpoint], int] | None = None
    # Seconds an endpoint has had requests awaiting a response without answering any, at `now`.
    stalled_for: Callable[[Endpoint, float], float] | None = None


class Policy(Protocol):
    """One instance per service port; `choose` is called only with a non-empty candidate list."""

    name: LbPolicy

    def choose(
        self, candidates: Sequence[Endpoint], context: SelectionContext
    ) -> Choice | None: ...


def placement_of(endpoint: Endpoint, where: Locality) -> Placement:
    return Placement.LOCAL if endpoint.node_name == where.node_name else Placement.REMOTE


class RoundRobin:
    """kube-proxy userspace's behaviour: the next endpoint in a stable order.

    The cursor is an index into the candidate list; when the list changes size the cursor is
    wrapped, not reset, so a change of endpoints does not send a burst to the first one.
    """

    name = LbPolicy.ROUND_ROBIN

    def __init__(self) -> None:
        self._cursor = 0

    def choose(self, candidates: Sequence[Endpoint], context: SelectionContext) -> Choice | None:
        if not candidates:
            return None
        index = self._cursor % len(candidates)
        self._cursor = index + 1
        endpoint = candidates[index]
        return Choice(endpoint, placement_of(endpoint, context.where), "round-robin")


class RandomChoice:
    """Uniform random choice: kube-proxy iptables mode's `-m statistic --mode random`."""

    name = LbPolicy.RANDOM

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, candidates: Sequence[Endpoint], context: SelectionContext) -> Choice | None:
        if not candidates:
            return None
        endpoint = candidates[self._rng.randrange(len(candidates))]
        return Choice(endpoint, placement_of(endpoint, context.where), "random")


class LeastConnections:
    """Power of two choices on the proxy's own active-connection counts.

    The two samples are drawn *without* replacement: with few endpoints, drawing the same one
    twice (HAProxy's behaviour until 2025) silently degrades to plain random.
    """

    name = LbPolicy.LEAST_CONN

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, candidates: Sequence[Endpoint], context: SelectionContext) -> Choice | None:
        if not candidates:
            return None
        if len(candidates) == 1:
            endpoint = candidates[0]
        else:
            first, second = self._rng.sample(range(len(candidates)), 2)
            a, b = candidates[first], candidates[second]
            endpoint = a if context.active_connections(a) <= context.active_connections(b) else b
        return Choice(endpoint, placement_of(endpoint, context.where), "least-connections (p2c)")


class LocalOnly:
    """Only endpoints on this node, round-robin among them: `internalTrafficPolicy: Local`.

    Kept as a policy so benchmarks can compare RAP against pure locality.
    """

    name = LbPolicy.LOCAL_ONLY

    def __init__(self) -> None:
        self._round_robin = RoundRobin()

    def choose(self, candidates: Sequence[Endpoint], context: SelectionContext) -> Choice | None:
        local = [e for e in candidates if e.node_name == context.where.node_name]
        return self._round_robin.choose(local, context)
