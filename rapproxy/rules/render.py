"""The nat rules that steer Service traffic into rapproxy, rendered as `iptables-restore` text.

Pure: no I/O. Every function takes the desired state (and, where repair needs it, the text of an
earlier `iptables-save -t nat`) and returns the text of ONE `iptables-restore --noflush`
transaction, so a sync is atomic — the kernel sees either the old rule set or the new one, never
half of each — and the output can be checked against golden text in tests.

Layout of what rapproxy owns in the nat table (per address family, rendered separately):

    PREROUTING  -> RAPPROXY-SERVICES   (traffic arriving from pods and from other nodes)
    OUTPUT      -> RAPPROXY-SERVICES   (traffic from processes on the node itself)

    RAPPROXY-SERVICES   one rule per (service port, address): the ClusterIPs, the externalIPs and
                        the LoadBalancer ingress IPs, each `-j REDIRECT --to-ports <proxy port>`;
                        its LAST rule jumps to RAPPROXY-NODEPORTS for destinations that are
                        addresses of this node (`-m addrtype --dst-type LOCAL`).
    RAPPROXY-NODEPORTS  one rule per NodePort, `-j REDIRECT --to-ports <proxy port>`.

Why only two chains: unlike kube-proxy's userspace mode (`KUBE-PORTALS-CONTAINER` with REDIRECT
and `KUBE-PORTALS-HOST` with DNAT to the node IP) rapproxy REDIRECTs on both paths, so PREROUTING
and OUTPUT can share one chain. externalIPs and LoadBalancer IPs are matched exactly like
ClusterIPs (by destination address), so they live in the same chain, told apart by comment; a
separate chain would add a jump per packet and buy nothing.

REDIRECT rewrites the destination to the primary address of the incoming interface (PREROUTING)
or to 127.0.0.1 / ::1 (OUTPUT), so the proxy's listening sockets must be bound to the wildcard
address. TCP service ports all redirect to the one TCP listener of their family (the service is
found again from SO_ORIGINAL_DST); each UDP service port redirects to its own socket, because a
UDP socket cannot ask for the original destination of a datagram.

NodePorts are not intercepted for loopback destinations by default (`127.0.0.0/8`, `::1`): like
kube-proxy's `nodePortAddresses` handling (its nftables mode never accepts them; its iptables mode
needs `route_localnet` for them), which also keeps local daemons that listen on 127.0.0.1 at a
port in the NodePort range reachable. `RuleConfig.localhost_nodeports` turns it on for IPv4;
IPv6 has no equivalent, as in kube-proxy. `RuleConfig.node_port_cidrs` restricts NodePorts to the
node addresses inside those CIDRs, like `nodePortAddresses`.

Rules are written in the canonical form `iptables-save` prints them in, so what is rendered can be
compared line by line with what the kernel reports.

Kernel-mode Services (rules/kernel.py) share these two entry chains: their rule jumps to the
Service's own DNAT chains instead of REDIRECTing, in the same name order, in the same
transaction. While any exists, POSTROUTING also jumps to `RAPPROXY-POSTROUTING` (SNAT of marked
connections); the repair below treats that jump like the other two.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from rapproxy.model.addresses import parse_ip
from rapproxy.model.service import L4Protocol, ServicePort
from rapproxy.rules.kernel import (
    INFRA_CHAINS,
    KernelConfig,
    KernelTarget,
    infra_rules,
    is_kernel_chain,
    postrouting_jump_spec,
    render_target,
)

Family = Literal[4, 6]

CHAIN_PREFIX = "RAPPROXY-"
SERVICES_CHAIN = "RAPPROXY-SERVICES"
NODEPORTS_CHAIN = "RAPPROXY-NODEPORTS"
OWN_CHAINS = (SERVICES_CHAIN, NODEPORTS_CHAIN)
JUMP_FROM = ("PREROUTING", "OUTPUT")
JUMP_COMMENT = "rapproxy service portals"
NODEPORTS_COMMENT = "rapproxy service nodeports; NOTE: this must be the last rule in this chain"

_LOOPBACK = {4: "127.0.0.0/8", 6: "::1/128"}
_HOST_PREFIX = {4: 32, 6: 128}
_MAX_COMMENT = 256
_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9._/:;, -]")


class RenderError(ValueError):
    """The desired state cannot be written as rules; the message names the offending value."""


@dataclass(frozen=True, slots=True)
class RedirectTarget:
    """One service port and the local port its traffic is redirected to.

    For TCP `to_port` is the family's shared TCP listener; for UDP the port of that service
    port's own socket.
    """

    service_port: ServicePort
    to_port: int


@dataclass(frozen=True, slots=True)
class RuleConfig:
    """How interception is shaped on this node (mirrors `KubeProxyConfiguration` where it can).

    `localhost_nodeports`: also intercept NodePorts addressed to 127.0.0.0/8 (IPv4 only).
    `node_port_cidrs`: when non-empty, NodePorts are intercepted only for node addresses inside
    these CIDRs (kube-proxy's `nodePortAddresses`); a family with no CIDR gets no NodePorts.
    """

    localhost_nodeports: bool = False
    node_port_cidrs: tuple[str, ...] = ()
    kernel: KernelConfig = field(default_factory=KernelConfig)

    def __post_init__(self) -> None:
        for index, cidr in enumerate(self.node_port_cidrs):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise RenderError(
                    f"RuleConfig.node_port_cidrs[{index}]: {cidr!r} is not a CIDR"
                ) from None


@dataclass(frozen=True, slots=True)
class SavedNat:
    """What an `iptables-save -t nat` showed: chain names and rules (`-A CHAIN spec`) in order."""

    chains: tuple[str, ...]
    rules: tuple[tuple[str, str], ...]


def render_rules(
    targets: Sequence[RedirectTarget],
    config: RuleConfig,
    family: Family = 4,
    saved_nat: str | None = None,
    *,
    kernel: Sequence[KernelTarget] = (),
    previous_chains: Iterable[str] = (),
) -> str:
    """One transaction that rewrites rapproxy's chains whole for one address family.

    Declaring a chain (`:RAPPROXY-SERVICES - [0:0]`) under `--noflush` creates it or flushes it,
    so leftovers of an earlier (or crashed) run are simply replaced. With `saved_nat` (the text
    of `iptables-save -t nat` taken just before) the same transaction also repairs the jumps from
    PREROUTING and OUTPUT: adds the missing ones, drops duplicates and stray jumps into
    `RAPPROXY-*`, and deletes `RAPPROXY-*` chains this version no longer uses. Without it the
    jumps are left untouched (the cheap per-sync path once they are known to be in place).

    `kernel` are the kernel-mode service ports; `previous_chains` the kernel chains the last
    transaction wrote, so the ones no longer wanted are deleted without an `iptables-save`.
    Output order does not depend on the order of `targets`.
    """
    chains = _render_chains(targets, config, family, kernel)
    if saved_nat is not None:
        repair = _plan_repair(parse_saved_nat(saved_nat), chains.kernel_chains, bool(kernel))
    else:
        repair = _Repair()
    return _transaction(chains, repair, previous_chains)


def render_rules_and_repair(
    targets: Sequence[RedirectTarget],
    config: RuleConfig,
    family: Family,
    saved_nat: str,
    *,
    kernel: Sequence[KernelTarget] = (),
) -> tuple[str, str]:
    """`render_rules` without and with `saved_nat`, from one render of the chains.

    A repairing sync needs both: it restores the second, and keeps the first to recognise an
    unchanged rewrite later. Rendering 10k service ports is most of a periodic resync's CPU, so
    it is not done twice.
    """
    chains = _render_chains(targets, config, family, kernel)
    repair = _plan_repair(parse_saved_nat(saved_nat), chains.kernel_chains, bool(kernel))
    return _transaction(chains, _Repair()), _transaction(chains, repair)


@dataclass(frozen=True, slots=True)
class RenderedSync:
    """One sync's render: the transaction, the chains alone (to recognise an unchanged rewrite
    later), and the kernel chains it declares (the next render's `previous_chains`)."""

    text: str
    rules: str
    kernel_chains: tuple[str, ...]


def render_sync(
    targets: Sequence[RedirectTarget],
    config: RuleConfig,
    family: Family,
    *,
    saved_nat: str | None = None,
    kernel: Sequence[KernelTarget] = (),
    previous_chains: Iterable[str] = (),
) -> RenderedSync:
    """`render_rules` and `render_rules_and_repair` in one: what `IptablesRunner.sync` needs."""
    chains = _render_chains(targets, config, family, kernel)
    plain = _transaction(chains, _Repair(), previous_chains)
    if saved_nat is None:
        return RenderedSync(plain, plain, chains.kernel_chains)
    repair = _plan_repair(parse_saved_nat(saved_nat), chains.kernel_chains, bool(kernel))
    rules = _transaction(chains, _Repair())
    return RenderedSync(_transaction(chains, repair), rules, chains.kernel_chains)


@dataclass(frozen=True, slots=True)
class _Chains:
    text: str  # every rule of every chain we own, one per line
    kernel_chains: tuple[str, ...]  # declared besides OWN_CHAINS: kernel mode's chains


def _render_chains(
    targets: Sequence[RedirectTarget],
    config: RuleConfig,
    family: Family,
    kernel: Sequence[KernelTarget] = (),
) -> _Chains:
    """The rules of our chains (no header, declarations or repair), one per line."""
    _check_family(family)
    ordered = sorted(targets, key=_name_order)
    _check_unique(ordered)
    _check_unique_across(ordered, kernel)
    entries: list[tuple[tuple[str, str, str, str], RedirectTarget | KernelTarget]] = [
        (_name_order(target), target) for target in ordered
    ]
    entries.extend((_port_order(k.service_port), k) for k in kernel)
    entries.sort(key=lambda entry: entry[0])
    service_rules: list[str] = []
    nodeport_rules: list[str] = []
    own: list[tuple[str, tuple[str, ...]]] = []
    if kernel:
        own.extend(infra_rules(config.kernel))
    for _, target in entries:
        if isinstance(target, RedirectTarget):
            service_rules.extend(_address_rules(target, family))
            nodeport_rules.extend(_nodeport_rules(target, family))
            continue
        rendered = render_target(target, config.kernel, family)
        service_rules.extend(rendered.service_rules)
        nodeport_rules.extend(rendered.nodeport_rules)
        own.extend(rendered.chains)
    lines = [*service_rules, *_nodeport_jumps(config, family), *nodeport_rules]
    for _, rules in own:
        lines.extend(rules)
    return _Chains("\n".join(lines), tuple(chain for chain, _ in own))


def _transaction(chains: _Chains, repair: _Repair, previous_chains: Iterable[str] = ()) -> str:
    wanted = set(chains.kernel_chains)
    gone = [
        c
        for c in dict.fromkeys(previous_chains)
        if c not in wanted and c not in repair.stale_chains and c not in OWN_CHAINS
    ]
    # A chain from the previous write is deleted only if no longer wanted; the infra chains are
    # referenced from POSTROUTING, whose jump only a repairing transaction can remove.
    gone = [c for c in gone if c.startswith(CHAIN_PREFIX) and not _is_infra(c)]
    stale = (*repair.stale_chains, *gone)
    lines = ["*nat"]
    lines.extend(f":{chain} - [0:0]" for chain in (*OWN_CHAINS, *chains.kernel_chains))
    lines.extend(f":{chain} - [0:0]" for chain in stale)
    lines.extend(f"-D {chain} {spec}" for chain, spec in repair.stale_rules)
    # Every chain that could refer to a stale one was flushed just above, so deleting it cannot
    # meet a reference.
    lines.extend(f"-X {chain}" for chain in stale)
    if chains.text:
        lines.append(chains.text)
    lines.extend(f"-I {chain} 1 {spec}" for chain, spec in repair.missing_jumps)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_jumps(saved_nat: str) -> str:
    """A transaction that only repairs the jumps (and creates our chains if absent), or "".

    For a periodic check between full syncs: existing `RAPPROXY-*` chains are NOT declared, so
    their rules — the live interception — are not flushed.
    """
    saved = parse_saved_nat(saved_nat)
    # Kernel-mode chains belong to the full sync (which knows which are wanted): kept here.
    present = tuple(chain for chain in saved.chains if is_kernel_chain(chain))
    repair = _plan_repair(saved, present, kernel=bool(present), require_kernel_jump=False)
    # A stale chain still referenced from one of our live chains must wait for the next full
    # sync (which flushes ours first); deleting it now would fail the whole transaction.
    still_used = {_jump_target(spec) for chain, spec in saved.rules if chain in OWN_CHAINS}
    stale_chains = [chain for chain in repair.stale_chains if chain not in still_used]
    missing_chains = [chain for chain in OWN_CHAINS if chain not in saved.chains]
    if not (stale_chains or repair.stale_rules or repair.missing_jumps or missing_chains):
        return ""
    lines = ["*nat"]
    lines.extend(f":{chain} - [0:0]" for chain in (*missing_chains, *stale_chains))
    lines.extend(f"-D {chain} {spec}" for chain, spec in repair.stale_rules)
    lines.extend(f"-X {chain}" for chain in stale_chains)
    lines.extend(f"-I {chain} 1 {spec}" for chain, spec in repair.missing_jumps)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_cleanup(saved_nat: str) -> str:
    """A transaction that removes everything rapproxy installed in the nat table, or "".

    Works from what is really there (any `RAPPROXY-*` chain, any rule jumping into one), so it
    also removes what an older version left behind. Deleting a rule that is not there would fail
    the whole transaction, which is why it needs `saved_nat`.
    """
    saved = parse_saved_nat(saved_nat)
    ours = [chain for chain in saved.chains if chain.startswith(CHAIN_PREFIX)]
    references = [
        (chain, spec)
        for chain, spec in saved.rules
        if not chain.startswith(CHAIN_PREFIX) and _jump_target(spec).startswith(CHAIN_PREFIX)
    ]
    if not ours and not references:
        return ""
    lines = ["*nat"]
    lines.extend(f":{chain} - [0:0]" for chain in ours)
    lines.extend(f"-D {chain} {spec}" for chain, spec in references)
    lines.extend(f"-X {chain}" for chain in ours)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def parse_saved_nat(text: str) -> SavedNat:
    """Read the nat table out of `iptables-save` output (other tables are ignored)."""
    chains: list[str] = []
    rules: list[tuple[str, str]] = []
    in_nat = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            in_nat = line == "*nat"
        elif not in_nat or not line or line.startswith("#"):
            continue
        elif line == "COMMIT":
            in_nat = False
        elif line.startswith(":"):
            chains.append(line[1:].split(" ", 1)[0])
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            rules.append((chain, spec))
    return SavedNat(tuple(chains), tuple(rules))


def comment_for(target: RedirectTarget) -> str:
    """kube-proxy's `ServicePortName` text: `ns/name:port`, or `ns/name` for an unnamed port."""
    name = target.service_port.name
    return f"{name.namespace}/{name.name}" + (f":{name.port}" if name.port else "")


@dataclass(frozen=True, slots=True)
class _Repair:
    stale_chains: tuple[str, ...] = ()
    stale_rules: tuple[tuple[str, str], ...] = ()
    missing_jumps: tuple[tuple[str, str], ...] = ()


def _plan_repair(
    saved: SavedNat,
    kernel_chains: Iterable[str] = (),
    kernel: bool = False,
    *,
    require_kernel_jump: bool = True,
) -> _Repair:
    """What to delete and add so exactly our jumps exist: one per (built-in chain, spec).

    `kernel`: kernel-mode chains are in use, so POSTROUTING's jump belongs too (added when
    missing only with `require_kernel_jump`).
    """
    wanted_chains = set(OWN_CHAINS) | set(kernel_chains)
    wanted_jumps = [(chain, _jump_spec()) for chain in JUMP_FROM]
    if kernel:
        wanted_jumps.append(("POSTROUTING", postrouting_jump_spec()))
    stale_chains = tuple(
        chain
        for chain in saved.chains
        if chain.startswith(CHAIN_PREFIX) and chain not in wanted_chains
    )
    kept: set[tuple[str, str]] = set()
    stale_rules: list[tuple[str, str]] = []
    for chain, spec in saved.rules:
        if chain.startswith(CHAIN_PREFIX) or not _jump_target(spec).startswith(CHAIN_PREFIX):
            continue
        if (chain, spec) in wanted_jumps and (chain, spec) not in kept:
            kept.add((chain, spec))
        else:
            stale_rules.append((chain, spec))
    missing = tuple(
        (chain, spec)
        for chain, spec in wanted_jumps
        if (chain, spec) not in kept and (require_kernel_jump or chain != "POSTROUTING")
    )
    return _Repair(stale_chains, tuple(stale_rules), missing)


def _is_infra(chain: str) -> bool:
    return chain in INFRA_CHAINS


def _jump_spec() -> str:
    return f'-m comment --comment "{JUMP_COMMENT}" -j {SERVICES_CHAIN}'


def _jump_target(spec: str) -> str:
    try:
        words = shlex.split(spec)
    except ValueError:
        return ""
    for flag, value in itertools.pairwise(words):
        if flag in ("-j", "-g", "--jump", "--goto"):
            return value
    return ""


def _address_rules(target: RedirectTarget, family: Family) -> Iterable[str]:
    port = target.service_port
    labelled = (
        *((ip, "cluster IP") for ip in port.cluster_ips),
        *((ip, "external IP") for ip in port.external_ips),
        *((ip, "loadbalancer IP") for ip in port.load_balancer_ips),
    )
    seen: set[str] = set()
    for ip, label in labelled:
        if _family_of(ip, target) != family or ip in seen:
            continue
        seen.add(ip)
        comment = _quote_comment(f"{comment_for(target)} {label}")
        yield (
            f"-A {SERVICES_CHAIN} -d {ip}/{_HOST_PREFIX[family]}"
            f" {_match_port(port, port.port, comment)} -j REDIRECT --to-ports {target.to_port}"
        )


def _nodeport_rules(target: RedirectTarget, family: Family) -> Iterable[str]:
    port = target.service_port
    if port.node_port is None:
        return
    # A NodePort belongs to the families the Service has ClusterIPs in (dual-stack services
    # get both, single-stack ones only their own), as kube-proxy decides it.
    if not any(_family_of(ip, target) == family for ip in port.cluster_ips):
        return
    comment = _quote_comment(comment_for(target))
    yield (
        f"-A {NODEPORTS_CHAIN} {_match_port(port, port.node_port, comment)}"
        f" -j REDIRECT --to-ports {target.to_port}"
    )


def _match_port(port: ServicePort, number: int, comment: str) -> str:
    """`-p proto -m comment --comment C -m proto --dport N`, in iptables-save's order."""
    proto = _proto(port.protocol)
    return f"-p {proto} -m comment --comment {comment} -m {proto} --dport {number}"


def _nodeport_jumps(config: RuleConfig, family: Family) -> list[str]:
    comment = _quote_comment(NODEPORTS_COMMENT)
    tail = f"-m comment --comment {comment} -m addrtype --dst-type LOCAL -j {NODEPORTS_CHAIN}"
    if config.node_port_cidrs:
        cidrs = [ipaddress.ip_network(cidr, strict=False) for cidr in config.node_port_cidrs]
        return [f"-A {SERVICES_CHAIN} -d {cidr} {tail}" for cidr in cidrs if cidr.version == family]
    if family == 4 and config.localhost_nodeports:
        return [f"-A {SERVICES_CHAIN} {tail}"]
    return [f"-A {SERVICES_CHAIN} ! -d {_LOOPBACK[family]} {tail}"]


def _proto(protocol: L4Protocol) -> str:
    if protocol is L4Protocol.TCP:
        return "tcp"
    if protocol is L4Protocol.UDP:
        return "udp"
    raise RenderError(f"protocol {protocol.value}: only TCP and UDP are intercepted")


def _family_of(ip: str, target: RedirectTarget) -> int:
    try:
        return parse_ip(ip)[0]
    except ValueError:
        raise RenderError(f"{comment_for(target)}: {ip!r} is not an IP address") from None


def _quote_comment(text: str) -> str:
    # Names of Kubernetes objects cannot contain quotes, but never trust a string that ends up
    # inside a quoted shell-like token: one stray `"` would break the whole transaction.
    safe = _COMMENT_UNSAFE.sub("_", text)[:_MAX_COMMENT]
    return f'"{safe}"'


def _name_order(target: RedirectTarget) -> tuple[str, str, str, str]:
    # ServicePortName's own order, as a plain tuple: its dataclass `__lt__` builds two tuples in
    # Python per comparison, and sorting 10k targets makes 130k comparisons per render.
    return _port_order(target.service_port)


def _port_order(port: ServicePort) -> tuple[str, str, str, str]:
    name = port.name
    return (name.namespace, name.name, name.port, name.protocol)


def _check_unique_across(
    redirects: Sequence[RedirectTarget], kernel: Sequence[KernelTarget]
) -> None:
    names = {target.service_port.name for target in redirects}
    seen: set[object] = set()
    for target in kernel:
        name = target.service_port.name
        if name in names or name in seen:
            raise RenderError(
                f"{name.namespace}/{name.name}:{name.port}/{name.protocol.value}: listed twice"
            )
        seen.add(name)
        if not 0 < target.fallback_port < 65536:
            raise RenderError(f"{name}: fallback_port {target.fallback_port} is not a port")


def _check_family(family: int) -> None:
    if family not in (4, 6):
        raise RenderError(f"family: {family!r} is not 4 or 6")


def _check_unique(ordered: Sequence[RedirectTarget]) -> None:
    for previous, current in itertools.pairwise(ordered):
        if previous.service_port.name == current.service_port.name:
            raise RenderError(
                f"{comment_for(current)}/{current.service_port.protocol.value}: listed twice"
            )
    for target in ordered:
        if not 0 < target.to_port < 65536:
            raise RenderError(f"{comment_for(target)}: to_port {target.to_port} is not a port")
