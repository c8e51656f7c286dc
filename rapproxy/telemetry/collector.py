"""This node's load figures: node CPU and memory utilization, and per-pod usage from cgroups.

Where the figures come from is a `Probe`, so the same collector measures

* the host (`HostProbe`, psutil) on a real node,
* one cgroup v2 directory (`CgroupV2Probe`) when an emulated node is a set of processes in its own
  cgroup on a shared host — measuring the host there would make every emulated node report the
  same load,
* a fixed, settable figure (`FixedProbe`) for tests and for injecting load in demos.

Per-pod figures are read from the kubelet's pod cgroups when readable (`PodCgroupScanner`; both
cgroup v1 and v2 layouts, both the `cgroupfs` and `systemd` drivers) and normalized by the pod's
limits when set, otherwise by the node's capacity. They are reported for explainability; the
overload verdict uses the node figures (design §3.4).

CPU utilization is a rate, so each probe keeps the previous counter and the monotonic time it was
read; the first reading of a CPU counter reports 0 (no interval yet). Reads are small sysfs/procfs
files; nothing here blocks for long, and a file that vanishes (a pod deleted mid-scan) is skipped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil  # type: ignore[import-untyped,unused-ignore]  # types-psutil not a dependency

from rapproxy.model.telemetry import NodeStats, PodStats

log = logging.getLogger(__name__)

Clock = Callable[[], float]

# cgroup v1 reports "no limit" as a huge page-aligned number rather than "max".
_V1_UNLIMITED = 1 << 60
_POD_DIR = re.compile(r"^(?:kubepods(?:-[a-z]+)?-)?pod([0-9a-fA-F_-]{16,})(?:\.slice)?$")


@dataclass(frozen=True, slots=True)
class Utilization:
    cpu: float
    memory: float


class Probe(Protocol):
    """Measures one node's CPU and memory utilization, each a fraction in [0, 1]."""

    def read(self) -> Utilization: ...


def _clamp(value: float) -> float:
    return 0.0 if value < 0 else 1.0 if value > 1 else value


class HostProbe:
    """The whole host, from psutil (`/proc/stat`, `/proc/meminfo`)."""

    def __init__(self) -> None:
        psutil.cpu_percent(interval=None)  # primes the counter: the next read covers the interval

    def read(self) -> Utilization:
        cpu = psutil.cpu_percent(interval=None) / 100.0
        memory = psutil.virtual_memory().percent / 100.0
        return Utilization(_clamp(cpu), _clamp(memory))


class FixedProbe:
    """Reports whatever it was last told: for tests and for "inject load figures"."""

    def __init__(self, cpu: float = 0.0, memory: float = 0.0) -> None:
        self.set(cpu, memory)

    def set(self, cpu: float, memory: float) -> None:
        self._value = Utilization(_clamp(cpu), _clamp(memory))

    def read(self) -> Utilization:
        return self._value


class FileProbe:
    """Figures read from a JSON file (`{"cpu": 0.9, "memory": 0.3}`), re-read on every sample.

    For emulated nodes and experiments that inject load into a running daemon. A missing or
    malformed file reads as idle and is logged once per distinct problem: a typo in a test
    fixture must not look like an overloaded node.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._last_problem: str | None = None

    def read(self) -> Utilization:
        try:
            data = json.loads(self.path.read_text())
            cpu = float(data.get("cpu", 0.0))
            memory = float(data.get("memory", 0.0))
        except (OSError, ValueError, TypeError, AttributeError) as error:
            problem = f"{type(error).__name__}: {error}"
            if problem != self._last_problem:
                log.warning("load file %s unusable (%s); reading as idle", self.path, problem)
                self._last_problem = problem
            return Utilization(0.0, 0.0)
        self._last_problem = None
        return Utilization(_clamp(cpu), _clamp(memory))


def probe_from_spec(spec: str) -> Probe:
    """`host`, `cgroup:/sys/fs/cgroup/PATH` or `file:/path/load.json` (config `rap.loadSource`)."""
    kind, _, argument = spec.partition(":")
    if kind == "host" and not argument:
        return HostProbe()
    if kind == "cgroup" and argument:
        return CgroupV2Probe(argument)
    if kind == "file" and argument:
        return FileProbe(argument)
    raise ValueError(f"{spec!r}: expected host, cgroup:PATH or file:PATH")


class _CpuRate:
    """Turns a cumulative CPU-seconds counter into a fraction of `cpus` over the last interval."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._last: tuple[float, float] | None = None

    def update(self, cpu_seconds: float, cpus: float) -> float:
        now = self._clock()
        last, self._last = self._last, (now, cpu_seconds)
        if last is None or now <= last[0] or cpus <= 0:
            return 0.0
        return _clamp((cpu_seconds - last[1]) / (now - last[0]) / cpus)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _v2_cpu_seconds(directory: Path) -> float | None:
    text = _read_text(directory / "cpu.stat")
    if text is None:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            try:
                return int(value) / 1e6
            except ValueError:
                return None
    return None


def _v2_cpu_limit(directory: Path) -> float | None:
    """Cores allowed by `cpu.max` ("quota period"), None when unlimited or unreadable."""
    text = _read_text(directory / "cpu.max")
    if text is None:
        return None
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        return int(parts[0]) / int(parts[1])
    except (ValueError, ZeroDivisionError):
        return None


def _v1_cpu_limit(directory: Path) -> float | None:
    quota = _read_int(directory / "cpu.cfs_quota_us")
    period = _read_int(directory / "cpu.cfs_period_us")
    if quota is None or period is None or quota <= 0 or period <= 0:
        return None
    return quota / period


def _host_cpus() -> float:
    return float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def _host_memory() -> int:
    return int(psutil.virtual_memory().total)


class CgroupV2Probe:
    """One cgroup v2 directory: an emulated node's processes.

    CPU is `usage_usec` per wall second divided by the cgroup's `cpu.max` quota (or the host's
    CPUs); memory is `memory.current` over `memory.max` (or the host's memory). Without the memory
    controller enabled on the cgroup, memory reads 0.
    """

    def __init__(self, path: str | os.PathLike[str], clock: Clock = time.monotonic) -> None:
        self.path = Path(path)
        if not (self.path / "cgroup.procs").exists():
            raise FileNotFoundError(f"{self.path} is not a cgroup v2 directory (no cgroup.procs)")
        self._rate = _CpuRate(clock)
        self.read()

    def read(self) -> Utilization:
        cpus = _v2_cpu_limit(self.path) or _host_cpus()
        seconds = _v2_cpu_seconds(self.path)
        cpu = self._rate.update(seconds, cpus) if seconds is not None else 0.0
        current = _read_int(self.path / "memory.current")
        limit = _read_int(self.path / "memory.max") or _host_memory()
        memory = _clamp(current / limit) if current is not None and limit > 0 else 0.0
        return Utilization(cpu, memory)


@dataclass(frozen=True, slots=True)
class _PodCgroup:
    uid: str
    cpu_dir: Path
    memory_dir: Path
    version: int


class PodCgroupScanner:
    """Per-pod CPU and memory from the kubelet's pod cgroups (v1 or v2, cgroupfs or systemd).

    Layouts recognised under `root` (default `/sys/fs/cgroup`):

    * v2: `kubepods[.slice]/[<qos>/|kubepods-<qos>.slice/]pod<uid>|kubepods-<qos>-pod<uid>.slice`
    * v1: the same below `cpu,cpuacct/` (or `cpuacct/`) and `memory/`.

    A `systemd` pod slice spells the UID with `_` for `-`; it is reported with dashes.
    """

    def __init__(
        self, root: str | os.PathLike[str] = "/sys/fs/cgroup", clock: Clock = time.monotonic
    ):
        self.root = Path(root)
        self._clock = clock
        self._rates: dict[str, _CpuRate] = {}

    def _layouts(self) -> Iterator[tuple[int, Path, Path]]:
        if (self.root / "cgroup.controllers").exists():
            yield 2, self.root, self.root
            return
        for cpu_name in ("cpu,cpuacct", "cpuacct", "cpu"):
            cpu_root = self.root / cpu_name
            if (cpu_root / "cpuacct.usage").exists():
                yield 1, cpu_root, self.root / "memory"
                return

    def _pods(self) -> Iterator[_PodCgroup]:
        for version, cpu_root, memory_root in self._layouts():
            for top in ("kubepods.slice", "kubepods"):
                base = cpu_root / top
                if not base.is_dir():
                    continue
                for directory in _walk_pods(base, depth=2):
                    match = _POD_DIR.match(directory.name)
                    if match is None:
                        continue
                    uid = match.group(1).replace("_", "-")
                    relative = directory.relative_to(cpu_root)
                    yield _PodCgroup(uid, directory, memory_root / relative, version)

    def scan(self) -> tuple[PodStats, ...]:
        host_cpus = _host_cpus()
        host_memory = _host_memory()
        out: list[PodStats] = []
        seen: set[str] = set()
        for pod in self._pods():
            seen.add(pod.uid)
            if pod.version == 2:
                seconds = _v2_cpu_seconds(pod.cpu_dir)
                cpu_limit = _v2_cpu_limit(pod.cpu_dir)
                used = _read_int(pod.memory_dir / "memory.current")
                memory_limit = _read_int(pod.memory_dir / "memory.max")
            else:
                nanoseconds = _read_int(pod.cpu_dir / "cpuacct.usage")
                seconds = None if nanoseconds is None else nanoseconds / 1e9
                cpu_limit = _v1_cpu_limit(pod.cpu_dir)
                used = _read_int(pod.memory_dir / "memory.usage_in_bytes")
                memory_limit = _read_int(pod.memory_dir / "memory.limit_in_bytes")
                if memory_limit is not None and memory_limit >= _V1_UNLIMITED:
                    memory_limit = None
            rate = self._rates.setdefault(pod.uid, _CpuRate(self._clock))
            cpu = None if seconds is None else rate.update(seconds, cpu_limit or host_cpus)
            memory = None if used is None else _clamp(used / (memory_limit or host_memory))
            out.append(
                PodStats(pod.uid, cpu, memory, cpu_limit is not None, memory_limit is not None)
            )
        for gone in [uid for uid in self._rates if uid not in seen]:
            del self._rates[gone]
        return tuple(sorted(out, key=lambda p: p.uid))


def _walk_pods(base: Path, depth: int) -> Iterator[Path]:
    try:
        children = [c for c in base.iterdir() if c.is_dir()]
    except OSError:
        return
    for child in children:
        if _POD_DIR.match(child.name):
            yield child
        elif depth > 0:
            yield from _walk_pods(child, depth - 1)


class Collector:
    """Samples a probe (and optionally pod cgroups) into `NodeStats` for this node."""

    def __init__(
        self,
        node_name: str,
        probe: Probe,
        pods: PodCgroupScanner | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.node_name = node_name
        self.probe = probe
        self.pods = pods
        self._clock = clock
        self.latest: NodeStats | None = None

    def sample(self) -> NodeStats:
        reading = self.probe.read()
        pods = self.pods.scan() if self.pods is not None else ()
        self.latest = NodeStats(self.node_name, reading.cpu, reading.memory, self._clock(), pods)
        return self.latest

    async def run(self, sink: Callable[[NodeStats], None], interval: float) -> None:
        """Sample every `interval` seconds until cancelled; a failing sample is logged, not fatal."""
        while True:
            try:
                sink(self.sample())
            except Exception:  # a probe bug must not stop telemetry for good
                log.exception("telemetry sample of node %s failed", self.node_name)
            await asyncio.sleep(interval)
