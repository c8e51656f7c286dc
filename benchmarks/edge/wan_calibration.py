"""Does the emulated WAN add the delay it is asked for, at the packet rates the benchmarks use?

Builds a 2-node `EdgeCluster` and, for each one-way delay (default 0, 5, 10, 20, 40 ms between
node-1 and node-2), measures from node-1:

* **ping**: ICMP echo RTTs to node-2 (raw socket; no `ping` binary here) — median, p10, p90;
  the *added* RTT is the median minus the 0 ms median, and should be 2 x delay ± 10 %;
* **request/response**: wrk (keep-alive, `--latency`) against `rapproxy.testing.backend` on
  node-2, with as many connections as it takes to offer ~4k req/s (closed loop: connections ≈
  rate x RTT), so the forwarder carries tens of thousands of packets per second; the added p50
  is compared with 2 x delay the same way. wrk is closed-loop and under-reports tail latency
  (coordinated omission); the p99 is printed for orientation only;
* the forwarder's own figures: packets, drops, its bias (how early it releases to make up for
  late wake-ups) and hold error (release time minus asked-for time) during the wrk run, and its
  CPU use.

Usage (root): `.venv/bin/python benchmarks/edge/wan_calibration.py [--delays 0 5 10 20 40]
[--pings 60] [--seconds 5] [--rate 4000] [--output benchmarks/edge/results]`.
Writes `wan-calibration-<UTC date-time>.md` there and prints the same tables.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import re
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from rapproxy.testing.edge.cluster import EdgeCluster
from rapproxy.testing.edge.delays import DelayMatrix
from rapproxy.testing.edge.measure import icmp_rtts, wait_port

PORT = 8080
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


@dataclass(frozen=True)
class PingRow:
    one_way_ms: float
    median_ms: float
    p10_ms: float
    p90_ms: float
    lost: int


@dataclass(frozen=True)
class WrkRow:
    one_way_ms: float
    connections: int
    rate: float
    p50_ms: float
    p99_ms: float
    errors: int
    forwarder_cpu: float
    packets_per_second: float
    hold_error_us: float
    bias_us: float
    dropped: int
    loaded_ping_ms: float


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def parse_wrk(text: str) -> tuple[float, float, float, int]:
    """(req/s, p50 ms, p99 ms, socket errors + non-2xx) from `wrk --latency` output."""

    def latency(label: str) -> float:
        match = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
        if match is None:
            raise ValueError(f"wrk output without a {label} latency:\n{text}")
        return float(match.group(1)) * _UNITS[match.group(2)]

    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if rate is None:
        raise ValueError(f"wrk output without Requests/sec:\n{text}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors += int(non_2xx.group(1)) if non_2xx else 0
    return float(rate.group(1)), latency("50%"), latency("99%"), errors


def connections_for(rate: float, one_way_ms: float) -> int:
    rtt_seconds = (2 * one_way_ms + 0.5) / 1000
    return max(8, min(256, round(rate * rtt_seconds)))


async def measure(args: argparse.Namespace) -> tuple[list[PingRow], list[WrkRow], dict[str, str]]:
    pings: list[PingRow] = []
    loads: list[WrkRow] = []
    async with EdgeCluster(2) as cluster:
        assert cluster.wan is not None
        client, server = cluster.node("node-1"), cluster.node("node-2")
        backend = [sys.executable, "-m", "rapproxy.testing.backend", "--name", "b"]
        await server.spawn([*backend, "--http", f"{server.ip}:{PORT}"])
        await client.call(wait_port, server.ip, PORT, 15.0)
        forwarder = psutil.Process(cluster.wan.forwarder_pid)
        info = {"bias_us": f"{cluster.wan.bias_us:.0f}"}
        for one_way in args.delays:
            await cluster.set_delays(DelayMatrix.symmetric({("node-1", "node-2"): one_way}))
            rtts = await client.call(icmp_rtts, server.ip, args.pings, 0.01)
            ms = [r * 1000 for r in rtts]
            pings.append(
                PingRow(
                    one_way,
                    statistics.median(ms),
                    percentile(ms, 0.1),
                    percentile(ms, 0.9),
                    args.pings - len(ms),
                )
            )
            connections = connections_for(args.rate, one_way)
            before = await cluster.wan_stats()
            cpu_before = sum(forwarder.cpu_times()[:2])
            wall_before = asyncio.get_running_loop().time()
            process = await client.spawn(
                [
                    *("wrk", "-t2", f"-c{connections}", f"-d{args.seconds}s", "--latency"),
                    f"http://{server.ip}:{PORT}/",
                ],
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            communicate = asyncio.ensure_future(process.communicate())
            # ICMP echoes alongside the load: the WAN's delay at this packet rate, without the
            # backend's and wrk's queueing that the HTTP latency also contains.
            loaded = await client.call(icmp_rtts, server.ip, args.pings, 0.02)
            out, _ = await asyncio.wait_for(communicate, args.seconds + 30)
            wall = asyncio.get_running_loop().time() - wall_before
            cpu = (sum(forwarder.cpu_times()[:2]) - cpu_before) / wall
            after = await cluster.wan_stats()
            rate, p50, p99, errors = parse_wrk(out.decode())
            loads.append(
                WrkRow(
                    one_way,
                    connections,
                    rate,
                    p50,
                    p99,
                    errors,
                    cpu,
                    (after["received"] - before["received"]) / wall,
                    (after["hold_error_total_us"] - before["hold_error_total_us"])
                    / max(1, after["hold_error_count"] - before["hold_error_count"]),
                    after["bias_us"],
                    after["dropped"] - before["dropped"],
                    statistics.median(loaded) * 1000,
                )
            )
            print(f"  {one_way:g} ms: ping {pings[-1].median_ms:.2f} ms, wrk {rate:.0f} req/s")
    return pings, loads, info


def verdict(added: float, wanted: float) -> str:
    if wanted == 0:
        return "—"
    error = added / wanted - 1
    return f"{error:+.1%} {'ok' if abs(error) <= 0.10 else 'OUT'}"


def render(pings: list[PingRow], loads: list[WrkRow], info: dict[str, str], command: str) -> str:
    base_ping = next(p.median_ms for p in pings if p.one_way_ms == 0)
    base_p50 = next(w.p50_ms for w in loads if w.one_way_ms == 0)
    lines = [
        f"# WAN calibration — {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{command}`",
        f"Host: {platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}. Forwarder bias calibrated at start (idle wake-up "
        f"lateness): {info['bias_us']} µs.",
        "",
        "2-node EdgeCluster, node-1 → node-2, symmetric one-way delay. *Added* = figure minus "
        "the same figure at 0 ms; target 2 x one-way ± 10 %.",
        "",
        "## ICMP ping",
        "",
        "| one-way ms | RTT median ms | p10 | p90 | added ms | vs 2xdelay | lost |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in pings:
        added = p.median_ms - base_ping
        lines.append(
            f"| {p.one_way_ms:g} | {p.median_ms:.3f} | {p.p10_ms:.3f} | {p.p90_ms:.3f} "
            f"| {added:.3f} | {verdict(added, 2 * p.one_way_ms)} | {p.lost} |"
        )
    lines += [
        "",
        "## HTTP request/response (wrk, keep-alive, rapproxy.testing.backend)",
        "",
        "wrk is closed-loop: p99 under-reports the tail (coordinated omission).",
        "",
        "*ping under load*: ICMP echoes sent during the wrk run (added = minus the idle 0 ms "
        "median): the WAN's delay at this packet rate. The HTTP p50 adds the backend's and "
        "wrk's own queueing on top (one single-threaded Python backend, 2 CPUs shared by "
        "client, server and forwarder). *Hold error*: mean of release time minus asked-for "
        "time of the packets held during the run (per direction); *bias*: how early the "
        "forwarder releases at the end of the run, tracking its wake-up lateness.",
        "",
        "| one-way ms | conns | req/s | WAN packets/s | ping under load ms | added | vs 2xdelay "
        "| HTTP p50 ms | added p50 | vs 2xdelay | p99 ms | errors | forwarder CPU "
        "| hold error µs | bias µs | drops |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in loads:
        added = w.p50_ms - base_p50
        ping_added = w.loaded_ping_ms - base_ping
        hold_error = f"{w.hold_error_us:+.0f}" if w.one_way_ms else "—"
        lines.append(
            f"| {w.one_way_ms:g} | {w.connections} | {w.rate:.0f} | {w.packets_per_second:.0f} "
            f"| {w.loaded_ping_ms:.3f} | {ping_added:.3f} | {verdict(ping_added, 2 * w.one_way_ms)} "
            f"| {w.p50_ms:.2f} | {added:.2f} | {verdict(added, 2 * w.one_way_ms)} "
            f"| {w.p99_ms:.2f} | {w.errors} | {w.forwarder_cpu:.0%} | {hold_error} "
            f"| {w.bias_us:.0f} | {w.dropped} |"
        )
    lines += ["", "## Summary", ""]
    for label, rows in (
        ("idle ping", [(p.one_way_ms, p.median_ms - base_ping) for p in pings]),
        ("ping under load", [(w.one_way_ms, w.loaded_ping_ms - base_ping) for w in loads]),
        (
            "HTTP p50 (WAN + server/client queueing)",
            [(w.one_way_ms, w.p50_ms - base_p50) for w in loads],
        ),
    ):
        checked = [(d, added) for d, added in rows if d > 0]
        out = [
            f"{d:g} ms ({added / (2 * d) - 1:+.1%})"
            for d, added in checked
            if abs(added / (2 * d) - 1) > 0.10
        ]
        lines.append(
            f"- {label}: {len(checked) - len(out)}/{len(checked)} delays within ±10 %"
            + (f"; outside: {', '.join(out)}" if out else "")
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delays", type=float, nargs="+", default=[0, 5, 10, 20, 40])
    parser.add_argument("--pings", type=int, default=60)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rate", type=float, default=4000.0, help="offered req/s to aim for")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("wan_calibration needs root (network namespaces, TUN, tc)")
    if 0 not in args.delays:
        args.delays = [0.0, *args.delays]
    command = shlex.join([".venv/bin/python", "benchmarks/edge/wan_calibration.py", *sys.argv[1:]])
    pings, loads, info = asyncio.run(measure(args))
    report = render(pings, loads, info, command)
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"wan-calibration-{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M}.md"
    path.write_text(report)
    print(report)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
