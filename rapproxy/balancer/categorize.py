"""Which endpoints may take a connection: kube-proxy's endpoint categorization.

This reproduces `pkg/proxy/topology.go` `CategorizeEndpoints` for a proxy that knows, per
connection, whether the client hit an internal address (ClusterIP) or an external one (NodePort,
externalIP, LoadBalancer IP):

* usable = ready endpoints; if there are none, the ones that are serving *and* terminating, so a
  rolling update with graceful termination does not drop traffic;
* topology hints (`forNodes`, then `forZones`; the EndpointSlice controller writes them for
  `trafficDistribution: PreferClose` and topology-aware routing) narrow the ready set only when
  *every* ready endpoint carries hints and at least one matches this node or zone; they are not
  applied to the serving-terminating fallback (a best effort not to drop connections);
* a traffic policy of `Local` restricts to endpoints on this node, and there is then no fallback
  to remote endpoints (kube-proxy drops such traffic rather than send it off-node). The local set
  is decided on its own: local ready endpoints, else local serving-and-terminating ones — even
  when other nodes still have ready endpoints, so a draining node keeps serving its own clients.

Pure: the caller passes the endpoints and where this node is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rapproxy.model.endpoints import Endpoint


@dataclass(frozen=True, slots=True)
class Categorized:
    """Endpoints a connection may use: for cluster-wide policy and for `Local` policy.

    `any_endpoints` is kube-proxy's `hasAnyEndpoints`: some endpoint anywhere is usable (ready, or
    serving and terminating). When it is true but the chosen set is empty, traffic is dropped
    (policy `Local`); when it is false, the service has no endpoints at all and is rejected.
    """

    cluster: tuple[Endpoint, ...]
    local: tuple[Endpoint, ...]
    any_endpoints: bool

    def for_traffic(self, local_only: bool) -> tuple[Endpoint, ...]:
        return self.local if local_only else self.cluster


@dataclass(frozen=True, slots=True)
class Locality:
    """Where this proxy runs; endpoints are local when their node name matches."""

    node_name: str
    zone: str | None = None


def usable_endpoints(endpoints: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    """Ready endpoints, or serving-and-terminating ones when nothing is ready."""
    ready = tuple(e for e in endpoints if e.ready)
    if ready:
        return ready
    return tuple(e for e in endpoints if e.serving and e.terminating)


def categorize(endpoints: Sequence[Endpoint], where: Locality) -> Categorized:
    ready = tuple(e for e in endpoints if e.ready)
    serving_terminating = tuple(e for e in endpoints if e.serving and e.terminating)
    cluster = _apply_topology(ready, where) if ready else serving_terminating
    local = tuple(e for e in ready if e.node_name == where.node_name) or tuple(
        e for e in serving_terminating if e.node_name == where.node_name
    )
    return Categorized(
        cluster=cluster, local=local, any_endpoints=bool(ready or serving_terminating)
    )


def _apply_topology(usable: tuple[Endpoint, ...], where: Locality) -> tuple[Endpoint, ...]:
    if not usable:
        return usable
    if all(e.node_hints for e in usable):
        by_node = tuple(e for e in usable if where.node_name in e.node_hints)
        if by_node:
            return by_node
    if where.zone is None:
        return usable
    if all(e.zone_hints for e in usable):
        by_zone = tuple(e for e in usable if where.zone in e.zone_hints)
        if by_zone:
            return by_zone
    return usable
