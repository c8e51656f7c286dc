"""Reliability under load (issue 14): rolling update, kill -9, API server outage.

Every scenario runs an open-loop load (`rapproxy.testing.connload`: connections started at a fixed
rate whatever happens, each classified ok / refused / reset / timeout / ...) through a ClusterIP
while something is done to the proxy, and reports what the clients saw:

* `rolling` — rolling updates of the proxy: a second `rapproxy run` starts on the node (it takes
  the listening sockets over), then the old one gets SIGTERM and drains for `--drain` seconds;
  repeated `--updates` times during one load. Short connections refused, reset or otherwise
  failed; long keep-alive connections opened before the first update, and how long each kept
  being answered after its proxy's SIGTERM.
* `kill9` — `kill -9` of the proxy, then a new one started at once (what a DaemonSet does, minus
  the kubelet's restart back-off): connections failed, and the time from the kill until
  connections are served again, `--runs` times during one load.
* `soak` — `--duration` seconds (default 600) of open-loop load while Services churn (one of
  `--services` appears or goes every second, endpoints move between backends) and clients reset
  mid-request: the daemon's open fds, RSS and `/healthz` latency (a stand-in for event-loop lag)
  after warm-up and at the end.
* `apiserver` — the emulated API server stops for `--outage` seconds, then comes back; once
  plainly, once with its history compacted meanwhile (the proxy's watch then gets 410 Gone and
  must re-list). A Service created during the outage times the resync: from the API's return to
  that Service answering. Target: 0 failed connections throughout.

Topology: network namespaces made here — client 10.0.0.2 → node 10.0.0.1 (rapproxy, iptables) →
backends b1 10.1.1.2, b2 10.1.2.2 (`rapproxy.testing.backend`); no default routes, nothing leaves
them, and they are deleted at the end (also on errors).

Usage (root): `.venv/bin/python benchmarks/reliability/run.py rolling|kill9|apiserver|soak|all
[--rate N] ...`. Results: `benchmarks/reliability/results/<scenario>-<UTC time>.{md,json}`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rapproxy.testing import probes
from rapproxy.testing.apiserver import EmulatedApiServer
from rapproxy.testing.apiserver.resources import ENDPOINT_SLICES, SERVICES
from rapproxy.testing.connload import (
    OK,
    SKIPPED,
    LoadReport,
    LoadSpec,
    latency_percentiles,
    run_load,
    timeline,
)
from rapproxy.testing.netns import Namespace
from rapproxy.testing.udpload import LOST, UdpLoadReport, UdpLoadSpec, run_udp_load

RAPPROXY = str(Path(sys.executable).with_name("rapproxy"))
RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = {"b1": "10.1.1.2", "b2": "10.1.2.2"}
WEB_IP = "10.96.0.10"
DNS_IP = "10.96.0.11"  # a UDP Service (port 53 to the backends' echo on 5353)


def service(name: str, cluster_ip: str, protocol: str = "TCP") -> dict[str, Any]:
    port = (
        {"name": "http", "port": 80, "targetPort": 8080}
        if protocol == "TCP"
        else {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}
    )
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": cluster_ip, "ports": [port]},
    }


def endpoint_slice(name: str, protocol: str = "TCP") -> dict[str, Any]:
    port = (
        {"name": "http", "port": 8080, "protocol": "TCP"}
        if protocol == "TCP"
        else {"name": "dns", "port": 5353, "protocol": "UDP"}
    )
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [port],
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node"}
            for ip in BACKENDS.values()
        ],
    }


@dataclass
class Bed:
    client: Namespace
    node: Namespace
    tmp: Path
    started: int = 0

    async def rapproxy(self, source: Sequence[str], *settings: str) -> tuple[Any, Path]:
        """Start `rapproxy run` on the node; returns the process and its log file."""
        log = self.tmp / f"rapproxy-{self.started}.log"
        self.started += 1
        argv = [RAPPROXY, "run", *source, "--node-name", "node", "--lb-policy", "round-robin"]
        for setting in ("iptables.minSyncPeriod=0.05", *settings):
            argv += ["--set", setting]
        with log.open("wb") as output:
            process = await self.node.spawn(argv, stdout=output, stderr=output)
        return process, log


def text_of(path: Path) -> str:
    return path.read_text(errors="replace")


async def until(check: Callable[[], bool], within: float, what: str) -> float:
    """Seconds until `check()` holds; raises after `within` seconds."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise TimeoutError(f"{what}: not within {within} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def serving(bed: Bed, url: str, within: float) -> float:
    """Seconds until a fresh connection to `url` is answered (polled every 10 ms).

    Probed from the node itself (nat OUTPUT), not the client namespace: that one's worker runs
    the load, and a probe queued behind it would measure the load's length.
    """
    started = time.monotonic()
    while True:
        try:
            status, _ = await bed.node.call(probes.http_get, url, 0.5)
            if status == 200:
                return time.monotonic() - started
        except OSError:
            pass
        if time.monotonic() - started > within:
            raise TimeoutError(f"{url} not served within {within} s")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def testbed(tmp: Path) -> AsyncIterator[Bed]:
    namespaces: list[Namespace] = []
    try:
        for tag in ("client", "node", "b1", "b2"):
            namespaces.append(await Namespace.create(tag))
        client, node, *backends = namespaces
        for namespace in (client, node):
            # One client address to one service address: at 1000 connections/s the default
            # 28k ephemeral ports come round again within TIME_WAIT's 60 s, and the SYNs that
            # meet the peer's TIME_WAIT socket stall for a second each. A node has many clients.
            await namespace.exec(["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"])
        await client.add_veth_peer(node, "10.0.0.2", "10.0.0.1")
        await client.add_route("10.96.0.0/16", via="10.0.0.1")
        await node.add_local_route("10.96.0.0/16")
        for index, (name, backend) in enumerate(zip(BACKENDS, backends, strict=True)):
            await node.add_veth_peer(backend, f"10.1.{index + 1}.1", BACKENDS[name])
            ready = tmp / f"{name}.ready"
            await backend.spawn(
                [
                    *(sys.executable, "-m", "rapproxy.testing.backend", "--name", name),
                    *("--http", "0.0.0.0:8080", "--udp", "0.0.0.0:5353"),
                    *("--ready-file", str(ready)),
                ]
            )
            await until(ready.exists, 10, f"backend {name}")
        objects = [
            service("web", WEB_IP),
            endpoint_slice("web"),
            service("dns", DNS_IP, "UDP"),
            endpoint_slice("dns", "UDP"),
        ]
        (tmp / "objects.yaml").write_text(yaml.safe_dump_all(objects))
        yield Bed(client, node, tmp)
    finally:
        for namespace in namespaces:
            await namespace.aclose()


def summary(report: LoadReport) -> dict[str, Any]:
    counts = report.counts()
    total = sum(counts.values())
    starts = [a.started for a in report.attempts]
    duration = (max(starts) - min(starts) + 1 / report.spec.rate) if starts else 1.0
    return {
        "connections": total,
        "rate_asked": report.spec.rate,
        "rate_started": round((total - counts.get(SKIPPED, 0)) / duration, 1),
        "outcomes": dict(sorted(counts.items())),
        "failed": total - counts.get(OK, 0),
        "latency_ms": {
            k: round(v, 2) for k, v in latency_percentiles(report.attempts, (50, 99, 99.9)).items()
        },
    }


# -- scenarios ---------------------------------------------------------------------------------


async def rolling(bed: Bed, args: argparse.Namespace) -> dict[str, Any]:
    source = ["--objects", str(bed.tmp / "objects.yaml")]
    drain = f"proxy.drainTimeout={args.drain}"
    current, _log = await bed.rapproxy(source, drain)
    await serving(bed, f"http://{WEB_IP}/", 20)
    seconds = args.warmup + args.updates * args.every + args.drain + 3
    ready = bed.tmp / "load.ready"
    spec = LoadSpec(
        WEB_IP, 80, rate=args.rate, seconds=seconds, long_connections=args.long,
        long_interval=0.5, ready_file=str(ready),
    )  # fmt: skip
    load = asyncio.create_task(bed.client.call(run_load, spec))
    await until(ready.exists, 20, "long connections open")
    # UDP beside it, from this process's loop on sockets made in the client namespace: the
    # client's worker runs the TCP load. The service socket is handed over too; what is lost is
    # what the old process's sessions had in flight when it exited.
    udp_spec = UdpLoadSpec(DNS_IP, 53, rate=args.udp_rate, seconds=seconds - 1, flows=16)
    udp = asyncio.create_task(
        run_udp_load(udp_spec, lambda: bed.client.socket(socket.AF_INET, socket.SOCK_DGRAM))
    )
    await asyncio.sleep(args.warmup)  # pacing of the experiment, not synchronisation
    updates: list[dict[str, Any]] = []
    for _ in range(args.updates):
        began = time.time()
        successor, log = await bed.rapproxy(source, drain)
        await until(lambda log=log: "took over" in text_of(log), 30, "handover")
        taken_over = time.time()
        await until(lambda log=log: "rapproxy on node" in text_of(log), 30, "successor up")
        terminated = time.time()
        current.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(current.wait(), args.drain + 15)
        exited = time.time()
        updates.append(
            {
                "started": began,
                "taken_over_after": round(taken_over - began, 3),
                "sigterm": terminated,
                "old_exit_code": code,
                "old_exited_after_sigterm": round(exited - terminated, 3),
            }
        )
        current = successor
        await asyncio.sleep(max(0.0, args.every - (time.time() - began)))  # pacing
        updates[-1]["exited"] = exited
    report: LoadReport = await asyncio.wait_for(load, seconds + 60)
    udp_report: UdpLoadReport = await asyncio.wait_for(udp, seconds + 60)
    current.send_signal(signal.SIGTERM)
    await asyncio.wait_for(current.wait(), args.drain + 15)
    for update in updates:
        # From the successor's start until a second after the old process exited.
        since, until_ = update["started"], update.pop("exited") + 1.0
        window = report.counts(since=since, until=until_)
        update["window_connections"] = sum(window.values())
        update["window_outcomes"] = dict(sorted(window.items()))
        update["window_udp"] = dict(sorted(udp_report.counts(since=since, until=until_).items()))
    first_sigterm = updates[0]["sigterm"] if updates else report.ended
    longs = [
        {
            "outcome": long.outcome,
            "answered": long.answered,
            "answered_until_after_sigterm": None
            if long.last_answer is None
            else round(long.last_answer - first_sigterm, 2),
            "ended_after_sigterm": round(long.ended - first_sigterm, 2),
        }
        for long in report.long
    ]
    served_through_drain = sum(
        1
        for long in report.long
        if long.last_answer is not None and long.last_answer >= first_sigterm + args.drain - 1.0
    )
    return {
        "scenario": "rolling",
        "drain_timeout": args.drain,
        "updates": updates,
        "short": summary(report),
        "udp": {
            **udp_report.summary(),
            "lost_sent_at": [
                round(d.sent - report.started, 3) for d in udp_report.datagrams if d.outcome == LOST
            ][:200],
        },
        "long": {
            "opened": len(report.long),
            "served_until_drain_deadline": served_through_drain,
            "connections": longs,
        },
        "timeline": timeline(report.attempts, report.started),
    }


async def kill9(bed: Bed, args: argparse.Namespace) -> dict[str, Any]:
    source = ["--objects", str(bed.tmp / "objects.yaml")]
    current, _log = await bed.rapproxy(source)
    await serving(bed, f"http://{WEB_IP}/", 20)
    stop = bed.tmp / "load.stop"
    spec = LoadSpec(
        WEB_IP, 80, rate=args.rate, seconds=args.runs * 120, connect_timeout=1.0,
        stop_file=str(stop),
    )  # fmt: skip
    load = asyncio.create_task(bed.client.call(run_load, spec))
    await asyncio.sleep(args.warmup)  # pacing
    kills: list[tuple[float, float]] = []
    try:
        for _ in range(args.runs):
            current.send_signal(signal.SIGKILL)
            await current.wait()
            killed = time.time()
            current, _log = await bed.rapproxy(source)
            await serving(bed, f"http://{WEB_IP}/", 120)
            kills.append((killed, time.time()))
            await asyncio.sleep(args.every)  # pacing: served load between kills
    finally:
        stop.write_text("")
    report: LoadReport = await asyncio.wait_for(load, 60)
    current.send_signal(signal.SIGTERM)
    await asyncio.wait_for(current.wait(), 30)
    runs = []
    for index, (killed, _probed) in enumerate(kills):
        window_end = kills[index + 1][0] if index + 1 < len(kills) else report.ended
        window = [a for a in report.attempts if killed <= a.started < window_end]
        first_ok = next((a for a in window if a.outcome == OK), None)
        failed = [
            a for a in report.attempts if a.outcome != OK and killed - 1 <= a.started < window_end
        ]
        runs.append(
            {
                "killed": killed,
                "served_again_after": None
                if first_ok is None
                else round(first_ok.started - killed, 3),
                "failed": len(failed),
                "failed_outcomes": dict(sorted(_count(a.outcome for a in failed).items())),
            }
        )
    gaps = sorted(r["served_again_after"] for r in runs if r["served_again_after"] is not None)
    return {
        "scenario": "kill9",
        "runs": runs,
        "served_again_after_s": {
            "p50": gaps[len(gaps) // 2] if gaps else None,
            "max": gaps[-1] if gaps else None,
        },
        "short": summary(report),
        "timeline": timeline(report.attempts, report.started),
    }


def _count(items: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


async def apiserver(bed: Bed, args: argparse.Namespace) -> dict[str, Any]:
    api = EmulatedApiServer(socket_factory=bed.node.socket, bookmark_interval=1.0, history_size=50)
    await api.start()
    daemon = None
    try:
        api.registry.create(ENDPOINT_SLICES, "default", endpoint_slice("web"))
        api.registry.create(SERVICES, "default", service("web", WEB_IP))
        kubeconfig = api.write_kubeconfig(bed.tmp / "kubeconfig")
        daemon, _log = await bed.rapproxy(["--kubeconfig", str(kubeconfig)])
        await serving(bed, f"http://{WEB_IP}/", 30)
        phases = []
        for index, compact in enumerate((False, True)):
            seconds = args.outage + args.after + 2
            spec = LoadSpec(WEB_IP, 80, rate=args.rate, seconds=seconds)
            load = asyncio.create_task(bed.client.call(run_load, spec))
            await asyncio.sleep(1.0)  # pacing: some load before the outage
            down = time.time()
            api.drop_watches()
            await api.stop()
            name, ip = f"new-{index}", f"10.96.1.{index + 1}"
            api.registry.create(ENDPOINT_SLICES, "default", endpoint_slice(name))
            api.registry.create(SERVICES, "default", service(name, ip))
            if compact:
                api.compact()  # the proxy's resourceVersion is now too old: 410 Gone
            await asyncio.sleep(args.outage)  # the outage itself
            up = time.time()
            await api.start()
            resync = await serving(bed, f"http://{ip}/", 120)
            report: LoadReport = await asyncio.wait_for(load, seconds + 120)
            during = report.counts(since=down, until=up + resync)
            phases.append(
                {
                    "history_compacted_410": compact,
                    "outage_s": round(up - down, 2),
                    "resync_s": round(resync, 3),
                    "failed_during_outage_and_resync": sum(during.values()) - during.get(OK, 0),
                    "short": summary(report),
                    "timeline": timeline(report.attempts, down),
                }
            )
        return {"scenario": "apiserver", "phases": phases}
    finally:
        if daemon is not None and daemon.returncode is None:
            daemon.send_signal(signal.SIGTERM)
            await asyncio.wait_for(daemon.wait(), 40)
        await api.stop()


def resetting_clients(host: str, port: int, rate: float, seconds: float) -> dict[str, int]:
    """Clients that misbehave at `rate` per second: half a request then RST, or RST at once.

    Runs in the client namespace (`Namespace.call`). Returns how many of each it did.
    """
    import socket as socket_module
    import struct

    linger = struct.pack("ii", 1, 0)
    done = {"half_request_then_rst": 0, "rst_at_once": 0, "connect_failed": 0}
    deadline = time.monotonic() + seconds
    index = 0
    while time.monotonic() < deadline:
        index += 1
        try:
            with socket_module.create_connection((host, port), timeout=1.0) as sock:
                sock.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_LINGER, linger)
                if index % 2:
                    sock.sendall(b"GET / HTTP/1.1\r\nHo")
                    done["half_request_then_rst"] += 1
                else:
                    done["rst_at_once"] += 1
        except OSError:
            done["connect_failed"] += 1
        time.sleep(1 / rate)  # the clients' pace
    return done


def churned_objects(second: int, services: int) -> list[dict[str, Any]]:
    """The objects file at `second`: web stays; of the churn Services, one appears or goes every
    second and their endpoints move between b1, b2 and both."""
    objects = [service("web", WEB_IP), endpoint_slice("web")]
    present = services - (second % services)  # shrinks by one a second, then starts over
    for index in range(present):
        name = f"churn-{index}"
        objects.append(service(name, f"10.96.2.{index + 1}"))
        chosen = list(BACKENDS.values())[(second + index) % 3 :][:1] or list(BACKENDS.values())
        slice_ = endpoint_slice(name)
        slice_["endpoints"] = [
            {"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node"} for ip in chosen
        ]
        objects.append(slice_)
    return objects


def proc_sample(pid: int) -> dict[str, float]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss_kib = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = int(line.split()[1])
    return {"fds": fds, "rss_mib": round(rss_kib / 1024, 1)}


def write_objects(path: Path, objects: list[dict[str, Any]]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(yaml.safe_dump_all(objects))
    temporary.replace(path)


async def soak(bed: Bed, args: argparse.Namespace) -> dict[str, Any]:
    objects = bed.tmp / "objects.yaml"
    write_objects(objects, churned_objects(0, args.services))
    daemon, _log = await bed.rapproxy(["--objects", str(objects)])
    await serving(bed, f"http://{WEB_IP}/", 20)
    spec = LoadSpec(WEB_IP, 80, rate=args.rate, seconds=args.duration)
    load = asyncio.create_task(bed.client.call(run_load, spec))
    resets = asyncio.create_task(
        bed.client.call(resetting_clients, WEB_IP, 80, args.reset_rate, args.duration)
    )
    samples: list[dict[str, float]] = []
    started = time.monotonic()
    second = 0
    next_sample = 0.0
    while (elapsed := time.monotonic() - started) < args.duration:
        second += 1
        write_objects(objects, churned_objects(second, args.services))
        if elapsed >= next_sample:
            health_started = time.monotonic()
            status, _ = await bed.node.call(probes.http_get, "http://127.0.0.1:10256/healthz", 5.0)
            samples.append(
                {
                    "at_s": round(elapsed, 1),
                    **proc_sample(daemon.pid),
                    "healthz_ms": round(1000 * (time.monotonic() - health_started), 1),
                    "healthz_status": status,
                }
            )
            next_sample += args.sample_every
        await asyncio.sleep(max(0.0, second - (time.monotonic() - started)))  # once a second
    report: LoadReport = await asyncio.wait_for(load, 120)
    reset_counts = await asyncio.wait_for(resets, 60)
    await asyncio.sleep(2.0)  # let the last relays close before the final sample (pacing)
    final = proc_sample(daemon.pid)
    alive = daemon.returncode is None
    daemon.send_signal(signal.SIGTERM)
    await asyncio.wait_for(daemon.wait(), 40)
    warm = [s for s in samples if s["at_s"] >= args.warmup_s] or samples
    first, last = warm[0], warm[-1]
    return {
        "scenario": "soak",
        "duration_s": args.duration,
        "churn": f"{args.services} Services: one appears or goes every second, endpoints move",
        "resetting_clients": reset_counts,
        "daemon_alive_at_end": alive,
        "after_warmup": {
            "from": first,
            "to": last,
            "fds_change_pct": round(100 * (last["fds"] - first["fds"]) / first["fds"], 1),
            "rss_change_pct": round(
                100 * (last["rss_mib"] - first["rss_mib"]) / first["rss_mib"], 1
            ),
        },
        "after_load": final,
        "samples": samples,
        "short": summary(report),
        "timeline": timeline(report.attempts, report.started, bucket=10.0),
    }


# -- reports -----------------------------------------------------------------------------------


def environment(command: str) -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "command": command,
        "commit": commit,
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%MZ"),
        "host": f"{platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()}",
        "load_average_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def markdown(result: dict[str, Any], env: dict[str, Any]) -> str:
    lines = [
        f"# Reliability: {result['scenario']}",
        "",
        f"- command: `{env['command']}` (commit {env['commit']}, started {env['started']})",
        f"- host: {env['host']}; load average before {env['load_average_before']}, after "
        f"{env['load_average_after']}",
        "- load: open loop (`rapproxy.testing.connload`), one HTTP/1.0 request per connection, "
        "from the client namespace through ClusterIP 10.96.0.10:80, rapproxy in the node "
        "namespace, two backend namespaces; all processes niced (19) on a shared 2-core box",
        "",
    ]
    scenario = result["scenario"]
    if scenario == "rolling":
        short = result["short"]
        lines += [
            f"Rolling updates: {len(result['updates'])}, drain deadline {result['drain_timeout']} s.",
            "",
            "| short connections | asked rate/s | started rate/s | refused | reset | other failures | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|---|---|",
            _short_row(short),
            "",
            f"Long keep-alive connections opened before the first update: {result['long']['opened']}; "
            f"answered until the old proxy's drain deadline: {result['long']['served_until_drain_deadline']}.",
            "",
            "| update | handover after start (s) | old exited after SIGTERM (s) | exit code "
            "| connections started in the window | their outcomes |",
            "|---|---|---|---|---|---|",
        ]
        for index, update in enumerate(result["updates"], 1):
            lines.append(
                f"| {index} | {update['taken_over_after']} | {update['old_exited_after_sigterm']} "
                f"| {update['old_exit_code']} | {update['window_connections']} "
                f"| {update['window_outcomes']} |"
            )
        lines += [
            "",
            "Window: from the successor's start until 1 s after the old process exited.",
        ]
        udp = result.get("udp")
        if udp:
            lines += [
                "",
                f"UDP beside it (`rapproxy.testing.udpload`, open loop, {udp['rate_asked']:g} "
                f"datagrams/s over {udp['flows']} client flows to {DNS_IP}:53, a reply counts "
                f"within 1 s): {udp['datagrams']} sent, {udp['answered']} answered, "
                f"**{udp['lost']} lost**; answered by {udp['by_backend']}.",
                "",
                "| update | datagrams sent in the window | their outcomes |",
                "|---|---|---|",
                *(
                    f"| {index} | {sum(u['window_udp'].values())} | {u['window_udp']} |"
                    for index, u in enumerate(result["updates"], 1)
                ),
            ]
            if udp["lost_sent_at"]:
                shown = ", ".join(f"{t:g}" for t in udp["lost_sent_at"][:30])
                lines.append(f"\nLost datagrams were sent at (s from the load's start): {shown}")
    elif scenario == "kill9":
        lines += [
            "| kill | served again after (s) | failed connections (from 1 s before the kill) | outcomes |",
            "|---|---|---|---|",
        ]
        for index, run in enumerate(result["runs"], 1):
            lines.append(
                f"| {index} | {run['served_again_after']} | {run['failed']} | {run['failed_outcomes']} |"
            )
        gaps = result["served_again_after_s"]
        lines += [
            "",
            f"Served again after: p50 {gaps['p50']} s, max {gaps['max']} s (kill to the first "
            "connection, started after the kill, that was answered; includes the new process's "
            "start-up: Python, imports, first sync).",
            "",
            "| all short connections | asked rate/s | started rate/s | refused | reset | other failures | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|---|---|",
            _short_row(result["short"]),
        ]
    elif scenario == "apiserver":
        lines += [
            "| phase | outage (s) | resync (s) | failed during outage + resync | all connections | failed overall |",
            "|---|---|---|---|---|---|",
        ]
        for phase in result["phases"]:
            lines.append(
                f"| {'410 Gone (history compacted)' if phase['history_compacted_410'] else 'plain'} "
                f"| {phase['outage_s']} | {phase['resync_s']} "
                f"| {phase['failed_during_outage_and_resync']} | {phase['short']['connections']} "
                f"| {phase['short']['failed']} |"
            )
        lines += [
            "",
            "Resync: from the API server's return to the first answered connection to a Service "
            "created during the outage.",
        ]
    if scenario == "soak":
        warm = result["after_warmup"]
        lines += [
            f"Duration {result['duration_s']:g} s; {result['churn']}; resetting clients: "
            f"{result['resetting_clients']}; daemon alive at the end: "
            f"{result['daemon_alive_at_end']}.",
            "",
            "| | fds | RSS MiB | /healthz ms |",
            "|---|---|---|---|",
            f"| after warm-up ({warm['from']['at_s']} s) | {warm['from']['fds']} "
            f"| {warm['from']['rss_mib']} | {warm['from']['healthz_ms']} |",
            f"| end of the load ({warm['to']['at_s']} s) | {warm['to']['fds']} "
            f"| {warm['to']['rss_mib']} | {warm['to']['healthz_ms']} |",
            f"| change | {warm['fds_change_pct']} % | {warm['rss_change_pct']} % | |",
            f"| 2 s after the load | {result['after_load']['fds']} "
            f"| {result['after_load']['rss_mib']} | |",
            "",
            "Event-loop lag is read from outside, as the time a `/healthz` request from the node "
            "takes (the daemon has no lag metric); it includes a process-pool round trip.",
            "",
            "| short connections | asked rate/s | started rate/s | refused | reset | other "
            "failures | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|---|---|",
            _short_row(result["short"]),
        ]
    pressure = result.get("cpu_pressure") or {}
    if pressure.get("median") is not None:
        lines += [
            "",
            f"CPU pressure during the run (share of each second in which some task waited for a "
            f"CPU, /proc/pressure/cpu): median {100 * pressure['median']:.0f} %, max "
            f"{100 * pressure['max']:.0f} %. Everything here runs at nice 19 beside other jobs: "
            "where failures are timeouts, compare their seconds with the samples in the JSON.",
        ]
    timelines = [("", result["timeline"])] if "timeline" in result else []
    timelines += [
        (
            f" ({'410' if p['history_compacted_410'] else 'plain'} phase, from the outage)",
            p["timeline"],
        )
        for p in result.get("phases", [])
    ]
    for label, buckets in timelines:
        bad = [b for b in buckets if set(b["counts"]) - {OK}]
        lines += ["", f"Seconds of the load with anything but `ok`{label}: {len(bad)}", ""]
        lines += [f"- {b['from']:g} s: {b['counts']}" for b in bad[:30]]
    return "\n".join(lines) + "\n"


def _short_row(short: dict[str, Any]) -> str:
    outcomes = short["outcomes"]
    refused = outcomes.get("refused", 0)
    reset = outcomes.get("reset", 0)
    other = short["failed"] - refused - reset
    latency = short["latency_ms"]
    return (
        f"| {short['connections']} | {short['rate_asked']:g} | {short['rate_started']:g} | {refused} "
        f"| {reset} | {other} | {latency.get('p50', '-')} | {latency.get('p99', '-')} |"
    )


SCENARIOS = {"rolling": rolling, "kill9": kill9, "apiserver": apiserver, "soak": soak}


def cpu_pressure_total() -> float:
    """Seconds in which some runnable task waited for a CPU (/proc/pressure/cpu, `some`)."""
    for line in Path("/proc/pressure/cpu").read_text().splitlines():
        if line.startswith("some"):
            return int(line.rsplit("total=", 1)[1]) / 1e6
    return 0.0


async def sample_cpu_pressure(samples: list[tuple[float, float]]) -> None:
    """Every second: (wall time, share of that second in which something waited for a CPU).

    This box is shared and everything here runs at nice 19: when other jobs keep both cores
    busy, the load, the proxy and the backends all wait, and connections time out for reasons
    that have nothing to do with the scenario. The samples let a reader tell the two apart.
    """
    last, at = cpu_pressure_total(), time.monotonic()
    while True:
        await asyncio.sleep(1.0)  # the sampling period
        total, now = cpu_pressure_total(), time.monotonic()
        samples.append((time.time(), round((total - last) / (now - at), 3)))
        last, at = total, now


async def run_scenario(name: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    samples: list[tuple[float, float]] = []
    sampler = asyncio.create_task(sample_cpu_pressure(samples))
    try:
        async with testbed(tmp) as bed:
            result = await SCENARIOS[name](bed, args)
    finally:
        sampler.cancel()
    shares = sorted(share for _at, share in samples)
    result["cpu_pressure"] = {
        "median": shares[len(shares) // 2] if shares else None,
        "max": shares[-1] if shares else None,
        "samples": samples,
    }
    return result


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument(
        "--rate", type=float, default=None, help="connections/s (default per scenario)"
    )
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--updates", type=int, default=3, help="rolling: updates during the load")
    parser.add_argument(
        "--every",
        type=float,
        default=None,
        help="rolling: seconds between updates; kill9: "
        "seconds of served load after a restart before the next kill",
    )
    parser.add_argument(
        "--udp-rate", type=float, default=200.0, help="rolling: UDP datagrams per second"
    )
    parser.add_argument("--drain", type=float, default=5.0, help="rolling: proxy.drainTimeout")
    parser.add_argument("--long", type=int, default=20, help="rolling: long connections")
    parser.add_argument("--runs", type=int, default=5, help="kill9: kills during the load")
    parser.add_argument("--outage", type=float, default=60.0, help="apiserver: seconds down")
    parser.add_argument("--after", type=float, default=10.0, help="apiserver: load after return")
    parser.add_argument("--duration", type=float, default=600.0, help="soak: seconds")
    parser.add_argument("--services", type=int, default=20, help="soak: churned Services")
    parser.add_argument("--reset-rate", type=float, default=20.0, help="soak: resets per second")
    parser.add_argument("--sample-every", type=float, default=10.0, help="soak: seconds")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="soak: warm-up seconds")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("run.py needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    command = shlex.join(["python", "benchmarks/reliability/run.py", *argv])
    RESULTS.mkdir(exist_ok=True)
    chosen = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    defaults = {
        "rolling": (1000.0, 12.0),
        "kill9": (200.0, 3.0),
        "apiserver": (200.0, 0.0),
        "soak": (200.0, 0.0),
    }
    for name in chosen:
        rate, every = defaults[name]
        scenario_args = argparse.Namespace(**vars(args))
        scenario_args.rate = args.rate or rate
        scenario_args.every = args.every or every
        env = environment(command)
        tmp = Path(f"/tmp/rapproxy-reliability-{os.getpid()}-{name}")
        tmp.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(run_scenario(name, tmp, scenario_args))
        env["load_average_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%MZ")
        base = RESULTS / f"{name}-{stamp}{'-' + args.tag if args.tag else ''}"
        base.with_suffix(".json").write_text(json.dumps({"env": env, **result}, indent=1) + "\n")
        base.with_suffix(".md").write_text(markdown(result, env))
        print(base.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
