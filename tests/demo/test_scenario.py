"""`rapproxy demo` end to end, as root: the cluster comes up, every policy carries traffic, a
primary fails over, and nothing is left — also when the run fails midway.

The runs are short (1 s of load per policy): these tests check that the demo works and what it
reports is consistent, not how fast anything is (that is `benchmarks/edge/`).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rapproxy.demo import main as demo_main
from rapproxy.demo.cluster import DemoCluster
from rapproxy.demo.options import POLICIES, DemoOptions
from rapproxy.demo.progress import Progress
from rapproxy.demo.scenario import (
    FAILOVER_RATE,
    HEALTHY,
    OVERLOADED,
    failover_result,
    kernel_placement,
    run_scenario,
)
from rapproxy.testing.connload import OK, REFUSED, Attempt, LoadReport, LoadSpec
from rapproxy.testing.edge.cgroups import cgroups_of_process
from rapproxy.testing.netns import child_processes, live_namespaces

ROOT_ONLY = pytest.mark.root


def edge_cgroups_of_this_process() -> list[Path]:
    return cgroups_of_process(os.getpid())


def rapproxy_rules_in_this_namespace() -> list[str]:
    """rapproxy's nat rules in the test's own (root) namespace: the demo must never add any."""
    dump = subprocess.run(
        ["iptables-save", "-t", "nat"], capture_output=True, text=True, check=False
    ).stdout
    return [line for line in dump.splitlines() if "RAPPROXY" in line.upper()]


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@ROOT_ONLY
@pytest.mark.slow
@pytest.mark.xdist_group("edge-timing")  # see tests/integration/test_rap_netns.py
async def test_every_policy_carries_traffic_a_primary_fails_over_and_nothing_is_left() -> None:
    before = set(live_namespaces())
    output = io.StringIO()
    # 16 connections (the demo's default): enough that node-1's capped pods queue when it is
    # overloaded, and a queue is what makes rap spill.
    # Two seconds per policy: on a box busy with other jobs, one second gave rap too few answers
    # from node-1's stalling pods to price its queue, and it stayed local (98 %) that whole run.
    options = DemoOptions(duration=2.0, connections=16)
    results = await run_scenario(options, Progress(output))
    story = output.getvalue()

    assert [(r.phase, r.policy) for r in results.runs] == [
        *((HEALTHY, p) for p in POLICIES),
        *((OVERLOADED, p) for p in POLICIES),
    ], story
    for run in results.runs:
        assert run.requests > 0 and run.errors == 0, (run, story)
    healthy = {r.policy: r for r in results.runs if r.phase == HEALTHY}
    # node-1 healthy: rap and local-only keep node-1's connections on node-1; round-robin and
    # random spread them over the three primaries, one per node.
    assert healthy["local-only"].local_share == 1.0
    assert healthy["rap"].local_share is not None and healthy["rap"].local_share >= 0.9
    for spread in ("round-robin", "random"):
        share = healthy[spread].local_share
        assert share is not None and 0.1 < share < 0.6, (spread, share)
    # node-1 overloaded: its pods' queue costs more than the WAN round trip, so rap sends part
    # of the load away (how much is a matter of measured costs; in the benchmark about half).
    overloaded_rap = next(r for r in results.runs if r.phase == OVERLOADED and r.policy == "rap")
    assert overloaded_rap.local_share is not None and overloaded_rap.local_share < 0.8, story

    failover = results.failover
    assert failover is not None, story
    assert failover.promoted_pod and failover.promoted_pod != failover.killed_pod
    assert failover.first_promoted_s is not None and failover.first_promoted_s < 10
    assert failover.restored_s is not None and 0 < failover.restored_s < 60, story
    # A continuous load, not a probe: requests all the way to half a second past the restore.
    assert failover.load_rate == FAILOVER_RATE
    assert failover.probe_requests >= 0.8 * FAILOVER_RATE * (failover.restored_s + 0.5), story
    assert "FailoverComplete" not in story or failover.timeline

    assert not [n for n in results.notes if "LEFT BEHIND" in n], results.notes
    assert set(live_namespaces()) == before
    assert rapproxy_rules_in_this_namespace() == []
    assert edge_cgroups_of_this_process() == []
    assert child_processes() == []


@ROOT_ONLY
async def test_a_run_failing_midway_still_removes_daemons_pods_namespaces_and_cgroups(
    tmp_path: Path,
) -> None:
    before = set(live_namespaces())
    demo = DemoCluster(DemoOptions(), tmp_path)
    with pytest.raises(RuntimeError, match="midway"):
        async with demo:
            await demo.start_control_plane()
            await demo.start_daemons()
            demo.deploy_web()
            await demo.wait_web_serving()
            assert processes_mentioning(str(tmp_path / "kubeconfig"))  # three daemons run
            raise RuntimeError("the demo failed midway")
    assert demo.leftover_report == []
    assert processes_mentioning(str(tmp_path / "kubeconfig")) == []
    assert set(live_namespaces()) == before
    assert rapproxy_rules_in_this_namespace() == []
    assert edge_cgroups_of_this_process() == []
    assert child_processes() == []


def test_without_root_the_demo_says_it_needs_root_and_touches_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A real unprivileged process cannot run this interpreter here (it lives under /root), so
    # the effective uid is what is faked; nothing after the check may run.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert demo_main(["--quick"]) == 1
    error = capsys.readouterr().err
    assert "needs root" in error and "sudo make demo" in error


def test_a_bad_flag_is_one_line_naming_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rapproxy", "demo", "--duration", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "rapproxy demo: --duration: 0 s is outside 1..600"


def test_the_failover_counts_every_request_sent_after_the_kill_and_when_each_failed() -> None:
    kill = 1000.0
    attempts = (
        Attempt(999.9, OK, 0.001, "web-a"),  # before the kill: not counted
        Attempt(1000.1, OK, 0.001, "web-b"),
        Attempt(1000.2, REFUSED, 0.0),
        Attempt(1000.3, OK, 0.001, "web-h"),  # the promoted hot backup
    )
    report = LoadReport(LoadSpec("10.96.0.10", 80, 200, 2), 999.5, 1001.5, attempts)
    status = {
        "lastFailover": {
            "failedPod": "web-a",
            "detectedAt": "2026-12-07T05:00:00Z",
            "promotedPod": "web-h",
            "restoredAt": "1970-01-01T00:16:41Z",  # 1001 s
        }
    }
    result = failover_result(
        report,
        killed_at=kill,
        name="web-a",
        node="node-1",
        known=["web-a", "web-b"],
        status=status,
        previous=None,
    )
    assert (result.probe_requests, result.probe_errors) == (3, 1)
    assert result.first_error_s == pytest.approx(0.2)
    assert result.first_promoted_s == pytest.approx(0.3)
    assert result.failed_at_s == (0.2,)
    assert result.restored_s == pytest.approx(1.0)
    assert result.load_rate == 200
    assert result.load_timeline == (
        {"from": 0.0, "counts": {OK: 1, REFUSED: 1}},
        {"from": 0.25, "counts": {OK: 1}},
    )


def test_kernel_placement_counts_dnat_counters_by_node_and_survives_a_reset() -> None:
    before = {"10.244.1.5": 100, "10.244.2.5": 40, "10.244.3.5": 7}
    after = {"10.244.1.5": 160, "10.244.2.5": 50, "10.244.3.5": 3}  # node-3's chain rewritten
    assert kernel_placement(before, after, "10.244.1.0/24") == {"local": 60, "remote": 13}
    assert kernel_placement({}, {"10.244.2.9": 5}, "10.244.1.0/24") == {"local": 0, "remote": 5}
