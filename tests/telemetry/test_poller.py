"""The peer poller against real telemetry servers on 127.0.0.x."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import pytest
from aiohttp import web

from rapproxy.model.endpoints import Endpoint
from rapproxy.model.service import ServicePort, ServicePortName
from rapproxy.model.table import ServiceEntry, ServiceTable
from rapproxy.model.telemetry import NodeStats, RapSettings, TelemetryTracker
from rapproxy.telemetry.poller import PeerPoller, PeerTarget, RecentTraffic
from rapproxy.telemetry.server import TelemetryEndpoint, TokenFile

from .conftest import Serve

SETTINGS = RapSettings(telemetry_interval=0.5, poll_timeout=0.3, rtt_alpha=0.5)


class Peer:
    """An emulated node's telemetry server with an injectable delay and failure mode."""

    def __init__(
        self, name: str, host: str, token_file: TokenFile, node_ips: Callable[[str], bool]
    ):
        self.name = name
        self.host = host
        self.delay = 0.0
        self.garbage = False
        self.hold: asyncio.Event | None = None
        self.served = 0
        self.cpu = 0.1
        self.endpoint = TelemetryEndpoint(
            lambda: NodeStats(self.name, self.cpu, 0.2, time.monotonic()),
            dict,
            token_file.current,
            node_ips,
        )
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.delay:
            await asyncio.sleep(self.delay)  # injected network/processing delay
        if self.hold is not None:
            await self.hold.wait()
        self.served += 1
        if self.garbage:
            return web.Response(text="<html>not telemetry</html>", content_type="text/html")
        return await self.endpoint.handle(request)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/rap/v1/telemetry", self.handle)
        return app

    @property
    def target(self) -> PeerTarget:
        return PeerTarget(self.name, self.host, self.port)


@pytest.fixture
async def peers(
    serve: Serve, token_file: TokenFile, node_ips: Callable[[str], bool]
) -> AsyncIterator[dict[str, Peer]]:
    async with AsyncExitStack() as stack:
        out = {}
        for i, name in enumerate(["n1", "n2", "n3"], start=2):
            peer = Peer(name, f"127.0.0.{i}", token_file, node_ips)
            peer.runner, peer.port = await stack.enter_async_context(serve(peer.app(), peer.host))
            out[name] = peer
        yield out


def poller_for(
    peers: dict[str, Peer], token: str, tracker: TelemetryTracker | None = None
) -> PeerPoller:
    return PeerPoller(
        tracker or TelemetryTracker("n0", SETTINGS),
        lambda: [p.target for p in peers.values()],
        lambda: token,
        source_address="127.0.0.1",
    )


async def test_polls_every_peer_and_measures_rtt(peers: dict[str, Peer]) -> None:
    async with poller_for(peers, "s3cret-token") as poller:
        await poller.poll_once()
    view = poller.tracker.snapshot()
    now = time.monotonic()
    for name in peers:
        assert view.is_fresh(name, now), view.describe(now)
        rtt = view.nodes[name].rtt
        assert rtt is not None and 0 < rtt < SETTINGS.poll_timeout
        assert view.nodes[name].stats is not None


async def test_dead_peer_goes_stale_without_disturbing_the_others(peers: dict[str, Peer]) -> None:
    async with poller_for(peers, "s3cret-token") as poller:
        await poller.poll_once()
        runner = peers["n2"].runner
        assert runner is not None
        await runner.cleanup()
        await poller.poll_once()
    view = poller.tracker.snapshot()
    now = time.monotonic()
    assert not view.is_fresh("n2", now)
    assert view.nodes["n2"].last_error is not None
    assert view.is_fresh("n1", now) and view.is_fresh("n3", now)


async def test_garbage_answer_marks_peer_stale(peers: dict[str, Peer]) -> None:
    peers["n3"].garbage = True
    async with poller_for(peers, "s3cret-token") as poller:
        await poller.poll_once()
    view = poller.tracker.snapshot()
    assert "bad answer" in str(view.nodes["n3"].last_error)
    assert view.is_fresh("n1", time.monotonic())


async def test_wrong_token_marks_every_peer_stale(peers: dict[str, Peer]) -> None:
    async with poller_for(peers, "not-the-token") as poller:
        await poller.poll_once()
    view = poller.tracker.snapshot()
    assert all("HTTP 401" in str(view.nodes[n].last_error) for n in peers)


async def test_slow_peer_costs_only_its_own_timeout(peers: dict[str, Peer]) -> None:
    peers["n1"].delay = 1.0
    async with poller_for(peers, "s3cret-token") as poller:
        started = time.monotonic()
        await poller.poll_once()
        elapsed = time.monotonic() - started
    view = poller.tracker.snapshot()
    assert elapsed < SETTINGS.poll_timeout + 0.5
    assert "timeout" in str(view.nodes["n1"].last_error)
    assert view.is_fresh("n2", time.monotonic()) and view.is_fresh("n3", time.monotonic())


async def test_injected_delay_raises_that_peers_rtt_ewma(peers: dict[str, Peer]) -> None:
    async with poller_for(peers, "s3cret-token") as poller:
        await poller.poll_once()
        peers["n2"].delay = 0.05
        for _ in range(4):
            await poller.poll_once()
    nodes = poller.tracker.snapshot().nodes
    n1, n2 = nodes["n1"].rtt, nodes["n2"].rtt
    assert n1 is not None and n2 is not None
    assert n2 > 0.04 > n1


async def test_run_polls_on_a_cadence_until_cancelled(peers: dict[str, Peer]) -> None:
    poller = poller_for(peers, "s3cret-token")
    task = asyncio.create_task(poller.run())
    try:
        deadline = time.monotonic() + 5
        while poller.rounds < 3:
            assert time.monotonic() < deadline, "poller did not run 3 rounds in 5 s"
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert poller.tracker.snapshot().nodes["n1"].rtt_sample_count >= 3


async def test_scope_limits_the_poll_set(peers: dict[str, Peer]) -> None:
    name = ServicePortName("default", "web", "http")
    port = ServicePort(name, 80, 8080, cluster_ips=("10.96.0.1",))
    table = ServiceTable({name: ServiceEntry(port, (Endpoint("10.0.0.1", 8080, node_name="n2"),))})
    recent = RecentTraffic(window=10.0)
    clock = [100.0]
    poller = PeerPoller(
        TelemetryTracker("n0", SETTINGS),
        lambda: [p.target for p in peers.values()],
        lambda: "s3cret-token",
        source_address="127.0.0.1",
        scope=recent.scope(lambda: table, clock=lambda: clock[0]),
    )
    assert poller.poll_set() == []
    recent.note(name, 100.0)
    assert [t.node_name for t in poller.poll_set()] == ["n2"]
    clock[0] = 111.0  # outside the window: no recent traffic any more
    assert poller.poll_set() == []
    await poller.close()


async def test_a_round_is_applied_as_one_update_after_every_peer_answered(
    peers: dict[str, Peer],
) -> None:
    release = asyncio.Event()
    peers["n1"].hold = release
    async with poller_for(peers, "s3cret-token") as poller:
        round_task = asyncio.create_task(poller.poll_once())
        deadline = time.monotonic() + 5
        while peers["n2"].served == 0 or peers["n3"].served == 0:
            assert time.monotonic() < deadline, "fast peers were not polled"
            await asyncio.sleep(0.01)
        # n2 and n3 have answered, n1 is still being waited for: nothing is published yet, so
        # policies do not re-plan once per peer.
        assert poller.tracker.snapshot().nodes == {}
        release.set()
        await round_task
    assert set(poller.tracker.snapshot().nodes) == {"n1", "n2", "n3"}
