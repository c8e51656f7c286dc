"""Informers against the emulated API server, through real kubernetes-asyncio over HTTP.

Each test drives the API with the same client the daemon uses and checks that the informer's
store and handler calls converge on the server's truth through dropped watches, 410s, 5xx
bursts and a server restart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from rapproxy.cluster.client import SERVICES, ClientSettings, Conflict, KubeClient, NotFound
from rapproxy.cluster.informer import Backoff, Callbacks, Informer, object_key
from rapproxy.testing.apiserver import DeleteOptions, EmulatedApiServer
from rapproxy.testing.apiserver import resources as emulated

FAST = Backoff(initial=0.05, maximum=0.2)


async def eventually(condition: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def service(name: str, port: int = 80) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"ports": [{"port": port}]},
    }


@pytest.fixture
async def api() -> AsyncIterator[EmulatedApiServer]:
    async with EmulatedApiServer(history_size=50, bookmark_interval=0.5) as server:
        yield server


@pytest.fixture
async def client(api: EmulatedApiServer, tmp_path: Path) -> AsyncIterator[KubeClient]:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    kube = await KubeClient.connect(ClientSettings(kubeconfig=str(kubeconfig), request_timeout=5))
    try:
        yield kube
    finally:
        await kube.close()


class Recorder:
    def __init__(self) -> None:
        self.live: dict[str, dict[str, Any]] = {}
        self.deletes: list[str] = []

    def callbacks(self) -> Callbacks:
        return Callbacks(self.upsert, self.delete)

    def upsert(self, obj: dict[str, Any]) -> None:
        self.live[object_key(obj)] = obj

    def delete(self, obj: dict[str, Any]) -> None:
        self.live.pop(object_key(obj), None)
        self.deletes.append(object_key(obj))


@pytest.fixture
async def informer(client: KubeClient) -> AsyncIterator[tuple[Informer, Recorder]]:
    recorder = Recorder()
    inf = Informer(client, SERVICES, recorder.callbacks(), watch_timeout_seconds=5, backoff=FAST)
    task = asyncio.create_task(inf.run())
    await asyncio.wait_for(inf.synced.wait(), 10)
    try:
        yield inf, recorder
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_list_then_watch_sees_creates_updates_and_deletes(
    client: KubeClient, informer: tuple[Informer, Recorder]
) -> None:
    inf, recorder = informer
    await client.create(SERVICES, service("web"), "default")
    await eventually(lambda: "default/web" in recorder.live)
    await client.patch(SERVICES, "web", {"metadata": {"labels": {"tier": "front"}}}, "default")
    await eventually(
        lambda: recorder.live["default/web"]["metadata"].get("labels") == {"tier": "front"}
    )
    await client.delete(SERVICES, "web", "default")
    await eventually(lambda: "default/web" not in recorder.live)
    assert recorder.deletes == ["default/web"]
    assert inf.store.keys() == recorder.live.keys()


async def test_dropped_watches_resume_without_a_relist(
    api: EmulatedApiServer, client: KubeClient, informer: tuple[Informer, Recorder]
) -> None:
    inf, recorder = informer
    relists = inf.relists
    for round_number in range(3):
        api.drop_watches()
        await client.create(SERVICES, service(f"svc-{round_number}"), "default")
    await eventually(lambda: {f"default/svc-{i}" for i in range(3)} <= recorder.live.keys())
    assert inf.relists == relists, "a dropped watch resumes from its last version"


async def test_expired_version_relists_and_synthesises_deletes(
    api: EmulatedApiServer, client: KubeClient, informer: tuple[Informer, Recorder]
) -> None:
    inf, recorder = informer
    await client.create(SERVICES, service("doomed"), "default")
    await eventually(lambda: "default/doomed" in recorder.live)
    relists = inf.relists
    await api.stop()  # the informer cannot hear the delete...
    api.registry.delete(emulated.SERVICES, "default", "doomed", DeleteOptions())
    api.compact()  # ...and its version is now too old
    await api.start()
    await eventually(lambda: "default/doomed" not in recorder.live)
    assert "default/doomed" in recorder.deletes
    assert inf.relists > relists


async def test_server_errors_back_off_and_recover(
    api: EmulatedApiServer, client: KubeClient, informer: tuple[Informer, Recorder]
) -> None:
    _inf, recorder = informer
    api.drop_watches()
    api.fail_next(5, status=500)
    await asyncio.sleep(0.05)
    created = False
    while not created:  # the writes may hit the injected 500s too
        try:
            await client.create(SERVICES, service("after-errors"), "default")
            created = True
        except Exception:
            await asyncio.sleep(0.05)
    await eventually(lambda: "default/after-errors" in recorder.live)


async def test_optimistic_concurrency_and_not_found_are_typed(client: KubeClient) -> None:
    created = await client.create(SERVICES, service("occ"), "default")
    stale = dict(created)
    await client.patch(SERVICES, "occ", {"metadata": {"labels": {"a": "b"}}}, "default")
    with pytest.raises(Conflict):
        await client.replace(SERVICES, "occ", stale, "default")
    with pytest.raises(NotFound):
        await client.get(SERVICES, "missing", "default")
    assert ("create", "", "services") in client.calls
