"""One coalescing runner for every sync: kube-proxy's BoundedFrequencyRunner, on asyncio.

Many events ask for a sync; the runner runs the sync function at most once per `min_interval`,
at least once per `max_interval` (the periodic full resync that repairs anything that drifted),
and again after `retry_interval` when a run fails. Requests that arrive while a run is in flight
are folded into one follow-up run. Because the sync is a full, idempotent render of the desired
state, running it more often than needed is always safe; running it concurrently never happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunnerTimings:
    min_interval: float
    max_interval: float
    retry_interval: float


class BoundedRunner:
    def __init__(
        self,
        name: str,
        sync: Callable[[], Awaitable[None]],
        timings: RunnerTimings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._sync = sync
        self.timings = timings
        self._clock = clock
        self._wake = asyncio.Event()
        self._last_run_started = -float("inf")
        self._retry_at: float | None = None
        self.runs = 0
        self.failures = 0
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.first_run_done = asyncio.Event()  # set when the first run ends, failed or not

    def request(self) -> None:
        """Ask for a sync soon (respecting `min_interval`). Cheap; call it from any handler."""
        self._wake.set()

    async def run_forever(self) -> None:
        """Run until cancelled. The first sync runs at once."""
        self._wake.set()
        while True:
            now = self._clock()
            next_periodic = self._last_run_started + self.timings.max_interval
            deadline = (
                next_periodic if self._retry_at is None else min(next_periodic, self._retry_at)
            )
            if not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, deadline - now))
            earliest = self._last_run_started + self.timings.min_interval
            now = self._clock()
            if now < earliest:
                await asyncio.sleep(earliest - now)
            self._wake.clear()
            await self._run_once()

    async def _run_once(self) -> None:
        self._last_run_started = self._clock()
        self.runs += 1
        try:
            await self._sync()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.failures += 1
            self.last_error = f"{type(error).__name__}: {error}"
            self._retry_at = self._clock() + self.timings.retry_interval
            log.exception(
                "%s sync failed; retrying in %.1fs", self.name, self.timings.retry_interval
            )
        else:
            self._retry_at = None
            self.last_error = None
            self.last_success = self._clock()
        finally:
            self.first_run_done.set()
