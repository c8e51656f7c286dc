"""CPU capacity per emulated node: a cgroup per node, so one node can be made "overloaded".

Every process of an emulated node (its pods, its rapproxy) joins the node's cgroup when it
starts, so a CPU quota on the cgroup caps the whole node and the cgroup's usage counter is the
node's CPU figure for telemetry.

Two host layouts are supported, found by `detect_layout`:

* **v2** — cgroup2 at /sys/fs/cgroup with the `cpu` controller available: a group
  `/sys/fs/cgroup/rapproxy-edge-<pid>-<n>/` gets `+cpu` (and `+memory` when available) in its
  `cgroup.subtree_control`, and each node is a child with `cpu.max`.
* **hybrid** — cgroup v1 controllers with a controller-less cgroup2 at /sys/fs/cgroup/unified
  (what these machines have: `cpu` is bound to the v1 hierarchy, so it can never be enabled in
  the v2 tree, whose only available controller is `hugetlb`). The quota is set in the v1 `cpu`
  hierarchy (`cpu.cfs_quota_us`/`cpu.cfs_period_us`); usage comes from the v2 tree, whose
  `cpu.stat` (`usage_usec`) is kept by the cgroup core without any controller, and which offers
  `cgroup.kill`. A node's processes join both. Memory is not limited there (the v1 memory
  hierarchy belongs to whoever runs this machine); a node's memory figure is the sum of its
  processes' resident sets.

Anything else raises `CgroupUnavailable` with the reason; the cluster then runs without CPU
limits and says so, and the tests that need limits skip with that reason.

Joining: `ip netns exec` remounts /sys for the namespace's view, hiding /sys/fs/cgroup, so a
process cannot join its cgroup by path once inside. `launch_argv` builds a command line that
joins the cgroup(s) first (a shell writing its own pid into `cgroup.procs`), then enters the
network namespace with `nsenter --net` (which leaves the mounts alone, so the process can still
read its own cgroup), then execs the command.

Groups still present when the interpreter exits are removed then (`atexit`). Names carry the
creating pid (`rapproxy-edge-<pid>-<n>`) so `sweep_stale_cgroups` can remove the groups of a
killed run without touching a concurrently running one.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil  # type: ignore[import-untyped,unused-ignore]  # types-psutil not a dependency

from rapproxy.telemetry.collector import CgroupV2Probe, Utilization

CGROUP_ROOT = Path("/sys/fs/cgroup")
GROUP_PREFIX = "rapproxy-edge-"
_GROUP_PATTERN = re.compile(r"^rapproxy-edge-(\d+)-(\d+)$")
_PERIOD_US = 100_000
_KILL_WAIT_SECONDS = 5.0
_counter = itertools.count()
_live: dict[str, EdgeCgroups] = {}


class CgroupUnavailable(RuntimeError):
    """CPU limits per node cannot be set on this host; the message says why."""


@dataclass(frozen=True, slots=True)
class CgroupLayout:
    """Where this host lets us cap CPU (`limit_root`) and count usage (`accounting_root`)."""

    kind: str  # "v2" | "hybrid"
    limit_root: Path
    accounting_root: Path
    controllers: tuple[str, ...] = ()  # v2: what the group enables for its nodes

    @property
    def roots(self) -> tuple[Path, ...]:
        if self.limit_root == self.accounting_root:
            return (self.limit_root,)
        return (self.limit_root, self.accounting_root)


def detect_layout(root: Path = CGROUP_ROOT) -> CgroupLayout:
    """The layout of this host, or `CgroupUnavailable` naming what is missing."""
    if os.geteuid() != 0:
        raise CgroupUnavailable("cgroups: creating cgroups needs root")
    if (root / "cgroup.controllers").exists():
        available = (root / "cgroup.controllers").read_text().split()
        if "cpu" not in available:
            raise CgroupUnavailable(
                f"cgroups: {root} is cgroup2 but offers no cpu controller (has {available})"
            )
        wanted = tuple(c for c in ("cpu", "memory") if c in available)
        return CgroupLayout("v2", root, root, wanted)
    cpu_v1 = root / "cpu"
    if not (cpu_v1 / "cpu.cfs_quota_us").exists():
        raise CgroupUnavailable(
            f"cgroups: neither cgroup2 with cpu at {root} nor a v1 cpu hierarchy at {cpu_v1}"
        )
    unified = root / "unified"
    if not (unified / "cgroup.procs").exists() or not (unified / "cpu.stat").exists():
        raise CgroupUnavailable(
            f"cgroups: v1 cpu at {cpu_v1} but no cgroup2 at {unified} to count usage and kill"
        )
    return CgroupLayout("hybrid", cpu_v1, unified)


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as error:
        raise CgroupUnavailable(f"cgroups: writing {text.strip()!r} to {path}: {error}") from error


class NodeCgroup:
    """One emulated node's cgroup (a directory in each hierarchy of the layout)."""

    def __init__(self, name: str, layout: CgroupLayout, group: str) -> None:
        self.name = name
        self.layout = layout
        self.limit_dir = layout.limit_root / group / name
        self.accounting_dir = layout.accounting_root / group / name
        self.dirs = tuple(dict.fromkeys((self.limit_dir, self.accounting_dir)))

    def create(self) -> None:
        for directory in self.dirs:
            try:
                directory.mkdir()
            except OSError as error:
                raise CgroupUnavailable(f"cgroups: mkdir {directory}: {error}") from error

    @property
    def procs_files(self) -> tuple[Path, ...]:
        """Every `cgroup.procs` a process of this node must be written into."""
        return tuple(directory / "cgroup.procs" for directory in self.dirs)

    # -- limits -----------------------------------------------------------------------------

    def set_cpu_limit(self, cpus: float | None) -> None:
        """Cap the node at `cpus` cores (e.g. 0.5), or lift the cap with None."""
        if cpus is not None and not cpus > 0:
            raise ValueError(f"cpu limit of {self.name}: {cpus!r} is not > 0")
        quota = -1 if cpus is None else max(1000, round(cpus * _PERIOD_US))
        if self.layout.kind == "v2":
            text = "max" if quota < 0 else str(quota)
            _write(self.limit_dir / "cpu.max", f"{text} {_PERIOD_US}\n")
        else:
            _write(self.limit_dir / "cpu.cfs_period_us", f"{_PERIOD_US}\n")
            _write(self.limit_dir / "cpu.cfs_quota_us", f"{quota}\n")

    def cpu_limit(self) -> float | None:
        """Cores this node may use, None when unlimited."""
        if self.layout.kind == "v2":
            quota, _, period = (self.limit_dir / "cpu.max").read_text().partition(" ")
            return None if quota == "max" else int(quota) / int(period)
        quota_us = int((self.limit_dir / "cpu.cfs_quota_us").read_text())
        period_us = int((self.limit_dir / "cpu.cfs_period_us").read_text())
        return None if quota_us < 0 else quota_us / period_us

    # -- figures ----------------------------------------------------------------------------

    def pids(self) -> list[int]:
        found: set[int] = set()
        for procs in self.procs_files:
            with contextlib.suppress(FileNotFoundError):
                found.update(int(line) for line in procs.read_text().split())
        return sorted(found)

    def cpu_seconds(self) -> float:
        """CPU time used by the node's processes since the cgroup was made."""
        for line in (self.accounting_dir / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
        raise CgroupUnavailable(f"cgroups: no usage_usec in {self.accounting_dir}/cpu.stat")

    def throttled(self) -> tuple[int, float]:
        """(times the quota throttled the node, seconds spent throttled)."""
        values: dict[str, int] = {}
        for line in (self.limit_dir / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            values[key] = int(value)
        if self.layout.kind == "v2":
            return values.get("nr_throttled", 0), values.get("throttled_usec", 0) / 1e6
        return values.get("nr_throttled", 0), values.get("throttled_time", 0) / 1e9

    def memory_bytes(self) -> int:
        """`memory.current` where the memory controller runs, else the processes' summed RSS."""
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int((self.accounting_dir / "memory.current").read_text())
        total = 0
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                total += int(psutil.Process(pid).memory_info().rss)
        return total

    # -- teardown ---------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL every process of the node and wait until the cgroup is empty."""
        deadline = time.monotonic() + _KILL_WAIT_SECONDS
        kill_file = self.accounting_dir / "cgroup.kill"
        while remaining := self.pids():
            if kill_file.exists():
                with contextlib.suppress(OSError):
                    kill_file.write_text("1\n")
            for pid in remaining:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise CgroupUnavailable(f"cgroups: {self.name}: {remaining} survive SIGKILL")
            time.sleep(0.01)  # polling for the kernel to finish the kills, not synchronisation

    def remove(self) -> None:
        """Kill what is left and remove the directories; idempotent."""
        if not any(directory.exists() for directory in self.dirs):
            return
        self.kill()
        for directory in self.dirs:
            _rmdir_when_empty(directory)


def _rmdir_when_empty(directory: Path) -> None:
    # A killed process leaves the cgroup a moment after it is reaped; rmdir says EBUSY until then.
    deadline = time.monotonic() + _KILL_WAIT_SECONDS
    while True:
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class EdgeCgroups:
    """The cgroup of one emulated cluster (`rapproxy-edge-<pid>-<n>`) and its nodes' children."""

    def __init__(self, layout: CgroupLayout, group: str) -> None:
        self.layout = layout
        self.group = group
        self.nodes: dict[str, NodeCgroup] = {}

    @classmethod
    def create(cls, layout: CgroupLayout | None = None) -> EdgeCgroups:
        layout = layout or detect_layout()
        group = f"{GROUP_PREFIX}{os.getpid()}-{next(_counter)}"
        made = cls(layout, group)
        _live[group] = made
        try:
            for root in layout.roots:
                try:
                    (root / group).mkdir()
                except OSError as error:
                    raise CgroupUnavailable(f"cgroups: mkdir {root / group}: {error}") from error
            if layout.kind == "v2":
                _enable(layout.limit_root, layout.controllers)
                _enable(layout.limit_root / group, layout.controllers)
        except BaseException:
            made.remove()
            raise
        return made

    def paths(self) -> tuple[Path, ...]:
        return tuple(root / self.group for root in self.layout.roots)

    def node(self, name: str) -> NodeCgroup:
        """The cgroup of node `name`, created on first use."""
        if name not in self.nodes:
            cgroup = NodeCgroup(name, self.layout, self.group)
            cgroup.create()
            self.nodes[name] = cgroup
        return self.nodes[name]

    def remove(self) -> None:
        """Kill every node's processes and remove all directories; idempotent."""
        _live.pop(self.group, None)
        for cgroup in self.nodes.values():
            cgroup.remove()
        for directory in self.paths():
            for child in directory.iterdir() if directory.exists() else ():
                if child.is_dir():
                    NodeCgroup(child.name, self.layout, self.group).remove()
            _rmdir_when_empty(directory)


def remove_all() -> None:
    """Remove every group this process still owns (registered to run at interpreter exit)."""
    for cgroups in list(_live.values()):
        with contextlib.suppress(Exception):
            cgroups.remove()


atexit.register(remove_all)


def _enable(directory: Path, controllers: Sequence[str]) -> None:
    enabled = (directory / "cgroup.subtree_control").read_text().split()
    missing = [c for c in controllers if c not in enabled]
    if missing:
        _write(directory / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing) + "\n")


def launch_argv(procs_files: Sequence[Path], netns_path: str, argv: Sequence[str]) -> list[str]:
    """argv that joins the cgroup(s), enters the network namespace, then execs `argv`."""
    joins = [f'echo $$ > "${i + 1}"' for i in range(len(procs_files))]
    script = " && ".join([*joins, f"shift {len(procs_files)}", 'exec "$@"'])
    return [
        "/bin/sh",
        "-c",
        script,
        "edge-launch",
        *(str(path) for path in procs_files),
        "nsenter",
        f"--net={netns_path}",
        "--",
        *argv,
    ]


def cgroups_of_process(pid: int, root: Path = CGROUP_ROOT) -> list[Path]:
    """The edge cgroups process `pid` created that still exist: [] once its clusters are gone."""
    try:
        layout = detect_layout(root)
    except CgroupUnavailable:
        return []
    return sorted(p for base in layout.roots for p in base.glob(f"{GROUP_PREFIX}{pid}-*"))


def sweep_stale_cgroups(root: Path = CGROUP_ROOT) -> list[str]:
    """Remove `rapproxy-edge-<pid>-<n>` groups whose creating process is gone."""
    try:
        layout = detect_layout(root)
    except CgroupUnavailable:
        return []
    removed = []
    for base in layout.roots:
        for directory in base.glob(f"{GROUP_PREFIX}*"):
            match = _GROUP_PATTERN.match(directory.name)
            if match is None or psutil.pid_exists(int(match.group(1))):
                continue
            EdgeCgroups(layout, directory.name).remove()
            removed.append(directory.name)
    return sorted(set(removed))


class NodeProbe:
    """The telemetry `Probe` of one emulated node: CPU relative to the node's own capacity.

    Reuses `CgroupV2Probe` on the node's v2 directory for the usage rate. On a hybrid host that
    probe can only divide by the host's CPUs (the quota lives in the v1 tree, invisible to it),
    so the figure is rescaled to the node's quota here. Memory is `memory.current` under v2
    with the memory controller, else the processes' RSS over `memory_capacity_bytes`.
    """

    def __init__(self, cgroup: NodeCgroup, memory_capacity_bytes: int | None = None) -> None:
        self.cgroup = cgroup
        self.memory_capacity_bytes = memory_capacity_bytes or int(psutil.virtual_memory().total)
        self._inner = CgroupV2Probe(cgroup.accounting_dir)
        self._host_cpus = float(len(os.sched_getaffinity(0)))

    def read(self) -> Utilization:
        figures = self._inner.read()
        cpu = figures.cpu
        if self.cgroup.layout.kind != "v2":
            limit = self.cgroup.cpu_limit()
            if limit is not None:
                cpu = min(1.0, figures.cpu * self._host_cpus / limit)
        memory = figures.memory
        if not (self.cgroup.accounting_dir / "memory.current").exists():
            memory = min(1.0, self.cgroup.memory_bytes() / self.memory_capacity_bytes)
        return Utilization(cpu, memory)
