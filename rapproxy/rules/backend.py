"""Which iptables the host really uses: nf_tables (`iptables-nft`) or the legacy x_tables.

Both kernels interfaces can hold rules at the same time, and the packet path runs both, but the
node's other programs (kubelet, the CNI plugin, kube-proxy, firewalls) write to one of them. Rules
written to the other one still work, yet they are invisible to that side's tools and ordering
between the two is not defined — so rapproxy must write where everybody else writes. The upstream
answer (kubernetes-sigs/iptables-wrappers, used by kube-proxy's images) is followed here:

1. kubelet's hint chains (`KUBE-IPTABLES-HINT`, older `KUBE-KUBELET-CANARY`) say it outright;
2. otherwise the side with more rules is the one in use;
3. otherwise (a fresh host, a fresh namespace) nft, the default of every current distribution.

A missing binary counts as an empty side; with neither installed `BackendUnavailable` is raised.
The decision is `choose_backend` (pure); `detect_backend` only runs the two `*-save` commands.
"""

from __future__ import annotations

import asyncio
import enum
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

from rapproxy.rules.render import Family

HINT_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")
_SAVE_TIMEOUT_SECONDS = 30.0


class Backend(enum.StrEnum):
    NFT = "nft"
    LEGACY = "legacy"


class BackendUnavailable(RuntimeError):
    """Neither `iptables-nft-save` nor `iptables-legacy-save` could be run."""


@dataclass(frozen=True, slots=True)
class IptablesTools:
    """The command names for one backend and one address family."""

    backend: Backend
    family: Family
    save: str
    restore: str


def tools_for(backend: Backend, family: Family) -> IptablesTools:
    """`iptables-nft-save`/`-restore`, `ip6tables-legacy-save`/`-restore`, ..."""
    stem = "iptables" if family == 4 else "ip6tables"
    return IptablesTools(
        backend=backend,
        family=family,
        save=f"{stem}-{backend.value}-save",
        restore=f"{stem}-{backend.value}-restore",
    )


def choose_backend(nft_save: str | None, legacy_save: str | None) -> Backend:
    """Decide from the two sides' `iptables-save` output (None: that side cannot be read)."""
    if nft_save is None and legacy_save is None:
        raise BackendUnavailable("neither iptables-nft-save nor iptables-legacy-save works")
    if nft_save is not None and _has_hint(nft_save):
        return Backend.NFT
    if legacy_save is not None and _has_hint(legacy_save):
        return Backend.LEGACY
    if nft_save is None:
        return Backend.LEGACY
    if legacy_save is None:
        return Backend.NFT
    return Backend.LEGACY if _count_rules(legacy_save) > _count_rules(nft_save) else Backend.NFT


async def detect_backend(exec_prefix: Sequence[str] = ()) -> Backend:
    """Run both sides' save commands (IPv4 and IPv6, all tables) and `choose_backend`.

    `exec_prefix` runs the commands elsewhere, e.g. `("ip", "netns", "exec", NAME)` in tests.
    """
    nft, legacy = await asyncio.gather(
        _save_both_families(Backend.NFT, exec_prefix),
        _save_both_families(Backend.LEGACY, exec_prefix),
    )
    return choose_backend(nft, legacy)


def _has_hint(saved: str) -> bool:
    return any(f":{chain} " in saved for chain in HINT_CHAINS)


def _count_rules(saved: str) -> int:
    return sum(1 for line in saved.splitlines() if line.startswith("-A "))


async def _save_both_families(backend: Backend, exec_prefix: Sequence[str]) -> str | None:
    outputs = [await _run_save(tools_for(backend, family).save, exec_prefix) for family in (4, 6)]
    present = [text for text in outputs if text is not None]
    return "\n".join(present) if present else None


async def _run_save(command: str, exec_prefix: Sequence[str]) -> str | None:
    if shutil.which(command) is None:
        return None
    process = await asyncio.create_subprocess_exec(
        *exec_prefix,
        command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        stdout, _ = await asyncio.wait_for(process.communicate(), _SAVE_TIMEOUT_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        return None
    # A side whose kernel modules are missing fails to save: it is not in use.
    return stdout.decode(errors="replace") if process.returncode == 0 else None
