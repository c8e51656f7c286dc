"""Choosing the iptables backend the way the upstream iptables wrappers do (pure decision)."""

from __future__ import annotations

import pytest

from rapproxy.rules.backend import Backend, BackendUnavailable, choose_backend, tools_for

EMPTY = "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"


def saved_with_rules(count: int, chain: str = "PREROUTING") -> str:
    return "*nat\n" + "".join(f"-A {chain} -j RETURN\n" for _ in range(count)) + "COMMIT\n"


def test_a_fresh_host_uses_nft() -> None:
    assert choose_backend(EMPTY, EMPTY) is Backend.NFT


def test_the_side_with_more_rules_wins() -> None:
    assert choose_backend(saved_with_rules(2), saved_with_rules(10)) is Backend.LEGACY
    assert choose_backend(saved_with_rules(10), saved_with_rules(2)) is Backend.NFT


def test_a_tie_goes_to_nft() -> None:
    assert choose_backend(saved_with_rules(3), saved_with_rules(3)) is Backend.NFT


def test_kubelet_hint_chain_overrides_rule_counts() -> None:
    hinted = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"
    assert choose_backend(hinted, saved_with_rules(50)) is Backend.NFT
    assert choose_backend(saved_with_rules(50), hinted) is Backend.LEGACY
    canary = "*mangle\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n"
    assert choose_backend(saved_with_rules(50), canary) is Backend.LEGACY


def test_a_missing_side_is_never_chosen() -> None:
    assert choose_backend(None, saved_with_rules(1)) is Backend.LEGACY
    assert choose_backend(saved_with_rules(0), None) is Backend.NFT
    with pytest.raises(BackendUnavailable):
        choose_backend(None, None)


def test_tools_are_named_per_backend_and_family() -> None:
    nft4 = tools_for(Backend.NFT, 4)
    assert (nft4.save, nft4.restore) == ("iptables-nft-save", "iptables-nft-restore")
    legacy6 = tools_for(Backend.LEGACY, 6)
    assert (legacy6.save, legacy6.restore) == ("ip6tables-legacy-save", "ip6tables-legacy-restore")
