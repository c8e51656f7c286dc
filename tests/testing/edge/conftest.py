"""Fixtures for the emulated edge cluster's tests: polling with a deadline, stale sweeps.

Namespaces and cgroups left by a killed earlier run (their creating pid is gone) are swept once
per session, so a crash never poisons the next run; those of a live xdist worker are kept.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rapproxy.testing.edge.cgroups import cgroups_of_process, sweep_stale_cgroups
from rapproxy.testing.netns import sweep_stale_namespaces


@pytest.fixture(scope="session", autouse=True)
def _sweep_stale() -> Iterator[None]:
    if os.geteuid() == 0:
        sweep_stale_namespaces()
        sweep_stale_cgroups()
    yield


async def eventually(check: Callable[[], Any], within: float = 10.0, interval: float = 0.02) -> Any:
    """Poll `check()` (sync or async) until it returns a truthy value; fail at the deadline."""
    deadline = time.monotonic() + within
    while True:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {within}s (last: {last!r})")
        await asyncio.sleep(interval)


def edge_cgroups_of_this_process() -> list[Path]:
    return cgroups_of_process(os.getpid())
