"""The kernel fast path in nftables, rendered without nft (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rapproxy.model.service import L4Protocol, ServicePort, ServicePortName
from rapproxy.rules.kernel import (
    KernelConfig,
    KernelRenderError,
    KernelTarget,
    NodeSplit,
    SplitRef,
    WeightedEndpoint,
    endpoint_hash,
    port_hash,
    split_shares,
)
from rapproxy.rules.nftables import (
    SCALE,
    NftGroup,
    join_groups,
    render_base,
    render_change,
    render_cleanup,
    render_port,
    render_rebuild,
    render_split,
    render_split_change,
    render_weights,
    shares,
    split_chain,
)

NAME = ServicePortName("default", "web", "http")
H = port_hash(NAME)
SVC, SVL, EXT = f"svc-{H}", f"svl-{H}", f"ext-{H}"
A = WeightedEndpoint("10.0.1.1", 8080, 0.5)
B = WeightedEndpoint("10.0.2.1", 8080, 0.3)
C = WeightedEndpoint("10.0.3.1", 8080, 0.2)
CONFIG = KernelConfig()


def port(
    cluster_ips: tuple[str, ...] = ("10.96.0.10",),
    protocol: L4Protocol = L4Protocol.TCP,
    **kwargs: object,
) -> ServicePort:
    name = ServicePortName(NAME.namespace, NAME.name, NAME.port, protocol)
    return ServicePort(name=name, port=80, target_port=8080, cluster_ips=cluster_ips, **kwargs)  # type: ignore[arg-type]


def target(
    service: ServicePort | None = None,
    cluster: tuple[WeightedEndpoint, ...] = (A, B, C),
    local: tuple[WeightedEndpoint, ...] = (A,),
) -> KernelTarget:
    return KernelTarget(service or port(), cluster, local, 15001)


def chain(rendered_port: object, name: str) -> tuple[str, ...]:
    return dict(rendered_port.chains)[name]  # type: ignore[attr-defined]


def test_cluster_ip_enters_the_service_chain_which_draws_an_endpoint_and_dnats_in_one_rule() -> (
    None
):
    rendered = render_port(target(), CONFIG, 4)
    assert rendered.entries == (("service-ips", "10.96.0.10 . tcp . 80", SVC),)
    assert [c for c, _ in rendered.chains] == [SVC]  # no endpoint chains, no sets
    assert rendered.sets == ()
    assert chain(rendered, SVC) == (
        f"numgen random mod {SCALE} < 500000 meta l4proto tcp dnat to 10.0.1.1:8080",
        f"numgen random mod {SCALE} < 600000 meta l4proto tcp dnat to 10.0.2.1:8080",
        "meta l4proto tcp dnat to 10.0.3.1:8080",
    )
    assert rendered.weighted == SVC
    assert rendered.endpoints == {"10.0.1.1", "10.0.2.1", "10.0.3.1"}


@given(st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=8))
def test_the_drawn_shares_are_the_weights(weights: list[int]) -> None:
    if not any(weights):
        weights = [1] * len(weights)
    endpoints = tuple(WeightedEndpoint(f"10.0.0.{i + 1}", 80, w) for i, w in enumerate(weights))
    drawn = shares(target(cluster=endpoints), 4)
    for endpoint in endpoints:
        wanted = endpoint.weight / sum(weights)
        # Each rule's threshold is rounded to 1/SCALE; the errors add up along the chain.
        assert abs(drawn[f"{endpoint.ip}:80"] - wanted) <= len(weights) / SCALE


def test_zero_weights_get_no_draw_and_all_zero_is_spread_evenly() -> None:
    rules = chain(
        render_port(target(cluster=(A, WeightedEndpoint("10.0.9.9", 80, 0))), CONFIG, 4), SVC
    )
    assert not any("10.0.9.9:80" in rule for rule in rules)
    assert len(rules) == 1
    zero = (WeightedEndpoint("10.0.1.1", 80, 0), WeightedEndpoint("10.0.2.1", 80, 0))
    assert shares(target(cluster=zero), 4) == {"10.0.1.1:80": 0.5, "10.0.2.1:80": 0.5}


def test_client_ip_affinity_uses_kube_proxys_per_endpoint_sets_and_chains() -> None:
    rendered = render_port(target(port(affinity_timeout_seconds=300), cluster=(A, B)), CONFIG, 4)
    a, b = endpoint_hash(NAME, A.ip, A.port), endpoint_hash(NAME, B.ip, B.port)
    assert chain(rendered, SVC) == (
        f"ip saddr @aff-{a}-300 goto sep-{a}",
        f"ip saddr @aff-{b}-300 goto sep-{b}",
        f"numgen random mod {SCALE} < 625000 goto sep-{a}",
        f"goto sep-{b}",
    )
    assert chain(rendered, f"sep-{a}") == (
        f"update @aff-{a}-300 {{ ip saddr }}",
        "meta l4proto tcp dnat to 10.0.1.1:8080",
    )
    assert dict(rendered.sets)[f"aff-{a}-300"] == (
        "{ type ipv4_addr ; flags dynamic,timeout ; timeout 300s ; }"
    )


def test_nodeport_and_external_addresses_go_through_the_external_chain_which_masquerades() -> None:
    service = port(node_port=30080, external_ips=("192.0.2.1",), load_balancer_ips=("10.96.0.10",))
    rendered = render_port(target(service), CONFIG, 4)
    assert rendered.entries == (
        ("service-ips", "10.96.0.10 . tcp . 80", SVC),
        ("service-ips", "192.0.2.1 . tcp . 80", EXT),  # an LB IP equal to the ClusterIP: once
        ("service-nodeports", "tcp . 30080", EXT),
    )
    assert chain(rendered, EXT) == ("jump mark-for-masquerade", f"goto {SVC}")


def test_external_traffic_policy_local_keeps_the_source_and_uses_local_endpoints() -> None:
    service = port(node_port=30080, external_traffic_local=True)
    config = KernelConfig(cluster_cidrs=("10.244.0.0/16",))
    rendered = render_port(target(service), config, 4)
    assert chain(rendered, EXT) == (
        f"ip saddr 10.244.0.0/16 goto {SVC}",
        "fib saddr type local jump mark-for-masquerade",
        f"fib saddr type local goto {SVC}",
        f"goto {SVL}",
    )
    assert chain(rendered, SVL)[-1] == "meta l4proto tcp dnat to 10.0.1.1:8080"
    assert not any("!=" in rule for rule in chain(rendered, SVL))  # no SNAT for local ones


def test_internal_traffic_policy_local_sends_cluster_ip_traffic_to_local_endpoints() -> None:
    rendered = render_port(target(port(internal_traffic_local=True)), CONFIG, 4)
    assert rendered.entries == (("service-ips", "10.96.0.10 . tcp . 80", SVL),)
    assert [c for c, _ in rendered.chains] == [SVL]
    assert rendered.weighted is None  # nothing RAP-weighted is reached


def test_a_policy_without_endpoints_redirects_to_the_proxy_never_to_nothing() -> None:
    rendered = render_port(target(port(protocol=L4Protocol.UDP), cluster=(), local=()), CONFIG, 4)
    assert rendered.chains == ((rendered.weighted, ("meta l4proto udp redirect to :15001",)),)


def test_a_sample_is_redirected_to_the_proxy_first_and_the_weight_write_carries_it() -> None:
    sampled = KernelTarget(port(), (A, B, C), (A,), 15001, sample_share=0.2)
    config = KernelConfig(cluster_cidrs=("10.244.0.0/16",))
    rules = chain(render_port(sampled, config, 4), SVC)
    assert rules[0] == (f"meta l4proto tcp numgen random mod {SCALE} < 200000 redirect to :15001")
    assert "mark-for-masquerade" in rules[1]  # SNAT marks after: the proxy sees the client
    local = KernelTarget(port(internal_traffic_local=True), (A, B), (A,), 15001, sample_share=0.2)
    assert not any("redirect" in rule for rule in chain(render_port(local, config, 4), SVL))
    group = render_weights(sampled, config, 4)
    assert group is not None
    assert f"add rule ip rapproxy {SVC} {rules[0]}" in group.lines
    affinity = KernelTarget(port(affinity_timeout_seconds=300), (A, B), (), 15001, sample_share=0.2)
    assert not any("redirect" in rule for rule in chain(render_port(affinity, CONFIG, 4), SVC))


def test_masquerade_all_and_cluster_cidr_mark_cluster_ip_traffic() -> None:
    cidr = render_port(target(), KernelConfig(cluster_cidrs=("10.244.0.0/16",)), 4)
    assert chain(cidr, SVC)[0] == (
        "ip saddr != 10.244.0.0/16 ip daddr 10.96.0.10 tcp dport 80 jump mark-for-masquerade"
    )
    every = render_port(target(), KernelConfig(masquerade_all=True), 4)
    assert chain(every, SVC)[0] == "ip daddr 10.96.0.10 tcp dport 80 jump mark-for-masquerade"


def test_ipv6_renders_only_in_its_family_with_bracketed_dnat() -> None:
    six = WeightedEndpoint("fd00::1", 8080, 1.0)
    dual = target(port(("10.96.0.10", "fd00:96::10")), cluster=(A, six), local=())
    v6 = render_port(dual, CONFIG, 6)
    assert v6.entries == (("service-ips", "fd00:96::10 . tcp . 80", SVC),)
    assert chain(v6, SVC)[-1] == "meta l4proto tcp dnat to [fd00::1]:8080"
    assert chain(v6, SVC) == ("meta l4proto tcp dnat to [fd00::1]:8080",)
    assert render_port(target(port(("fd00:96::10",))), CONFIG, 4).chains == ()


def test_unsupported_protocol_is_refused_naming_the_service() -> None:
    with pytest.raises(KernelRenderError, match="default/web:http"):
        render_port(target(port(protocol=L4Protocol.SCTP)), CONFIG, 4)


def test_the_base_hooks_before_iptables_nat_and_masquerades_marked_connections() -> None:
    base = render_base(KernelConfig(masquerade_bit=14), 4)
    text = "\n".join(base.lines)
    assert base.owner is None
    assert "type nat hook prerouting priority -101 ;" in text
    assert "type nat hook output priority -101 ;" in text
    assert "type nat hook postrouting priority 99 ;" in text
    assert "add set ip rapproxy hairpin { type ipv4_addr . ipv4_addr ; }" in text
    masquerading = [line for line in base.lines if line.startswith("add rule ip rapproxy masq")]
    assert masquerading == [
        "add rule ip rapproxy masquerading ct status dnat ip saddr . ip daddr @hairpin"
        " meta mark set meta mark | 0x4000",
        "add rule ip rapproxy masquerading meta mark & 0x4000 == 0 return",
        "add rule ip rapproxy masquerading meta mark set meta mark ^ 0x4000",
        "add rule ip rapproxy masquerading masquerade fully-random",
    ]
    assert (
        "add rule ip rapproxy services ip daddr != 127.0.0.0/8 fib daddr type local"
        " meta l4proto . th dport vmap @service-nodeports" in text
    )
    limited = "\n".join(render_base(CONFIG, 6, ("192.168.0.0/16", "fd00::/64")).lines)
    assert "ip6 daddr fd00::/64 fib daddr type local" in limited
    assert "192.168" not in limited


def test_an_endpoint_change_rewrites_only_that_ports_chain_and_no_element() -> None:
    before = render_port(target(), CONFIG, 4)
    after = render_port(target(cluster=(A, B, WeightedEndpoint("10.0.4.1", 8080, 0.2))), CONFIG, 4)
    group = render_change(before, after, 4)
    assert group is not None and group.owner == NAME
    assert group.lines[0] == f"flush chain ip rapproxy {SVC}"
    assert all(line.startswith(f"add rule ip rapproxy {SVC} ") for line in group.lines[1:-1])
    assert group.lines[-1] == (  # the new address joins the hairpin set; gone ones may stay
        "table ip rapproxy { set hairpin { type ipv4_addr . ipv4_addr ;"
        " elements = { 10.0.4.1 . 10.0.4.1 } ; } ; }"
    )
    assert render_change(before, before, 4) is None


def test_an_affinity_endpoint_change_declares_new_objects_first_and_deletes_gone_ones_last() -> (
    None
):
    service = port(affinity_timeout_seconds=60)
    before = render_port(target(service, cluster=(A, B)), CONFIG, 4)
    d = WeightedEndpoint("10.0.4.1", 8080, 0.3)
    after = render_port(target(service, cluster=(A, d)), CONFIG, 4)
    lines = render_change(before, after, 4).lines  # type: ignore[union-attr]
    b, new = endpoint_hash(NAME, B.ip, B.port), endpoint_hash(NAME, d.ip, d.port)
    order = [
        f"add chain ip rapproxy sep-{new}",
        f"add set ip rapproxy aff-{new}-60 {{ type ipv4_addr ; flags dynamic,timeout ;"
        " timeout 60s ; }",
        f"flush chain ip rapproxy {SVC}",
        f"flush chain ip rapproxy sep-{b}",
        f"delete chain ip rapproxy sep-{b}",
        f"delete set ip rapproxy aff-{b}-60",
    ]
    assert [lines.index(line) for line in order] == sorted(lines.index(line) for line in order)
    assert lines[-1] == f"delete set ip rapproxy aff-{b}-60"


def test_an_entry_change_replaces_its_element_with_the_block_form() -> None:
    before = render_port(target(), CONFIG, 4)
    after = render_port(target(port(("10.96.0.20",))), CONFIG, 4)
    lines = render_change(before, after, 4).lines  # type: ignore[union-attr]
    assert "delete element ip rapproxy service-ips { 10.96.0.10 . tcp . 80 }" in lines
    assert (
        "table ip rapproxy { map service-ips { type ipv4_addr . inet_proto . inet_service :"
        f" verdict ; elements = {{ 10.96.0.20 . tcp . 80 : goto {SVC} }} ; }} ; }}" in lines
    )


def test_removing_a_port_deletes_its_elements_then_its_chains_and_sets() -> None:
    before = render_port(target(port(affinity_timeout_seconds=60), cluster=(A,)), CONFIG, 4)
    lines = render_change(before, None, 4).lines  # type: ignore[union-attr]
    a = endpoint_hash(NAME, A.ip, A.port)
    assert lines == (
        "delete element ip rapproxy service-ips { 10.96.0.10 . tcp . 80 }",
        f"flush chain ip rapproxy {SVC}",
        f"delete chain ip rapproxy {SVC}",
        f"flush chain ip rapproxy sep-{a}",
        f"delete chain ip rapproxy sep-{a}",
        f"delete set ip rapproxy aff-{a}-60",
    )


def test_a_rebuild_replaces_the_table_in_one_transaction_base_first() -> None:
    groups = render_rebuild(render_base(CONFIG, 4), [render_port(target(), CONFIG, 4)], 4)
    assert groups[0].lines[:3] == (
        "add table ip rapproxy",
        "delete table ip rapproxy",
        "add table ip rapproxy",
    )
    assert [g.owner for g in groups] == [None, NAME]
    assert render_cleanup(6) == "add table ip6 rapproxy\ndelete table ip6 rapproxy\n"


def test_a_weight_write_rewrites_the_weighted_chain_alone() -> None:
    group = render_weights(target(cluster=(A, B)), CONFIG, 4)
    assert group is not None
    assert group.lines[0] == f"flush chain ip rapproxy {SVC}"
    assert group.lines[-1] == f"add rule ip rapproxy {SVC} meta l4proto tcp dnat to 10.0.2.1:8080"
    assert render_weights(target(port(internal_traffic_local=True)), CONFIG, 4) is None


def test_joined_groups_know_their_line_numbers() -> None:
    text, spans = join_groups([NftGroup(None, ("a", "b")), NftGroup(NAME, ("c",))])
    assert text == "a\nb\nc\n"
    assert spans == [range(1, 3), range(3, 4)]


# -- shared node splits --------------------------------------------------------------------------

KEY = "LAYOUTKEY23456"
FIELD, CLEAR = "0x00ff0000", "meta mark set meta mark & 0xff00ffff"


def split_target(
    service: ServicePort | None = None, slots: tuple[int, ...] = (1, 1, 2)
) -> KernelTarget:
    cluster = tuple(WeightedEndpoint(e.ip, e.port, 1.0) for e in (A, B, C))
    return KernelTarget(service or port(), cluster, (A,), 15001, split=SplitRef(KEY, slots))


def test_a_split_service_jumps_to_the_shared_draw_then_draws_evenly_inside_the_node() -> None:
    rules = chain(render_port(split_target(), CONFIG, 4), SVC)
    assert rules == (
        f"jump lay-{KEY}",
        f"meta mark & {FIELD} == {FIELD} meta l4proto tcp {CLEAR} redirect to :15001",
        f"meta mark & {FIELD} == 0x00010000 numgen random mod {SCALE} < 500000"
        f" meta l4proto tcp {CLEAR} dnat to 10.0.1.1:8080",
        f"meta mark & {FIELD} == 0x00010000 meta l4proto tcp {CLEAR} dnat to 10.0.2.1:8080",
        f"meta mark & {FIELD} == 0x00020000 meta l4proto tcp {CLEAR} dnat to 10.0.3.1:8080",
        f"meta l4proto tcp {CLEAR} redirect to :15001",  # no value taken: the proxy decides
    )
    assert split_chain(KEY) == f"lay-{KEY}"


def test_the_shared_draw_clears_the_field_then_draws_the_sample_and_each_node() -> None:
    rules = render_split(NodeSplit(KEY, (0.25, 0.0, 0.75), sample_share=0.2), CONFIG)
    assert rules == (
        CLEAR,
        f"numgen random mod {SCALE} < 200000 meta mark set meta mark | {FIELD} return",
        f"numgen random mod {SCALE} < 250000 meta mark set meta mark | 0x00010000 return",
        "meta mark set meta mark | 0x00030000 return",  # slot 2 has share 0: never drawn
    )
    assert render_split(NodeSplit(KEY, (0.0, 0.0)), CONFIG)[1:] == (  # all 0: evenly
        f"numgen random mod {SCALE} < 500000 meta mark set meta mark | 0x00010000 return",
        "meta mark set meta mark | 0x00020000 return",
    )
    narrow = KernelConfig(node_mark_mask=0x3 << 20)
    with pytest.raises(KernelRenderError, match="tells 2 apart"):
        render_split(NodeSplit(KEY, (0.3, 0.3, 0.4)), narrow)


def test_a_split_write_is_the_chain_alone_and_a_table_level_group() -> None:
    before, after = NodeSplit(KEY, (0.5, 0.5)), NodeSplit(KEY, (0.9, 0.1))
    created = render_split_change(None, before, CONFIG, 4)
    assert created is not None and created.owner is None
    assert created.lines[0] == f"add chain ip rapproxy lay-{KEY}"
    moved = render_split_change(before, after, CONFIG, 4)
    assert moved is not None
    assert moved.lines[0] == f"flush chain ip rapproxy lay-{KEY}"
    assert all(line.startswith(f"add rule ip rapproxy lay-{KEY} ") for line in moved.lines[1:])
    assert render_split_change(after, after, CONFIG, 4) is None
    gone = render_split_change(after, None, CONFIG, 4)
    assert gone is not None and gone.lines == (
        f"flush chain ip rapproxy lay-{KEY}",
        f"delete chain ip rapproxy lay-{KEY}",
    )
    groups = render_rebuild(
        render_base(CONFIG, 4), [render_port(split_target(), CONFIG, 4)], 4, [before], CONFIG
    )
    assert [g.owner for g in groups] == [None, None, NAME]  # the draw before its Services


def test_with_affinity_the_draw_comes_after_the_affinity_lookups_and_nothing_is_sampled() -> None:
    rules = chain(render_port(split_target(port(affinity_timeout_seconds=60)), CONFIG, 4), SVC)
    lookups = [i for i, rule in enumerate(rules) if "saddr @aff-" in rule]
    assert lookups and rules.index(f"jump lay-{KEY}") > max(lookups)
    assert sum("redirect" in rule for rule in rules) == 1  # only the last resort
    a = endpoint_hash(NAME, A.ip, A.port)
    assert f"meta mark & {FIELD} == 0x00010000 numgen random mod {SCALE} < 500000 {CLEAR}" in (
        " ".join(rules)
    )
    assert any(rule.endswith(f"{CLEAR} goto sep-{a}") for rule in rules)


def test_split_shares_spread_a_nodes_share_evenly_over_its_endpoints() -> None:
    target = split_target()
    assert split_shares(target, NodeSplit(KEY, (0.4, 0.6))) == [0.2, 0.2, 0.6]
    assert split_shares(target, NodeSplit(KEY, (0.0, 0.0))) == pytest.approx([1 / 3] * 3)


def test_the_node_field_must_be_contiguous_wide_enough_and_clear_of_the_masquerade_bit() -> None:
    assert KernelConfig().node_slots == 254
    assert KernelConfig(node_mark_mask=0x7 << 4).node_slots == 6
    for mask in (0, 0x10000, 0x50000, 1 << 32):
        with pytest.raises(KernelRenderError, match="node_mark_mask"):
            KernelConfig(node_mark_mask=mask)
    with pytest.raises(KernelRenderError, match="masquerade bit"):
        KernelConfig(node_mark_mask=0xC000)
    with pytest.raises(KernelRenderError, match="2 node slots for 3 endpoints"):
        KernelTarget(port(), (A, B, C), (), 15001, split=SplitRef(KEY, (1, 2)))


def test_a_node_split_over_two_families_is_refused_and_an_absent_family_redirects() -> None:
    v6 = WeightedEndpoint("fd00::1", 8080, 1.0)
    cluster = (WeightedEndpoint(A.ip, A.port, 1.0), v6)
    dual = KernelTarget(
        port(cluster_ips=("10.96.0.10", "fd00::10")),
        cluster,
        (),
        15001,
        split=SplitRef(KEY, (1, 2)),
    )
    with pytest.raises(KernelRenderError, match="one address family"):
        render_port(dual, CONFIG, 4)
    only_v4 = KernelTarget(
        port(cluster_ips=("10.96.0.10", "fd00::10")),
        (WeightedEndpoint(A.ip, A.port, 1.0),),
        (),
        15001,
        split=SplitRef(KEY, (1,)),
    )
    assert chain(render_port(only_v4, CONFIG, 6), SVC) == ("meta l4proto tcp redirect to :15001",)
