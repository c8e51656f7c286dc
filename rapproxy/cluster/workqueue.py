"""A de-duplicating work queue with rate-limited retries, as client-go's workqueue behaves.

Controllers enqueue *keys* (`namespace/name`), never objects: the reconciler reads the latest
state from its informer's store when it gets to the key, so ten events for one object cost one
reconcile. The guarantees that make this safe:

* a key is in the queue at most once;
* a key is never processed by two workers at once — if it is added while being processed, it is
  marked dirty and re-queued when `done` is called;
* `retry(key)` re-adds it after a per-key exponential backoff (`base·2^failures`, capped), and
  `forget(key)` resets the backoff after a success.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_delay: float = 0.005
    max_delay: float = 60.0

    def delay(self, failures: int) -> float:
        return min(self.max_delay, self.base_delay * 2.0 ** max(0, failures - 1))


class ShutDown(Exception):
    """The queue was shut down; workers stop."""


class WorkQueue(Generic[K]):
    def __init__(self, retry_policy: RetryPolicy | None = None) -> None:
        self.retry_policy = retry_policy or RetryPolicy()
        self._queue: deque[K] = deque()
        self._queued: set[K] = set()
        self._processing: set[K] = set()
        self._dirty: set[K] = set()
        self._failures: dict[K, int] = {}
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._ready = asyncio.Event()
        self._shut_down = False

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, key: K) -> None:
        if self._shut_down:
            return
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if key in self._processing:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._queue.append(key)
        self._wake()

    def _wake(self) -> None:
        self._ready.set()

    async def get(self) -> K:
        """The next key to process; call `done(key)` when finished with it."""
        while not self._queue:
            if self._shut_down:
                raise ShutDown
            self._ready.clear()
            await self._ready.wait()
        key = self._queue.popleft()
        self._queued.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def retry(self, key: K) -> float:
        """Re-add `key` after its backoff; returns the delay chosen."""
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        delay = self.retry_policy.delay(failures)
        self.add_after(key, delay)
        return delay

    def add_after(self, key: K, delay: float) -> None:
        if self._shut_down:
            return
        existing = self._timers.get(key)
        if existing is not None and existing.when() <= asyncio.get_running_loop().time() + delay:
            return  # an earlier wake-up is already scheduled
        if existing is not None:
            existing.cancel()
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(delay, self._fire, key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def forget(self, key: K) -> None:
        self._failures.pop(key, None)

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    def shut_down(self) -> None:
        self._shut_down = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._ready.set()
