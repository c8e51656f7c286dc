"""Loopback benchmark: rapproxy side by side with no proxy, HAProxy and a kernel DNAT rule.

Issues 2 and 12 set targets against HAProxy (TCP mode, as many threads as rapproxy has relay
processes): keep-alive req/s ≥ 1.0x, connection-close req/s ≥ 0.8x, bulk MB/s ≥ 1.5x, proxy CPU
per request ≤ 1.5x; and redis GET through the ClusterIP ≥ 0.8x the direct rps with p99 ≤ 2x
direct (redis-benchmark, when redis-server is installed). Issue 13 sets rapproxy's kernel mode
(a Service DNATed by its own chains, kube-proxy's layout) against a plain DNAT rule: ≥ 0.9x in
keep-alive, close and bulk. This script measures all paths in one run, in one fresh network
namespace (see testbed.py), so the ratios compare like with like on the same machine at the
same time.

Each round runs every test against every target, interleaved (keep-alive: direct, haproxy,
rapproxy, dnat; then close: ...; then bulk: ...), and the figures reported are medians over the
rounds: the machine is small and shared, and a neighbour's burst should land on all targets, not
on one. Load comes from wrk (one thread, closed loop): it sends the next request only when the
previous one answered, so its percentiles under-report tail latency (coordinated omission).

Usage (root): `make bench-loopback` or `.venv/bin/python benchmarks/loopback/run.py
[--duration S] [--rounds N] [--workers N] [--relay-engine native|asyncio] [--quick] [--targets a,b,...] [--output DIR]`.
`--workers N` runs rapproxy with `proxy.workers=N` and HAProxy with `nbthread N`
(`--haproxy-threads` to differ); proxy CPU is summed over rapproxy's worker processes. Results go to
`benchmarks/loopback/results/loopback-<UTC date-time>.{md,json}`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed import (
    BACKEND_IP,
    REDIS_VIP,
    TARGETS,
    Target,
    Testbed,
    TestbedError,
    cpu_seconds,
    install_signal_handlers,
    machine_note,
    require_root_and_tools,
    rss_bytes,
    versions,
)

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True, slots=True)
class Test:
    name: str
    path: str
    connections: int
    close: bool
    describe: str


TESTS = (
    Test("keepalive", "/", 32, False, "wrk -t1 -c32, GET / (3-byte body), keep-alive"),
    Test(
        "close",
        "/",
        32,
        True,
        "wrk -t1 -c32 -H 'Connection: close', GET / — one TCP connection per request",
    ),
    Test("bulk", "/big", 4, False, "wrk -t1 -c4, GET /big (10 MiB body), keep-alive"),
)

REDIS_TARGETS = {"direct": BACKEND_IP, "rapproxy": REDIS_VIP}
REDIS_DESCRIBE = "redis-benchmark -t get -c 50 -n 100000 (keep-alive clients), direct vs ClusterIP"

# (test, metric, minimum rapproxy/haproxy ratio or maximum for CPU, "min"/"max")
GOALS = (
    ("keepalive", "req_s", 1.0, "min"),
    ("close", "req_s", 0.8, "min"),
    ("bulk", "mb_s", 1.5, "min"),
    ("keepalive", "cpu_ms_per_1k", 1.5, "max"),
    ("close", "cpu_ms_per_1k", 1.5, "max"),
)
# Issue 13: (test, metric, minimum kernel-mode/plain-DNAT ratio).
KERNEL_GOALS = (
    ("keepalive", "req_s", 0.9),
    ("close", "req_s", 0.9),
    ("bulk", "mb_s", 0.9),
)


def tree_cpu(bed: Testbed, name: str) -> float:
    return sum(cpu_seconds(pid) for pid in bed.process_tree(name))


def measure_redis(bed: Testbed, target: str) -> dict[str, Any]:
    cpu0 = tree_cpu(bed, "rapproxy") if target == "rapproxy" else 0.0
    summary = bed.redis_benchmark(REDIS_TARGETS[target])
    cpu = tree_cpu(bed, "rapproxy") - cpu0 if target == "rapproxy" else None
    return {
        "rps": summary["rps"],
        "p50_ms": summary["p50_latency_ms"],
        "p99_ms": summary["p99_latency_ms"],
        "max_ms": summary["max_latency_ms"],
        "cpu_ms_per_1k": (cpu / 100_000 * 1e6) if cpu else None,
    }


def measure(bed: Testbed, target: Target, test: Test, duration: float) -> dict[str, Any]:
    if target.process:
        bed.pid(target.process)  # raises if it died
    nginx_pid = bed.nginx_worker_pid()
    proxy_cpu0 = tree_cpu(bed, target.process) if target.process else 0.0
    nginx_cpu0 = cpu_seconds(nginx_pid) if nginx_pid else 0.0
    dnat0 = bed.dnat_packets() if target.name == "dnat" else 0
    kernel0 = bed.kernel_packets() if target.name == "kernel" else 0
    summary = bed.wrk(
        target.url + test.path, duration=duration, connections=test.connections, close=test.close
    )
    proxy_cpu = (tree_cpu(bed, target.process) - proxy_cpu0) if target.process else None
    nginx_cpu = (cpu_seconds(nginx_pid) - nginx_cpu0) if nginx_pid else None
    seconds = summary["duration_us"] / 1e6
    requests = summary["requests"]
    errors = sum(
        int(summary[k])
        for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    result: dict[str, Any] = {
        "requests": int(requests),
        "seconds": round(seconds, 3),
        "req_s": requests / seconds,
        "mb_s": summary["bytes"] / seconds / 1e6,
        "p50_ms": summary["p50_us"] / 1000,
        "p99_ms": summary["p99_us"] / 1000,
        "max_ms": summary["max_us"] / 1000,
        "errors": errors,
        "error_detail": {
            k: int(summary[k])
            for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
        },
        "proxy_cpu_s": proxy_cpu,
        "cpu_ms_per_1k": (proxy_cpu / requests * 1000 * 1000) if proxy_cpu and requests else None,
        "cpu_s_per_gb": (proxy_cpu / (summary["bytes"] / 1e9))
        if proxy_cpu and summary["bytes"]
        else None,
        "nginx_cpu_ms_per_1k": (nginx_cpu / requests * 1e6) if nginx_cpu and requests else None,
    }
    if target.name == "dnat":
        # The DNAT rule sees only the first packet of each connection: its counter is the number
        # of connections the kernel translated. Non-zero proves the traffic took the rule.
        result["dnat_new_connections"] = bed.dnat_packets() - dnat0
        if result["dnat_new_connections"] < test.connections:
            raise TestbedError(
                f"DNAT counter moved by {result['dnat_new_connections']} during {test.name}: "
                "traffic did not take the DNAT rule"
            )
    if target.name == "kernel":
        after = bed.kernel_packets()
        # rapproxy's periodic full resync (every 30 s) rewrites its chains, which zeroes their
        # counters; keep-alive connections all open in the first milliseconds, so a reset during
        # the measurement leaves nothing to count, and the counter then proves nothing either
        # way (a reset can also leave it exactly where it started). Then the proof is the
        # proxy's CPU: relaying any of these tests keeps it busy most of a core, the kernel
        # path leaves it to its background work.
        counted = after - kernel0
        busy = (proxy_cpu or 0.0) / seconds if seconds > 0 else 0.0
        reset = counted < test.connections and requests > 0 and busy < KERNEL_PATH_MAX_BUSY
        result["kernel_new_connections"] = None if reset else counted
        result["kernel_counter_reset"] = reset
        if not reset and counted < test.connections:
            raise TestbedError(
                f"kernel-mode SEP counter moved by {counted} during {test.name} and the proxy"
                f" was busy {busy:.0%} of a core: traffic did not take the kernel path"
            )
    return result


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(
    raw: dict[str, dict[str, list[dict[str, Any]]]],
) -> dict[str, dict[str, dict[str, float | None]]]:
    keys = (
        *("req_s", "mb_s", "p50_ms", "p99_ms", "max_ms", "errors"),
        *("cpu_ms_per_1k", "cpu_s_per_gb", "nginx_cpu_ms_per_1k"),
    )
    return {
        test: {target: {k: median_of(runs, k) for k in keys} for target, runs in by_target.items()}
        for test, by_target in raw.items()
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def paired_ratios(
    raw: dict[str, dict[str, list[dict[str, Any]]]],
    test: str,
    key: str,
    base: str,
    subject: str = "rapproxy",
) -> list[float]:
    """subject/base for each round separately: the spread shows how much noise there was."""
    out = []
    for mine, theirs in zip(raw[test].get(subject, []), raw[test].get(base, []), strict=False):
        r = ratio(mine.get(key), theirs.get(key))
        if r is not None:
            out.append(round(r, 3))
    return out


def verdicts(
    medians: dict[str, dict[str, dict[str, float | None]]],
    raw: dict[str, dict[str, list[dict[str, Any]]]],
) -> list[dict[str, Any]]:
    """Judge each goal on the median of the per-round rapproxy/HAProxy ratios.

    Paired ratios (same round, measured seconds apart) cancel most of the machine's drift; the
    ratio of the medians is kept beside it, since it can land on the other side of a goal when
    the rounds disagree.
    """
    out = []
    for test, key, bound, kind in GOALS:
        paired = paired_ratios(raw, test, key, "haproxy")
        r = statistics.median(paired) if paired else None
        ok = None if r is None else (r >= bound if kind == "min" else r <= bound)
        of_medians = ratio(
            _median(medians, test, "rapproxy", key), _median(medians, test, "haproxy", key)
        )
        vs_nat = paired_ratios(raw, test, key, "haproxy-nat")
        out.append(
            {
                "test": test,
                "metric": key,
                "goal": f"{'≥' if kind == 'min' else '≤'} {bound}x HAProxy",
                "ratio": None if r is None else round(r, 3),
                "ratio_of_medians": None if of_medians is None else round(of_medians, 3),
                "per_round": paired,
                "vs_haproxy_nat": round(statistics.median(vs_nat), 3) if vs_nat else None,
                "met": ok,
            }
        )
    return out


def kernel_verdicts(
    medians: dict[str, dict[str, dict[str, float | None]]],
    raw: dict[str, dict[str, list[dict[str, Any]]]],
) -> list[dict[str, Any]]:
    """Issue 13: kernel mode against plain DNAT, judged like `verdicts` (paired ratios)."""
    out = []
    for test, key, bound in KERNEL_GOALS:
        paired = paired_ratios(raw, test, key, "dnat", subject="kernel")
        r = statistics.median(paired) if paired else None
        of_medians = ratio(
            _median(medians, test, "kernel", key), _median(medians, test, "dnat", key)
        )
        out.append(
            {
                "test": test,
                "metric": key,
                "goal": f"≥ {bound}x plain DNAT",
                "ratio": None if r is None else round(r, 3),
                "ratio_of_medians": None if of_medians is None else round(of_medians, 3),
                "per_round": paired,
                "met": None if r is None else r >= bound,
            }
        )
    return out


def redis_verdicts(raw_redis: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Issue 12's redis goals, on the median of per-round rapproxy/direct ratios."""
    out = []
    for key, bound, kind in (("rps", 0.8, "min"), ("p99_ms", 2.0, "max")):
        paired = [
            round(m[key] / d[key], 3)
            for m, d in zip(
                raw_redis.get("rapproxy", []), raw_redis.get("direct", []), strict=False
            )
            if d[key]
        ]
        r = statistics.median(paired) if paired else None
        out.append(
            {
                "test": "redis",
                "metric": key,
                "goal": f"{'≥' if kind == 'min' else '≤'} {bound}x direct",
                "ratio": r,
                "per_round": paired,
                "met": None if r is None else (r >= bound if kind == "min" else r <= bound),
            }
        )
    return out


def _median(
    medians: dict[str, dict[str, dict[str, float | None]]], test: str, target: str, key: str
) -> float | None:
    return medians.get(test, {}).get(target, {}).get(key)


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    medians = report["medians"]
    lines = [
        f"# Loopback benchmark — {report['started_utc']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Rounds: {report['rounds']} (interleaved), {report['duration_s']:g} s per measurement; "
        "figures are medians over the rounds.",
        "",
        "Machine: {cpus} CPUs ({cpu_model}), {mem_gib} GiB, kernel {kernel}; pinning: {pinning}."
        "".format(**report["machine"]),
        f"Load average before / after: {report['loadavg_before']} / {report['loadavg_after']} "
        "(the machine is shared; other jobs may have run).",
        "",
        "Versions: " + ", ".join(f"{k} `{v}`" for k, v in report["versions"].items()),
        "",
        "Targets (all inside one network namespace, backend nginx with one worker):",
        "",
    ]
    lines += [f"- **{t['name']}**: {t['note']}" for t in report["targets"]]
    lines += [""]
    for test in TESTS:
        lines += [f"## {test.name}: {test.describe}", ""]
        if test.name == "bulk":
            lines += [
                "| target | MB/s | req/s | p50 ms | p99 ms | errors | proxy CPU s per GB |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for target, m in medians[test.name].items():
                lines.append(
                    f"| {target} | {fmt(m['mb_s'])} | {fmt(m['req_s'], 1)} | "
                    f"{fmt(m['p50_ms'], 2)} | {fmt(m['p99_ms'], 2)} | {fmt(m['errors'])} | "
                    f"{fmt(m['cpu_s_per_gb'], 3)} |"
                )
        else:
            lines += [
                "| target | req/s | p50 ms | p99 ms | errors | proxy CPU ms per 1k req "
                "| nginx CPU ms per 1k req |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for target, m in medians[test.name].items():
                lines.append(
                    f"| {target} | {fmt(m['req_s'])} | {fmt(m['p50_ms'], 2)} | "
                    f"{fmt(m['p99_ms'], 2)} | {fmt(m['errors'])} | {fmt(m['cpu_ms_per_1k'], 1)} "
                    f"| {fmt(m['nginx_cpu_ms_per_1k'], 1)} |"
                )
        lines += [""]
    lines += [
        "Latency percentiles come from wrk, which is closed-loop: a slow response delays the next "
        "request instead of queueing it, so p99 under-reports the tail an open-loop client would "
        "see (coordinated omission). Proxy CPU is utime+stime of the proxy process from "
        "/proc/PID/stat; direct and DNAT have no proxy process (the DNAT cost is kernel softirq "
        "time charged to whichever process happens to run), hence n/a. CPU s per GB is the "
        "proxy's CPU for the bulk test divided by the bytes wrk received.",
        "",
        "## rapproxy against the issue's targets (same run)",
        "",
        "The verdict uses the median of the per-round ratios (each round measures both proxies "
        "seconds apart, which cancels most of the machine's drift); the ratio of the medians of "
        "the tables above is shown beside it.",
        "",
        "| test | metric | goal | rapproxy / HAProxy (median of rounds) | per-round ratios "
        "| ratio of medians | verdict | rapproxy / HAProxy behind the same REDIRECT |",
        "|---|---|---|---:|---|---:|---|---:|",
    ]
    for v in report["verdicts"]:
        verdict = {True: "met", False: "**short**", None: "n/a"}[v["met"]]
        lines.append(
            f"| {v['test']} | {v['metric']} | {v['goal']} | {fmt(v['ratio'], 2)} | "
            f"{', '.join(f'{r:.2f}' for r in v['per_round'])} | "
            f"{fmt(v['ratio_of_medians'], 2)} | {verdict} | {fmt(v.get('vs_haproxy_nat'), 2)} |"
        )
    if report.get("redis_medians"):
        lines += [
            "",
            f"## redis: {REDIS_DESCRIBE}",
            "",
            "| target | GET rps | p50 ms | p99 ms | max ms | proxy CPU ms per 1k requests |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for target, m in report["redis_medians"].items():
            lines.append(
                f"| {target} | {fmt(m['rps'])} | {fmt(m['p50_ms'], 3)} | {fmt(m['p99_ms'], 3)} "
                f"| {fmt(m['max_ms'], 3)} | {fmt(m['cpu_ms_per_1k'], 1)} |"
            )
        lines += [
            "",
            "| metric | goal | rapproxy / direct (median of rounds) | per-round | verdict |",
        ]
        lines += ["|---|---|---:|---|---|"]
        for v in report["redis_verdicts"]:
            verdict = {True: "met", False: "**short**", None: "n/a"}[v["met"]]
            lines.append(
                f"| {v['metric']} | {v['goal']} | {fmt(v['ratio'], 2)} | "
                f"{', '.join(f'{r:.2f}' for r in v['per_round'])} | {verdict} |"
            )
        lines += [
            "",
            "redis-benchmark's 50 clients each wait for a reply before the next request (closed "
            "loop, like wrk): its percentiles under-report the tail as well.",
        ]
    lines += [
        "",
        "## Kernel mode against plain DNAT (issue 13, same run)",
        "",
        "| test | metric | goal | kernel / DNAT (median of rounds) | per-round ratios "
        "| ratio of medians | verdict |",
        "|---|---|---|---:|---|---:|---|",
    ]
    for v in report.get("kernel_verdicts", []):
        verdict = {True: "met", False: "**short**", None: "n/a"}[v["met"]]
        lines.append(
            f"| {v['test']} | {v['metric']} | {v['goal']} | {fmt(v['ratio'], 2)} | "
            f"{', '.join(f'{r:.2f}' for r in v['per_round'])} | "
            f"{fmt(v['ratio_of_medians'], 2)} | {verdict} |"
        )
    lines += [
        "",
        "Against the direct path (ratios of medians):",
        "",
        "| test | metric | rapproxy / direct | haproxy / direct | haproxy-nat / direct "
        "| dnat / direct | kernel / direct |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, key in (("keepalive", "req_s"), ("close", "req_s"), ("bulk", "mb_s")):
        direct = _median(medians, name, "direct", key)
        cells = [fmt(ratio(medians[name].get(t, {}).get(key), direct), 2) for t in TARGETS_NAMES]
        lines.append(f"| {name} | {key} | {' | '.join(cells)} |")
    lines += ["", "## Notes", ""]
    lines += [f"- {note}" for note in report["notes"]]
    lines += [""]
    return "\n".join(lines)


# The share of a core the kernel target's proxy may use while the kernel carries the load: its
# background work (syncs, telemetry, HTTP) is a few %; relaying any test keeps it above 50 %.
KERNEL_PATH_MAX_BUSY = 0.15
TARGETS_NAMES = ("rapproxy", "haproxy", "haproxy-nat", "dnat", "kernel")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def finish(report: dict[str, Any]) -> None:
    """Derive medians, ratios, verdicts and notes from report["raw"] (also for --rerender)."""
    raw = report["raw"]
    medians = summarise(raw)
    report["medians"] = medians
    report["verdicts"] = verdicts(medians, raw)
    report["kernel_verdicts"] = kernel_verdicts(medians, raw)
    raw_redis = report.get("raw_redis") or {}
    if raw_redis:
        report["redis_medians"] = {
            target: {
                k: median_of(runs, k)
                for k in ("rps", "p50_ms", "p99_ms", "max_ms", "cpu_ms_per_1k")
            }
            for target, runs in raw_redis.items()
        }
        report["redis_verdicts"] = redis_verdicts(raw_redis)
    report["paired_ratios"] = {
        base: {
            f"{test}.{key}": paired_ratios(raw, test, key, base)
            for test, key, _, _ in (*GOALS, ("bulk", "cpu_s_per_gb", 0, ""))
        }
        for base in ("haproxy", "haproxy-nat", "direct")
    }
    report["paired_ratios"]["kernel/dnat"] = {
        f"{test}.{key}": paired_ratios(raw, test, key, "dnat", subject="kernel")
        for test, key, _ in KERNEL_GOALS
    }
    workers = report.get("workers", 1)
    report["notes"] = [
        f"rapproxy ran with proxy.workers={workers} (relay processes sharing one listener) and "
        f"proxy.relayEngine={report.get('relay_engine', 'asyncio')}; "
        f"HAProxy with nbthread {report.get('haproxy_threads', 1)}. Proxy CPU is summed over "
        "rapproxy's processes.",
        f"{report['machine']['cpus']} CPUs, nothing pinned: wrk (1 thread), nginx (1 worker), the proxy "
        "and the kernel's softirq work all share them, so a proxy that uses less CPU leaves more "
        "for the others.",
        "rapproxy is reached the way a pod reaches a Service (ClusterIP, nat OUTPUT REDIRECT, "
        "SO_ORIGINAL_DST lookup); HAProxy listens on its VIP directly, so it pays no NAT. The "
        "issue's targets are judged against that plain HAProxy; the haproxy-nat target (the same "
        "HAProxy process behind an iptables REDIRECT) shows how much of a gap is interception "
        "rather than the relay.",
        "bulk: wrk with 4 keep-alive connections fetching a 10 MiB file (nginx sendfile); MB/s is "
        "bytes received by wrk / duration, 1 MB = 10^6 bytes.",
        "DNAT verified: nothing listens on its VIP, the body is nginx's, and the rule's packet "
        "counter grew by at least the connection count in every DNAT measurement.",
        "kernel verified the same way: the kernel-mode Service's endpoint chain (RAPPROXY-SEP-*) "
        "DNAT counter grew by at least the connection count in every measurement whose "
        "counter was not reset meanwhile by rapproxy's periodic full resync "
        f"({sum(1 for runs in report['raw'].values() for r in runs.get('kernel', []) if r.get('kernel_counter_reset'))} "
        "were), so no connection took the proxy's fallback REDIRECT. Its path is kube-proxy's: OUTPUT → "
        "RAPPROXY-SERVICES (rule per Service port) → RAPPROXY-SVC (statistic rules) → "
        "RAPPROXY-SEP (hairpin mark check, DNAT), plus POSTROUTING → RAPPROXY-POSTROUTING (mark "
        "check) — per new connection only; established packets skip nat entirely. The plain "
        "DNAT rule sits in a chain of its own jumped to from OUTPUT; rapproxy's jump is "
        "inserted first, so both paths cross RAPPROXY-SERVICES' few rules. Proxy CPU for "
        "kernel is the daemon's own (telemetry, weight refresh), with no connection through it.",
        f"rapproxy alive at the end: {report['rapproxy_alive_at_end']}, RSS "
        f"{report['rapproxy_rss_mib_at_end']} MiB; warning/error log lines: "
        f"{len(report['rapproxy_log_problems'])}.",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s: a smoke check")
    parser.add_argument("--workers", type=int, default=1, help="rapproxy's proxy.workers")
    parser.add_argument(
        "--relay-engine",
        choices=("native", "asyncio"),
        help="rapproxy's proxy.relayEngine (default: its configured default)",
    )
    parser.add_argument(
        "--haproxy-threads", type=int, help="HAProxy nbthread (default: as many as --workers)"
    )
    parser.add_argument(
        "--no-redis", action="store_true", help="skip redis-benchmark even if redis is installed"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="results directory")
    parser.add_argument(
        "--targets",
        default=",".join(t.name for t in TARGETS),
        help="comma-separated targets to measure (default: all); e.g. dnat,kernel",
    )
    parser.add_argument(
        "--rerender",
        type=Path,
        metavar="JSON",
        help="recompute summaries and verdicts of a results JSON and rewrite it and its .md",
    )
    args = parser.parse_args(argv)
    if args.rerender:
        stored: dict[str, Any] = json.loads(args.rerender.read_text())
        finish(stored)
        args.rerender.write_text(json.dumps(stored, indent=2, default=str) + "\n")
        args.rerender.with_suffix(".md").write_text(render_markdown(stored))
        print(f"rewrote {args.rerender} and its .md")
        return 0
    if args.quick:
        args.duration, args.rounds = 2.0, 1
    if args.duration <= 0 or args.rounds < 1:
        parser.error("--duration must be positive and --rounds at least 1")
    chosen = [name.strip() for name in args.targets.split(",") if name.strip()]
    unknown = sorted(set(chosen) - {t.name for t in TARGETS})
    if unknown or not chosen:
        parser.error(f"--targets: unknown {unknown}; known {[t.name for t in TARGETS]}")
    targets = [t for t in TARGETS if t.name in chosen]
    require_root_and_tools()
    install_signal_handlers()
    haproxy_threads = args.haproxy_threads or args.workers
    with_redis = not args.no_redis and all(
        shutil.which(tool) for tool in ("redis-server", "redis-benchmark", "redis-cli")
    )

    started = datetime.datetime.now(datetime.UTC)
    report: dict[str, Any] = {
        "started_utc": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": " ".join(
            shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv[:1], *sys.argv[1:]]
        ),
        "duration_s": args.duration,
        "rounds": args.rounds,
        "workers": args.workers,
        "relay_engine": args.relay_engine or "default",
        "haproxy_threads": haproxy_threads,
        "machine": machine_note(),
        "versions": versions(),
        "loadavg_before": loadavg(),
        "targets": [{"name": t.name, "url": t.url, "note": t.note} for t in targets],
        "tests": [{"name": t.name, "describe": t.describe} for t in TESTS],
    }
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {
        test.name: {t.name: [] for t in targets} for test in TESTS
    }
    raw_redis: dict[str, list[dict[str, Any]]] = {t: [] for t in REDIS_TARGETS}
    clock = time.monotonic()
    with Testbed() as bed:
        bed.start(
            extra_args=[f"--set=proxy.workers={args.workers}"]
            + ([f"--set=proxy.relayEngine={args.relay_engine}"] if args.relay_engine else []),
            haproxy_threads=haproxy_threads,
            with_redis=with_redis,
        )
        print(f"testbed up in namespace {bed.name}; warming up", flush=True)
        for target in targets:
            for test in TESTS:
                measure(bed, target, test, 1.0)
        for round_number in range(1, args.rounds + 1):
            for test in TESTS:
                for target in targets:
                    result = measure(bed, target, test, args.duration)
                    result["round"] = round_number
                    raw[test.name][target.name].append(result)
                    print(
                        f"round {round_number} {test.name:9} {target.name:11} "
                        f"{result['req_s']:9.0f} req/s {result['mb_s']:8.1f} MB/s "
                        f"p50 {result['p50_ms']:6.2f} ms p99 {result['p99_ms']:7.2f} ms "
                        f"errors {result['errors']}"
                        + (
                            f" cpu {result['cpu_ms_per_1k']:.1f} ms/1k"
                            if result["cpu_ms_per_1k"]
                            else ""
                        ),
                        flush=True,
                    )
            if with_redis:
                for name in REDIS_TARGETS:
                    result = measure_redis(bed, name)
                    result["round"] = round_number
                    raw_redis[name].append(result)
                    print(
                        f"round {round_number} redis     {name:11} {result['rps']:9.0f} rps "
                        f"p50 {result['p50_ms']:6.3f} ms p99 {result['p99_ms']:6.3f} ms",
                        flush=True,
                    )
        rapproxy_pid = bed.pid("rapproxy")  # raises if it died
        rapproxy_log = bed.log("rapproxy", tail=100000)
        report["rapproxy_alive_at_end"] = True
        report["rapproxy_rss_mib_at_end"] = round(rss_bytes(rapproxy_pid) / 2**20, 1)
        report["rapproxy_log_problems"] = [
            line
            for line in rapproxy_log.splitlines()
            if " E " in line or " W " in line or "Traceback" in line or "relay bug" in line
        ][:20]
    report["loadavg_after"] = loadavg()
    report["wall_s"] = round(time.monotonic() - clock, 1)
    report["raw"] = raw
    if with_redis:
        report["raw_redis"] = raw_redis
    finish(report)

    args.output.mkdir(parents=True, exist_ok=True)
    stem = (
        "loopback-"
        + started.strftime("%Y-%m-%dT%H%MZ")
        + (f"-w{args.workers}" if args.workers != 1 else "")
        + (f"-{args.relay_engine}" if args.relay_engine else "")
        + ("-quick" if args.quick else "")
    )
    markdown = render_markdown(report)
    (args.output / f"{stem}.md").write_text(markdown)
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(markdown)
    print(f"wrote {args.output / stem}.md and .json ({report['wall_s']} s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TestbedError as error:
        sys.exit(f"benchmark failed: {error}")
