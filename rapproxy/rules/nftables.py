"""The kernel fast path in nftables: kernel-mode Services DNATed from rapproxy's own nft table.

Pure: no I/O. rules/nft_apply.py runs what this renders through `nft -f -`.

Why a second backend: with iptables-nft-restore the kernel path did not finish writing 10k
Services (kube-proxy's iptables layout: six chains per Service; iptables-nft-restore grows
superlinearly with chains), and with iptables-legacy every transaction replaces the whole nat
table, so a one-Service change costs a full write. An nft transaction touches only what it names.

Layout, per address family (table `ip rapproxy` / `ip6 rapproxy`; kube-proxy's nftables mode is
the model, names included):

    nat-prerouting  (hook prerouting, priority -101)  jump services
    nat-output      (hook output,     priority -101)  jump services
    nat-postrouting (hook postrouting, priority 99)   jump masquerading
    services        daddr . l4proto . dport vmap @service-ips           (O(1), not a rule per IP)
                    [not loopback] fib daddr type local  l4proto . dport vmap @service-nodeports
    masquerading    ct status dnat  saddr . daddr @hairpin  mark; then SNAT what is marked
    svc-<h>         cluster-wide endpoints of one service port: [a sample redirected to the
                    proxy while RAP samples (rules/kernel.py)] [SNAT marks]
                    [affinity: saddr @aff-<e> goto sep-<e>]
                    `numgen random mod 1000000 < T_i` + DNAT per endpoint, T_i from
                    p_i = w_i / (w_i + ... + w_n) (the last unconditional): RAP's weights.
                    With a node split instead: `jump lay-<k>`, [the sample value → redirect
                    to the proxy], [SNAT marks] [affinity], then per node value an even draw
                    over that node's endpoints + DNAT, each clearing the field; last, a
                    redirect to the proxy for a value no rule took (none, normally)
    lay-<k>         one node layout's shared draw (`NodeSplit`): clear the field of
                    `dataplane.nodeMarkMask`, then [the sample: the field all ones] and one
                    value per node, `numgen ... < T` + `meta mark set ... return`
    svl-<h>         the same over this node's endpoints, evenly, no SNAT (traffic policy Local)
    ext-<h>         external entries (NodePort, externalIPs, LB IPs), as rules/kernel.py's EXT
    sep-<e>         affinity Services only: `update @aff-<e> { saddr }`, DNAT
    aff-<e>-<t>     affinity Services only: the clients recently sent to endpoint e (timeout t)
    hairpin         `e . e` for every endpoint address e written

Why the priorities: nf_nat consults the nat chains of a hook in priority order only until one
sets up a binding, so a kernel-mode Service's new connection DNATed here at -101 is never seen by
iptables' nat chains at -100 — where userspace-mode Services keep their REDIRECT (rules/render.py).
A port without a rule here falls through to them untouched. The same holds for SNAT: our
masquerading at 99 runs before iptables' POSTROUTING at 100.

Why rules and not maps for the weights (measured on this host, nft 1.0.6, kernel 6.18, 10k
Services x 5 endpoints): the `nft` tool fetches its cache — every chain and every set in the
network namespace, and for element commands every element of every set, each set found by a
linear search in the kernel — before almost any command. With a named interval map per Service
(`numgen ... vmap @w-<h>`) a one-Service change took 0.1 s (`add rule`) to 3 s (`add`/`delete
element`) and rewriting every Service's weights 6-10 s of mostly kernel time; anonymous maps are
worse (a name search per map). Plain rules in one chain per Service cost about 5 µs of cache per
chain: 0.05 s per change at 10k chains. So non-affinity Services get no endpoint chains at all
(the DNAT is in the rule that draws the endpoint), and the only sets are the two entry maps, the
hairpin set and the affinity sets. Elements are added with the block form (`table ... { map ...
{ elements = ... } }`), which needs no element cache; only deleting one does.

Hairpin (an endpoint connecting to its own Service and DNATed back to itself) needs SNAT. With
the endpoint drawn in the rule that DNATs it there is no per-endpoint chain to put kube-proxy's
mark in, so it is decided after the fact, in postrouting: a DNATed connection whose source is
its destination is a hairpin, whichever Service it went through, and nft cannot compare two
fields but can look a pair up, so the set `hairpin` holds `e . e` for every endpoint address
written. Addresses are only added (a stale pair matches only a hairpin anyway, which needs the
SNAT whatever it is), and the set starts afresh when the table is rebuilt. That also keeps a
weight write to the draw rules alone.

Node splits (why the fwmark): RAP's weights depend on the telemetry and on which node each
endpoint is on, nothing else (balancer/kernel_weights.py), so the Services whose endpoints are
on the same nodes all want the same split. Written into each Service's chain, a telemetry
change that moves every weight rewrites 50k rules at 10k Services: 4-10 s here. Drawn once in a
chain the layout's Services share, it rewrites a few rules. The drawn node has to reach the
Service's own chain, which is the only one that knows its endpoints; nft cannot return a value
from a chain, so it rides in a few fwmark bits for the length of that one traversal, as
kube-proxy's masquerade bit does (set in one chain, read in another). The draw clears the field
first, so a value left by anything else is never read as a node; the Service's chain clears it
as it DNATs, so the packet leaves with the field zero. What another component kept in those bits
is lost: the field is configurable for that reason. A Service under ClientIP affinity draws
after its affinity lookups and is never sampled, so its layout's split is its own (the layout
key says whether it can be sampled).

`render_port` gives one service port's objects; `render_change` the commands that turn what the
kernel holds for it into what is wanted, as one group that stands or falls alone (a group never
refers to another group's objects), so a broken Service can be left out of a transaction and
the others still written. `render_rebuild` replaces the whole table in one transaction.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from rapproxy.model.service import ServicePort, ServicePortName
from rapproxy.rules.kernel import (
    KernelConfig,
    KernelRenderError,
    KernelTarget,
    NodeSplit,
    WeightedEndpoint,
    comment_for,
    endpoint_address,
    endpoint_hash,
    family_of,
    l4_keyword,
    of_family,
    port_hash,
    probabilities,
)

TABLE = "rapproxy"
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
MARK_CHAIN = "mark-for-masquerade"
MASQUERADING_CHAIN = "masquerading"
SERVICES_CHAIN = "services"
HAIRPIN_SET = "hairpin"
DNAT_PRIORITY = -101  # before iptables' nat (dstnat, -100)
SNAT_PRIORITY = 99  # before iptables' nat (srcnat, 100)
SCALE = 1_000_000  # numgen modulus: weights are resolved to one millionth
_FAMILY = {4: "ip", 6: "ip6"}
_ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
_LOOPBACK = {4: "127.0.0.0/8", 6: "::1"}


@dataclass(frozen=True, slots=True)
class NftPort:
    """One service port's objects in one family: chains (name, rule bodies in order), affinity
    sets (name, declaration), entry map elements (map, key, chain), the weighted chain and the
    endpoint addresses (for the hairpin set)."""

    name: ServicePortName
    chains: tuple[tuple[str, tuple[str, ...]], ...] = ()
    sets: tuple[tuple[str, str], ...] = ()
    entries: tuple[tuple[str, str, str], ...] = ()
    weighted: str | None = None
    endpoints: frozenset[str] = frozenset()  # addresses, for the hairpin set


@dataclass(frozen=True, slots=True)
class NftGroup:
    """Commands that stand or fall together: one service port's (`owner`), or the table's (None)."""

    owner: ServicePortName | None
    lines: tuple[str, ...]


def table_ref(family: int) -> str:
    """`ip rapproxy` or `ip6 rapproxy`."""
    _check_family(family)
    return f"{_FAMILY[family]} {TABLE}"


def render_base(config: KernelConfig, family: int, node_port_cidrs: Sequence[str] = ()) -> NftGroup:
    """The table's own objects, declared (created when absent) and their rules rewritten.

    `node_port_cidrs` restricts NodePorts to node addresses inside them (kube-proxy's
    `nodePortAddresses`); empty means every local address but loopback.
    """
    t = table_ref(family)
    ip = _FAMILY[family]
    mark = config.mark
    lines = [
        f"add table {t}",
        f"add chain {t} nat-prerouting {{ type nat hook prerouting priority {DNAT_PRIORITY} ;"
        " policy accept ; }",
        f"add chain {t} nat-output {{ type nat hook output priority {DNAT_PRIORITY} ;"
        " policy accept ; }",
        f"add chain {t} nat-postrouting {{ type nat hook postrouting priority {SNAT_PRIORITY} ;"
        " policy accept ; }",
        f"add chain {t} {SERVICES_CHAIN}",
        f"add chain {t} {MARK_CHAIN}",
        f"add chain {t} {MASQUERADING_CHAIN}",
        f"add map {t} {SERVICE_IPS} {_service_ips_type(family)}",
        f"add map {t} {SERVICE_NODEPORTS} {_nodeports_type()}",
        f"add set {t} {HAIRPIN_SET} {_hairpin_type(family)}",
    ]
    rules: dict[str, list[str]] = {
        "nat-prerouting": [f"jump {SERVICES_CHAIN}"],
        "nat-output": [f"jump {SERVICES_CHAIN}"],
        "nat-postrouting": [f"jump {MASQUERADING_CHAIN}"],
        SERVICES_CHAIN: [f"{ip} daddr . meta l4proto . th dport vmap @{SERVICE_IPS}"],
        MARK_CHAIN: [f"meta mark set meta mark | {mark}"],
        MASQUERADING_CHAIN: [
            f"ct status dnat {ip} saddr . {ip} daddr @{HAIRPIN_SET} meta mark set meta mark | {mark}",
            f"meta mark & {mark} == 0 return",
            f"meta mark set meta mark ^ {mark}",
            "masquerade fully-random",
        ],
    }
    nodeports = f"fib daddr type local meta l4proto . th dport vmap @{SERVICE_NODEPORTS}"
    if node_port_cidrs:
        for cidr in node_port_cidrs:
            network = ipaddress.ip_network(cidr, strict=False)
            if network.version == family:
                rules[SERVICES_CHAIN].append(f"{ip} daddr {network} {nodeports}")
    else:
        rules[SERVICES_CHAIN].append(f"{ip} daddr != {_LOOPBACK[family]} {nodeports}")
    for chain, bodies in rules.items():
        lines.append(f"flush chain {t} {chain}")
        lines.extend(f"add rule {t} {chain} {body}" for body in bodies)
    return NftGroup(None, tuple(lines))


def render_port(target: KernelTarget, config: KernelConfig, family: int) -> NftPort:
    """Everything one kernel-mode service port needs in one family (nothing: not in it)."""
    _check_family(family)
    port = target.service_port
    name = port.name
    proto = l4_keyword(port.protocol, name)
    cluster_ips = of_family(port.cluster_ips, family, name)
    if not cluster_ips:  # single-stack Service of the other family, as rules/kernel.py
        return NftPort(name)
    cluster = tuple(e for e in target.cluster if family_of(e.ip, name) == family)
    local = tuple(e for e in target.local if family_of(e.ip, name) == family)
    if target.split is not None and cluster and len(cluster) != len(target.cluster):
        raise KernelRenderError(
            f"{comment_for(name)}: a node split needs endpoints of one address family"
        )
    h = port_hash(name)
    svc, svl, ext = f"svc-{h}", f"svl-{h}", f"ext-{h}"
    external = [
        ip for ip in of_family(port.external_addresses, family, name) if ip not in cluster_ips
    ]
    needs_ext = port.node_port is not None or bool(external)
    internal = svl if port.internal_traffic_local else svc
    svc_used = internal == svc or needs_ext
    svl_used = internal == svl or (needs_ext and port.external_traffic_local)

    chains: dict[str, tuple[str, ...]] = {}
    endpoint_chains: dict[str, tuple[str, ...]] = {}
    sets: dict[str, str] = {}
    if svc_used:
        chains[svc] = _balance(
            target,
            cluster,
            config=config,
            family=family,
            cluster_ips=cluster_ips,
            cluster_wide=True,
            endpoint_chains=endpoint_chains,
            sets=sets,
        )
    if svl_used:
        chains[svl] = _balance(
            target,
            local,
            config=config,
            family=family,
            cluster_ips=cluster_ips,
            cluster_wide=False,
            endpoint_chains=endpoint_chains,
            sets=sets,
        )
    if needs_ext:
        chains[ext] = _external(port, svc, svl, config, family)
    chains.update(sorted(endpoint_chains.items()))

    entries = [(SERVICE_IPS, f"{ip} . {proto} . {port.port}", internal) for ip in cluster_ips]
    entries.extend((SERVICE_IPS, f"{ip} . {proto} . {port.port}", ext) for ip in external)
    if port.node_port is not None:
        entries.append((SERVICE_NODEPORTS, f"{proto} . {port.node_port}", ext))
    return NftPort(
        name,
        tuple(chains.items()),
        tuple(sorted(sets.items())),
        tuple(entries),
        svc if svc_used else None,
        frozenset(e.ip for e in (*cluster, *local)),
    )


def render_change(old: NftPort | None, new: NftPort | None, family: int) -> NftGroup | None:
    """Commands turning `old` (what the kernel holds; None: nothing) into `new` (None: remove).

    Order inside the group: new chains and sets are declared before any rule or element names
    them; changed chains are flushed and refilled; entry elements are replaced; what is no longer
    wanted is deleted last, when nothing refers to it any more. None when nothing differs.
    """
    t = table_ref(family)
    either = new if new is not None else old
    if either is None:
        return None
    before_chains = dict(old.chains) if old is not None else {}
    after_chains = dict(new.chains) if new is not None else {}
    before_sets = dict(old.sets) if old is not None else {}
    after_sets = dict(new.sets) if new is not None else {}
    before_entries = {(m, k): c for m, k, c in old.entries} if old is not None else {}
    after_entries = {(m, k): c for m, k, c in new.entries} if new is not None else {}

    lines = [f"add chain {t} {chain}" for chain in after_chains if chain not in before_chains]
    lines.extend(
        f"add set {t} {s} {spec}" for s, spec in after_sets.items() if s not in before_sets
    )
    for chain, rules in after_chains.items():
        if chain in before_chains:
            if before_chains[chain] == rules:
                continue
            lines.append(f"flush chain {t} {chain}")
        lines.extend(f"add rule {t} {chain} {rule}" for rule in rules)
    lines.extend(
        f"delete element {t} {m} {{ {k} }}"
        for (m, k), chain in before_entries.items()
        if after_entries.get((m, k)) != chain
    )
    added: dict[str, list[str]] = {}
    for (m, k), chain in after_entries.items():
        if before_entries.get((m, k)) != chain:
            added.setdefault(m, []).append(f"{k} : goto {chain}")
    lines.extend(_add_elements(family, added))
    new_endpoints = sorted(
        (new.endpoints if new is not None else frozenset())
        - (old.endpoints if old is not None else frozenset())
    )
    if new_endpoints:
        pairs = ", ".join(f"{ip} . {ip}" for ip in new_endpoints)
        spec = _hairpin_type(family)[2:-2]
        lines.append(f"table {t} {{ set {HAIRPIN_SET} {{ {spec} elements = {{ {pairs} }} ; }} ; }}")
    for chain in before_chains:
        if chain not in after_chains:
            lines.extend((f"flush chain {t} {chain}", f"delete chain {t} {chain}"))
    lines.extend(f"delete set {t} {s}" for s in before_sets if s not in after_sets)
    return NftGroup(either.name, tuple(lines)) if lines else None


def render_rebuild(
    base: NftGroup,
    ports: Iterable[NftPort],
    family: int,
    splits: Iterable[NodeSplit] = (),
    config: KernelConfig | None = None,
) -> list[NftGroup]:
    """Groups that replace the whole table in one transaction: the old one is deleted first.

    For the first write and after the kernel's state became unknown. Affinity sets start empty.
    """
    config = config or KernelConfig()
    t = table_ref(family)
    # `add` before `delete`: deleting a table that is not there would fail the transaction.
    head = NftGroup(None, (f"add table {t}", f"delete table {t}", *base.lines))
    groups = [head]
    for split in splits:  # before the Services that jump to them
        group = render_split_change(None, split, config, family)
        if group is not None:
            groups.append(group)
    for port in ports:
        group = render_change(None, port, family)
        if group is not None:
            groups.append(group)
    return groups


def render_weights(target: KernelTarget, config: KernelConfig, family: int) -> NftGroup | None:
    """Rewrite a service port's weighted chain alone (its endpoints are those written)."""
    port = render_port(target, config, family)
    if port.weighted is None:
        return None
    t = table_ref(family)
    rules = dict(port.chains)[port.weighted]
    lines = [f"flush chain {t} {port.weighted}"]
    lines.extend(f"add rule {t} {port.weighted} {rule}" for rule in rules)
    return NftGroup(port.name, tuple(lines))


def split_chain(key: str) -> str:
    """The chain drawing a node layout's node: `lay-<key>`."""
    return f"lay-{key}"


def render_split(split: NodeSplit, config: KernelConfig) -> tuple[str, ...]:
    """The rules of a node layout's shared draw: clear the field, then the sample (the field
    all ones) and each node slot by its share (kube-proxy's conditional probabilities, the last
    unconditional). A slot with share 0 is never drawn; all 0 is spread evenly."""
    if len(split.shares) > config.node_slots:
        raise KernelRenderError(
            f"node split {split.key}: {len(split.shares)} nodes, the mark field"
            f" {_hex(config.node_mark_mask)} tells {config.node_slots} apart"
        )
    rules = [_clear_node_mark(config)]
    if split.sample_share > 0:
        sample = round(split.sample_share * SCALE)
        rules.append(
            f"numgen random mod {SCALE} < {sample}"
            f" meta mark set meta mark | {_hex(config.sample_mark)} return"
        )
    shares = split.shares if any(s > 0 for s in split.shares) else (1.0,) * len(split.shares)
    marks = [
        (f"meta mark set meta mark | {_hex(config.slot_mark(index + 1))} return", threshold)
        for index, threshold in _draws(shares)
    ]
    rules.extend(_drawn(marks))
    return tuple(rules)


def render_split_change(
    old: NodeSplit | None, new: NodeSplit | None, config: KernelConfig, family: int
) -> NftGroup | None:
    """Commands turning the split chain `old` into `new` (None: absent), or None when equal.

    A table-level group: a split chain is shared, so its failure is not one Service's."""
    if old == new:
        return None
    t = table_ref(family)
    if new is None:
        assert old is not None
        chain = split_chain(old.key)
        return NftGroup(None, (f"flush chain {t} {chain}", f"delete chain {t} {chain}"))
    chain = split_chain(new.key)
    head = f"add chain {t} {chain}" if old is None else f"flush chain {t} {chain}"
    body = (f"add rule {t} {chain} {rule}" for rule in render_split(new, config))
    return NftGroup(None, (head, *body))


def render_cleanup(family: int) -> str:
    """A transaction removing the table, whether or not it is there."""
    t = table_ref(family)
    return f"add table {t}\ndelete table {t}\n"


def join_groups(groups: Sequence[NftGroup]) -> tuple[str, list[range]]:
    """The transaction text and, per group, the range of its (1-based) line numbers."""
    lines: list[str] = []
    spans: list[range] = []
    for group in groups:
        start = len(lines) + 1
        lines.extend(group.lines)
        spans.append(range(start, len(lines) + 1))
    return "\n".join(lines) + "\n", spans


def shares(target: KernelTarget, family: int) -> Mapping[str, float]:
    """The share of new cluster-wide connections each endpoint gets, as the rules draw it."""
    name = target.service_port.name
    endpoints = [e for e in target.cluster if family_of(e.ip, name) == family]
    live = _live(endpoints)
    out = {endpoint_address(e): 0.0 for e in endpoints}
    remaining = 1.0
    for endpoint, threshold in _thresholds(live):
        share = remaining * threshold / SCALE
        out[endpoint_address(endpoint)] += share
        remaining -= share
    return out


# -- one port's chains ---------------------------------------------------------------------------


def _balance(
    target: KernelTarget,
    endpoints: Sequence[WeightedEndpoint],
    *,
    config: KernelConfig,
    family: int,
    cluster_ips: Sequence[str],
    cluster_wide: bool,
    endpoint_chains: dict[str, tuple[str, ...]],
    sets: dict[str, str],
) -> tuple[str, ...]:
    port = target.service_port
    name = port.name
    proto = l4_keyword(port.protocol, name)
    ip = _FAMILY[family]
    if not endpoints:  # a policy without endpoints: the proxy decides (rejects or drops)
        return (f"meta l4proto {proto} redirect to :{target.fallback_port}",)
    rules: list[str] = []
    affinity = port.affinity_timeout_seconds
    split = target.split if cluster_wide else None
    if split is not None and affinity is None:
        # The shared draw first, so a sample reaches the proxy before any SNAT mark.
        rules.extend(
            (
                f"jump {split_chain(split.key)}",
                f"meta mark & {_hex(config.node_mark_mask)} == {_hex(config.sample_mark)}"
                f" meta l4proto {proto} {_clear_node_mark(config)}"
                f" redirect to :{target.fallback_port}",
            )
        )
    elif cluster_wide and target.sample_share > 0 and affinity is None:
        # First, before any SNAT mark: the proxy decides a sample (rules/kernel.py's SVC).
        sample = round(target.sample_share * SCALE)
        rules.append(
            f"meta l4proto {proto} numgen random mod {SCALE} < {sample}"
            f" redirect to :{target.fallback_port}"
        )
    if cluster_wide:
        pod_cidr = config.cluster_cidr(family)
        if config.masquerade_all or pod_cidr is not None:
            source = "" if config.masquerade_all else f"{ip} saddr != {pod_cidr} "
            rules.extend(
                f"{source}{ip} daddr {cip} {proto} dport {port.port} jump {MARK_CHAIN}"
                for cip in cluster_ips
            )
    if affinity is not None:
        for endpoint in endpoints:
            key = endpoint_hash(name, endpoint.ip, endpoint.port)
            sep, aff = f"sep-{key}", f"aff-{key}-{affinity}"
            sets[aff] = (
                f"{{ type {_ADDR_TYPE[family]} ; flags dynamic,timeout ; timeout {affinity}s ; }}"
            )
            endpoint_chains[sep] = (
                f"update @{aff} {{ {ip} saddr }}",
                f"meta l4proto {proto} {_dnat(endpoint)}",
            )
            rules.append(f"{ip} saddr @{aff} goto {sep}")
    if split is not None:
        if affinity is not None:  # after the affinity lookups, which must not see the field
            rules.append(f"jump {split_chain(split.key)}")
        rules.extend(_dispatch(target, endpoints, split.slots, config))
        return tuple(rules)
    actions = [
        (
            f"meta l4proto {proto} {_dnat(endpoint)}"
            if affinity is None
            else f"goto sep-{endpoint_hash(name, endpoint.ip, endpoint.port)}",
            threshold,
        )
        for endpoint, threshold in _thresholds(_live(endpoints))
    ]
    rules.extend(_drawn(actions))
    return tuple(rules)


def _dispatch(
    target: KernelTarget,
    endpoints: Sequence[WeightedEndpoint],
    slots: Sequence[int],
    config: KernelConfig,
) -> list[str]:
    """Per node slot the split drew, an even draw over that node's endpoints; the field is
    cleared in the rule that DNATs. Last, for a value no rule took, the proxy decides."""
    port = target.service_port
    name = port.name
    proto = l4_keyword(port.protocol, name)
    field = _hex(config.node_mark_mask)
    clear = _clear_node_mark(config)
    by_slot: dict[int, list[WeightedEndpoint]] = {}
    for endpoint, slot in zip(endpoints, slots, strict=True):
        by_slot.setdefault(slot, []).append(WeightedEndpoint(endpoint.ip, endpoint.port, 1.0))
    rules: list[str] = []
    for slot, members in sorted(by_slot.items()):
        actions = [
            (
                f"meta l4proto {proto} {clear} {_dnat(endpoint)}"
                if port.affinity_timeout_seconds is None
                else f"{clear} goto sep-{endpoint_hash(name, endpoint.ip, endpoint.port)}",
                threshold,
            )
            for endpoint, threshold in _thresholds(members)
        ]
        drawn = f"meta mark & {field} == {_hex(config.slot_mark(slot))} "
        rules.extend(_drawn(actions, drawn))
    rules.append(f"meta l4proto {proto} {clear} redirect to :{target.fallback_port}")
    return rules


def _external(
    port: ServicePort, svc: str, svl: str, config: KernelConfig, family: int
) -> tuple[str, ...]:
    if not port.external_traffic_local:
        return (f"jump {MARK_CHAIN}", f"goto {svc}")
    rules: list[str] = []
    pod_cidr = config.cluster_cidr(family)
    if pod_cidr is not None:  # pods reach external addresses cluster-wide, source kept
        rules.append(f"{_FAMILY[family]} saddr {pod_cidr} goto {svc}")
    rules.extend(
        (
            f"fib saddr type local jump {MARK_CHAIN}",  # the node itself: cluster-wide, SNATed
            f"fib saddr type local goto {svc}",
            f"goto {svl}",
        )
    )
    return tuple(rules)


def _live(endpoints: Sequence[WeightedEndpoint]) -> list[WeightedEndpoint]:
    live = [e for e in endpoints if e.weight > 0]
    if not live:  # every weight 0 is no decision at all: spread evenly rather than drop
        live = [WeightedEndpoint(e.ip, e.port, 1.0) for e in endpoints]
    return live


def _thresholds(live: Sequence[WeightedEndpoint]) -> list[tuple[WeightedEndpoint, int]]:
    """(endpoint, T) for `numgen random mod SCALE < T`, in rule order; the last T is SCALE."""
    return [(live[index], t) for index, t in _draws([e.weight for e in live])]


def _drawn(actions: Sequence[tuple[str, int]], prefix: str = "") -> list[str]:
    """One rule per (action, T): `numgen random mod SCALE < T` then the action; a T of SCALE
    is unconditional and the last. `prefix`: matches every rule starts with."""
    rules: list[str] = []
    for action, threshold in actions:
        if threshold >= SCALE:
            rules.append(f"{prefix}{action}")
            break
        rules.append(f"{prefix}numgen random mod {SCALE} < {threshold} {action}")
    return rules


def _draws(weights: Sequence[float]) -> list[tuple[int, int]]:
    """(index, T) per weight for `numgen random mod SCALE < T` rules taken in order, so that
    index i is drawn with probability w_i / Σw; the last T is SCALE. A weight whose
    conditional share rounds to 0 gets no rule (it cannot be drawn)."""
    out: list[tuple[int, int]] = []
    for index, p in enumerate(probabilities(weights)):
        threshold = SCALE if p >= 1.0 else min(SCALE, round(p * SCALE))
        if threshold > 0:
            out.append((index, threshold))
        if threshold >= SCALE:
            break
    return out


# -- small pieces --------------------------------------------------------------------------------


def _add_elements(family: int, added: Mapping[str, Sequence[str]]) -> list[str]:
    """The block form: adds elements without the element cache an `add element` command needs."""
    declarations = {SERVICE_IPS: _service_ips_type(family), SERVICE_NODEPORTS: _nodeports_type()}
    lines = []
    for map_name, elements in added.items():
        spec = declarations[map_name][2:-2]  # "type ... : verdict ;"
        lines.append(
            f"table {table_ref(family)} {{ map {map_name} {{ {spec} elements = "
            f"{{ {', '.join(elements)} }} ; }} ; }}"
        )
    return lines


def _service_ips_type(family: int) -> str:
    return f"{{ type {_ADDR_TYPE[family]} . inet_proto . inet_service : verdict ; }}"


def _hairpin_type(family: int) -> str:
    return f"{{ type {_ADDR_TYPE[family]} . {_ADDR_TYPE[family]} ; }}"


def _nodeports_type() -> str:
    return "{ type inet_proto . inet_service : verdict ; }"


def _dnat(endpoint: WeightedEndpoint) -> str:
    return f"dnat to {endpoint_address(endpoint)}"


def _hex(value: int) -> str:
    return f"0x{value:08x}"


def _clear_node_mark(config: KernelConfig) -> str:
    return f"meta mark set meta mark & {_hex(~config.node_mark_mask & 0xFFFFFFFF)}"


def _check_family(family: int) -> None:
    if family not in (4, 6):
        raise KernelRenderError(f"family: {family!r} is not 4 or 6")
