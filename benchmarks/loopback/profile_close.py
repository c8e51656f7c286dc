"""Where a `Connection: close` request's proxy CPU goes: py-spy and perf on the real daemon.

Why this exists: issue 12 asks for the per-connection cost to be shown, not asserted. This starts
the loopback testbed (nginx, rapproxy behind its own iptables REDIRECT; see testbed.py), drives
`wrk -t1 -c32 -H 'Connection: close'` at the ClusterIP, and meanwhile samples every rapproxy
process twice in a row: py-spy (Python and native frames) for what the user-space part is made
of, then perf (kernel and user, by shared object) for the user/kernel split. It prints a short
text summary: CPU ms per 1000 connections, the split by DSO, and the top frames by own and by
inclusive samples.

Usage (root): `.venv/bin/python benchmarks/loopback/profile_close.py [--duration 10]
[--set proxy.workers=2] [--output FILE]`. Profilers add overhead of their own (py-spy's
sampling pauses the process); the CPU figure is measured in a separate unprofiled window.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from testbed import (
    RAPPROXY_VIP,
    SERVICE_PORT,
    Testbed,
    cpu_seconds,
    install_signal_handlers,
    require_root_and_tools,
)

PY_SPY = Path(sys.executable).parent / "py-spy"


def proxy_pids(bed: Testbed) -> list[int]:
    """The daemon and its worker processes (children), if any."""
    main = bed.pid("rapproxy")
    pids = [main]
    try:
        with open(f"/proc/{main}/task/{main}/children") as children:
            pids += [int(p) for p in children.read().split()]
    except OSError:
        pass
    return pids


def load(bed: Testbed, seconds: float) -> dict[str, float]:
    return bed.wrk(
        f"http://{RAPPROXY_VIP}:{SERVICE_PORT}/", duration=seconds, connections=32, close=True
    )


def in_background(bed: Testbed, seconds: float) -> tuple[threading.Thread, list[dict[str, float]]]:
    out: list[dict[str, float]] = []
    thread = threading.Thread(target=lambda: out.append(load(bed, seconds)), daemon=True)
    thread.start()
    time.sleep(1.0)  # past wrk's connection warm-up
    return thread, out


def py_spy(bed: Testbed, seconds: float, work: Path) -> collections.Counter[tuple[str, ...]]:
    stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
    thread, _ = in_background(bed, seconds + 2)
    procs = []
    for pid in proxy_pids(bed):
        out = work / f"spy-{pid}.txt"
        argv = [str(PY_SPY), "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "250"]
        argv += ["--native", "-f", "raw", "-o", str(out)]
        procs.append(
            (subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), out)
        )
    for proc, out in procs:
        proc.wait(timeout=seconds + 60)
        if out.exists():
            for line in out.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                frames = tuple(_short(f) for f in stack.split(";")[1:])  # drop the thread/process
                stacks[frames] += int(count)
    thread.join()
    return stacks


def _short(frame: str) -> str:
    # "data_received (rapproxy/dataplane/tcp.py:321)" → "data_received (tcp.py)"
    match = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    return f"{match.group(1)} ({Path(match.group(2)).name})"


def perf_dso(bed: Testbed, seconds: float, work: Path) -> list[tuple[float, str]]:
    thread, _ = in_background(bed, seconds + 2)
    data = work / "perf.data"
    pids = ",".join(str(p) for p in proxy_pids(bed))
    subprocess.run(
        [
            "perf",
            "record",
            "-q",
            "-F",
            "999",
            "-p",
            pids,
            "-o",
            str(data),
            "--",
            "sleep",
            str(seconds),
        ],
        check=False,
        capture_output=True,
    )
    thread.join()
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--sort", "dso", "--no-children"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    rows = []
    for line in report.splitlines():
        match = re.match(r"\s+([\d.]+)%\s+(\S.*)$", line)
        if match:
            rows.append((float(match.group(1)), match.group(2).strip()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--set", action="append", default=[], help="rapproxy --set KEY=VALUE")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    require_root_and_tools()
    install_signal_handlers()
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    with Testbed() as bed, tempfile.TemporaryDirectory(prefix="rapprof-") as tmp:
        bed.start(with_haproxy=False, with_dnat=False, extra_args=[f"--set={s}" for s in args.set])
        work = Path(tmp)
        load(bed, 2)  # warm-up
        pids = proxy_pids(bed)
        before = sum(cpu_seconds(p) for p in pids)
        summary = load(bed, args.duration)
        cpu = sum(cpu_seconds(p) for p in pids) - before
        requests = summary["requests"]
        rate = requests / (summary["duration_us"] / 1e6)
        say(f"command: {' '.join(sys.argv)}")
        say(f"rapproxy processes: {len(pids)}; settings: {args.set or 'defaults'}")
        say(
            f"unprofiled: {rate:.0f} conn/s, proxy CPU {1e6 * cpu / requests:.1f} ms per 1000 "
            f"connections ({cpu:.2f} s over {requests:.0f})"
        )
        rows = perf_dso(bed, args.duration, work)
        say("")
        say("perf, samples by shared object (kernel vs user space):")
        for share, dso in rows[:8]:
            say(f"  {share:5.1f}%  {dso}")
        stacks = py_spy(bed, args.duration, work)
        # Idle pool threads (asyncio.to_thread at start-up) are sampled too: py-spy --native
        # cannot tell a thread parked in a futex from one at work. Count the event loop only.
        idle = sum(c for f, c in stacks.items() if any("Thread._bootstrap" in x for x in f))
        stacks = collections.Counter(
            {f: c for f, c in stacks.items() if not any("Thread._bootstrap" in x for x in f)}
        )
        total = sum(stacks.values())
        say("")
        say(f"(left out: {idle} samples of idle worker threads)")
        own: collections.Counter[str] = collections.Counter()
        inclusive: collections.Counter[str] = collections.Counter()
        for frames, count in stacks.items():
            if frames:
                own[frames[-1]] += count
            for frame in set(frames):
                inclusive[frame] += count
        say("")
        say(f"py-spy --native, {total} samples; top frames by own samples:")
        for frame, count in own.most_common(25):
            say(f"  {100 * count / total:5.1f}%  {frame}")
        say("")
        say("top frames by inclusive samples (Python frames only):")
        python = [(f, c) for f, c in inclusive.items() if ".py)" in f]
        for frame, count in sorted(python, key=lambda fc: -fc[1])[:25]:
            say(f"  {100 * count / total:5.1f}%  {frame}")
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
