"""What every edge experiment shares: the cluster, one measured policy run, rounds, the header.

Used by run.py (the paper's experiments and failover) and grid.py (issue 11's grid).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import statistics
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rapproxy.demo.cluster import NODES, DemoCluster
from rapproxy.demo.options import DemoOptions
from rapproxy.demo.progress import Progress
from rapproxy.demo.report import PolicyRun
from rapproxy.demo.scenario import measure


@dataclass(frozen=True, slots=True)
class Point:
    """One policy at one setting (a delay, or a load level)."""

    setting: float  # one-way delay in ms (sweep) or wrk connections (overload)
    run: PolicyRun
    node_cpu: dict[str, float]  # mean fraction of each node's pod CPU capacity during the run
    round_rates: tuple[float, ...] = ()  # req/s of every round, when the setting ran several

    @property
    def rate(self) -> float:
        return self.run.rate


# -- the cluster ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def cluster(options: DemoOptions, progress: Progress) -> AsyncIterator[DemoCluster]:
    workdir = Path(tempfile.mkdtemp(prefix="rapproxy-edge-bench-"))
    demo = DemoCluster(options, workdir)
    try:
        async with demo:
            with progress.step("cluster: namespaces, WAN, API server, rapproxy on every node"):
                await demo.start_control_plane()
                await demo.start_daemons()
                demo.deploy_web()
                primaries = await demo.wait_web_serving()
            progress.say(f"  primaries {', '.join(primaries)}")
            yield demo
    finally:
        if demo.leftover_report:
            progress.say(f"  WARNING: left behind: {demo.leftover_report}")
        shutil.rmtree(workdir, ignore_errors=True)


async def measure_with_cpu(
    demo: DemoCluster, options: DemoOptions, label: str, policy: str, lua: Path
) -> tuple[PolicyRun, dict[str, float]]:
    """`measure` one policy while sampling every node's pod CPU figure twice a second."""
    samples: dict[str, list[float]] = {node: [] for node in NODES}

    async def sample() -> None:
        await asyncio.sleep(1.0)  # skip wrk's ramp-up
        while True:
            for node in NODES:
                samples[node].append(demo.node_load(node))
            await asyncio.sleep(0.5)

    sampler = asyncio.ensure_future(sample())
    try:
        run = await measure(demo, options, label, policy, lua)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    cpu = {node: round(statistics.fmean(v), 3) if v else 0.0 for node, v in samples.items()}
    return run, cpu


def show(progress: Progress, point: Point) -> None:
    run = point.run
    local = "n/a" if run.local_share is None else f"{run.local_share * 100:3.0f} % local"
    cpu = " ".join(f"{n[-1]}:{v:.2f}" for n, v in point.node_cpu.items())
    progress.say(
        f"  {run.policy:<11} {run.rate:7.0f} req/s  p50 {run.p50_ms:6.1f}  p99 {run.p99_ms:6.1f} ms"
        f"  {run.errors} err  {local}  cpu {cpu}"
    )


async def rounds_of(
    demo: DemoCluster,
    options: DemoOptions,
    *,
    setting: float,
    label: str,
    rounds: int,
    lua: Path,
    progress: Progress,
) -> list[Point]:
    """Every policy `rounds` times, interleaved and in a rotated order each round (so no policy
    always runs first, after a quiet pause, or last); per policy the median round by req/s."""
    policies = list(options.policies)
    measured: dict[str, list[Point]] = {policy: [] for policy in policies}
    for index in range(rounds):
        shift = index % len(policies)
        for policy in policies[shift:] + policies[:shift]:
            run, cpu = await measure_with_cpu(demo, options, label, policy, lua)
            measured[policy].append(Point(setting, run, cpu))
            show(progress, measured[policy][-1])
    points = []
    for policy in policies:
        runs = sorted(measured[policy], key=lambda p: p.rate)
        median = runs[(len(runs) - 1) // 2]
        rates = tuple(round(p.rate, 1) for p in measured[policy]) if rounds > 1 else ()
        points.append(replace(median, round_rates=rates))
    return points


def header(
    title: str, env: dict[str, Any], options: DemoOptions, load: str | None = None
) -> list[str]:
    env = {"load_average_after": " ".join(f"{v:.2f}" for v in os.getloadavg()), **env}
    load = load or (
        f"- load: wrk, 1 thread, {options.connections} connections unless the table says, "
        f"{options.duration:g} s per policy, Connection: close, from node-1's host network to "
        "ClusterIP 10.96.0.10:80"
    )
    return [
        f"# Edge cluster: {title}",
        "",
        f"- command: `{env['command']}` (commit {env['commit']}, started {env['started']})",
        f"- host: {env['host']}; load average before {env['load_average_before']}, "
        f"after {env['load_average_after']}",
        f"- cluster: nodes {', '.join(NODES)}; pods capped at {options.node_cpus:g} CPU per node "
        f"(cgroup); backend work {options.work_ms:g} ms CPU per request; "
        "Service web = 3 primaries of BackupPodSet web (1 hot, 1 cold backup)"
        + (
            f"; rapproxy --set {' '.join(options.daemon_settings)}"
            if options.daemon_settings
            else ""
        ),
        load,
        "",
    ]
