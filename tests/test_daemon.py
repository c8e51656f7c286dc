"""`rapproxy run`'s cold-start garbage-collection policy (the wiring itself is tested end to end
in tests/integration/test_daemon_*)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from rapproxy.daemon import _freeze_after_first_sync
from rapproxy.sync.runner import BoundedRunner, RunnerTimings


@pytest.fixture(autouse=True)
def restore_gc() -> Iterator[None]:
    yield
    gc.unfreeze()
    gc.enable()


async def test_no_cyclic_collection_until_the_first_sync_ends_then_survivors_are_frozen() -> None:
    enabled_during_sync: list[bool] = []

    async def sync() -> None:
        enabled_during_sync.append(gc.isenabled())

    runner = BoundedRunner("t", sync, RunnerTimings(0.01, 60, 60))
    guard = asyncio.create_task(_freeze_after_first_sync(runner))
    await asyncio.sleep(0)
    assert not gc.isenabled()  # while the informers list
    syncing = asyncio.create_task(runner.run_forever())
    try:
        await asyncio.wait_for(guard, 5.0)
        assert enabled_during_sync == [False]
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
    finally:
        syncing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await syncing


async def test_collection_is_back_on_after_a_shutdown_before_the_first_sync() -> None:
    async def sync() -> None:
        raise AssertionError("never runs")

    guard = asyncio.create_task(
        _freeze_after_first_sync(BoundedRunner("t", sync, RunnerTimings(0.01, 60, 60)))
    )
    await asyncio.sleep(0)
    assert not gc.isenabled()
    guard.cancel()
    with pytest.raises(asyncio.CancelledError):
        await guard
    assert gc.isenabled()


async def test_collection_resumes_unfrozen_when_the_first_sync_takes_too_long() -> None:
    # An API server that never answers: its retries leave cyclic garbage that must be collected.
    async def sync() -> None:
        raise AssertionError("never runs")

    runner = BoundedRunner("t", sync, RunnerTimings(0.01, 60, 60))
    await asyncio.wait_for(_freeze_after_first_sync(runner, window=0.05), 5.0)
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0
