"""Endpoint weights for the kernel fast path: RAP's split, as probabilities the kernel can draw.

In kernel mode no code runs per connection: iptables picks an endpoint with `statistic --mode
random`. So the choice RAP makes per connection in userspace has to be expressed ahead of time as
a share per endpoint, recomputed every period from the same telemetry (`rap-aimd`'s inputs: the
node's gradual local share from `TelemetryTracker.local_share`, and the score-weighted split of
the remainder over the `top_k` best remote nodes — `balancer.rap.node_shares`):

* local node not overloaded (local share 1) → every new connection stays local, spread evenly
  over the local endpoints;
* overloaded → the local endpoints keep `local_share` between them, and the rest is split over
  the top remote nodes in proportion to their score, then evenly inside each node. Never all of
  it to the single best node: every proxy sees the same telemetry, and all of them moving their
  whole spill at once would overload that node within a period (the herd RAP avoids);
* no telemetry at all, or every node overloaded → the same share for every endpoint, which is
  exactly kube-proxy's uniform random choice.

Relay measurements (queues, latency — what the default `rap` policy decides from) do not exist
for connections the kernel forwards; they never reach userspace. Utilization alone is a poor
guide once the node is overloaded: it saturates, so `rap-aimd`'s share only ever shrinks, and in
the edge grid it sent every connection over the WAN (0.64x userspace `rap` with node-1
overloaded at 10 ms). So while this node is overloaded (the only time `rap` spills at all) a
Service under the `rap` policy lets the proxy decide a *sample* of its connections
(`dataplane.kernelSampleShare`, REDIRECTed to the relay by the kernel chain): those get `rap`'s
full per-connection decision from queues, latency curves and stalls, and the split they were
given becomes the kernel's weights for the rest (`observed_split`, `blend`, `split_weights`).
This is a feedback loop: too much kept local queues the local pods, the sampled connections
see it and leave, the local share falls; too little, and they come back. The smoothing
(`SAMPLE_BLEND`) damps it to the period. Below `MIN_SAMPLES` decisions in a period the split is
not trusted and the previous one is kept.

Pure: the caller passes candidates, a telemetry snapshot and the time.

At ten thousand Services the shares cannot be computed Service by Service every period (about
0.2 ms each, two seconds of the event loop per period). They do not need to be: they depend on
the telemetry and on which node each candidate is on, nothing else. `layout_of` names that
shape; Services of one layout share one computation (`relabel` puts it on their endpoints), and
whether their weights moved is judged once per layout (`shares_moved`). With nftables they share
the written weights too: one node split per layout (`node_slots` names its nodes, `slot_shares`
gives each node's share, `slot_shares_moved` judges it), drawn in one chain the layout's
Services jump to, so a telemetry change rewrites a few chains, not every Service's.
The sampled split is per layout as well: the layout's Services' tallies are summed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rapproxy.balancer.rap import node_shares
from rapproxy.model.endpoints import Endpoint
from rapproxy.model.telemetry import RapSettings, TelemetryView


@dataclass(frozen=True, slots=True)
class EndpointShare:
    """The fraction of a Service's new connections one endpoint should get."""

    ip: str
    port: int
    node: str | None
    share: float


@dataclass(frozen=True, slots=True)
class KernelWeights:
    """Every candidate's share (candidate order; shares sum to 1) and why, for /debug/state."""

    shares: tuple[EndpointShare, ...]
    decision: str
    local_share: float

    def by_address(self) -> dict[tuple[str, int], float]:
        return {(s.ip, s.port): s.share for s in self.shares}


def kernel_weights(
    candidates: Sequence[Endpoint],
    view: TelemetryView,
    local_node: str,
    now: float,
    settings: RapSettings,
) -> KernelWeights:
    """The share of each candidate endpoint, from `rap-aimd`'s split of this telemetry."""
    if not candidates:
        return KernelWeights((), "no endpoints", 0.0)
    split = node_shares(candidates, view, local_node, now, settings)
    if split.spread_evenly:
        even = 1.0 / len(candidates)
        return KernelWeights(
            tuple(_share(e, even) for e in candidates), split.decision.value, split.local_share
        )
    local = [e for e in candidates if e.node_name == local_node]
    share: dict[int, float] = {}
    if local and split.local_share > 0:
        for endpoint in local:
            share[id(endpoint)] = split.local_share / len(local)
    remainder = 1.0 - (split.local_share if local else 0.0)
    total = sum(weight for _, weight in split.remote)
    if remainder > 0 and total > 0:
        for node, weight in split.remote:
            members = [e for e in candidates if e.node_name == node]
            for endpoint in members:
                share[id(endpoint)] = remainder * weight / total / len(members)
    shares = tuple(_share(e, share.get(id(e), 0.0)) for e in candidates)
    placed = sum(s.share for s in shares)
    if placed <= 0:  # cannot happen with a consistent split; never leave a Service pathless
        even = 1.0 / len(candidates)
        return KernelWeights(tuple(_share(e, even) for e in candidates), "even", 1.0)
    return KernelWeights(
        tuple(_share_of(s, s.share / placed) for s in shares),
        split.decision.value,
        split.local_share,
    )


MIN_SAMPLES = 8  # sampled decisions in a period below which their split is not trusted
SAMPLE_BLEND = 0.5  # weight of a period's observed split against the smoothed one before it

NodeSplit = Mapping[str | None, float]


def observed_split(tally: Mapping[str | None, int]) -> dict[str | None, float] | None:
    """The fraction of the sampled decisions each node got; None below `MIN_SAMPLES`."""
    total = sum(count for count in tally.values() if count > 0)
    if total < MIN_SAMPLES:
        return None
    return {node: count / total for node, count in tally.items() if count > 0}


def blend(
    previous: NodeSplit | None, observed: NodeSplit, weight: float
) -> dict[str | None, float]:
    """`weight` of `observed` plus the rest of `previous` (an EWMA over periods), normalized."""
    if previous is None:
        mixed = dict(observed)
    else:
        nodes = set(previous) | set(observed)
        mixed = {
            node: weight * observed.get(node, 0.0) + (1.0 - weight) * previous.get(node, 0.0)
            for node in nodes
        }
    total = sum(mixed.values())
    if total <= 0:
        return {}
    return {node: share / total for node, share in mixed.items() if share > 0}


def split_weights(
    candidates: Sequence[Endpoint], split: NodeSplit, local_node: str, decision: str
) -> KernelWeights | None:
    """Each node's share of `split`, spread evenly over its candidates; renormalized over the
    nodes that still have one. None when no candidate's node has a share."""
    members: dict[str | None, int] = {}
    for endpoint in candidates:
        members[endpoint.node_name] = members.get(endpoint.node_name, 0) + 1
    placed = sum(split.get(node, 0.0) for node in members)
    if placed <= 0:
        return None
    shares = tuple(
        _share(e, split.get(e.node_name, 0.0) / placed / members[e.node_name]) for e in candidates
    )
    local = sum(s.share for s in shares if s.node == local_node)
    return KernelWeights(shares, decision, local)


def uniform_weights(candidates: Sequence[Endpoint], reason: str) -> KernelWeights:
    """The same share for every candidate (traffic policy Local, or a non-RAP policy)."""
    if not candidates:
        return KernelWeights((), "no endpoints", 0.0)
    even = 1.0 / len(candidates)
    return KernelWeights(tuple(_share(e, even) for e in candidates), reason, 1.0)


Layout = tuple[str | None, ...]


def layout_of(candidates: Sequence[Endpoint]) -> Layout:
    """The node of each candidate, in order: all `kernel_weights` looks at besides telemetry."""
    return tuple(endpoint.node_name for endpoint in candidates)


def relabel(weights: KernelWeights, candidates: Sequence[Endpoint]) -> KernelWeights:
    """`weights`, computed for another candidate list of the same layout, for `candidates`."""
    if len(weights.shares) != len(candidates):
        raise ValueError(f"{len(weights.shares)} shares for {len(candidates)} candidates")
    return KernelWeights(
        tuple(_share(e, s.share) for e, s in zip(candidates, weights.shares, strict=True)),
        weights.decision,
        weights.local_share,
    )


def shares_moved(old: KernelWeights | None, new: KernelWeights, threshold: float) -> bool:
    """`weights_moved` for two weights of one layout, by position (endpoints not compared)."""
    if old is None or len(old.shares) != len(new.shares):
        return True
    return any(
        abs(a.share - b.share) > threshold for a, b in zip(old.shares, new.shares, strict=True)
    )


def weights_moved(old: KernelWeights | None, new: KernelWeights, threshold: float) -> bool:
    """Whether `new` is worth a rules write: other endpoints, or a share moved by > threshold."""
    if old is None:
        return True
    before = old.by_address()
    after = new.by_address()
    if before.keys() != after.keys():
        return True
    return any(abs(after[key] - before[key]) > threshold for key in after)


def _share(endpoint: Endpoint, share: float) -> EndpointShare:
    return EndpointShare(endpoint.ip, endpoint.port, endpoint.node_name, share)


def _share_of(share: EndpointShare, value: float) -> EndpointShare:
    return EndpointShare(share.ip, share.port, share.node, value)


def node_slots(layout: Layout) -> tuple[tuple[str | None, ...], tuple[int, ...]]:
    """A layout's nodes in order of first appearance, and each candidate's node slot (1-based):
    how a shared node split names the nodes (rules/kernel.py's `NodeSplit`)."""
    nodes: dict[str | None, int] = {}
    slots = tuple(nodes.setdefault(node, len(nodes) + 1) for node in layout)
    return tuple(nodes), slots


def slot_shares(weights: KernelWeights, slots: Sequence[int]) -> tuple[float, ...]:
    """Each node slot's share of `weights` (positional: computed for the slots' layout)."""
    if len(weights.shares) != len(slots):
        raise ValueError(f"{len(weights.shares)} shares for {len(slots)} candidates")
    out = [0.0] * max(slots, default=0)
    for share, slot in zip(weights.shares, slots, strict=True):
        out[slot - 1] += share.share
    return tuple(out)


def slot_shares_moved(old: Sequence[float], new: Sequence[float], threshold: float) -> bool:
    """Whether a node split is worth rewriting: another node count, or a share moved by more
    than `threshold`."""
    return len(old) != len(new) or any(
        abs(a - b) > threshold for a, b in zip(old, new, strict=True)
    )
