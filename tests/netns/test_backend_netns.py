"""Backend detection against real iptables-nft and iptables-legacy inside a namespace."""

from __future__ import annotations

import pytest

from rapproxy.rules.backend import Backend, detect_backend
from rapproxy.testing.netns import Namespace

pytestmark = pytest.mark.root

LEGACY_RULES = "*nat\n" + "-A OUTPUT -d 10.9.9.9/32 -j RETURN\n" * 3 + "COMMIT\n"


async def test_a_fresh_namespace_detects_nft(netns: Namespace) -> None:
    assert await detect_backend(netns.exec_prefix) is Backend.NFT


async def test_a_namespace_whose_rules_are_legacy_detects_legacy(netns: Namespace) -> None:
    netns.run(["iptables-legacy-restore", "--noflush"], input=LEGACY_RULES)
    assert await detect_backend(netns.exec_prefix) is Backend.LEGACY


async def test_the_kubelet_hint_chain_wins_over_rule_counts(netns: Namespace) -> None:
    netns.run(["iptables-legacy-restore", "--noflush"], input=LEGACY_RULES)
    netns.run(["iptables-nft", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"])
    assert await detect_backend(netns.exec_prefix) is Backend.NFT
