"""Golden-text and property tests for the nat rules rapproxy renders (pure, no iptables)."""

from __future__ import annotations

import ipaddress
import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rapproxy.model.service import L4Protocol, ServicePort, ServicePortName
from rapproxy.rules.render import (
    RedirectTarget,
    RenderError,
    RuleConfig,
    parse_saved_nat,
    render_cleanup,
    render_jumps,
    render_rules,
    render_rules_and_repair,
)

HEADER = "*nat\n:RAPPROXY-SERVICES - [0:0]\n:RAPPROXY-NODEPORTS - [0:0]\n"
NODEPORT_JUMP_V4 = (
    '-A RAPPROXY-SERVICES ! -d 127.0.0.0/8 -m comment --comment "rapproxy service nodeports;'
    ' NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL'
    " -j RAPPROXY-NODEPORTS\n"
)
NODEPORT_JUMP_V6 = NODEPORT_JUMP_V4.replace("127.0.0.0/8", "::1/128")
JUMPS = (
    '-I PREROUTING 1 -m comment --comment "rapproxy service portals" -j RAPPROXY-SERVICES\n'
    '-I OUTPUT 1 -m comment --comment "rapproxy service portals" -j RAPPROXY-SERVICES\n'
)


def port(
    name: str = "web",
    port_name: str = "http",
    number: int = 80,
    protocol: L4Protocol = L4Protocol.TCP,
    cluster_ips: tuple[str, ...] = ("10.96.0.10",),
    **kwargs: object,
) -> ServicePort:
    return ServicePort(
        name=ServicePortName("default", name, port_name, protocol),
        port=number,
        target_port=8080,
        cluster_ips=cluster_ips,
        **kwargs,  # type: ignore[arg-type]
    )


def test_clusterip_tcp_service_redirects_to_the_shared_tcp_listener() -> None:
    text = render_rules([RedirectTarget(port(), 15001)], RuleConfig())
    assert text == (
        HEADER
        + '-A RAPPROXY-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http'
        ' cluster IP" -m tcp --dport 80 -j REDIRECT --to-ports 15001\n'
        + NODEPORT_JUMP_V4
        + "COMMIT\n"
    )


def test_udp_service_redirects_to_its_own_socket() -> None:
    dns = port("dns", "dns", 53, L4Protocol.UDP, ("10.96.0.53",))
    text = render_rules([RedirectTarget(dns, 40053)], RuleConfig())
    assert text == (
        HEADER
        + '-A RAPPROXY-SERVICES -d 10.96.0.53/32 -p udp -m comment --comment "default/dns:dns'
        ' cluster IP" -m udp --dport 53 -j REDIRECT --to-ports 40053\n'
        + NODEPORT_JUMP_V4
        + "COMMIT\n"
    )


def test_nodeport_is_matched_in_its_own_chain_after_the_local_address_jump() -> None:
    text = render_rules([RedirectTarget(port(node_port=30080), 15001)], RuleConfig())
    assert text == (
        HEADER
        + '-A RAPPROXY-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http'
        ' cluster IP" -m tcp --dport 80 -j REDIRECT --to-ports 15001\n'
        + NODEPORT_JUMP_V4
        + '-A RAPPROXY-NODEPORTS -p tcp -m comment --comment "default/web:http"'
        " -m tcp --dport 30080 -j REDIRECT --to-ports 15001\n"
        "COMMIT\n"
    )


def test_external_and_loadbalancer_ips_are_redirected_like_cluster_ips() -> None:
    web = port(external_ips=("192.0.2.7",), load_balancer_ips=("198.51.100.4",))
    text = render_rules([RedirectTarget(web, 15001)], RuleConfig())
    assert text == (
        HEADER
        + '-A RAPPROXY-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http'
        ' cluster IP" -m tcp --dport 80 -j REDIRECT --to-ports 15001\n'
        '-A RAPPROXY-SERVICES -d 192.0.2.7/32 -p tcp -m comment --comment "default/web:http'
        ' external IP" -m tcp --dport 80 -j REDIRECT --to-ports 15001\n'
        '-A RAPPROXY-SERVICES -d 198.51.100.4/32 -p tcp -m comment --comment "default/web:http'
        ' loadbalancer IP" -m tcp --dport 80 -j REDIRECT --to-ports 15001\n'
        + NODEPORT_JUMP_V4
        + "COMMIT\n"
    )


def test_multi_port_service_gets_one_rule_per_port_in_name_order() -> None:
    https = port(port_name="https", number=443)
    http = port(port_name="http", number=80)
    dns = port(port_name="metrics", number=9153, protocol=L4Protocol.UDP)
    text = render_rules(
        [RedirectTarget(https, 15001), RedirectTarget(dns, 40001), RedirectTarget(http, 15001)],
        RuleConfig(),
    )
    assert text == (
        HEADER
        + '-A RAPPROXY-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http'
        ' cluster IP" -m tcp --dport 80 -j REDIRECT --to-ports 15001\n'
        '-A RAPPROXY-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:https'
        ' cluster IP" -m tcp --dport 443 -j REDIRECT --to-ports 15001\n'
        '-A RAPPROXY-SERVICES -d 10.96.0.10/32 -p udp -m comment --comment "default/web:metrics'
        ' cluster IP" -m udp --dport 9153 -j REDIRECT --to-ports 40001\n'
        + NODEPORT_JUMP_V4
        + "COMMIT\n"
    )


def test_unnamed_port_is_commented_without_a_trailing_colon() -> None:
    text = render_rules([RedirectTarget(port(port_name=""), 15001)], RuleConfig())
    assert '--comment "default/web cluster IP"' in text


def test_ipv6_renders_only_ipv6_addresses_and_excludes_ipv6_loopback_nodeports() -> None:
    dual = port(
        cluster_ips=("10.96.0.10", "fd00:96::10"),
        external_ips=("192.0.2.7", "2001:db8::7"),
        node_port=30080,
    )
    text = render_rules([RedirectTarget(dual, 15002)], RuleConfig(), family=6)
    assert text == (
        HEADER
        + '-A RAPPROXY-SERVICES -d fd00:96::10/128 -p tcp -m comment --comment "default/web:http'
        ' cluster IP" -m tcp --dport 80 -j REDIRECT --to-ports 15002\n'
        '-A RAPPROXY-SERVICES -d 2001:db8::7/128 -p tcp -m comment --comment "default/web:http'
        ' external IP" -m tcp --dport 80 -j REDIRECT --to-ports 15002\n'
        + NODEPORT_JUMP_V6
        + '-A RAPPROXY-NODEPORTS -p tcp -m comment --comment "default/web:http"'
        " -m tcp --dport 30080 -j REDIRECT --to-ports 15002\n"
        "COMMIT\n"
    )


def test_nodeport_of_a_single_stack_service_exists_only_in_its_family() -> None:
    v6_only = port(cluster_ips=("fd00:96::10",), node_port=30080)
    assert "RAPPROXY-NODEPORTS -p tcp" not in render_rules(
        [RedirectTarget(v6_only, 15001)], RuleConfig(), family=4
    )
    assert "RAPPROXY-NODEPORTS -p tcp" in render_rules(
        [RedirectTarget(v6_only, 15001)], RuleConfig(), family=6
    )


def test_localhost_nodeports_are_opt_in_and_ipv4_only() -> None:
    config = RuleConfig(localhost_nodeports=True)
    v4 = render_rules([], config, family=4)
    v6 = render_rules([], config, family=6)
    assert "! -d 127.0.0.0/8" not in v4
    assert "-m addrtype --dst-type LOCAL -j RAPPROXY-NODEPORTS" in v4
    assert "! -d ::1/128" in v6


def test_node_port_cidrs_restrict_nodeports_to_matching_node_addresses() -> None:
    config = RuleConfig(node_port_cidrs=("192.168.1.0/24", "10.0.0.0/8", "fd00::/64"))
    v4 = render_rules([], config, family=4)
    jumps = [line for line in v4.splitlines() if line.endswith("-j RAPPROXY-NODEPORTS")]
    assert [line.split()[3] for line in jumps] == ["192.168.1.0/24", "10.0.0.0/8"]
    v4_without = render_rules([], RuleConfig(node_port_cidrs=("fd00::/64",)), family=4)
    assert "RAPPROXY-NODEPORTS" not in v4_without.replace(":RAPPROXY-NODEPORTS - [0:0]", "")


def test_first_sync_after_a_crash_repairs_jumps_and_removes_old_chains() -> None:
    crashed = """# Generated by iptables-nft-save
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j RAPPROXY-IGNORED-OTHER-TABLE
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:RAPPROXY-SERVICES - [0:0]
:RAPPROXY-PORTALS - [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -m comment --comment "rapproxy service portals" -j RAPPROXY-SERVICES
-A PREROUTING -m comment --comment "rapproxy service portals" -j RAPPROXY-SERVICES
-A PREROUTING -j KUBE-SERVICES
-A OUTPUT -j RAPPROXY-PORTALS
-A RAPPROXY-SERVICES -d 10.96.0.99/32 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 1
COMMIT
"""
    text = render_rules([], RuleConfig(), saved_nat=crashed)
    assert text == (
        HEADER + ":RAPPROXY-PORTALS - [0:0]\n"
        '-D PREROUTING -m comment --comment "rapproxy service portals" -j RAPPROXY-SERVICES\n'
        "-D OUTPUT -j RAPPROXY-PORTALS\n"
        "-X RAPPROXY-PORTALS\n"
        + NODEPORT_JUMP_V4
        + '-I OUTPUT 1 -m comment --comment "rapproxy service portals" -j RAPPROXY-SERVICES\n'
        "COMMIT\n"
    )


def test_sync_adds_both_jumps_to_an_empty_table() -> None:
    assert render_rules([], RuleConfig(), saved_nat="") == HEADER + NODEPORT_JUMP_V4 + JUMPS + (
        "COMMIT\n"
    )


def test_sync_adds_no_jump_when_both_are_in_place() -> None:
    saved = render_rules([], RuleConfig(), saved_nat="").replace("-I PREROUTING 1", "-A PREROUTING")
    saved = saved.replace("-I OUTPUT 1", "-A OUTPUT")
    assert "-I " not in render_rules([], RuleConfig(), saved_nat=saved)
    assert "-D " not in render_rules([], RuleConfig(), saved_nat=saved)


def test_jump_check_leaves_live_chains_unflushed() -> None:
    healthy = (
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        ":RAPPROXY-SERVICES - [0:0]\n:RAPPROXY-NODEPORTS - [0:0]\n"
        '-A PREROUTING -m comment --comment "rapproxy service portals" -j RAPPROXY-SERVICES\n'
        '-A OUTPUT -m comment --comment "rapproxy service portals" -j RAPPROXY-SERVICES\n'
        "COMMIT\n"
    )
    assert render_jumps(healthy) == ""
    without_output = healthy.replace(
        '-A OUTPUT -m comment --comment "rapproxy service portals" -j RAPPROXY-SERVICES\n', ""
    )
    assert render_jumps(without_output) == (
        "*nat\n"
        '-I OUTPUT 1 -m comment --comment "rapproxy service portals" -j RAPPROXY-SERVICES\n'
        "COMMIT\n"
    )
    assert render_jumps("") == HEADER + JUMPS + "COMMIT\n"


def test_jump_check_keeps_a_stale_chain_that_a_live_chain_still_uses() -> None:
    saved = (
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        ":RAPPROXY-SERVICES - [0:0]\n:RAPPROXY-NODEPORTS - [0:0]\n:RAPPROXY-OLD - [0:0]\n"
        ":RAPPROXY-UNUSED - [0:0]\n"
        '-A PREROUTING -m comment --comment "rapproxy service portals" -j RAPPROXY-SERVICES\n'
        '-A OUTPUT -m comment --comment "rapproxy service portals" -j RAPPROXY-SERVICES\n'
        "-A RAPPROXY-SERVICES -j RAPPROXY-OLD\n"
        "COMMIT\n"
    )
    assert render_jumps(saved) == ("*nat\n:RAPPROXY-UNUSED - [0:0]\n-X RAPPROXY-UNUSED\nCOMMIT\n")


def test_cleanup_removes_every_rapproxy_chain_and_reference() -> None:
    saved = (
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n"
        ":RAPPROXY-SERVICES - [0:0]\n:RAPPROXY-NODEPORTS - [0:0]\n"
        '-A PREROUTING -m comment --comment "rapproxy service portals" -j RAPPROXY-SERVICES\n'
        "-A PREROUTING -j KUBE-SERVICES\n"
        '-A OUTPUT -m comment --comment "rapproxy service portals" -j RAPPROXY-SERVICES\n'
        "-A RAPPROXY-SERVICES -m addrtype --dst-type LOCAL -j RAPPROXY-NODEPORTS\n"
        "COMMIT\n"
    )
    assert render_cleanup(saved) == (
        HEADER
        + '-D PREROUTING -m comment --comment "rapproxy service portals" -j RAPPROXY-SERVICES\n'
        '-D OUTPUT -m comment --comment "rapproxy service portals" -j RAPPROXY-SERVICES\n'
        "-X RAPPROXY-SERVICES\n"
        "-X RAPPROXY-NODEPORTS\n"
        "COMMIT\n"
    )


def test_cleanup_of_a_clean_table_is_empty() -> None:
    assert render_cleanup("*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j KUBE-X\nCOMMIT\n") == ""


def test_parse_saved_nat_reads_only_the_nat_table() -> None:
    saved = parse_saved_nat(
        "*filter\n:RAPPROXY-F - [0:0]\n-A RAPPROXY-F -j ACCEPT\nCOMMIT\n"
        "*nat\n:RAPPROXY-SERVICES - [0:0]\n-A RAPPROXY-SERVICES -j RETURN\nCOMMIT\n"
    )
    assert saved.chains == ("RAPPROXY-SERVICES",)
    assert saved.rules == (("RAPPROXY-SERVICES", "-j RETURN"),)


def test_a_comment_can_never_break_out_of_its_quotes() -> None:
    odd = ServicePort(
        name=ServicePortName('ns"x', "a b\\c", "p'q"), port=80, target_port=80,
        cluster_ips=("10.96.0.1",),
    )  # fmt: skip
    text = render_rules([RedirectTarget(odd, 15001)], RuleConfig())
    assert '--comment "ns_x/a b_c:p_q cluster IP"' in text


@pytest.mark.parametrize(
    ("targets", "family", "message"),
    [
        ([RedirectTarget(port(), 15001), RedirectTarget(port(), 15002)], 4, "listed twice"),
        ([RedirectTarget(port(), 0)], 4, "to_port 0"),
        ([RedirectTarget(port(protocol=L4Protocol.SCTP), 15001)], 4, "only TCP and UDP"),
        ([], 5, "family: 5"),
        ([RedirectTarget(port(cluster_ips=("10.96.0.300",)), 15001)], 4, "not an IP"),
    ],
)
def test_invalid_input_is_rejected_with_a_reason(
    targets: list[RedirectTarget], family: int, message: str
) -> None:
    with pytest.raises(RenderError, match=message):
        render_rules(targets, RuleConfig(), family=family)  # type: ignore[arg-type]


def test_invalid_node_port_cidr_names_the_field() -> None:
    with pytest.raises(RenderError, match=r"node_port_cidrs\[1\]"):
        RuleConfig(node_port_cidrs=("10.0.0.0/8", "nonsense"))


# -- properties ----------------------------------------------------------------------------------

_v4 = st.ip_addresses(v=4).map(str)
_v6 = st.ip_addresses(v=6).map(str)


@st.composite
def service_ports(draw: st.DrawFn, index: int) -> ServicePort:
    protocol = draw(st.sampled_from([L4Protocol.TCP, L4Protocol.UDP]))
    return ServicePort(
        name=ServicePortName("ns", f"svc{index}", draw(st.sampled_from(["", "a", "b"])), protocol),
        port=draw(st.integers(1, 65535)),
        target_port=80,
        cluster_ips=tuple(draw(st.lists(st.one_of(_v4, _v6), min_size=1, max_size=2, unique=True))),
        node_port=draw(st.none() | st.integers(30000, 32767)),
        external_ips=tuple(draw(st.lists(st.one_of(_v4, _v6), max_size=2, unique=True))),
        load_balancer_ips=tuple(draw(st.lists(st.one_of(_v4, _v6), max_size=1, unique=True))),
    )


@st.composite
def target_lists(draw: st.DrawFn) -> list[RedirectTarget]:
    count = draw(st.integers(0, 8))
    return [
        RedirectTarget(draw(service_ports(i)), draw(st.integers(1024, 65535))) for i in range(count)
    ]


@given(target_lists(), st.sampled_from([4, 6]), st.randoms())
def test_render_is_deterministic_and_independent_of_input_order(
    targets: list[RedirectTarget], family: int, rng: random.Random
) -> None:
    shuffled = list(targets)
    rng.shuffle(shuffled)
    first = render_rules(targets, RuleConfig(), family=family)  # type: ignore[arg-type]
    assert first == render_rules(targets, RuleConfig(), family=family)  # type: ignore[arg-type]
    assert first == render_rules(shuffled, RuleConfig(), family=family)  # type: ignore[arg-type]


@given(target_lists(), st.sampled_from([4, 6]))
def test_every_service_port_appears_exactly_once_per_address(
    targets: list[RedirectTarget], family: int
) -> None:
    text = render_rules(targets, RuleConfig(), family=family)  # type: ignore[arg-type]
    lines = text.splitlines()
    for target in targets:
        sp = target.service_port
        proto = sp.protocol.value.lower()
        addresses = {*sp.cluster_ips, *sp.external_ips, *sp.load_balancer_ips}
        for address in addresses:
            ip = ipaddress.ip_address(address)
            needle = re.compile(
                rf"^-A RAPPROXY-SERVICES -d {re.escape(str(ip))}/{ip.max_prefixlen} -p {proto}"
                rf' -m comment --comment "{re.escape(str(sp.name).rstrip(":"))} [a-z ]+ IP"'
                rf" -m {proto} --dport {sp.port} -j REDIRECT --to-ports {target.to_port}$"
            )
            expected = 1 if ip.version == family else 0
            assert sum(1 for line in lines if needle.match(line)) == expected
        if sp.node_port is not None:
            has_family = any(ipaddress.ip_address(a).version == family for a in sp.cluster_ips)
            nodeport = (
                f"-A RAPPROXY-NODEPORTS -p {proto} -m comment --comment "
                f'"{str(sp.name).rstrip(":")}" -m {proto} --dport {sp.node_port}'
                f" -j REDIRECT --to-ports {target.to_port}"
            )
            assert lines.count(nodeport) == (1 if has_family else 0)


_saved_nats = st.sampled_from(
    [
        "",  # an empty table: both jumps missing
        "*nat\n:PREROUTING ACCEPT [0:0]\n:RAPPROXY-SERVICES - [0:0]\n:RAPPROXY-OLD - [0:0]\n"
        '-A PREROUTING -m comment --comment "rapproxy service portals" -j RAPPROXY-SERVICES\n'
        "-A OUTPUT -j RAPPROXY-OLD\nCOMMIT\n",
        "*nat\n"
        '-A PREROUTING -m comment --comment "rapproxy service portals" -j RAPPROXY-SERVICES\n'
        '-A OUTPUT -m comment --comment "rapproxy service portals" -j RAPPROXY-SERVICES\n'
        "COMMIT\n",  # healthy: nothing to repair
    ]
)


@given(
    target_lists(),
    st.sampled_from([4, 6]),
    _saved_nats,
    st.sampled_from([RuleConfig(), RuleConfig(node_port_cidrs=("10.0.0.0/8",))]),
)
def test_one_render_gives_exactly_the_chains_and_the_repairing_transaction(
    targets: list[RedirectTarget], family: int, saved: str, config: RuleConfig
) -> None:
    chains, transaction = render_rules_and_repair(targets, config, family, saved)  # type: ignore[arg-type]
    assert chains == render_rules(targets, config, family=family)  # type: ignore[arg-type]
    assert transaction == render_rules(targets, config, family=family, saved_nat=saved)  # type: ignore[arg-type]


_names = st.builds(
    ServicePortName,
    st.sampled_from(["a", "b", "kube-system"]),
    st.sampled_from(["web", "web-2", "api"]),
    st.sampled_from(["", "http", "https"]),
    st.sampled_from(list(L4Protocol)),
)


@given(st.lists(_names, unique=True))
def test_rules_are_rendered_in_service_port_name_order(names: list[ServicePortName]) -> None:
    from rapproxy.rules.render import _name_order

    targets = [RedirectTarget(ServicePort(n, 80, 80, ("10.96.0.1",)), 1) for n in names]
    assert [t.service_port.name for t in sorted(targets, key=_name_order)] == sorted(names)
