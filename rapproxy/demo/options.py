"""What a demo run is asked to do: the flags of `rapproxy demo`, read into one frozen value.

Pure (argparse only), so the flag handling is testable without root. The delays are the first
author's three-node matrix — node1-node2 4 ms, node1-node3 8 ms, node2-node3 3 ms, one way —
multiplied by `--delay-scale`: at scale 1 the WAN costs less than a Python proxy hop on a
two-core host, so the default stretches it to the tens of milliseconds an edge WAN has.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BASE_DELAYS_MS = {("node-1", "node-2"): 4.0, ("node-1", "node-3"): 8.0, ("node-2", "node-3"): 3.0}
STATIC_POLICIES = ("round-robin", "random", "least-conn", "local-only")
RAP_VARIANTS = ("rap-aimd", "rap-switch")  # the utilization-based RAP, for side-by-side runs
# The kernel fast path (issue 13): Service web DNATed by node-1's iptables, not relayed.
# `rap-kernel` draws with RAP's telemetry weights; `random-kernel` uniformly, which is what
# kube-proxy's iptables mode does.
KERNEL_SUFFIX = "-kernel"
KERNEL_VARIANTS = ("rap-kernel", "random-kernel")
POLICIES = ("rap", *STATIC_POLICIES)  # what the demo compares unless told otherwise
KNOWN_POLICIES = ("rap", *RAP_VARIANTS, *KERNEL_VARIANTS, *STATIC_POLICIES)


class DemoOptionError(ValueError):
    """A flag's value cannot be used; the message names the flag."""


@dataclass(frozen=True, slots=True)
class DemoOptions:
    delay_scale: float = 2.5
    duration: float = 10.0  # seconds of load per policy, phase and round
    rounds: int = 1  # interleaved rounds per phase; the median round per policy is reported
    connections: int = 16
    work_ms: float = 0.5  # CPU per request in each backend pod
    node_cpus: float = 2.0  # each node's CPU capacity for pods while healthy (its cgroup cap)
    daemon_settings: tuple[str, ...] = ()  # extra `--set PATH=VALUE` for every rapproxy run
    output: Path | None = None
    policies: tuple[str, ...] = POLICIES
    overload: bool = True  # also run the comparison with node-1 overloaded
    failover: bool = True
    quick: bool = False

    def delays_ms(self) -> dict[tuple[str, str], float]:
        return {pair: ms * self.delay_scale for pair, ms in BASE_DELAYS_MS.items()}


def policy_and_dataplane(policy: str) -> tuple[str, str]:
    """A demo policy name as the Service's two annotations: (lb-policy, dataplane).

    `rap-kernel` is (`rap`, `kernel`); every other name is itself in the userspace relay.
    """
    if policy.endswith(KERNEL_SUFFIX):
        return policy.removesuffix(KERNEL_SUFFIX), "kernel"
    return policy, "userspace"


def add_daemon_settings_argument(parser: argparse.ArgumentParser) -> None:
    """`--set PATH=VALUE` (repeatable) into `daemon_settings`: shared with benchmarks/edge."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        dest="daemon_settings",
        help="a setting for every node's rapproxy, e.g. --set rap.spillBackoff=0 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rapproxy demo",
        description=(
            "Build an emulated 3-node edge cluster (namespaces, WAN delays, CPU caps), compare "
            "RAP with the static policies (round-robin, random, least-conn, local-only), fail a "
            "primary over, print and chart the results, and remove everything. Needs root."
        ),
    )
    parser.add_argument(
        "--delay-scale",
        type=float,
        default=2.5,
        help="multiply the 4/8/3 ms one-way delay matrix (default 2.5: 10/20/7.5 ms)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds of load per policy and round (default 5)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds per phase, each policy's median round reported (default 3): "
        "one round's req/s moves by 3-7 %% on a shared two-core machine",
    )
    parser.add_argument(
        "--connections", type=int, default=16, help="concurrent wrk connections (default 16)"
    )
    parser.add_argument(
        "--work-ms", type=float, default=0.5, help="CPU ms per request in each backend"
    )
    parser.add_argument(
        "--node-cpus",
        type=float,
        default=2.0,
        help="each node's CPU capacity for pods, its cgroup cap (default 2)",
    )
    parser.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help=f"comma-separated, from {','.join(KNOWN_POLICIES)} (default {','.join(POLICIES)})",
    )
    add_daemon_settings_argument(parser)
    parser.add_argument("--no-overload", action="store_true", help="skip the overloaded phase")
    parser.add_argument("--no-failover", action="store_true", help="skip the failover")
    parser.add_argument(
        "--output", type=Path, default=None, help="directory for the PNG chart, JSON and Markdown"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short load (one round of 3 s per policy): done in under 2 minutes",
    )
    return parser


def parse_options(argv: Sequence[str]) -> DemoOptions:
    """Flags → `DemoOptions`; raises `DemoOptionError` naming the flag (argparse exits on -h)."""
    args = build_parser().parse_args(list(argv))
    duration = args.duration if args.duration is not None else (3.0 if args.quick else 5.0)
    if not 1 <= duration <= 600:
        raise DemoOptionError(f"--duration: {duration:g} s is outside 1..600")
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if not 1 <= rounds <= 9:
        raise DemoOptionError(f"--rounds: {rounds} is outside 1..9")
    if not 0 <= args.delay_scale <= 50:
        raise DemoOptionError(f"--delay-scale: {args.delay_scale:g} is outside 0..50")
    if not 1 <= args.connections <= 512:
        raise DemoOptionError(f"--connections: {args.connections} is outside 1..512")
    if not 0 <= args.work_ms <= 100:
        raise DemoOptionError(f"--work-ms: {args.work_ms:g} is outside 0..100")
    if not 0.05 <= args.node_cpus <= 64:
        raise DemoOptionError(f"--node-cpus: {args.node_cpus:g} is outside 0.05..64")
    for setting in args.daemon_settings:
        if "=" not in setting or not setting.partition("=")[0].strip():
            raise DemoOptionError(f"--set: {setting!r} is not PATH=VALUE")
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    unknown = [p for p in policies if p not in KNOWN_POLICIES]
    if unknown or not policies:
        raise DemoOptionError(
            f"--policies: {unknown or 'none'} not among {', '.join(KNOWN_POLICIES)}"
        )
    return DemoOptions(
        delay_scale=args.delay_scale,
        duration=duration,
        rounds=rounds,
        connections=args.connections,
        work_ms=args.work_ms,
        node_cpus=args.node_cpus,
        daemon_settings=tuple(args.daemon_settings),
        output=args.output,
        policies=policies,
        overload=not args.no_overload,
        failover=not args.no_failover,
        quick=args.quick,
    )
