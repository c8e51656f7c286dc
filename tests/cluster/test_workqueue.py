"""WorkQueue: de-duplication, no concurrent processing of one key, backoff on retry."""

from __future__ import annotations

import asyncio

import pytest

from rapproxy.cluster.workqueue import RetryPolicy, ShutDown, WorkQueue


async def test_duplicates_collapse_and_order_is_fifo() -> None:
    queue: WorkQueue[str] = WorkQueue()
    for key in ("a", "b", "a", "c", "b"):
        queue.add(key)
    assert len(queue) == 3
    assert [await queue.get() for _ in range(3)] == ["a", "b", "c"]


async def test_key_added_while_processing_is_requeued_after_done() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("a")
    key = await queue.get()
    queue.add("a")
    assert len(queue) == 0, "never handed to a second worker while in progress"
    queue.done(key)
    assert await asyncio.wait_for(queue.get(), 1) == "a"


async def test_retry_backs_off_exponentially_and_forget_resets() -> None:
    queue: WorkQueue[str] = WorkQueue(RetryPolicy(base_delay=0.05, max_delay=1))
    assert queue.retry("a") == pytest.approx(0.05)
    assert queue.retry("a") == pytest.approx(0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.wait_for(queue.get(), 2) == "a"
    assert loop.time() - started >= 0.04
    queue.forget("a")
    assert queue.failures("a") == 0


async def test_shut_down_wakes_waiting_workers() -> None:
    queue: WorkQueue[str] = WorkQueue()
    waiter = asyncio.create_task(queue.get())
    await asyncio.sleep(0.01)
    queue.shut_down()
    with pytest.raises(ShutDown):
        await asyncio.wait_for(waiter, 1)
