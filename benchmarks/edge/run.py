"""The RAP paper's experiments, reproduced in the emulated edge cluster, plus failover timing.

Three experiments, each on the cluster `rapproxy demo` builds (three nodes as network
namespaces behind the TUN delay router, pods as real processes in per-node CPU cgroups, the
emulated API server, the real `rapproxy run` on every node, Service `web` backed by
BackupPodSet `web`):

* `sweep` — the paper's first experiment: the same one-way delay between every pair of nodes,
  swept (default 0, 5, 10, 20, 40 ms); for each delay, each policy (`rap`, `round-robin`,
  `random`, `local-only`) gets the same wrk load from node-1's host network to the ClusterIP.
  Issue 6's targets, at ≥ 10 ms: `rap` ≥ 2x the throughput of round-robin and random, with
  ≤ 0.5x their p99.
* `overload` — the paper's second experiment: load concentrated on node-1, raised step by step
  (wrk connections) until node-1's pods run out of CPU; throughput, latency and the CPU of
  every node's pods (from each node's cgroup) per policy. Target: under overload, `rap` ≥ 1.3x
  the throughput of `local-only`.
* `failover` — SIGKILL to the process of a primary (restartPolicy Never, so its pod fails), while
  a client on node-1 sends an open-loop load (200 requests/s, each a new connection) to the
  ClusterIP through round-robin until the set is restored: requests failed, time to the first
  request the promoted pod answers, and to the BackupPodSet's full set restored; ≥ 20 runs,
  p50/p95, beside the paper's 1.933 s (its primary failure was a `kubectl delete pod`).

Load: wrk, one thread, `Connection: close` so every request is a new connection and so a new
balancing decision (rapproxy balances connections, as kube-proxy does). wrk is closed-loop: its
percentiles under-report tail latency (coordinated omission).

* `grid` — issue 11's question, whether RAP is ever worse than the best static policy, over
  delay scales x connections x node states (grid.py).

Usage (root): `.venv/bin/python benchmarks/edge/run.py sweep|overload|failover|grid|all [options]`.
Results: `benchmarks/edge/results/<experiment>-<UTC date-time>.{md,json,png}`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from common import Point, cluster, header, rounds_of  # benchmarks/edge/common.py
from grid import grid, grid_cells, grid_from_json, grid_json, grid_markdown, heatmap

from rapproxy.demo.cluster import NODES
from rapproxy.demo.options import (
    KNOWN_POLICIES,
    POLICIES,
    DemoOptions,
    add_daemon_settings_argument,
)
from rapproxy.demo.progress import Progress
from rapproxy.demo.report import FailoverResult
from rapproxy.demo.scenario import FAILOVER_RATE, fail_over
from rapproxy.testing.edge.delays import DelayMatrix
from rapproxy.testing.load import CLOSED_LOOP_NOTE, write_lua

RESULTS = Path(__file__).parent / "results"
PAPER_FAILOVER_TOTAL_S = 1.933
SWEEP_TARGET_THROUGHPUT = 2.0  # rap / round-robin and rap / random, at >= 10 ms
SWEEP_TARGET_P99 = 0.5
OVERLOAD_TARGET = 1.3  # rap / local-only once node-1 is overloaded


# -- experiments ----------------------------------------------------------------------------------


async def sweep(
    options: DemoOptions, delays_ms: Sequence[float], rounds: int, progress: Progress
) -> list[Point]:
    points = []
    async with cluster(options, progress) as demo:
        lua = write_lua(demo.workdir)
        edge = demo.require_edge()
        for delay in delays_ms:
            await edge.set_delays(DelayMatrix.uniform(NODES, delay))
            progress.say(f"one-way delay {delay:g} ms between every pair of nodes")
            points += await rounds_of(
                demo,
                options,
                setting=delay,
                label=f"{delay:g} ms",
                rounds=rounds,
                lua=lua,
                progress=progress,
            )
    return points


async def overload(
    options: DemoOptions, levels: Sequence[int], rounds: int, progress: Progress
) -> list[Point]:
    points = []
    async with cluster(options, progress) as demo:
        lua = write_lua(demo.workdir)
        for connections in levels:
            progress.say(f"{connections} wrk connections from node-1")
            at_level = replace(options, connections=connections)
            points += await rounds_of(
                demo,
                at_level,
                setting=connections,
                label=f"c{connections}",
                rounds=rounds,
                lua=lua,
                progress=progress,
            )
    return points


async def failovers(options: DemoOptions, runs: int, progress: Progress) -> list[FailoverResult]:
    results: list[FailoverResult] = []
    async with cluster(options, progress) as demo:
        for index in range(1, runs + 1):
            result = await fail_over(demo, progress)
            results.append(result)
            progress.say(
                f"  run {index}/{runs}: {result.killed_pod} killed, {result.promoted_pod} "
                f"promoted; served by it after {ms(result.first_promoted_s)}, set restored "
                f"after {ms(result.restored_s)}; {result.probe_errors} of "
                f"{result.probe_requests} requests failed"
            )
            await demo.wait_web_serving()
    return results


# -- reporting ------------------------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def environment(command: str) -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parent,
    ).stdout.strip()
    return {
        "command": command,
        "commit": commit,
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def by(points: Sequence[Point], setting: float, policy: str) -> Point | None:
    return next((p for p in points if p.setting == setting and p.run.policy == policy), None)


def ratio(a: Point | None, b: Point | None, field: str) -> float | None:
    if a is None or b is None:
        return None
    low = getattr(b.run if field != "rate" else b, field)
    return getattr(a.run if field != "rate" else a, field) / low if low else None


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def points_table(points: Sequence[Point], setting_name: str) -> list[str]:
    several = any(p.round_rates for p in points)
    lines = [
        f"| {setting_name} | policy | req/s | p50 ms | p99 ms | errors | kept local | "
        "node CPU (share of cap) 1 / 2 / 3 |" + (" req/s of each round |" if several else ""),
        "|---:|---|---:|---:|---:|---:|---:|---|" + ("---|" if several else ""),
    ]
    if several:
        lines.insert(
            0,
            "Each row is the median round by req/s (its latency, share and CPU are that "
            "round's); the policies ran interleaved, in a rotated order each round.\n",
        )
    for p in points:
        r = p.run
        local = "-" if r.local_share is None else f"{r.local_share * 100:.0f} %"
        cpu = " / ".join(f"{p.node_cpu[n]:.2f}" for n in NODES)
        each = " / ".join(f"{v:.0f}" for v in p.round_rates)
        lines.append(
            f"| {p.setting:g} | {r.policy} | {r.rate:.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | "
            f"{r.errors} | {local} | {cpu} |" + (f" {each} |" if several else "")
        )
    return lines


def sweep_markdown(points: Sequence[Point], env: dict[str, Any], options: DemoOptions) -> str:
    lines = header("Inter-node delay sweep", env, options)
    lines += points_table(points, "one-way delay ms")
    lines += ["", "## Against issue 6's targets (at >= 10 ms one-way)", ""]
    lines += [
        "| delay | rap/round-robin req/s | rap/random req/s | rap/round-robin p99 | "
        "rap/random p99 | verdict |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for delay in sorted({p.setting for p in points}):
        rap = by(points, delay, "rap")
        rr, rnd = by(points, delay, "round-robin"), by(points, delay, "random")
        ratios = [ratio(rap, rr, "rate"), ratio(rap, rnd, "rate")]
        p99s = [ratio(rap, rr, "p99_ms"), ratio(rap, rnd, "p99_ms")]
        verdict = "-"
        if delay >= 10 and None not in ratios + p99s:
            met = all(r >= SWEEP_TARGET_THROUGHPUT for r in ratios if r is not None) and all(
                r <= SWEEP_TARGET_P99 for r in p99s if r is not None
            )
            verdict = "met" if met else "missed"
        lines.append(
            f"| {delay:g} ms | {fmt_ratio(ratios[0])} | {fmt_ratio(ratios[1])} | "
            f"{fmt_ratio(p99s[0])} | {fmt_ratio(p99s[1])} | {verdict} |"
        )
    return "\n".join([*lines, "", f"_{CLOSED_LOOP_NOTE}._", ""])


def overload_markdown(points: Sequence[Point], env: dict[str, Any], options: DemoOptions) -> str:
    lines = header("Concentrated load on node-1", env, options)
    lines += points_table(points, "wrk connections")
    lines += ["", "## Against issue 6's target (rap >= 1.3x local-only once node-1 is overloaded)"]
    lines += ["", "| connections | node-1 CPU under local-only | rap/local-only req/s | verdict |"]
    lines.append("|---:|---:|---:|---|")
    for level in sorted({p.setting for p in points}):
        rap, local = by(points, level, "rap"), by(points, level, "local-only")
        value = ratio(rap, local, "rate")
        overloaded = local is not None and local.node_cpu["node-1"] >= 0.8
        verdict = "-"
        if overloaded and value is not None:
            verdict = "met" if value >= OVERLOAD_TARGET else "missed"
        cpu = "-" if local is None else f"{local.node_cpu['node-1']:.2f}"
        lines.append(f"| {level:g} | {cpu} | {fmt_ratio(value)} | {verdict} |")
    return "\n".join([*lines, "", f"_{CLOSED_LOOP_NOTE}._", ""])


def failover_markdown(
    results: Sequence[FailoverResult], env: dict[str, Any], options: DemoOptions
) -> str:
    lines = header(
        "Failover: SIGKILL to a primary's process",
        env,
        options,
        f"- client: an open-loop load of {FAILOVER_RATE:g} requests/s (each a new connection) "
        "from node-1's host network to ClusterIP 10.96.0.10:80 (round-robin over the "
        "primaries), from 0.5 s before the kill until 0.5 s after the set is restored; the set "
        "(3 primaries, 1 hot, 1 cold) settles between runs",
    )
    served = [r.first_promoted_s for r in results if r.first_promoted_s is not None]
    restored = [r.restored_s for r in results if r.restored_s is not None]
    handling = [
        float(r.last_failover["handlingSeconds"])
        for r in results
        if isinstance(r.last_failover.get("handlingSeconds"), int | float)
    ]
    lines += [
        "| measure | runs | p50 | p95 | max | paper |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, values, paper in (
        ("kill → first request served by the promoted pod", served, "-"),
        ("kill → full set restored (BackupPodSet restoredAt)", restored, "1.933 s"),
        ("controller handling (event → writes acknowledged)", handling, "0.079 s"),
    ):
        lines.append(
            f"| {name} | {len(values)} | {ms(percentile(values, 50))} | "
            f"{ms(percentile(values, 95))} | {ms(max(values) if values else None)} | {paper} |"
        )
    failed = sum(r.probe_errors for r in results)
    probes = sum(r.probe_requests for r in results)
    lines += [
        "",
        f"Requests of the continuous load that failed across all runs: {failed} of {probes} sent "
        f"after the kills ({FAILOVER_RATE:g}/s, 1 s connect and 2 s response timeouts, through "
        "node-1's rapproxy with round-robin over the primaries).",
        "",
        "| run | killed | node | promoted | served by promoted | restored | requests failed |",
        "|---:|---|---|---|---:|---:|---:|",
    ]
    for i, r in enumerate(results, 1):
        lines.append(
            f"| {i} | {r.killed_pod} | {r.node} | {r.promoted_pod or '-'} | "
            f"{ms(r.first_promoted_s)} | {ms(r.restored_s)} | {r.probe_errors}/{r.probe_requests} |"
        )
    return "\n".join([*lines, ""])


def chart(points: Sequence[Point], path: Path, xlabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    policies = list(dict.fromkeys(p.run.policy for p in points))
    for policy in policies:
        series = [p for p in points if p.run.policy == policy]
        xs = [p.setting for p in series]
        axes[0].plot(xs, [p.rate for p in series], marker="o", label=policy)
        axes[1].plot(xs, [p.run.p50_ms for p in series], marker="o", label=policy)
        axes[2].plot(xs, [p.run.p99_ms for p in series], marker="o", label=policy)
    for ax, name, unit in (
        (axes[0], "throughput", "requests/s"),
        (axes[1], "p50 latency", "ms"),
        (axes[2], "p99 latency (closed loop: a lower bound)", "ms"),
    ):
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def failover_chart(results: Sequence[FailoverResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(8, 4))
    served = [(r.first_promoted_s or 0) * 1000 for r in results]
    restored = [(r.restored_s or 0) * 1000 for r in results]
    runs = range(1, len(results) + 1)
    ax.plot(runs, served, "o-", label="first request served by the promoted pod")
    ax.plot(runs, restored, "s-", label="full set restored")
    ax.axhline(PAPER_FAILOVER_TOTAL_S * 1000, color="grey", ls="--", label="paper: 1933 ms")
    ax.set_xlabel("run")
    ax.set_ylabel("ms after SIGKILL")
    ax.set_title("Failover of a primary in the emulated edge cluster")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# -- entry point ----------------------------------------------------------------------------------


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def states_of(text: str | None) -> list[str] | None:
    """`healthy,node-1` → the grid's state names; None: every state."""
    if text is None:
        return None
    names = {"healthy": "healthy", "node-1": "node-1 overloaded", "node-2": "node-2 overloaded"}
    chosen = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in names]
    if unknown or not chosen:
        raise SystemExit(f"--states: {unknown or 'none'} not among {', '.join(names)}")
    return [names[v] for v in chosen]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _beside(stem: Path, suffix: str) -> Path:
    """`stem` plus `suffix`; not `with_suffix`, which takes a label's dot ("share-0.5") for one."""
    return stem.with_name(stem.name + suffix)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=("sweep", "overload", "failover", "grid", "all"))
    parser.add_argument("--delays", type=floats, default=[0, 5, 10, 20, 40], help="sweep, ms")
    parser.add_argument(
        "--levels", type=ints, default=[2, 8, 32], help="overload and grid: connections"
    )
    parser.add_argument(
        "--scales", type=floats, default=[0.25, 1, 2], help="grid: delay scales of 4/8/3 ms"
    )
    parser.add_argument(
        "--remote-scale",
        type=float,
        default=1.0,
        help="grid: the delay scale that also gets a node-2-overloaded row (-1: none)",
    )
    parser.add_argument(
        "--states",
        default=None,
        help="grid: comma-separated subset of healthy,node-1,node-2 (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="grid: scale 1, connections 2 and 32, healthy and node-1 overloaded, 1 round, 3 s",
    )
    parser.add_argument("--runs", type=int, default=20, help="failover runs")
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds, median (grid: 3, else 1)"
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="s of load per policy (grid: 5, else 8)"
    )
    parser.add_argument("--connections", type=int, default=16, help="sweep: wrk connections")
    parser.add_argument(
        "--policies",
        default=None,
        help=f"comma-separated (default {','.join(POLICIES)}; grid: all of "
        f"{','.join(KNOWN_POLICIES)})",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--label", default="", help="suffix for the result files' names")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="GRID.json",
        help="grid: write the .md and .png of a recorded run again from its JSON (no root, no "
        "load; pass the run's own --duration and --set flags)",
    )
    add_daemon_settings_argument(parser)
    args = parser.parse_args(argv)
    if args.render is not None:
        if args.experiment != "grid":
            parser.error("--render: only for the grid")
        return render_grid(args.render, args)
    if os.geteuid() != 0:
        print("benchmarks/edge/run.py: needs root (namespaces, cgroups, iptables)", file=sys.stderr)
        return 1
    command = shlex.join(["benchmarks/edge/run.py", *(sys.argv[1:] if argv is None else argv)])
    stamp = time.strftime("%Y-%m-%dT%H%MZ", time.gmtime())
    args.output.mkdir(parents=True, exist_ok=True)
    progress = Progress()
    grid_run = args.experiment == "grid"
    default_policies = KNOWN_POLICIES if grid_run else POLICIES
    policies = (
        tuple(p.strip() for p in args.policies.split(",") if p.strip())
        if args.policies is not None
        else default_policies
    )
    if not policies or any(p not in KNOWN_POLICIES for p in policies):
        parser.error(f"--policies: choose from {', '.join(KNOWN_POLICIES)}")
    if grid_run and "rap" not in policies:
        parser.error("--policies: the grid compares rap with the others; include rap")
    rounds = args.rounds if args.rounds is not None else (1 if args.quick or not grid_run else 3)
    duration = (
        args.duration
        if args.duration is not None
        else ((3.0 if args.quick else 5.0) if grid_run else 8.0)
    )
    experiments = (
        ("sweep", "overload", "failover") if args.experiment == "all" else (args.experiment,)
    )
    base = DemoOptions(
        duration=duration, policies=policies, daemon_settings=tuple(args.daemon_settings)
    )
    for experiment in experiments:
        env = environment(command)
        stem = args.output / "-".join(filter(None, (experiment, stamp, args.label)))
        if experiment == "sweep":
            options = replace(base, connections=args.connections)
            points = asyncio.run(sweep(options, args.delays, rounds, progress))
            text = sweep_markdown(points, env, options)
            chart(
                points,
                _beside(stem, ".png"),
                "one-way delay between nodes (ms)",
                "Delay sweep: wrk from node-1 to ClusterIP, Connection: close",
            )
            raw: Any = [asdict(p) for p in points]
        elif experiment == "overload":
            # Pods get 0.5 CPU per node and 2 ms of CPU per request: node-1 alone serves at
            # most ~250 req/s, the cluster ~750; delays stay the demo's 10/20/7.5 ms matrix.
            options = replace(base, node_cpus=0.5, work_ms=2.0)
            points = asyncio.run(overload(options, args.levels, rounds, progress))
            text = overload_markdown(points, env, options)
            chart(
                points,
                _beside(stem, ".png"),
                "wrk connections from node-1",
                "Concentrated load on node-1 (pods: 0.5 CPU per node, 2 ms CPU per request)",
            )
            raw = [asdict(p) for p in points]
        elif experiment == "grid":
            options = base
            if args.quick:
                cells = grid_cells([1.0], [2, 32], None)
            else:
                remote = args.remote_scale if args.remote_scale >= 0 else None
                cells = grid_cells(args.scales, args.levels, remote, states_of(args.states))
            grid_results = asyncio.run(grid(options, cells, rounds, progress))
            text = grid_markdown(grid_results, env, options, rounds)
            heatmap(grid_results, _beside(stem, ".png"))
            raw = grid_json(grid_results)
        else:
            options = base
            results = asyncio.run(failovers(options, args.runs, progress))
            text = failover_markdown(results, env, options)
            failover_chart(results, _beside(stem, ".png"))
            raw = [asdict(r) for r in results]
        env["load_average_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
        _beside(stem, ".md").write_text(text)
        _beside(stem, ".json").write_text(
            json.dumps({"environment": env, "results": raw}, indent=2, default=str) + "\n"
        )
        print(text)
        print(f"written: {stem}.md, .json, .png")
    return 0


def render_grid(path: Path, args: argparse.Namespace) -> int:
    """Rewrite a recorded grid's Markdown and heatmap from its JSON (the verdicts as now defined)."""
    recorded = json.loads(path.read_text())
    env = recorded["environment"]
    if "load_average_after" not in env:  # runs before it was recorded: the Markdown has it
        old = path.with_suffix(".md").read_text() if path.with_suffix(".md").exists() else ""
        after = old.split(", after ", 1)[1].split("\n", 1)[0] if ", after " in old else "-"
        env["load_average_after"] = after
    results = grid_from_json(recorded["results"])
    rounds = max((len(p.round_rates) for r in results for p in r.points), default=1)
    options = DemoOptions(
        duration=args.duration if args.duration is not None else 5.0,
        daemon_settings=tuple(args.daemon_settings),
    )
    path.with_suffix(".md").write_text(grid_markdown(results, env, options, rounds))
    heatmap(results, path.with_suffix(".png"))
    print(f"rendered again: {path.with_suffix('.md')}, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
