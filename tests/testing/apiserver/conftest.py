"""Fixtures for the emulated API server's tests.

`kube` gives a kubernetes-asyncio ApiClient and a fresh namespace. By default it talks to an
emulated server; with `RAPPROXY_TEST_KUBECONFIG` set it talks to that real cluster instead, so
the same tests check the emulator and the real thing (tests needing the emulator's fault
injection ask for `emulator` and are skipped then).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client, config

from rapproxy.testing.apiserver import EmulatedApiServer

REAL_KUBECONFIG = os.environ.get("RAPPROXY_TEST_KUBECONFIG")


@dataclass
class Kube:
    api: client.ApiClient
    namespace: str
    emulator: EmulatedApiServer | None


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatedApiServer]:
    if REAL_KUBECONFIG:
        pytest.skip("EMULATOR ONLY: RAPPROXY_TEST_KUBECONFIG points at a real cluster")
    async with EmulatedApiServer(bookmark_interval=0.5, gc_delay=0.0) as api:
        yield api


@pytest.fixture
async def kube(tmp_path: Path) -> AsyncIterator[Kube]:
    emulated: EmulatedApiServer | None = None
    if REAL_KUBECONFIG:
        path = REAL_KUBECONFIG
    else:
        emulated = EmulatedApiServer(bookmark_interval=0.5)
        await emulated.start()
        path = str(emulated.write_kubeconfig(tmp_path / "kubeconfig"))
    configuration = client.Configuration()
    await config.load_kube_config(config_file=path, client_configuration=configuration)
    api = client.ApiClient(configuration)
    namespace = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(api)
    await core.create_namespace({"metadata": {"name": namespace}})
    try:
        yield Kube(api, namespace, emulated)
    finally:
        try:
            await core.delete_namespace(namespace)
        finally:
            await api.close()
            if emulated is not None:
                await emulated.stop()


async def eventually(check: Callable[[], Any], within: float = 5.0, interval: float = 0.02) -> Any:
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
