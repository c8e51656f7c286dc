"""EmulatedApiServer as an object: fault injection, restart on the same port, kubeconfig."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
from kubernetes_asyncio import client, config

from rapproxy.testing.apiserver import EmulatedApiServer
from rapproxy.testing.apiserver.resources import CONFIGMAPS

from .conftest import eventually


async def _get(url: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, json.loads(await resp.read())


async def test_drop_watches_ends_every_open_stream_cleanly(emulator: EmulatedApiServer) -> None:
    url = f"{emulator.url}/api/v1/configmaps?watch=true&resourceVersion=1&timeoutSeconds=60"
    lines: list[bytes] = []
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        dropped = 0

        async def drop_when_subscribed() -> None:
            nonlocal dropped
            dropped = await eventually(emulator.drop_watches)

        dropper = asyncio.create_task(drop_when_subscribed())
        started = time.monotonic()
        async for line in resp.content:
            lines.append(line)
        await dropper
    assert dropped == 1
    assert time.monotonic() - started < 5
    assert all(json.loads(line)["type"] == "ADDED" for line in lines if line.strip())


async def test_fail_next_answers_500_then_429_then_recovers(emulator: EmulatedApiServer) -> None:
    emulator.fail_next(1, status=500)
    status, body = await _get(f"{emulator.url}/api/v1/namespaces")
    assert (status, body["reason"]) == (500, "InternalError")
    emulator.fail_next(2, status=429)
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.get(f"{emulator.url}/api/v1/namespaces") as resp:
                assert resp.status == 429 and resp.headers["Retry-After"] == "1"
    status, body = await _get(f"{emulator.url}/api/v1/namespaces")
    assert status == 200 and body["kind"] == "NamespaceList"


async def test_latency_delays_each_request(emulator: EmulatedApiServer) -> None:
    emulator.set_latency(0.2)
    started = time.monotonic()
    status, _ = await _get(f"{emulator.url}/api/v1/namespaces")
    assert status == 200 and time.monotonic() - started >= 0.2
    emulator.set_latency(0)


async def test_restart_keeps_state_port_and_resource_versions(
    emulator: EmulatedApiServer,
) -> None:
    made = emulator.registry.create(CONFIGMAPS, "default", {"metadata": {"name": "kept"}}).body
    url = emulator.url
    await emulator.stop()
    assert not emulator.running
    await emulator.start()
    assert emulator.url == url
    status, body = await _get(f"{url}/api/v1/namespaces/default/configmaps/kept")
    assert status == 200 and body["metadata"]["uid"] == made["metadata"]["uid"]
    # A watch from the version seen before the restart resumes (history kept).
    emulator.registry.create(CONFIGMAPS, "default", {"metadata": {"name": "later"}})
    watch = (
        f"{url}/api/v1/namespaces/default/configmaps?watch=1&timeoutSeconds=0.3"
        f"&resourceVersion={made['metadata']['resourceVersion']}"
    )
    async with aiohttp.ClientSession() as http, http.get(watch) as resp:
        events = [json.loads(line) async for line in resp.content if line.strip()]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "later")]


async def test_compact_expires_old_watches_with_an_error_event(
    emulator: EmulatedApiServer,
) -> None:
    emulator.registry.create(CONFIGMAPS, "default", {"metadata": {"name": "a"}})
    emulator.compact()
    url = f"{emulator.url}/api/v1/configmaps?watch=1&resourceVersion=2&timeoutSeconds=5"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        events = [json.loads(line) async for line in resp.content if line.strip()]
    assert len(events) == 1 and events[0]["type"] == "ERROR"
    assert events[0]["object"]["code"] == 410 and events[0]["object"]["reason"] == "Expired"


async def test_kubeconfig_works_with_kubernetes_asyncio(
    emulator: EmulatedApiServer, tmp_path: Path
) -> None:
    path = emulator.write_kubeconfig(tmp_path / "kc")
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(path), client_configuration=configuration)
    async with client.ApiClient(configuration) as api:
        version = await client.VersionApi(api).get_code()
        names = [n.metadata.name for n in (await client.CoreV1Api(api).list_namespace()).items]
    assert version.git_version == "v1.28.7"
    assert {"default", "kube-system"} <= set(names)


async def test_http_lists_encode_exactly_the_registry_list(emulator: EmulatedApiServer) -> None:
    from rapproxy.testing.apiserver.registry import ListOptions

    for i in range(3):
        emulator.registry.create(CONFIGMAPS, "default", {"metadata": {"name": f"c{i}"}})
    # A cached encoding must follow updates.
    emulator.registry.patch(
        CONFIGMAPS, "default", "c1", "application/merge-patch+json", b'{"data": {"k": "v"}}'
    )
    for query in ("", "?limit=2"):
        status, body = await _get(f"{emulator.url}/api/v1/namespaces/default/configmaps{query}")
        assert status == 200
        expected = emulator.registry.list(
            CONFIGMAPS, "default", ListOptions(limit=2 if query else None)
        )
        assert body == expected
    status, body = await _get(f"{emulator.url}/api/v1/namespaces/default/configmaps/c1")
    assert body["data"] == {"k": "v"}


async def test_streaming_list_watches_are_refused_as_v1_28_does_by_default(
    emulator: EmulatedApiServer,
) -> None:
    # WatchList is off by default in v1.28: clients must be told, so they fall back to list+watch.
    url = (
        f"{emulator.url}/api/v1/configmaps?watch=true&sendInitialEvents=true"
        "&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true"
    )
    status, body = await _get(url)
    assert status == 422
    assert body["reason"] == "Invalid"
    assert [c["field"] for c in body["details"]["causes"]] == ["sendInitialEvents"]
    status, body = await _get(f"{emulator.url}/api/v1/configmaps?watch=true&sendInitialEvents=true")
    assert status == 422
    assert [c["field"] for c in body["details"]["causes"]] == [
        "resourceVersionMatch",
        "sendInitialEvents",
    ]
