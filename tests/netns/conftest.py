"""Fixtures for root tests: network namespaces that are always destroyed, even on failure.

`make_namespace(tag)` creates as many namespaces as a test needs; all are destroyed (processes
killed, namespace removed) when the test ends, in reverse order. Namespaces left by a killed
earlier run (their creating pid is gone) are swept once per session.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from rapproxy.testing.netns import Namespace, sweep_stale_namespaces

MakeNamespace = Callable[..., Awaitable[Namespace]]


@pytest.fixture(scope="session", autouse=True)
def _sweep_stale_namespaces() -> Iterator[None]:
    if os.geteuid() == 0:
        sweep_stale_namespaces()
    yield


@pytest.fixture
async def make_namespace() -> AsyncIterator[MakeNamespace]:
    created: list[Namespace] = []

    async def make(tag: str = "") -> Namespace:
        namespace = await Namespace.create(tag)
        created.append(namespace)
        return namespace

    try:
        yield make
    finally:
        errors = []
        for namespace in reversed(created):
            try:
                await namespace.aclose()
            except Exception as error:  # keep destroying the others, then report
                errors.append(error)
        if errors:
            raise errors[0]


@pytest.fixture
async def netns(make_namespace: MakeNamespace) -> Namespace:
    """One fresh namespace (loopback up) for the test."""
    return await make_namespace("test")
