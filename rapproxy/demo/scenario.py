"""The demo's story, step by step: build, compare the policies, fail a primary over, clean up.

1. Build the cluster (`DemoCluster`): nodes, WAN delays, API server, a rapproxy per node, and
   Service `web` backed by BackupPodSet `web` (a primary on each node).
2. "node-1 healthy": for each policy, annotate the Service and drive wrk from node-1's host
   network to the ClusterIP with `Connection: close` — rapproxy balances connections, so a new
   connection per request makes every request a balancing decision. Record req/s, p50, p99 and
   the share of connections node-1's rapproxy kept on node-1 (its selection counters).
3. "node-1 overloaded": the same, with node-1 short of CPU (see `DemoCluster.overload_node1`):
   RAP should leave it, local-only cannot.
4. Failover: kill the process of node-1's primary while a client probes the ClusterIP; report
   when requests failed, when the promoted pod answered, and the BackupPodSet's own timeline.
5. Everything is removed on the way out, also after an error or Ctrl-C, and checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import signal
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bpsctl.render import failover_timeline
from rapproxy.demo.cluster import (
    CLUSTER_IP,
    NODES,
    SERVICE_URL,
    DemoCluster,
    DemoSetupError,
    until,
)
from rapproxy.demo.options import DemoOptions
from rapproxy.demo.progress import Progress
from rapproxy.demo.report import DemoResults, FailoverResult, PolicyRun
from rapproxy.model.bps import Role, parse_time
from rapproxy.testing.connload import OK, LoadReport, LoadSpec, run_load, timeline
from rapproxy.testing.load import parse_wrk, write_lua, wrk_argv

HEALTHY = "node-1 healthy"
OVERLOADED = "node-1 overloaded"


async def run_scenario(options: DemoOptions, progress: Progress) -> DemoResults:
    workdir = Path(tempfile.mkdtemp(prefix="rapproxy-demo-"))
    runs: list[PolicyRun] = []
    failover: FailoverResult | None = None
    notes: list[str] = []
    setting: dict[str, Any] = {
        "nodes": list(NODES),
        "delays_ms": {f"{a}-{b}": ms for (a, b), ms in options.delays_ms().items()},
        "delay_scale": options.delay_scale,
        "duration_s_per_policy": options.duration,
        "rounds": options.rounds,
        "connections": options.connections,
        "backend_work_ms": options.work_ms,
        "client": "wrk from node-1's host network to ClusterIP 10.96.0.10:80, Connection: close",
    }
    if options.daemon_settings:
        setting["rapproxy_settings"] = list(options.daemon_settings)
    demo = DemoCluster(options, workdir)
    try:
        async with contextlib.AsyncExitStack() as stack:
            with progress.step(
                "building the edge cluster: 3 node namespaces on a WAN router, one-way delays "
                + ", ".join(f"{k} {v:g} ms" for k, v in setting["delays_ms"].items())
            ):
                await stack.enter_async_context(demo)
            with progress.step("starting the emulated API server, scheduler, kubelets, BPS CRD"):
                await demo.start_control_plane()
            with progress.step("starting rapproxy on every node (own iptables, RAP telemetry)"):
                await demo.start_daemons()
            if demo.injected_load:
                notes.append("no usable cgroups: node load figures are injected, CPU not capped")
            with progress.step(
                "deploying Service web + BackupPodSet web (3 primaries, 1 hot, 1 cold backup)"
            ):
                demo.deploy_web()
                primaries = await demo.wait_web_serving()
            progress.say(f"  primaries: {', '.join(primaries)}; {placement(demo)}")
            lua = write_lua(workdir)
            runs += await compare(demo, options, progress, HEALTHY, lua)
            if options.overload:
                with progress.step("overloading node-1"):
                    how = await demo.overload_node1()
                progress.say(f"  {how}")
                setting["overload"] = how
                runs += await compare(demo, options, progress, OVERLOADED, lua)
                with progress.step("relieving node-1"):
                    await demo.relieve_node1()
            if options.failover:
                failover = await fail_over(demo, progress)
            progress.say("cleaning up: API server, daemons, pods, namespaces, cgroups, WAN")
    except BaseException:
        progress.say(f"  the daemons' logs are kept in {workdir}/logs")
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    if demo.leftover_report:
        notes.append(f"LEFT BEHIND after cleanup: {demo.leftover_report}")
        progress.say(f"  WARNING: left behind: {demo.leftover_report}")
    else:
        progress.say("  cleaned up: no namespaces, cgroups or processes left")
    return DemoResults(setting, tuple(runs), failover, tuple(notes))


def placement(demo: DemoCluster) -> str:
    roles = demo.pods_by_role()
    parts = []
    for role in Role:
        pods = roles.get(role.value, [])
        where = ", ".join(f"{p['metadata']['name']}@{p['spec'].get('nodeName')}" for p in pods)
        parts.append(f"{role.value}: {where or '-'}")
    return "; ".join(parts)


async def compare(
    demo: DemoCluster, options: DemoOptions, progress: Progress, phase: str, lua: Path
) -> list[PolicyRun]:
    """Every policy `options.rounds` times, interleaved and in a rotated order each round (no
    policy always first, after a quiet pause, or last); per policy its median round by req/s,
    carrying every round's req/s."""
    policies = list(options.policies)
    measured: dict[str, list[PolicyRun]] = {policy: [] for policy in policies}
    for index in range(options.rounds):
        shift = index % len(policies)
        label = f" round {index + 1}/{options.rounds}" if options.rounds > 1 else ""
        for policy in policies[shift:] + policies[:shift]:
            with progress.step(f"{phase}:{label} {policy:<11} wrk {options.duration:g} s"):
                run = await measure(demo, options, phase, policy, lua)
            local = "n/a" if run.local_share is None else f"{run.local_share * 100:.0f} % local"
            progress.say(
                f"  {run.rate:7.0f} req/s  p50 {run.p50_ms:6.1f} ms  p99 {run.p99_ms:6.1f} ms  "
                f"{run.errors} errors  {local}"
            )
            measured[policy].append(run)
    return [median_round(measured[policy]) for policy in policies]


def median_round(runs: list[PolicyRun]) -> PolicyRun:
    """The median run by req/s (the lower one of an even count), with every round's rate."""
    ordered = sorted(runs, key=lambda r: r.rate)
    median = ordered[(len(ordered) - 1) // 2]
    if len(runs) == 1:
        return median
    return replace(median, round_rates=tuple(round(r.rate, 1) for r in runs))


async def measure(
    demo: DemoCluster, options: DemoOptions, phase: str, policy: str, lua: Path
) -> PolicyRun:
    await demo.set_policy(policy)
    node1 = demo.require_edge().node("node-1")
    before = (await demo.balancer_state())["selections"]
    kernel_before = await demo.kernel_connections()
    argv = wrk_argv(
        SERVICE_URL, lua, duration=options.duration, connections=options.connections, close=True
    )
    process = await node1.namespace.spawn(
        argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), options.duration + 30)
    except TimeoutError:
        process.kill()
        raise DemoSetupError(
            f"wrk ({policy}) did not finish within {options.duration + 30:g} s"
        ) from None
    after = (await demo.balancer_state())["selections"]
    kernel_after = await demo.kernel_connections()
    result = parse_wrk(out.decode(errors="replace"), err.decode(errors="replace"))
    chosen = {k: int(after.get(k, 0)) - int(before.get(k, 0)) for k in after}
    total = sum(chosen.values())
    if total == 0 and kernel_after:  # kernel mode: the relay chose nothing, the rules did
        chosen = kernel_placement(kernel_before, kernel_after, node1.pod_cidr)
        total = sum(chosen.values())
    return PolicyRun(
        phase=phase,
        policy=policy,
        requests=result.requests,
        duration_s=result.duration_s,
        errors=result.errors,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        local_share=chosen.get("local", 0) / total if total > 0 else None,
    )


def kernel_placement(
    before: dict[str, int], after: dict[str, int], local_cidr: str
) -> dict[str, int]:
    """Connections DNATed between two counter readings, as {"local": n, "remote": m}.

    A counter that went down was reset by a rules rewrite in between: what it counted since is
    all that is known of it (an undercount, for that endpoint only).
    """
    network = ipaddress.ip_network(local_cidr)
    placed = {"local": 0, "remote": 0}
    for ip, count in after.items():
        moved = count - before.get(ip, 0)
        if moved < 0:
            moved = count
        placed["local" if ipaddress.ip_address(ip) in network else "remote"] += moved
    return placed


FAILOVER_RATE = 200.0
"""Requests per second of the failover's load: each a new connection, so a new balancing decision."""
FAILOVER_LIMIT = 70.0
"""Upper bound of the failover load, seconds: it normally stops once the set is restored."""
RESTORE_WITHIN = 60.0
"""How long the set may take to be restored: ~0.3 s on an idle machine, over 30 s once under
the whole test suite on two cores."""


async def fail_over(demo: DemoCluster, progress: Progress) -> FailoverResult:
    """SIGKILL a primary's process under a continuous open-loop load through the ClusterIP.

    The load (FAILOVER_RATE new connections per second from node-1, whatever happens) starts half a
    second before the kill and stops half a second after the BackupPodSet reports its set
    restored, so every request sent while the failover ran is counted, not just a first probe.
    """
    node1 = demo.require_edge().node("node-1")
    with progress.step("failover: switching web to round-robin so the load reaches every pod"):
        await demo.set_policy("round-robin")
    roles = demo.pods_by_role()
    primaries = roles[Role.PRIMARY.value]
    victim = next((p for p in primaries if p["spec"].get("nodeName") == "node-1"), primaries[0])
    name, node = victim["metadata"]["name"], victim["spec"]["nodeName"]
    known = [p["metadata"]["name"] for p in primaries]
    pid = demo.pod_process(victim)
    previous = (demo.bps_status().get("lastFailover") or {}).get("detectedAt")
    stop = demo.workdir / f"failover-{os.getpid()}-{time.monotonic_ns()}.stop"
    spec = LoadSpec(
        CLUSTER_IP,
        80,
        rate=FAILOVER_RATE,
        seconds=FAILOVER_LIMIT,
        connect_timeout=1.0,
        response_timeout=2.0,
        stop_file=str(stop),
    )

    def restored() -> bool:
        last = demo.bps_status().get("lastFailover") or {}
        return (
            last.get("failedPod") == name
            and last.get("detectedAt") != previous
            and bool(last.get("restoredAt"))
        )

    with progress.step(
        f"failover: SIGKILL to primary {name}'s process (pid {pid}) on {node}, "
        f"under {FAILOVER_RATE:g} req/s"
    ):
        load = asyncio.ensure_future(node1.call(run_load, spec))
        try:
            await asyncio.sleep(0.5)  # half a second of healthy load before the kill, for contrast
            killed_at = time.time()
            os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(DemoSetupError):
                await until(restored, RESTORE_WITHIN, "the BackupPodSet to restore its full set")
            await asyncio.sleep(0.5)  # and half a second after it
        finally:
            stop.write_text("")
            report = await load
            stop.unlink(missing_ok=True)
    return failover_result(
        report,
        killed_at=killed_at,
        name=name,
        node=node,
        known=known,
        status=demo.bps_status(),
        previous=previous,
    )


def failover_result(
    report: LoadReport,
    *,
    killed_at: float,
    name: str,
    node: str,
    known: list[str],
    status: dict[str, Any],
    previous: str | None,
) -> FailoverResult:
    """What the load saw after the kill, beside what the BackupPodSet's status says."""
    after = [a for a in report.attempts if a.started >= killed_at]
    first_error = next((a.started - killed_at for a in after if a.outcome != OK), None)
    promoted_at, promoted = next(
        ((a.started - killed_at, a.backend) for a in after if a.backend and a.backend not in known),
        (None, None),
    )
    last = status.get("lastFailover") or {}
    ours = last.get("failedPod") == name and last.get("detectedAt") != previous
    restored_at = parse_time(last.get("restoredAt")) if ours else None
    failed = [a for a in after if a.outcome != OK]
    return FailoverResult(
        killed_pod=name,
        node=node,
        promoted_pod=last.get("promotedPod") or promoted,
        first_error_s=first_error,
        first_promoted_s=promoted_at,
        restored_s=None if restored_at is None else restored_at - killed_at,
        probe_requests=len(after),
        probe_errors=len(failed),
        last_failover=dict(last),
        timeline=failover_timeline(last) if ours else "",
        load_rate=report.spec.rate,
        failed_at_s=tuple(round(a.started - killed_at, 3) for a in failed),
        load_timeline=tuple(timeline(after, killed_at, bucket=0.25)),
    )
