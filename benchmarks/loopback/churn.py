"""Churn run: minutes of connection-close load plus clients that reset mid-stream.

Issue 2 asks that the proxy survive this with no file-descriptor growth. A relay that leaks one
socket per reset, or a uvloop callback that touches a dead transport (references.md: a naive
uvloop relay aborted with "double free or corruption" under exactly this load), shows up here
and not in a 10-second benchmark.

In one fresh namespace (testbed.py: nginx and the real rapproxy daemon, ClusterIP via REDIRECT):
- wrk -t1 -c32 -H 'Connection: close' against the ClusterIP for the whole duration;
- a client process inside the namespace (this script with --clients) runs a few threads that
  repeatedly connect through the ClusterIP and misbehave, in turn:
  * start a 10 MiB download, read part of it, then close with SO_LINGER 0 (RST);
  * send half a request, then RST;
  * connect and RST at once (the relay may still be dialling its upstream);
- every few seconds, the daemon's fd count (/proc/PID/fd), RSS and CPU are sampled.
At the end the load stops, and the run passes when the daemon is alive, still serves a request,
and its fd count has come back to the baseline taken before the load (within a small tolerance).

Usage (root): `make bench-churn` or `.venv/bin/python benchmarks/loopback/churn.py
[--duration 300] [--sample-every 5] [--output DIR]`; exit status 1 when the run fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from testbed import (
    RAPPROXY_VIP,
    SERVICE_PORT,
    Testbed,
    TestbedError,
    cpu_seconds,
    fd_count,
    install_signal_handlers,
    machine_note,
    require_root_and_tools,
    rss_bytes,
    versions,
)

RESULTS = Path(__file__).resolve().parent / "results"
FD_TOLERANCE = 4
LINGER_ZERO = struct.pack("ii", 1, 0)
CLIENT_THREADS = 4
CLIENT_PAUSE = 0.005
WRK_ERRORS = ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
MAX_CLIENT_CONNECTIONS = 200_000  # a hard bound on the misbehaving clients, whatever the duration


# -- the misbehaving clients (run inside the namespace by `--clients`) --------------------------


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
    sock.close()


def _one_client(kind: str, rng: random.Random, counts: dict[str, int]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect((RAPPROXY_VIP, SERVICE_PORT))
        if kind == "download_then_rst":
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: bench\r\n\r\n")
            want = rng.randint(16 * 1024, 1024 * 1024)
            got = 0
            while got < want:
                chunk = sock.recv(65536)
                if not chunk:
                    counts["download_ended_early"] += 1
                    break
                got += len(chunk)
            counts["bytes_read"] += got
        elif kind == "half_request_then_rst":
            sock.sendall(b"GET /big HTTP/1.1\r\nHo")
            time.sleep(rng.uniform(0, 0.02))
        # "connect_then_rst": nothing to send; reset at once.
        counts[kind] += 1
    except OSError as error:
        counts[f"{kind}_error_{type(error).__name__}"] += 1
    finally:
        try:
            _reset(sock)
        except OSError:
            sock.close()


def run_clients(duration: float, threads: int, limit: int) -> dict[str, int]:
    kinds = ("download_then_rst", "half_request_then_rst", "connect_then_rst")
    deadline = time.monotonic() + duration
    lock = threading.Lock()
    started = [0]
    totals: dict[str, int] = {}

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        counts: dict[str, int] = _Counter()
        i = 0
        while time.monotonic() < deadline:
            with lock:
                if started[0] >= limit:
                    break
                started[0] += 1
            _one_client(kinds[i % len(kinds)], rng, counts)
            i += 1
            time.sleep(CLIENT_PAUSE)  # leave most of the 2 cores to the connection-close load
        with lock:
            for k, v in counts.items():
                totals[k] = totals.get(k, 0) + v

    pool = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=duration + 30)
    totals["connections_started"] = started[0]
    return totals


class _Counter(dict[str, int]):
    def __missing__(self, key: str) -> int:
        return 0


# -- the orchestrator ------------------------------------------------------------------------


def metric_lines(bed: Testbed) -> list[str]:
    try:
        text = bed.get("http://127.0.0.1:10249/metrics", timeout=5)
    except TestbedError as error:
        return [f"metrics unavailable: {error}"]
    return [
        line
        for line in text.splitlines()
        if line.startswith(("rapproxy_connections", "rapproxy_dial_failures"))
    ]


def sample(bed: Testbed, pid: int, t0: float) -> dict[str, Any]:
    return {
        "t_s": round(time.monotonic() - t0, 1),
        "fds": fd_count(pid),
        "rss_mib": round(rss_bytes(pid) / 2**20, 1),
        "cpu_s": round(cpu_seconds(pid), 2),
    }


def settle_fds(pid: int, baseline: int, deadline_s: float) -> int:
    """The fd count once it is back within tolerance, or the last count seen at the deadline."""
    deadline = time.monotonic() + deadline_s
    count = fd_count(pid)
    while count > baseline + FD_TOLERANCE and time.monotonic() < deadline:
        time.sleep(0.2)
        count = fd_count(pid)
    return count


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Churn run — {report['started_utc']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"**Verdict: {'PASS' if report['passed'] else 'FAIL'}** — " + "; ".join(report["checks"]),
        "",
        "Machine: {cpus} CPUs ({cpu_model}), {mem_gib} GiB, kernel {kernel}.".format(
            **report["machine"]
        ),
        f"Load average before / after: {report['loadavg_before']} / {report['loadavg_after']}.",
        "",
        "Versions: " + ", ".join(f"{k} `{v}`" for k, v in report["versions"].items()),
        "",
        "## Load",
        "",
        f"- {report['wrk_command']}: {report['wrk']['requests']:,} requests "
        f"({report['wrk']['requests'] / max(report['duration_s'], 1):,.0f}/s), errors: "
        + (", ".join(f"{k} {v}" for k, v in report["wrk"]["errors"].items() if v) or "none")
        + ".",
        f"- misbehaving clients ({CLIENT_THREADS} threads, {CLIENT_PAUSE * 1000:g} ms pause "
        f"between connections, at most {MAX_CLIENT_CONNECTIONS:,} connections): "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(report["clients"].items())),
        "",
        "## rapproxy process",
        "",
        f"fd baseline {report['fd_baseline']}, peak {report['fd_peak']}, after the load "
        f"{report['fd_after']} (tolerance ±{FD_TOLERANCE}); RSS {report['rss_mib_start']} → "
        f"{report['rss_mib_end']} MiB; CPU {report['cpu_s_used']} s over the run.",
        "",
        "| t (s) | fds | RSS MiB | CPU s |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {s['t_s']} | {s['fds']} | {s['rss_mib']} | {s['cpu_s']} |" for s in report["samples"]
    ]
    lines += ["", "Metrics at the end:", "", "```", *report["metrics_end"], "```", ""]
    if report["log_problems"]:
        lines += ["Warning/error lines in the daemon's log (first 20):", "", "```"]
        lines += [*report["log_problems"], "```", ""]
    return "\n".join(lines)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def orchestrate(args: argparse.Namespace) -> int:
    require_root_and_tools()
    install_signal_handlers()
    started = datetime.datetime.now(datetime.UTC)
    report: dict[str, Any] = {
        "started_utc": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv]),
        "duration_s": args.duration,
        "machine": machine_note(),
        "versions": versions(),
        "loadavg_before": loadavg(),
    }
    samples: list[dict[str, Any]] = []
    with Testbed() as bed:
        bed.start(with_haproxy=False, with_dnat=False)
        pid = bed.pid("rapproxy")
        url = f"http://{RAPPROXY_VIP}:{SERVICE_PORT}/"
        bed.wrk(url, duration=2, connections=8, close=True)  # warm up: imports, first relays
        baseline = settle_fds(pid, 0, 5)  # nothing in flight: take what it settles to
        report["fd_baseline"] = baseline
        report["rss_mib_start"] = round(rss_bytes(pid) / 2**20, 1)
        cpu0 = cpu_seconds(pid)
        t0 = time.monotonic()
        samples.append(sample(bed, pid, t0))
        wrk_argv = ["wrk", "-t1", "-c32", f"-d{args.duration:g}s", "--timeout=5s"]
        wrk_argv += ["-s", str(bed.dir / "summary.lua"), "-H", "Connection: close", url]
        report["wrk_command"] = " ".join(shlex.quote(a) for a in wrk_argv)
        wrk = subprocess.Popen(bed.exec_argv(wrk_argv), stdout=subprocess.PIPE, text=True)
        bed.processes["wrk"] = wrk
        clients = subprocess.Popen(
            bed.exec_argv(
                [sys.executable, __file__, "--clients", "--duration", f"{args.duration:g}"]
            ),
            stdout=subprocess.PIPE,
            text=True,
        )
        bed.processes["clients"] = clients
        end = t0 + args.duration
        while time.monotonic() < end:
            time.sleep(min(args.sample_every, max(0.0, end - time.monotonic())))
            samples.append(sample(bed, pid, t0))
            print(
                f"t={samples[-1]['t_s']:6.1f}s fds={samples[-1]['fds']:5} "
                f"rss={samples[-1]['rss_mib']} MiB cpu={samples[-1]['cpu_s']} s",
                flush=True,
            )
        wrk_out, _ = wrk.communicate(timeout=90)
        clients_out, _ = clients.communicate(timeout=90)
        summary: dict[str, float] = next(
            (json.loads(x[8:]) for x in wrk_out.splitlines() if x.startswith("WRKJSON ")), {}
        )
        report["wrk"] = {
            "requests": int(summary.get("requests", 0)),
            "errors": {k: int(summary.get(k, 0)) for k in WRK_ERRORS},
        }
        report["clients"] = json.loads(clients_out.strip().splitlines()[-1]) if clients_out else {}
        alive = bed.processes["rapproxy"].poll() is None
        fd_after = settle_fds(pid, baseline, 30) if alive else -1
        samples.append(sample(bed, pid, t0) if alive else {"t_s": "end", "fds": "dead"})
        serves = False
        if alive:
            try:
                serves = bed.get(url) == "ok\n"
            except TestbedError:
                serves = False
        report["fd_after"] = fd_after
        report["fd_peak"] = max(int(s["fds"]) for s in samples if isinstance(s["fds"], int))
        report["rss_mib_end"] = round(rss_bytes(pid) / 2**20, 1) if alive else None
        report["cpu_s_used"] = round(cpu_seconds(pid) - cpu0, 1) if alive else None
        report["metrics_end"] = metric_lines(bed) if alive else []
        report["log_problems"] = [
            line
            for line in bed.log("rapproxy", tail=1_000_000).splitlines()
            if " E " in line or " W " in line or "Traceback" in line or "relay bug" in line
        ][:20]
        if not alive:
            report["daemon_log_tail"] = bed.log("rapproxy", tail=60)
    fd_ok = alive and fd_after <= baseline + FD_TOLERANCE
    report["checks"] = [
        f"daemon alive: {alive}",
        f"serves after the churn: {serves}",
        f"fds back to baseline: {fd_ok} ({baseline} → {fd_after})",
    ]
    report["passed"] = alive and serves and fd_ok
    report["samples"] = samples
    report["loadavg_after"] = loadavg()
    args.output.mkdir(parents=True, exist_ok=True)
    stem = f"churn-{started.strftime('%Y-%m-%dT%H%MZ')}"
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    markdown = render_markdown(report)
    (args.output / f"{stem}.md").write_text(markdown)
    print(markdown)
    print(f"wrote {args.output / stem}.md and .json")
    return 0 if report["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--output", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--clients", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.duration <= 0:
        parser.error("--duration must be positive")
    if args.clients:  # inside the namespace, started by the orchestrator
        counts = run_clients(args.duration, CLIENT_THREADS, MAX_CLIENT_CONNECTIONS)
        print(json.dumps(counts, sort_keys=True))
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TestbedError as error:
        sys.exit(f"churn run failed: {error}")
