"""The kernel fast path: nat chains that DNAT a Service's connections the way kube-proxy's iptables
mode does, with RAP's weights as the probabilities.

Pure: no I/O. rules/render.py puts these chains into the same one-transaction rewrite as the
userspace redirects, so switching a Service between modes is one atomic swap of its entry rule
(a REDIRECT to the proxy becomes a jump to its chain, or back) and no new connection falls between
the two. `render_weight_update` is the cheap per-period write: only the weighted chains of the
Services whose weights moved, each declared (flushed) and refilled in one transaction, so the
kernel sees the old chain or the new one — never an empty one.

Per Service port `X` (the hash `h` is of its name, as kube-proxy hashes; names stay ≤ 28 chars):

    RAPPROXY-SERVICES  -d <clusterIP> ... --dport P  -j RAPPROXY-SVC-h   (or -SVL-h: policy Local)
                       -d <externalIP|LB IP> ...     -j RAPPROXY-EXT-h
    RAPPROXY-NODEPORTS ... --dport <nodePort>        -j RAPPROXY-EXT-h
    RAPPROXY-EXT-h     externalTrafficPolicy Cluster: mark for SNAT, then -j RAPPROXY-SVC-h.
                       Local: pod sources (clusterCidrs) and the node itself go cluster-wide (the
                       node's own traffic SNATed), everything else -j RAPPROXY-SVL-h.
    RAPPROXY-SVC-h     cluster-wide endpoints: [a sample REDIRECTed to the proxy, whose `rap`
                       decisions set the weights (balancer/kernel_weights.py)] [SNAT mark for
                       sources outside clusterCidrs, or
                       all with masqueradeAll] [ClientIP affinity: `recent --rcheck` per
                       endpoint] then `statistic --mode random --probability p_i` per endpoint
                       (the last unconditional), p_i = w_i / (w_i + ... + w_n), so endpoint i is
                       taken with probability w_i / Σw: RAP's weights.
    RAPPROXY-SVL-h     the same over this node's endpoints, evenly (no SNAT: the source is kept).
    RAPPROXY-SEP-e     one endpoint: hairpin SNAT mark, [`recent --set`], DNAT to ip:port.
    RAPPROXY-MARK-MASQ / RAPPROXY-POSTROUTING (from POSTROUTING): MASQUERADE what was marked.

Where a policy has no endpoint (none anywhere, or none local under policy Local) the rule
REDIRECTs to the proxy instead (`fallback_port`), whose relay applies the very same
categorization and rejects or drops the connection as it would in userspace mode: a kernel
Service is never left without a path, and its failure behaviour does not depend on the mode.

`render_kernel_update` is the per-change write for kernel-mode Services whose entry rules stay
as they are (an endpoint added, removed or replaced): only their own chains are rewritten, new
endpoint chains created and gone ones deleted, in one transaction. With 10k Services the full
rewrite takes seconds (every chain of every Service, and iptables-restore's cost grows with the
text); kube-proxy's iptables mode writes only the changed Services' chains for the same reason.

Endpoints with weight 0 get no statistic rule (no new connection), but keep their endpoint chain
while they exist, so affinity entries pointing at them still resolve.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rapproxy.model.addresses import parse_ip
from rapproxy.model.service import L4Protocol, ServicePort, ServicePortName

MARK_MASQ_CHAIN = "RAPPROXY-MARK-MASQ"
POSTROUTING_CHAIN = "RAPPROXY-POSTROUTING"
INFRA_CHAINS = (MARK_MASQ_CHAIN, POSTROUTING_CHAIN)
SERVICE_CHAIN_PREFIXES = ("RAPPROXY-SVC-", "RAPPROXY-SVL-", "RAPPROXY-EXT-", "RAPPROXY-SEP-")
POSTROUTING_COMMENT = "rapproxy postrouting rules"
MAX_CHAIN_NAME = 28  # XT_EXTENSION_MAXNAMELEN - 1
_HASH_CHARS = 14
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_HASH_SHIFTS = tuple(range(5 * (_HASH_CHARS - 1), -1, -5))
_HOST_PREFIX = {4: 32, 6: 128}
_HOST_MASK = {4: "255.255.255.255", 6: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"}
_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9._/:;, >-]")
_MAX_COMMENT = 256


NODE_MARK_MASK = 0x00FF0000  # dataplane.nodeMarkMask's default: bits 16-23


class KernelRenderError(ValueError):
    """A kernel-mode Service cannot be written as rules; the message names the value."""


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """SNAT decisions of the kernel path (kube-proxy's masqueradeAll, clusterCIDR, masqueradeBit).

    At most one pod CIDR per family: "not from the pods" must be one `! -s` match.
    """

    masquerade_all: bool = False
    cluster_cidrs: tuple[str, ...] = ()
    masquerade_bit: int = 14
    node_mark_mask: int = NODE_MARK_MASK

    def __post_init__(self) -> None:
        if not 0 <= self.masquerade_bit <= 31:
            raise KernelRenderError(f"masquerade_bit: {self.masquerade_bit} is not 0-31")
        mask = self.node_mark_mask
        if not 0 < mask < 1 << 32:
            raise KernelRenderError(f"node_mark_mask: {mask:#x} is not a 32-bit mark field")
        low = mask & -mask
        if (mask + low) & mask or mask >> (low.bit_length() - 1) < 3:
            raise KernelRenderError(
                f"node_mark_mask: {mask:#x} must be contiguous bits, at least two of them"
            )
        if mask & (1 << self.masquerade_bit):
            raise KernelRenderError(
                f"node_mark_mask: {mask:#x} holds the masquerade bit {self.masquerade_bit}"
            )
        families: set[int] = set()
        for index, cidr in enumerate(self.cluster_cidrs):
            try:
                network = ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise KernelRenderError(f"cluster_cidrs[{index}]: {cidr!r} is not a CIDR") from None
            if network.version in families:
                raise KernelRenderError(
                    f"cluster_cidrs[{index}]: {cidr}: at most one CIDR per address family"
                )
            families.add(network.version)

    @property
    def mark(self) -> str:
        return f"0x{1 << self.masquerade_bit:x}"

    @property
    def node_slots(self) -> int:
        """How many nodes a shared node split can tell apart (its field's values but 0, the
        sample)."""
        return (self.node_mark_mask >> _shift(self.node_mark_mask)) - 1

    def slot_mark(self, slot: int) -> int:
        """The mark field's value for node slot `slot` (1-based)."""
        if not 1 <= slot <= self.node_slots:
            raise KernelRenderError(f"node slot {slot} is not 1-{self.node_slots}")
        return slot << _shift(self.node_mark_mask)

    @property
    def sample_mark(self) -> int:
        """The mark field's value for a connection the proxy decides (every bit of the field)."""
        return self.node_mark_mask

    def cluster_cidr(self, family: int) -> str | None:
        for cidr in self.cluster_cidrs:
            network = ipaddress.ip_network(cidr, strict=False)
            if network.version == family:
                return str(network)
        return None


@dataclass(frozen=True, slots=True)
class WeightedEndpoint:
    """One DNAT target and its relative weight (any scale; 0 means no new connections)."""

    ip: str
    port: int
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class NodeSplit:
    """Which node a new connection goes to, for every Service whose endpoints lie on the same
    nodes (a node layout): drawn once, in one chain the Services share (rules/nftables.py).

    `shares[i]` is node slot i+1's share; `sample_share` of the connections is left to the
    proxy instead. `key` (`layout_hash`) names the chain. A weight change rewrites this alone,
    not the Services: at 10k Services that is the difference between a few rules and 50k.
    """

    key: str
    shares: tuple[float, ...]
    sample_share: float = 0.0

    def __post_init__(self) -> None:
        if not self.shares:
            raise KernelRenderError(f"node split {self.key}: no node")
        if any(not math.isfinite(s) or s < 0 for s in self.shares):
            raise KernelRenderError(f"node split {self.key}: shares {self.shares!r}")
        if not 0.0 <= self.sample_share < 1.0:
            raise KernelRenderError(
                f"node split {self.key}: sample share {self.sample_share} must be in [0, 1)"
            )


@dataclass(frozen=True, slots=True)
class SplitRef:
    """A Service's use of a `NodeSplit`: its key, and the node slot of each cluster endpoint."""

    key: str
    slots: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class KernelTarget:
    """One kernel-mode service port: where its traffic may go, and the proxy port to fall back to.

    `cluster` are the endpoints for cluster-wide traffic (RAP-weighted), `local` this node's
    endpoints (for traffic policy Local). Both already categorized (balancer/categorize.py).
    `sample_share` of the cluster-wide connections is REDIRECTed to the proxy instead, whose
    `rap` decisions set the weights (balancer/kernel_weights.py); 0 for none. Ignored under
    ClientIP affinity: the kernel's `recent` entries and the relay's table would disagree.

    With `split` (nftables only) the cluster-wide weights are not the Service's own: the node
    is drawn by the shared `NodeSplit` it names (its sample share included), and the
    endpoint evenly inside that node; `cluster`'s weights and `sample_share` are then unused.
    """

    service_port: ServicePort
    cluster: tuple[WeightedEndpoint, ...]
    local: tuple[WeightedEndpoint, ...]
    fallback_port: int
    sample_share: float = 0.0
    split: SplitRef | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_share < 1.0:
            raise KernelRenderError(
                f"{comment_for(self.service_port.name)}: sample share {self.sample_share}"
                " must be in [0, 1)"
            )
        if self.split is not None and len(self.split.slots) != len(self.cluster):
            raise KernelRenderError(
                f"{comment_for(self.service_port.name)}: {len(self.split.slots)} node slots"
                f" for {len(self.cluster)} endpoints"
            )


@dataclass(frozen=True, slots=True)
class KernelRules:
    """One target's rules for one family: entry rules for our two chains, and its own chains."""

    service_rules: tuple[str, ...]
    nodeport_rules: tuple[str, ...]
    chains: tuple[tuple[str, tuple[str, ...]], ...]


def service_chain(name: ServicePortName, kind: str) -> str:
    """`RAPPROXY-<kind>-<hash>` for kind SVC, SVL or EXT."""
    return f"RAPPROXY-{kind}-{port_hash(name)}"


def endpoint_chain(name: ServicePortName, ip: str, port: int) -> str:
    return f"RAPPROXY-SEP-{endpoint_hash(name, ip, port)}"


def port_hash(name: ServicePortName) -> str:
    """14 base32 characters naming a service port's objects (chains here, nftables too)."""
    return _hash(f"{name}/{name.protocol.value}")


def endpoint_hash(name: ServicePortName, ip: str, port: int) -> str:
    """14 base32 characters naming one endpoint of a service port's objects."""
    return _hash(f"{name}/{name.protocol.value}/{ip}/{port}")


def layout_hash(parts: Iterable[object]) -> str:
    """14 base32 characters naming a node layout's shared objects (its `NodeSplit`)."""
    return _hash("/".join(str(part) for part in parts))


def split_shares(target: KernelTarget, split: NodeSplit) -> list[float]:
    """Each cluster endpoint's share of new connections under `split`, in `target.cluster`'s
    order: its node's share, evenly between the node's endpoints, over the nodes present (the
    sample left out: the proxy decides it)."""
    ref = target.split
    if ref is None or not ref.slots:
        return []
    members: dict[int, int] = {}
    for slot in ref.slots:
        members[slot] = members.get(slot, 0) + 1
    node_share = {
        slot: split.shares[slot - 1] if slot <= len(split.shares) else 0.0 for slot in members
    }
    total = sum(node_share.values())
    if total <= 0:  # the chain's last rule catches it: spread as the proxy would, evenly
        return [1.0 / len(ref.slots)] * len(ref.slots)
    return [node_share[slot] / total / members[slot] for slot in ref.slots]


def is_kernel_chain(chain: str) -> bool:
    return chain in INFRA_CHAINS or chain.startswith(SERVICE_CHAIN_PREFIXES)


def postrouting_jump_spec() -> str:
    return f'-m comment --comment "{POSTROUTING_COMMENT}" -j {POSTROUTING_CHAIN}'


def infra_rules(config: KernelConfig) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The SNAT machinery every kernel Service shares (canonical iptables-save form)."""
    mark = config.mark
    return (
        (MARK_MASQ_CHAIN, (f"-A {MARK_MASQ_CHAIN} -j MARK --set-xmark {mark}/{mark}",)),
        (
            POSTROUTING_CHAIN,
            (
                f"-A {POSTROUTING_CHAIN} -m mark ! --mark {mark}/{mark} -j RETURN",
                f"-A {POSTROUTING_CHAIN} -j MARK --set-xmark {mark}/0x0",
                f'-A {POSTROUTING_CHAIN} -m comment --comment "rapproxy service traffic requiring'
                f' SNAT" -j MASQUERADE --random-fully',
            ),
        ),
    )


def render_target(target: KernelTarget, config: KernelConfig, family: int) -> KernelRules:
    """Everything one kernel-mode service port needs in one address family."""
    port = target.service_port
    name = port.name
    proto = l4_keyword(port.protocol, name)
    comment = comment_for(name)
    cluster_ips = of_family(port.cluster_ips, family, name)
    if not cluster_ips:  # single-stack Service of the other family: nothing here, as render.py
        return KernelRules((), (), ())
    cluster = tuple(e for e in target.cluster if family_of(e.ip, name) == family)
    local = tuple(e for e in target.local if family_of(e.ip, name) == family)
    svc = service_chain(name, "SVC") if cluster else None
    svl = service_chain(name, "SVL") if local else None
    redirect = f"-j REDIRECT --to-ports {target.fallback_port}"

    def to(chain: str | None) -> str:
        return f"-j {chain}" if chain is not None else redirect

    chains: dict[str, tuple[str, ...]] = {}
    used_endpoints: dict[str, WeightedEndpoint] = {}
    internal = svl if port.internal_traffic_local else svc
    needs_ext = bool(port.node_port is not None or of_family(port.external_addresses, family, name))
    ext = service_chain(name, "EXT") if needs_ext and (svc or svl) else None
    # EXT always names the cluster-wide chain (policy Cluster, or the node's own traffic under
    # policy Local) and, under policy Local, the local one.
    svc_used = internal == svc or ext is not None
    svl_used = internal == svl or (ext is not None and port.external_traffic_local)
    if svc is not None and svc_used:
        chains[svc] = _balance_chain(
            svc,
            target,
            cluster,
            config=config,
            family=family,
            cluster_ips=cluster_ips,
            cluster_wide=True,
        )
        used_endpoints.update({endpoint_chain(name, e.ip, e.port): e for e in cluster})
    if svl is not None and svl_used:
        chains[svl] = _balance_chain(
            svl,
            target,
            local,
            config=config,
            family=family,
            cluster_ips=cluster_ips,
            cluster_wide=False,
        )
        used_endpoints.update({endpoint_chain(name, e.ip, e.port): e for e in local})
    if ext is not None:
        chains[ext] = _external_chain(
            ext, port, svc=svc, svl=svl, redirect=redirect, config=config, family=family
        )
    for chain, endpoint in sorted(used_endpoints.items()):
        chains[chain] = _endpoint_chain(chain, port, endpoint, family)

    service_rules = [
        f"-A RAPPROXY-SERVICES -d {ip}/{_HOST_PREFIX[family]}"
        f" {_match(proto, _quote(f'{comment} cluster IP'), port.port)} {to(internal)}"
        for ip in cluster_ips
    ]
    labelled = (
        *((ip, "external IP") for ip in port.external_ips),
        *((ip, "loadbalancer IP") for ip in port.load_balancer_ips),
    )
    seen = set(cluster_ips)
    for ip, label in labelled:
        if family_of(ip, name) != family or ip in seen:
            continue
        seen.add(ip)
        service_rules.append(
            f"-A RAPPROXY-SERVICES -d {ip}/{_HOST_PREFIX[family]}"
            f" {_match(proto, _quote(f'{comment} {label}'), port.port)}"
            f" {to(ext)}"
        )
    nodeport_rules = []
    if port.node_port is not None:
        nodeport_rules.append(
            f"-A RAPPROXY-NODEPORTS {_match(proto, _quote(comment), port.node_port)} {to(ext)}"
        )
    return KernelRules(tuple(service_rules), tuple(nodeport_rules), tuple(chains.items()))


def weighted_chain(target: KernelTarget, config: KernelConfig, family: int) -> tuple[str, str]:
    """(name, rules text) of the cluster-wide weighted chain alone: what a weight change rewrites.

    Raises `KernelRenderError` when the target has no such chain in this family.
    """
    name = target.service_port.name
    cluster_ips = of_family(target.service_port.cluster_ips, family, name)
    cluster = tuple(e for e in target.cluster if family_of(e.ip, name) == family)
    port = target.service_port
    reached = not port.internal_traffic_local or bool(
        port.node_port is not None or of_family(port.external_addresses, family, name)
    )
    if not cluster_ips or not cluster or not reached:
        raise KernelRenderError(f"{comment_for(name)}: no weighted chain in IPv{family}")
    svc = service_chain(name, "SVC")
    rules = _balance_chain(
        svc,
        target,
        cluster,
        config=config,
        family=family,
        cluster_ips=cluster_ips,
        cluster_wide=True,
    )
    return svc, "\n".join(rules)


def render_weight_update(targets: Sequence[KernelTarget], config: KernelConfig, family: int) -> str:
    """One transaction rewriting only the weighted chains of `targets` ("" when none has one).

    Only valid when each target's endpoints are those last written by a full render (only the
    weights differ): the endpoint chains it jumps to must exist.
    """
    lines: list[str] = []
    bodies: list[str] = []
    for target in sorted(targets, key=lambda t: t.service_port.name):
        try:
            chain, body = weighted_chain(target, config, family)
        except KernelRenderError:
            continue
        lines.append(f":{chain} - [0:0]")
        bodies.append(body)
    if not lines:
        return ""
    return "\n".join(["*nat", *lines, *bodies, "COMMIT"]) + "\n"


@dataclass(frozen=True, slots=True)
class KernelUpdate:
    """One transaction rewriting some Services' chains, and the chains it creates and deletes."""

    text: str
    created: tuple[str, ...]
    deleted: tuple[str, ...]


def render_kernel_update(
    changes: Sequence[tuple[KernelTarget, KernelTarget]], config: KernelConfig, family: int
) -> KernelUpdate:
    """Rewrite each (written, wanted) pair's chains; their entry rules must be the same.

    Only valid when `written` is what the kernel holds. Every chain of `wanted` is declared
    (created or flushed) and refilled; `written`'s chains that `wanted` no longer has are
    flushed and deleted — after the rewrite, so nothing refers to them any more. Raises
    `KernelRenderError` when a pair's entry rules differ (a full sync is needed then).
    """
    declared: list[str] = []
    bodies: list[str] = []
    created: list[str] = []
    deleted: list[str] = []
    for written, wanted in sorted(changes, key=lambda pair: pair[1].service_port.name):
        before = render_target(written, config, family)
        after = render_target(wanted, config, family)
        if (before.service_rules, before.nodeport_rules) != (
            after.service_rules,
            after.nodeport_rules,
        ):
            raise KernelRenderError(
                f"{comment_for(wanted.service_port.name)}: entry rules changed in IPv{family}"
            )
        old = {chain for chain, _ in before.chains}
        for chain, rules in after.chains:
            declared.append(chain)
            bodies.extend(rules)
            if chain not in old:
                created.append(chain)
        new = {chain for chain, _ in after.chains}
        deleted.extend(chain for chain, _ in before.chains if chain not in new)
    if not declared and not deleted:
        return KernelUpdate("", (), ())
    lines = ["*nat"]
    lines.extend(f":{chain} - [0:0]" for chain in (*declared, *deleted))
    lines.extend(bodies)
    lines.extend(f"-X {chain}" for chain in deleted)
    lines.append("COMMIT")
    return KernelUpdate("\n".join(lines) + "\n", tuple(created), tuple(deleted))


def probabilities(weights: Sequence[float]) -> list[float]:
    """Per-rule probabilities for a chain of `statistic` rules taken in order.

    Rule i matches with p_i = w_i / Σ_{j≥i} w_j of the packets that reach it, so overall endpoint
    i gets w_i / Σw. The last rule is unconditional (p = 1). Weights must be finite and ≥ 0
    with a positive sum.
    """
    if not weights:
        return []
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise KernelRenderError(f"weights {list(weights)!r}: need finite values >= 0, sum > 0")
    remaining = sum(weights)
    out: list[float] = []
    for weight in weights:
        out.append(min(1.0, weight / remaining) if remaining > 0 else 1.0)
        remaining -= weight
    out[-1] = 1.0
    return out


def comment_for(name: ServicePortName) -> str:
    return f"{name.namespace}/{name.name}" + (f":{name.port}" if name.port else "")


# -- chains --------------------------------------------------------------------------------------


def _balance_chain(
    chain: str,
    target: KernelTarget,
    endpoints: Sequence[WeightedEndpoint],
    *,
    config: KernelConfig,
    family: int,
    cluster_ips: Sequence[str],
    cluster_wide: bool,
) -> tuple[str, ...]:
    port = target.service_port
    name = port.name
    proto = l4_keyword(port.protocol, name)
    comment = comment_for(name)
    rules: list[str] = []
    if cluster_wide and target.sample_share > 0 and port.affinity_timeout_seconds is None:
        # First, before any SNAT mark: the proxy sees the client as it is.
        rules.append(
            f"-A {chain} -p {proto} -m comment"
            f" --comment {_quote(f'{comment} sample decided by the proxy')}"
            f" -m statistic --mode random --probability {target.sample_share:.11f}"
            f" -j REDIRECT --to-ports {target.fallback_port}"
        )
    if cluster_wide:
        pod_cidr = config.cluster_cidr(family)
        if config.masquerade_all or pod_cidr is not None:
            source = "" if config.masquerade_all else f"! -s {pod_cidr} "
            for ip in cluster_ips:
                rules.append(
                    f"-A {chain} {source}-d {ip}/{_HOST_PREFIX[family]}"
                    f" {_match(proto, _quote(f'{comment} cluster IP'), port.port)}"
                    f" -j {MARK_MASQ_CHAIN}"
                )
    if port.affinity_timeout_seconds is not None:
        for endpoint in endpoints:
            sep = endpoint_chain(name, endpoint.ip, endpoint.port)
            rules.append(
                f"-A {chain} -m comment --comment {_quote(f'{comment} -> {endpoint_address(endpoint)}')}"
                f" -m recent --rcheck --seconds {port.affinity_timeout_seconds} --reap"
                f" --name {sep} --mask {_HOST_MASK[family]} --rsource -j {sep}"
            )
    live = [e for e in endpoints if e.weight > 0]
    if not live:  # every weight 0 is no decision at all: spread evenly rather than drop
        live = [WeightedEndpoint(e.ip, e.port, 1.0) for e in endpoints]
    for endpoint, probability in zip(live, probabilities([e.weight for e in live]), strict=True):
        sep = endpoint_chain(name, endpoint.ip, endpoint.port)
        text = _quote(f"{comment} -> {endpoint_address(endpoint)}")
        if probability >= 1.0:
            rules.append(f"-A {chain} -m comment --comment {text} -j {sep}")
            break
        rules.append(
            f"-A {chain} -m comment --comment {text} -m statistic --mode random"
            f" --probability {probability:.11f} -j {sep}"
        )
    return tuple(rules)


def _external_chain(
    chain: str,
    port: ServicePort,
    *,
    svc: str | None,
    svl: str | None,
    redirect: str,
    config: KernelConfig,
    family: int,
) -> tuple[str, ...]:
    comment = comment_for(port.name)
    to_svc = f"-j {svc}" if svc is not None else redirect
    if not port.external_traffic_local:
        return (
            f"-A {chain} -m comment --comment"
            f" {_quote(f'masquerade traffic for {comment} external destinations')}"
            f" -j {MARK_MASQ_CHAIN}",
            f"-A {chain} {to_svc}",
        )
    rules: list[str] = []
    pod_cidr = config.cluster_cidr(family)
    if pod_cidr is not None:
        rules.append(
            f"-A {chain} -s {pod_cidr} -m comment --comment"
            f" {_quote(f'pod traffic for {comment} external destinations')} {to_svc}"
        )
    rules.extend(
        (
            f"-A {chain} -m comment --comment"
            f" {_quote(f'masquerade LOCAL traffic for {comment} external destinations')}"
            f" -m addrtype --src-type LOCAL -j {MARK_MASQ_CHAIN}",
            f"-A {chain} -m comment --comment"
            f" {_quote(f'route LOCAL traffic for {comment} external destinations')}"
            f" -m addrtype --src-type LOCAL {to_svc}",
            f"-A {chain} {f'-j {svl}' if svl is not None else redirect}",
        )
    )
    return tuple(rules)


def _endpoint_chain(
    chain: str, port: ServicePort, endpoint: WeightedEndpoint, family: int
) -> tuple[str, ...]:
    proto = l4_keyword(port.protocol, port.name)
    comment = _quote(comment_for(port.name))
    recent = (
        f" -m recent --set --name {chain} --mask {_HOST_MASK[family]} --rsource"
        if port.affinity_timeout_seconds is not None
        else ""
    )
    return (
        f"-A {chain} -s {endpoint.ip}/{_HOST_PREFIX[family]} -m comment --comment {comment}"
        f" -j {MARK_MASQ_CHAIN}",
        f"-A {chain} -p {proto} -m comment --comment {comment}{recent} -m {proto}"
        f" -j DNAT --to-destination {endpoint_address(endpoint)}",
    )


# -- small pieces --------------------------------------------------------------------------------


def _shift(mask: int) -> int:
    return (mask & -mask).bit_length() - 1


def _hash(text: str) -> str:
    # The first 14 characters of the digest in base32 (RFC 4648 alphabet), i.e. its first 70
    # bits, 5 at a time. base64.b32encode gives the same text but is pure Python and encodes
    # every byte: it was a third of a 10k-Service weight render.
    bits = int.from_bytes(hashlib.sha256(text.encode()).digest()[:9]) >> 2  # 72 -> 70 bits
    return "".join([_B32[(bits >> shift) & 31] for shift in _HASH_SHIFTS])


def _match(proto: str, comment: str, number: int) -> str:
    return f"-p {proto} -m comment --comment {comment} -m {proto} --dport {number}"


def endpoint_address(endpoint: WeightedEndpoint) -> str:
    host = f"[{endpoint.ip}]" if ":" in endpoint.ip else endpoint.ip
    return f"{host}:{endpoint.port}"


def l4_keyword(protocol: L4Protocol, name: ServicePortName) -> str:
    if protocol is L4Protocol.TCP:
        return "tcp"
    if protocol is L4Protocol.UDP:
        return "udp"
    raise KernelRenderError(f"{comment_for(name)}: protocol {protocol.value} is not supported")


def family_of(ip: str, name: ServicePortName) -> int:
    try:
        return parse_ip(ip)[0]
    except ValueError:
        raise KernelRenderError(f"{comment_for(name)}: {ip!r} is not an IP address") from None


def of_family(ips: Iterable[str], family: int, name: ServicePortName) -> list[str]:
    out: list[str] = []
    for ip in ips:
        if family_of(ip, name) == family and ip not in out:
            out.append(ip)
    return out


def _quote(text: str) -> str:
    safe = _COMMENT_UNSAFE.sub("_", text)[:_MAX_COMMENT]
    return f'"{safe}"'
