"""CPU capacity per emulated node: the cap holds, usage is counted, and nothing is left."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator

import pytest

from rapproxy.testing.edge.cgroups import (
    CgroupUnavailable,
    EdgeCgroups,
    NodeProbe,
    detect_layout,
    launch_argv,
    sweep_stale_cgroups,
)
from rapproxy.testing.netns import namespace

from .conftest import eventually

pytestmark = pytest.mark.root

BURN = "import time\nwhile True: pass"


@pytest.fixture
async def cgroups() -> AsyncIterator[EdgeCgroups]:
    try:
        layout = detect_layout()
    except CgroupUnavailable as error:
        pytest.skip(f"NO CGROUPS FOR NODE CPU CAPS: {error}")
    made = EdgeCgroups.create(layout)
    try:
        yield made
    finally:
        made.remove()


async def test_a_capped_node_burns_no_more_than_its_quota(cgroups: EdgeCgroups) -> None:
    node = cgroups.node("node-1")
    node.set_cpu_limit(0.2)
    assert node.cpu_limit() == pytest.approx(0.2)
    async with namespace("node-1") as node_namespace:
        burner = await asyncio.create_subprocess_exec(
            *launch_argv(node.procs_files, node_namespace.path, [sys.executable, "-c", BURN])
        )
        await eventually(lambda: burner.pid in node.pids())
        probe = NodeProbe(node)
        start_cpu, start = node.cpu_seconds(), time.monotonic()
        throttled_before, _ = node.throttled()
        await eventually(lambda: time.monotonic() - start > 1.5, interval=0.1)
        used = (node.cpu_seconds() - start_cpu) / (time.monotonic() - start)
        utilization = probe.read()
        burner.kill()
        await burner.wait()
    assert used <= 0.2 * 1.15
    assert used > 0.1  # it did run, inside this cgroup
    assert node.throttled()[0] > throttled_before
    assert utilization.cpu > 0.5  # relative to the node's 0.2 cores, not the host's


async def test_removal_kills_the_nodes_processes_and_deletes_the_groups(
    cgroups: EdgeCgroups,
) -> None:
    node = cgroups.node("node-2")
    async with namespace("node-2") as node_namespace:
        sleeper = await asyncio.create_subprocess_exec(
            *launch_argv(node.procs_files, node_namespace.path, ["sleep", "60"])
        )
        await eventually(lambda: sleeper.pid in node.pids())
        cgroups.remove()
        assert await asyncio.wait_for(sleeper.wait(), 5.0) == -9
    assert not any(path.exists() for path in cgroups.paths())


async def test_groups_of_a_dead_run_are_swept_and_live_ones_kept(cgroups: EdgeCgroups) -> None:
    exited = await asyncio.create_subprocess_exec("true")
    await exited.wait()
    stale = EdgeCgroups(cgroups.layout, f"rapproxy-edge-{exited.pid}-0")
    for path in stale.paths():
        path.mkdir()
    stale.node("node-1")
    assert stale.group in sweep_stale_cgroups()
    assert not any(path.exists() for path in stale.paths())
    assert all(path.exists() for path in cgroups.paths())
