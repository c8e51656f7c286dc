"""The kernel fast path's nat rules, rendered without iptables (pure)."""

from __future__ import annotations

import base64
import hashlib
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rapproxy.model.service import L4Protocol, ServicePort, ServicePortName
from rapproxy.rules.kernel import (
    MAX_CHAIN_NAME,
    KernelConfig,
    KernelRenderError,
    KernelTarget,
    WeightedEndpoint,
    endpoint_chain,
    probabilities,
    render_kernel_update,
    render_target,
    render_weight_update,
    service_chain,
)
from rapproxy.rules.render import (
    RedirectTarget,
    RenderError,
    RuleConfig,
    render_cleanup,
    render_rules,
    render_sync,
)

NAME = ServicePortName("default", "web", "http")
SVC = service_chain(NAME, "SVC")
SVL = service_chain(NAME, "SVL")
EXT = service_chain(NAME, "EXT")
A = WeightedEndpoint("10.0.1.1", 8080, 0.5)
B = WeightedEndpoint("10.0.2.1", 8080, 0.3)
C = WeightedEndpoint("10.0.3.1", 8080, 0.2)


def port(cluster_ips: tuple[str, ...] = ("10.96.0.10",), **kwargs: object) -> ServicePort:
    return ServicePort(
        name=NAME,
        port=80,
        target_port=8080,
        cluster_ips=cluster_ips,
        **kwargs,  # type: ignore[arg-type]
    )


def target(
    service: ServicePort | None = None,
    cluster: tuple[WeightedEndpoint, ...] = (A, B, C),
    local: tuple[WeightedEndpoint, ...] = (A,),
) -> KernelTarget:
    return KernelTarget(service or port(), cluster, local, 15001)


def lines(text: str, chain: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"-A {chain} ")]


def test_cluster_ip_jumps_to_a_weighted_chain_whose_probabilities_are_cumulative() -> None:
    text = render_rules([], RuleConfig(), kernel=[target()])
    assert lines(text, "RAPPROXY-SERVICES")[0] == (
        '-A RAPPROXY-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http'
        f' cluster IP" -m tcp --dport 80 -j {SVC}'
    )
    chain = lines(text, SVC)
    assert len(chain) == 3
    # 0.5 of all, then 0.3 of the remaining 0.5, then the rest unconditionally.
    assert "--probability 0.50000000000" in chain[0]
    assert "--probability 0.60000000000" in chain[1]
    assert "statistic" not in chain[2]
    assert chain[2].endswith(f"-j {endpoint_chain(NAME, C.ip, C.port)}")
    sep = lines(text, endpoint_chain(NAME, A.ip, A.port))
    assert sep == [
        f"-A {endpoint_chain(NAME, A.ip, A.port)} -s 10.0.1.1/32 -m comment --comment"
        ' "default/web:http" -j RAPPROXY-MARK-MASQ',
        f"-A {endpoint_chain(NAME, A.ip, A.port)} -p tcp -m comment --comment"
        ' "default/web:http" -m tcp -j DNAT --to-destination 10.0.1.1:8080',
    ]


@given(st.lists(st.floats(0.0, 100.0), min_size=1, max_size=20).filter(lambda w: sum(w) > 0))
def test_rule_probabilities_give_each_endpoint_its_weight(weights: list[float]) -> None:
    p = probabilities(weights)
    reach = 1.0
    total = sum(weights)
    for weight, probability in zip(weights, p, strict=True):
        assert 0.0 <= probability <= 1.0
        assert reach * probability == pytest.approx(weight / total, abs=1e-9)
        reach *= 1.0 - probability
    assert p[-1] == 1.0


def test_bad_weights_are_refused_with_the_values() -> None:
    with pytest.raises(KernelRenderError, match="weights"):
        probabilities([0.0, 0.0])
    with pytest.raises(KernelRenderError, match="weights"):
        probabilities([math.nan, 1.0])


def test_zero_weight_endpoints_get_no_new_connections_but_keep_their_chain() -> None:
    zero = WeightedEndpoint("10.0.9.9", 8080, 0.0)
    text = render_rules([], RuleConfig(), kernel=[target(cluster=(A, zero))])
    assert [line.split(" -j ")[-1] for line in lines(text, SVC)] == [
        endpoint_chain(NAME, A.ip, A.port)
    ]
    assert lines(text, endpoint_chain(NAME, zero.ip, zero.port))


def test_client_ip_affinity_checks_recent_lists_before_drawing() -> None:
    text = render_rules([], RuleConfig(), kernel=[target(port(affinity_timeout_seconds=600))])
    chain = lines(text, SVC)
    sep_a = endpoint_chain(NAME, A.ip, A.port)
    assert chain[0] == (
        f'-A {SVC} -m comment --comment "default/web:http -> 10.0.1.1:8080" -m recent --rcheck'
        f" --seconds 600 --reap --name {sep_a} --mask 255.255.255.255 --rsource -j {sep_a}"
    )
    assert sum("--rcheck" in line for line in chain) == 3
    assert f"-m recent --set --name {sep_a} --mask 255.255.255.255 --rsource" in text


def sampled(service: ServicePort | None = None, share: float = 0.2) -> KernelTarget:
    return KernelTarget(service or port(), (A, B, C), (A,), 15001, sample_share=share)


def test_a_sample_is_redirected_to_the_proxy_first_then_the_weights_draw() -> None:
    config = KernelConfig(cluster_cidrs=("10.244.0.0/16",))
    text = render_rules([], RuleConfig(kernel=config), kernel=[sampled()])
    chain = lines(text, SVC)
    assert chain[0] == (
        f'-A {SVC} -p tcp -m comment --comment "default/web:http sample decided by the proxy"'
        " -m statistic --mode random --probability 0.20000000000 -j REDIRECT --to-ports 15001"
    )
    assert "RAPPROXY-MARK-MASQ" in chain[1]  # the SNAT mark comes after: the proxy sees the client
    assert len(chain) == 5
    # Only the cluster-wide chain samples; the weight update carries the sample rule.
    assert not any("REDIRECT" in line for line in lines(text, SVL))
    update = render_weight_update([sampled()], config, 4)
    assert lines(update, SVC) == chain


def test_no_sample_under_client_ip_affinity_or_at_share_zero() -> None:
    for target_ in (sampled(port(affinity_timeout_seconds=600)), sampled(share=0.0)):
        text = render_rules([], RuleConfig(), kernel=[target_])
        assert not any("REDIRECT" in line for line in lines(text, SVC))


@pytest.mark.parametrize("share", [-0.1, 1.0, 1.5])
def test_a_sample_share_outside_zero_to_one_is_refused(share: float) -> None:
    with pytest.raises(KernelRenderError, match="sample share"):
        sampled(share=share)


def test_nodeport_and_external_ips_go_through_the_external_chain_which_masquerades() -> None:
    service = port(node_port=30080, external_ips=("192.0.2.7",), load_balancer_ips=("192.0.2.8",))
    text = render_rules([], RuleConfig(), kernel=[target(service)])
    services = lines(text, "RAPPROXY-SERVICES")
    assert any("-d 192.0.2.7/32" in line and line.endswith(f"-j {EXT}") for line in services)
    assert any("-d 192.0.2.8/32" in line and line.endswith(f"-j {EXT}") for line in services)
    assert lines(text, "RAPPROXY-NODEPORTS")[0].endswith(f"--dport 30080 -j {EXT}")
    assert [line.split(" -j ")[-1] for line in lines(text, EXT)] == ["RAPPROXY-MARK-MASQ", SVC]


def test_external_traffic_policy_local_keeps_the_source_and_uses_local_endpoints() -> None:
    service = port(node_port=30080, external_traffic_local=True)
    text = render_rules([], RuleConfig(), kernel=[target(service)])
    ext = lines(text, EXT)
    assert ext[-1] == f"-A {EXT} -j {SVL}"
    assert "--src-type LOCAL -j RAPPROXY-MARK-MASQ" in ext[0]
    assert lines(text, SVL)[0].endswith(f"-j {endpoint_chain(NAME, A.ip, A.port)}")
    assert "MARK-MASQ" not in "\n".join(lines(text, SVL))


def test_internal_traffic_policy_local_sends_cluster_ip_traffic_to_local_endpoints() -> None:
    text = render_rules([], RuleConfig(), kernel=[target(port(internal_traffic_local=True))])
    assert lines(text, "RAPPROXY-SERVICES")[0].endswith(f"-j {SVL}")
    assert f":{SVC} " not in text  # nothing reaches the cluster-wide chain


def test_a_policy_without_endpoints_falls_back_to_the_proxy_never_to_nothing() -> None:
    text = render_rules([], RuleConfig(), kernel=[target(cluster=(), local=())])
    assert lines(text, "RAPPROXY-SERVICES")[0].endswith("-j REDIRECT --to-ports 15001")
    local_only = port(node_port=30080, external_traffic_local=True)
    text = render_rules([], RuleConfig(), kernel=[target(local_only, local=())])
    assert lines(text, EXT)[-1] == f"-A {EXT} -j REDIRECT --to-ports 15001"


def test_masquerade_all_and_cluster_cidr_mark_cluster_ip_traffic() -> None:
    everything = RuleConfig(kernel=KernelConfig(masquerade_all=True))
    assert lines(render_rules([], everything, kernel=[target()]), SVC)[0].endswith(
        "-j RAPPROXY-MARK-MASQ"
    )
    pods = RuleConfig(kernel=KernelConfig(cluster_cidrs=("10.244.0.0/16",)))
    first = lines(render_rules([], pods, kernel=[target()]), SVC)[0]
    assert first.startswith(f"-A {SVC} ! -s 10.244.0.0/16 -d 10.96.0.10/32")


def test_kernel_config_refuses_bad_values_naming_them() -> None:
    with pytest.raises(KernelRenderError, match="cluster_cidrs"):
        KernelConfig(cluster_cidrs=("10.0.0.0/8", "10.1.0.0/16"))
    with pytest.raises(KernelRenderError, match="masquerade_bit"):
        KernelConfig(masquerade_bit=40)


def test_ipv6_targets_render_only_in_their_family() -> None:
    v6 = port(cluster_ips=("fd00::10",))
    endpoint = WeightedEndpoint("fd00:1::1", 8080, 1.0)
    kernel = [target(v6, cluster=(endpoint,), local=())]
    assert SVC not in render_rules([], RuleConfig(), 4, kernel=kernel)
    text = render_rules([], RuleConfig(), 6, kernel=kernel)
    assert "--to-destination [fd00:1::1]:8080" in text
    assert "-d fd00::10/128" in text


def test_kernel_and_redirect_services_share_the_entry_chain_in_name_order() -> None:
    other = ServicePort(ServicePortName("default", "api", "http"), 80, 80, ("10.96.0.11",))
    later = ServicePort(ServicePortName("default", "zzz", "http"), 80, 80, ("10.96.0.12",))
    text = render_rules(
        [RedirectTarget(other, 15001), RedirectTarget(later, 15001)],
        RuleConfig(),
        kernel=[target()],
    )
    services = lines(text, "RAPPROXY-SERVICES")
    assert "10.96.0.11" in services[0]
    assert services[1].endswith(f"-j {SVC}")
    assert "10.96.0.12" in services[2]


def test_a_service_in_both_modes_at_once_is_refused() -> None:
    with pytest.raises(RenderError, match="listed twice"):
        render_rules([RedirectTarget(port(), 15001)], RuleConfig(), kernel=[target()])


def test_a_repairing_sync_adds_the_postrouting_jump_and_the_snat_chains() -> None:
    rendered = render_sync([], RuleConfig(), 4, saved_nat="", kernel=[target()])
    assert (
        '-I POSTROUTING 1 -m comment --comment "rapproxy postrouting rules" -j RAPPROXY-POSTROUTING'
    ) in rendered.text
    assert "-A RAPPROXY-POSTROUTING -j MASQUERADE" not in rendered.text
    assert "-j MASQUERADE --random-fully" in rendered.text
    assert "RAPPROXY-MARK-MASQ" in rendered.kernel_chains
    assert SVC in rendered.kernel_chains
    # The jump is removed again once no kernel Service is left.
    after = render_sync([], RuleConfig(), 4, saved_nat=rendered.text.replace("-I ", "-A "))
    assert "-D POSTROUTING" in after.text
    assert "-X RAPPROXY-POSTROUTING" in after.text
    assert f"-X {SVC}" in after.text


def test_chains_written_last_time_and_no_longer_wanted_are_deleted_without_a_save() -> None:
    first = render_sync([], RuleConfig(), 4, kernel=[target()])
    second = render_sync(
        [], RuleConfig(), 4, kernel=[target(cluster=(A,))], previous_chains=first.kernel_chains
    )
    gone = endpoint_chain(NAME, B.ip, B.port)
    assert f":{gone} - [0:0]" in second.text
    assert f"-X {gone}" in second.text
    assert f"-X {SVC}" not in second.text
    assert "-X RAPPROXY-POSTROUTING" not in second.text  # referenced from POSTROUTING


def test_a_weight_update_rewrites_only_the_weighted_chains_in_one_transaction() -> None:
    text = render_weight_update([target()], KernelConfig(), 4)
    declared = [line for line in text.splitlines() if line.startswith(":")]
    assert declared == [f":{SVC} - [0:0]"]
    assert text.startswith("*nat\n") and text.endswith("COMMIT\n")
    assert len(lines(text, SVC)) == 3
    assert (
        render_weight_update([target(port(internal_traffic_local=True))], KernelConfig(), 4) == ""
    )


def test_an_endpoint_change_rewrites_only_that_services_chains_and_drops_the_gone_one() -> None:
    replacement = WeightedEndpoint("10.0.4.1", 8080, 0.2)
    update = render_kernel_update(
        [(target(), target(cluster=(A, B, replacement)))], KernelConfig(), 4
    )
    gone = endpoint_chain(NAME, C.ip, C.port)
    new = endpoint_chain(NAME, replacement.ip, replacement.port)
    assert (update.created, update.deleted) == ((new,), (gone,))
    text = update.text
    assert "RAPPROXY-SERVICES" not in text and "RAPPROXY-NODEPORTS" not in text
    declared = [line for line in text.splitlines() if line.startswith(":")]
    assert f":{SVC} - [0:0]" in declared and f":{new} - [0:0]" in declared
    # The gone chain is flushed with the others and deleted last, once nothing jumps to it.
    assert declared[-1] == f":{gone} - [0:0]"
    assert text.splitlines()[-2:] == [f"-X {gone}", "COMMIT"]
    assert not any(f"-j {gone}" in line for line in text.splitlines())
    assert render_kernel_update([(target(), target())], KernelConfig(), 6).text == ""


def test_an_endpoint_change_that_moves_an_entry_rule_needs_the_full_write() -> None:
    # The last endpoint gone: the ClusterIP's rule becomes the proxy's REDIRECT.
    with pytest.raises(KernelRenderError, match="entry rules changed"):
        render_kernel_update([(target(), target(cluster=(), local=()))], KernelConfig(), 4)


def test_cleanup_removes_kernel_chains_and_the_postrouting_jump() -> None:
    saved = render_sync([], RuleConfig(), 4, saved_nat="", kernel=[target()]).text
    saved = saved.replace("-I POSTROUTING 1", "-A POSTROUTING").replace("-I ", "-A ")
    text = render_cleanup(saved)
    assert "-D POSTROUTING" in text
    assert f"-X {SVC}" in text
    assert "-X RAPPROXY-MARK-MASQ" in text


@given(st.text(min_size=1, max_size=63), st.text(min_size=0, max_size=15))
def test_chain_names_fit_iptables_limit(name: str, port_name: str) -> None:
    service_name = ServicePortName("ns", name, port_name, L4Protocol.UDP)
    for kind in ("SVC", "SVL", "EXT"):
        assert len(service_chain(service_name, kind)) <= MAX_CHAIN_NAME
    assert len(endpoint_chain(service_name, "fd00::1", 65535)) <= MAX_CHAIN_NAME


@given(st.text(max_size=40), st.text(max_size=40))
def test_chain_names_are_the_first_characters_of_the_whole_digest_in_base32(
    name: str, ip: str
) -> None:
    # The names must never change between versions: a rename would leave a running node's
    # chains to the next full sync. They are encoded from a prefix of the digest, for speed.
    service_name = ServicePortName("ns", name, "p")
    text = f"{service_name}/{service_name.protocol.value}/{ip}/80"
    whole = base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()
    assert endpoint_chain(service_name, ip, 80) == f"RAPPROXY-SEP-{whole[:14]}"


def test_render_target_of_other_family_is_empty() -> None:
    assert render_target(target(), KernelConfig(), 6).chains == ()
