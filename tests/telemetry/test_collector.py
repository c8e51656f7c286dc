"""The collector: psutil on the host, cgroup v2 probes, kubelet pod cgroup layouts (v1 and v2)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rapproxy.telemetry.collector import (
    CgroupV2Probe,
    Collector,
    FixedProbe,
    HostProbe,
    PodCgroupScanner,
)

GiB = 1 << 30


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_host_probe_reports_sane_fractions() -> None:
    probe = HostProbe()
    reading = probe.read()
    assert 0.0 <= reading.cpu <= 1.0
    assert 0.0 < reading.memory < 1.0  # this process alone uses some memory


def test_collector_stamps_samples_with_its_clock() -> None:
    clock = Clock()
    probe = FixedProbe(0.3, 0.4)
    collector = Collector("n1", probe, clock=clock)
    stats = collector.sample()
    assert (stats.node_name, stats.cpu, stats.memory, stats.sampled_at) == ("n1", 0.3, 0.4, 100.0)
    probe.set(0.9, 0.1)
    clock.now = 101.0
    assert collector.sample().cpu == 0.9 and collector.latest is not None
    assert collector.latest.sampled_at == 101.0


def test_fixed_probe_clamps_injected_figures() -> None:
    assert FixedProbe(1.5, -1.0).read().cpu == 1.0


def fake_v2_cgroup(path: Path, usage_usec: int, *, quota: str = "max 100000") -> None:
    write(path / "cgroup.procs", "")
    write(path / "cpu.stat", f"usage_usec {usage_usec}\nuser_usec 0\nsystem_usec 0\n")
    write(path / "cpu.max", quota + "\n")
    write(path / "memory.current", str(GiB // 4))
    write(path / "memory.max", str(GiB))


def test_cgroup_v2_probe_computes_cpu_rate_against_quota_and_memory_against_max(
    tmp_path: Path,
) -> None:
    clock = Clock()
    fake_v2_cgroup(tmp_path, 1_000_000, quota="200000 100000")  # 2 cores allowed
    probe = CgroupV2Probe(tmp_path, clock=clock)
    clock.now += 2.0
    fake_v2_cgroup(tmp_path, 1_000_000 + 2_000_000, quota="200000 100000")  # 2 CPU-s in 2 s
    reading = probe.read()
    assert reading.cpu == pytest.approx(0.5)  # 1 core of 2
    assert reading.memory == pytest.approx(0.25)


def test_cgroup_v2_probe_without_memory_controller_reads_zero_memory(tmp_path: Path) -> None:
    write(tmp_path / "cgroup.procs", "")
    write(tmp_path / "cpu.stat", "usage_usec 5\n")
    assert CgroupV2Probe(tmp_path).read().memory == 0.0


def test_cgroup_v2_probe_refuses_a_directory_that_is_not_a_cgroup(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a cgroup v2"):
        CgroupV2Probe(tmp_path)


def test_pod_scanner_reads_v2_systemd_and_cgroupfs_layouts(tmp_path: Path) -> None:
    clock = Clock()
    write(tmp_path / "cgroup.controllers", "cpu memory\n")
    systemd = (
        tmp_path
        / "kubepods.slice/kubepods-burstable.slice"
        / "kubepods-burstable-pod1b2c3d4e_0000_4000_8000_000000000001.slice"
    )
    guaranteed = tmp_path / "kubepods/pod2b2c3d4e-0000-4000-8000-000000000002"
    besteffort = tmp_path / "kubepods/besteffort/pod3b2c3d4e-0000-4000-8000-000000000003"
    fake_v2_cgroup(systemd, 0, quota="50000 100000")  # 0.5 core limit
    fake_v2_cgroup(guaranteed, 0)
    fake_v2_cgroup(besteffort, 0)
    write(besteffort / "memory.max", "max\n")
    write(tmp_path / "kubepods/besteffort/not-a-pod/cpu.stat", "usage_usec 1\n")
    scanner = PodCgroupScanner(tmp_path, clock=clock)
    assert {p.uid for p in scanner.scan()} == {
        "1b2c3d4e-0000-4000-8000-000000000001",
        "2b2c3d4e-0000-4000-8000-000000000002",
        "3b2c3d4e-0000-4000-8000-000000000003",
    }
    clock.now += 1.0
    write(systemd / "cpu.stat", "usage_usec 250000\n")  # 0.25 CPU-s in 1 s
    pods = {p.uid[:8]: p for p in scanner.scan()}
    assert pods["1b2c3d4e"].cpu == pytest.approx(0.5) and pods["1b2c3d4e"].cpu_limited
    assert pods["1b2c3d4e"].memory == pytest.approx(0.25) and pods["1b2c3d4e"].memory_limited
    assert not pods["3b2c3d4e"].memory_limited  # normalized by the node's memory instead
    assert pods["3b2c3d4e"].memory is not None and pods["3b2c3d4e"].memory < 0.25


def test_pod_scanner_reads_v1_layout_with_limits(tmp_path: Path) -> None:
    clock = Clock()
    uid = "4b2c3d4e-0000-4000-8000-000000000004"
    write(tmp_path / "cpu,cpuacct/cpuacct.usage", "0")
    cpu_dir = tmp_path / f"cpu,cpuacct/kubepods/burstable/pod{uid}"
    mem_dir = tmp_path / f"memory/kubepods/burstable/pod{uid}"
    write(cpu_dir / "cpuacct.usage", "0")
    write(cpu_dir / "cpu.cfs_quota_us", "100000")
    write(cpu_dir / "cpu.cfs_period_us", "100000")
    write(mem_dir / "memory.usage_in_bytes", str(GiB // 2))
    write(mem_dir / "memory.limit_in_bytes", str(GiB))
    scanner = PodCgroupScanner(tmp_path, clock=clock)
    scanner.scan()
    clock.now += 2.0
    write(cpu_dir / "cpuacct.usage", str(int(0.5e9)))  # 0.5 CPU-s in 2 s of a 1-core limit
    (pod,) = scanner.scan()
    assert pod.uid == uid
    assert pod.cpu == pytest.approx(0.25)
    assert pod.memory == pytest.approx(0.5)


def test_pod_scanner_without_kubelet_cgroups_finds_nothing(tmp_path: Path) -> None:
    assert PodCgroupScanner(tmp_path).scan() == ()


def cgroup_v2_root() -> Path | None:
    for candidate in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if (candidate / "cgroup.procs").exists() and (candidate / "cgroup.stat").exists():
            return candidate
    return None


@pytest.fixture
def real_cgroup() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("SKIPPED LOUDLY: needs root to create a cgroup v2 directory")
    root = cgroup_v2_root()
    if root is None or not os.access(root, os.W_OK):
        pytest.skip("SKIPPED LOUDLY: no writable cgroup v2 hierarchy mounted")
    path = root / f"rapproxy-test-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    try:
        yield path
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                path.rmdir()
                break
            except OSError:  # still populated for a moment after the child was reaped
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@pytest.mark.root
def test_cgroup_v2_probe_sees_a_process_burning_cpu_in_its_cgroup(real_cgroup: Path) -> None:
    probe = CgroupV2Probe(real_cgroup)
    assert probe.read().cpu == 0.0  # empty cgroup
    burner = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 20\nwhile time.time() < end: pass"]
    )
    try:
        (real_cgroup / "cgroup.procs").write_text(str(burner.pid))
        probe.read()  # restart the interval now that the burner is inside
        deadline = time.monotonic() + 10
        best = 0.0
        cpus = os.cpu_count() or 1
        while best * cpus < 0.2:  # a fifth of a core at least, even on a busy shared host
            assert time.monotonic() < deadline, f"cgroup cpu stayed at {best}"
            time.sleep(0.2)
            best = max(best, probe.read().cpu)
    finally:
        burner.kill()
        burner.wait()
