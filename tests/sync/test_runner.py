"""BoundedRunner: coalesces requests, respects the minimum interval, resyncs, retries failures."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

import pytest

from rapproxy.sync.runner import BoundedRunner, RunnerTimings


async def wait_for(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


@pytest.fixture
def runs() -> list[float]:
    return []


async def test_first_sync_runs_at_once_and_requests_coalesce(runs: list[float]) -> None:
    async def sync() -> None:
        runs.append(time.monotonic())
        await asyncio.sleep(0.05)

    runner = BoundedRunner("t", sync, RunnerTimings(0.2, 60, 1))
    task = asyncio.create_task(runner.run_forever())
    try:
        await wait_for(lambda: len(runs) == 1)
        for _ in range(50):
            runner.request()
        await wait_for(lambda: len(runs) == 2)
        await asyncio.sleep(0.4)
        assert len(runs) == 2, "fifty requests must fold into one follow-up run"
        assert runs[1] - runs[0] >= 0.2 - 0.01, "minimum interval between runs"
    finally:
        task.cancel()


async def test_periodic_resync_without_requests(runs: list[float]) -> None:
    async def sync() -> None:
        runs.append(time.monotonic())

    runner = BoundedRunner("t", sync, RunnerTimings(0.0, 0.1, 1))
    task = asyncio.create_task(runner.run_forever())
    try:
        await wait_for(lambda: len(runs) >= 4)
    finally:
        task.cancel()
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert all(gap >= 0.09 for gap in gaps)


async def test_failed_sync_is_retried_after_retry_interval(runs: list[float]) -> None:
    async def sync() -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise RuntimeError("iptables-restore failed")

    runner = BoundedRunner("t", sync, RunnerTimings(0.0, 60, 0.15))
    task = asyncio.create_task(runner.run_forever())
    try:
        await wait_for(lambda: len(runs) >= 2)
    finally:
        task.cancel()
    assert runs[1] - runs[0] >= 0.14
    assert runner.failures == 1
    assert runner.last_error is None and runner.last_success is not None


@pytest.mark.parametrize("fails", [False, True])
async def test_first_run_done_is_set_when_the_first_run_ends(fails: bool) -> None:
    release = asyncio.Event()

    async def sync() -> None:
        await release.wait()
        if fails:
            raise RuntimeError("iptables-restore failed")

    runner = BoundedRunner("t", sync, RunnerTimings(0.01, 60, 60))
    task = asyncio.create_task(runner.run_forever())
    try:
        await wait_for(lambda: runner.runs == 1)
        assert not runner.first_run_done.is_set()
        release.set()
        await asyncio.wait_for(runner.first_run_done.wait(), 5.0)
        assert runner.failures == (1 if fails else 0)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
