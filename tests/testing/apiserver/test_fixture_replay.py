"""The emulator against transcripts of a real kube-apiserver v1.28.7 (fixtures/kube-api-v1.28).

Each fixture file is replayed in order against a fresh emulated server: same requests (with
placeholders substituted by the values bound so far), then status code, content type, `Warning`
header and body compared with placeholders matched as patterns (see fixture_replay.py). Watch
exchanges are streamed while the exchanges recorded "while this stream was open" are made, then
compared event by event (BOOKMARKs loosely: at least one when the server sent one, matching its
shape and resourceVersion). Unrecorded setup described in each file's `notes` is done directly
on the emulator's registry. Reads the fixtures say were polled until a controller caught up
(GC, EndpointSlices) are polled here too, with a deadline.

Deviations are listed per file in SKIPS (not replayed) and in the Compare options (fields
compared loosely), each with its reason.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rapproxy.testing.apiserver import EmulatedApiServer
from rapproxy.testing.apiserver.controlplane import EndpointSliceController
from rapproxy.testing.apiserver.resources import NAMESPACES, NODES, PODS

from .fixture_replay import Bindings, Compare, compare

REPO_ROOT = Path(__file__).resolve().parents[3]
FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "kube-api-v1.28"
POLL_DEADLINE = 3.0


@dataclass
class Scenario:
    namespaces: tuple[str, ...] = ()
    server: dict[str, Any] = field(default_factory=dict)
    compare: dict[int, Compare] = field(default_factory=dict)
    skips: dict[int, str] = field(default_factory=dict)
    poll_gets: bool = False
    # The recordings ran with kube-controller-manager, so its EndpointSlice controller writes too.
    endpointslice_controller: bool = True
    nodes: tuple[dict[str, Any], ...] = ()
    # Exchange index → hook run just before it (unrecorded steps from the notes).
    before: dict[int, Callable[[EmulatedApiServer, Bindings], Awaitable[None]]] = field(
        default_factory=dict
    )
    # Watch timeoutSeconds rewritten to keep the suite fast (bookmark interval scaled alike).
    watch_timeouts: dict[int, str] = field(default_factory=dict)


async def _compact_like_etcd(api: EmulatedApiServer, _b: Bindings) -> None:
    # The notes: etcd was compacted (at <rv-7>, a revision nothing in these exchanges wrote).
    api.registry.create(NAMESPACES, "", {"metadata": {"name": "fx-compaction-marker"}})
    api.store.compact_etcd(api.store.revision)


async def _roll_pods_watch_cache(api: EmulatedApiServer, _b: Bindings) -> None:
    # The notes: 100 label patches to a pod in another namespace until the pods watch cache
    # dropped its oldest events (this emulator's window is `history_size` events per resource).
    api.registry.create(NAMESPACES, "", {"metadata": {"name": "fx-churn"}})
    api.registry.create(
        PODS,
        "fx-churn",
        {"metadata": {"name": "churn"}, "spec": {"containers": [{"name": "c", "image": "x"}]}},
    )
    for i in range(100):
        api.registry.patch(
            PODS,
            "fx-churn",
            "churn",
            "application/merge-patch+json",
            json.dumps({"metadata": {"labels": {"n": str(i)}}}).encode(),
        )


async def _create_precond_pod(api: EmulatedApiServer, _b: Bindings) -> None:
    # Not recorded: the pod the UID-precondition deletes (its shape is in exchange 23).
    api.registry.create(
        PODS,
        "fx-pods",
        {
            "metadata": {"name": "precond"},
            "spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.9"}]},
        },
    )


GO_CMP_DIFF = Compare(prefix_paths=(".message", ".details.causes[].message"))
TOO_OLD_WINDOW = Compare(loose_paths=("[].object.message",))

SCENARIOS: dict[str, Scenario] = {
    "01-discovery.json": Scenario(
        compare={2: Compare(subset=True), 3: Compare(subset=True), 7: Compare(subset=True)},
    ),
    "02-crud-service.json": Scenario(),
    "03-patches.json": Scenario(namespaces=("fx-patch",), compare={17: GO_CMP_DIFF}),
    "04-validation-errors.json": Scenario(namespaces=("fx-validate",)),
    "05-list-watch.json": Scenario(
        namespaces=("fx-watch",),
        server={"history_size": 100, "bookmark_interval": 6.0},
        before={12: _compact_like_etcd, 20: _roll_pods_watch_cache},
        # 70 s → 7 s, with bookmarks every 6 s instead of 60 s: the same two bookmarks.
        watch_timeouts={18: "7"},
        compare={
            # The window start in "too old resource version: 1 (N)" is the real watch cache's;
            # here it is wherever the emulator's 100-event window starts.
            20: TOO_OLD_WINDOW,
            21: TOO_OLD_WINDOW,
        },
    ),
    "06-custom-resources.json": Scenario(namespaces=("fx-crd",), poll_gets=True),
    "07-pods.json": Scenario(namespaces=("fx-pods",), before={22: _create_precond_pod}),
    "08-leases.json": Scenario(namespaces=("fx-lease",)),
    "09-garbage-collection.json": Scenario(namespaces=("fx-gc",), poll_gets=True),
    "10-endpointslice-controller.json": Scenario(
        namespaces=("fx-eps",),
        poll_gets=True,
        nodes=(
            {
                "metadata": {
                    "name": "node-b",
                    "labels": {
                        "kubernetes.io/hostname": "node-b",
                        "topology.kubernetes.io/zone": "zone-b",
                    },
                }
            },
        ),
        compare={
            i: Compare(
                # How many times the real controller rewrote the slice between two polls
                # depends on its queue timing; the emulator's count differs.
                # So does the list's own revision: the real endpoints and EndpointSlice
                # controllers' writes interleaved differently from the emulator's.
                loose_paths=(".items[].metadata.generation", ".metadata.resourceVersion"),
                unordered_paths=(".subsets[].ports",),
            )
            for i in range(27)
        },
    ),
}


def _is_watch(exchange: dict[str, Any]) -> bool:
    return exchange["request"]["query"].get("watch") in ("true", "1")


def _concurrent_count(exchange: dict[str, Any]) -> int:
    found = re.search(r"The (\d+) exchange\(s\) right after", exchange.get("note", ""))
    return int(found.group(1)) if found else 0


class Replayer:
    def __init__(self, api: EmulatedApiServer, http: aiohttp.ClientSession, scenario: Scenario):
        self.api = api
        self.http = http
        self.scenario = scenario
        self.bindings = Bindings()
        self.failures: list[str] = []

    def _request_args(self, index: int, request: dict[str, Any]) -> dict[str, Any]:
        query = self.bindings.substitute(request["query"])
        if index in self.scenario.watch_timeouts:
            query["timeoutSeconds"] = self.scenario.watch_timeouts[index]
        headers = dict(request["headers"])
        body = request.get("body")
        data: bytes | None = None
        if body is not None:
            data = (
                body.encode()
                if isinstance(body, str)
                else json.dumps(self.bindings.substitute(body)).encode()
            )
        return {
            "method": request["method"],
            "url": self.api.url + self.bindings.substitute(request["path"]),
            "params": query,
            "headers": headers,
            "data": data,
        }

    async def _send(self, index: int, request: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        async with self.http.request(**self._request_args(index, request)) as resp:
            raw = await resp.read()
            headers = {k.lower(): v for k, v in resp.headers.items()}
            if headers.get("content-type", "").startswith("text/plain"):
                return resp.status, headers, raw.decode()
            return resp.status, headers, json.loads(raw) if raw else None

    def _check(
        self,
        index: int,
        exchange: dict[str, Any],
        response: tuple[int, dict[str, str], Any],
        bindings: Bindings,
    ) -> list[str]:
        status, headers, body = response
        expected = exchange["response"]
        where = f"#{index} {exchange['request']['method']} {exchange['request']['path']}"
        errors = []
        if status != expected["status"]:
            errors.append(
                f"status {status}, expected {expected['status']}: {json.dumps(body)[:600]}"
            )
        want_type = expected["headers"].get("content-type")
        if want_type and headers.get("content-type") != want_type:
            errors.append(f"content-type {headers.get('content-type')!r}, expected {want_type!r}")
        want_warning = expected["headers"].get("warning")
        got_warning = headers.get("warning")
        if want_warning or got_warning:
            split = lambda text: set(re.split(r",\s*(?=299 )", text or ""))  # noqa: E731
            if split(want_warning) != split(got_warning):
                errors.append(f"warning {got_warning!r}, expected {want_warning!r}")
        opts = self.scenario.compare.get(index, Compare())
        errors += compare(expected["body"], body, bindings, opts)
        errors += bindings.errors
        errors += bindings.check_rv_order()
        return [f"{where}: {e}" for e in errors]

    async def plain(self, index: int, exchange: dict[str, Any]) -> None:
        poll = self.scenario.poll_gets and exchange["request"]["method"] == "GET"
        deadline = time.monotonic() + (POLL_DEADLINE if poll else 0)
        while True:
            status, headers, body = await self._send(index, exchange["request"])
            trial = Bindings(dict(self.bindings.values))
            errors = self._check(index, exchange, (status, headers, body), trial)
            if not errors or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        if not errors:
            self.bindings.values = trial.values
        self.failures += errors

    async def watch(
        self, index: int, exchange: dict[str, Any], concurrent: list[tuple[int, dict[str, Any]]]
    ) -> None:
        args = self._request_args(index, exchange["request"])
        started = asyncio.Event()
        events: list[dict[str, Any]] = []
        status_holder: list[int] = []

        async def stream() -> None:
            async with self.http.request(**args) as resp:
                status_holder.append(resp.status)
                started.set()
                async for line in resp.content:
                    if line.strip():
                        events.append(json.loads(line))

        task = asyncio.create_task(stream())
        await asyncio.wait_for(started.wait(), 5)
        for j, other in concurrent:
            await self.plain(j, other)
        await asyncio.wait_for(task, 90)
        expected = exchange["response"]["body"]
        where = f"#{index} WATCH {exchange['request']['path']} {exchange['request']['query']}"
        if status_holder != [exchange["response"]["status"]]:
            self.failures.append(f"{where}: status {status_holder}")
        want = [e for e in expected if e["type"] != "BOOKMARK"]
        got = [e for e in events if e["type"] != "BOOKMARK"]
        opts = self.scenario.compare.get(index, Compare())
        errors = compare(want, got, self.bindings, opts)
        want_bm = [e for e in expected if e["type"] == "BOOKMARK"]
        got_bm = [e for e in events if e["type"] == "BOOKMARK"]
        if want_bm and not got_bm:
            errors.append(f"no BOOKMARK, expected {len(want_bm)}")
        if got_bm and not want_bm:
            errors.append(f"unexpected BOOKMARKs {got_bm}")
        for bookmark in got_bm:
            errors += compare(want_bm[0], bookmark, self.bindings, opts, "BOOKMARK")
        errors += self.bindings.errors + self.bindings.check_rv_order()
        self.bindings.errors = []
        self.failures += [f"{where}: {e}" for e in errors]

    async def run(self, exchanges: list[dict[str, Any]]) -> None:
        i = 0
        while i < len(exchanges):
            if i in self.scenario.before:
                await self.scenario.before[i](self.api, self.bindings)
            exchange = exchanges[i]
            if i in self.scenario.skips:
                i += 1
                continue
            if _is_watch(exchange):
                n = _concurrent_count(exchange)
                concurrent = [(j, exchanges[j]) for j in range(i + 1, i + 1 + n)]
                await self.watch(i, exchange, concurrent)
                i += 1 + n
            else:
                await self.plain(i, exchange)
                i += 1


# Files whose watches run for their recorded timeoutSeconds take 15-20 s each.
SLOW = {"05-list-watch.json", "09-garbage-collection.json"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in sorted(SCENARIOS)],
)
async def test_emulator_replays_real_apiserver_transcript(name: str) -> None:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"FIXTURES MISSING: {path} not found; the replay cannot run without them")
    scenario = SCENARIOS[name]
    exchanges = json.loads(path.read_text())["exchanges"]
    api = EmulatedApiServer(**scenario.server)
    controller = (
        EndpointSliceController(api.registry) if scenario.endpointslice_controller else None
    )
    async with api, aiohttp.ClientSession() as http:
        for ns in scenario.namespaces:
            api.registry.create(NAMESPACES, "", {"metadata": {"name": ns}})
        for node in scenario.nodes:
            api.registry.create(NODES, "", node)
        if controller is not None:
            controller.start()
        try:
            replayer = Replayer(api, http, scenario)
            await replayer.run(exchanges)
        finally:
            if controller is not None:
                await controller.stop()
    assert not replayer.failures, "\n".join(replayer.failures)
