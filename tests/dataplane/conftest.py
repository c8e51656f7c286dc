"""Shared fixtures for the relay tests: both event loops, loop-error tripwire, backends, relays.

Every async test here runs twice, on the stock asyncio loop and on uvloop (the loops differ in
exactly the places a relay gets hurt: close ordering, buffer ownership, callback re-entrancy).
Tests that take the `relay` or `relay_server` fixture run on both TCP relay engines as well:
the asyncio Protocol relay and the native C engine, which must pass the same behaviours.
Any exception that reaches a loop's exception handler fails the test: the relay promises to
handle everything itself.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import pytest
import uvloop

from rapproxy.dataplane.native import NativeTcpRelayServer
from rapproxy.dataplane.routing import Backend, L4Protocol
from rapproxy.dataplane.stats import RelayStats
from rapproxy.dataplane.tcp import TcpRelayServer, TcpRelaySettings, fixed_destination

SERVICE = "default/web:80/TCP"


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.SelectorEventLoop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(autouse=True)
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Record every call of the loop's exception handler; the test fails if any happened."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    yield seen
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert not seen, f"exceptions reached the loop's handler: {seen}"


class ListSelector:
    """Round-robin over a fixed backend list; records what the relay reported."""

    def __init__(self, backends: list[Backend], service: str | None = SERVICE) -> None:
        self.backends = backends
        self.service = service
        self.next = 0  # round-robin position
        self.chosen: list[Backend] = []
        self.failed: list[Backend] = []
        self.opened: list[Backend] = []
        self.closed: list[Backend] = []
        self.connect_times: list[float | None] = []
        self.responses: list[tuple[Backend, float, float]] = []
        # Requests awaiting a response, as the relay reported them (opened: one each).
        self.awaiting: Counter[Backend] = Counter()
        self.closed_awaiting: list[bool] = []

    def service_for(self, protocol: L4Protocol, dst_ip: str, dst_port: int) -> str | None:
        return self.service

    def choose(self, service: str, client_ip: str, tried: frozenset[Backend]) -> Backend | None:
        for offset in range(len(self.backends)):
            backend = self.backends[(self.next + offset) % len(self.backends)]
            if backend not in tried:
                self.next = (self.next + offset + 1) % len(self.backends)
                self.chosen.append(backend)
                return backend
        return None

    def dial_failed(self, service: str, backend: Backend, client_ip: str) -> None:
        self.failed.append(backend)

    def connection_opened(
        self, service: str, backend: Backend, connect_seconds: float | None = None
    ) -> None:
        self.opened.append(backend)
        self.connect_times.append(connect_seconds)
        self.awaiting[backend] += 1

    def first_response(
        self,
        service: str,
        backend: Backend,
        connect_seconds: float,
        response_seconds: float,
        queued: int | None = None,
    ) -> None:
        self.responses.append((backend, connect_seconds, response_seconds))
        self.awaiting[backend] -= 1

    def response_started(self, service: str, backend: Backend) -> None:
        self.awaiting[backend] -= 1

    def request_started(self, service: str, backend: Backend) -> None:
        self.awaiting[backend] += 1

    def connection_closed(self, service: str, backend: Backend, awaiting: bool = True) -> None:
        self.closed.append(backend)
        self.closed_awaiting.append(awaiting)
        if awaiting:
            self.awaiting[backend] -= 1


async def _eventually(
    condition: Callable[[], bool], *, within: float = 5.0, what: str = "condition"
) -> None:
    """Poll `condition` until it holds; fail the test after `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.01)


Eventually = Callable[..., Awaitable[None]]


@pytest.fixture
def eventually() -> Eventually:
    """`await eventually(condition, within=5, what=...)`: poll with a deadline, never sleep-sync."""
    return _eventually


@pytest.fixture
def make_selector() -> type[ListSelector]:
    return ListSelector


@pytest.fixture
def open_fds() -> Callable[[], int]:
    return lambda: len(os.listdir("/proc/self/fd"))


@pytest.fixture
def refused_backend() -> Callable[[], Backend]:
    """Factory of loopback backends with nothing listening (port bound once, then released)."""

    def make() -> Backend:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        return Backend("127.0.0.1", port)

    return make


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def backends() -> AsyncIterator[Callable[[Handler], Awaitable[Backend]]]:
    """Start stream servers on 127.0.0.1:0; each returns its Backend. Closed at teardown."""
    servers: list[asyncio.Server] = []
    handler_tasks: set[asyncio.Task[None]] = set()

    def tracked(handler: Handler) -> Handler:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handler_tasks.add(task)
            try:
                await handler(reader, writer)
            finally:
                handler_tasks.discard(task)

        return run

    async def start(handler: Handler) -> Backend:
        server = await asyncio.start_server(tracked(handler), "127.0.0.1", 0, backlog=1024)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return Backend("127.0.0.1", port)

    yield start
    for server in servers:
        server.close()
    # Handlers whose relay was just reset end on their own within a loop iteration or two; one
    # cancelled mid-callback trips asyncio 3.11's stream callback (task.exception() raises).
    if handler_tasks:
        await asyncio.wait(set(handler_tasks), timeout=1.0)
    for task in list(handler_tasks):
        task.cancel()
    await asyncio.gather(*handler_tasks, return_exceptions=True)


@pytest.fixture
async def echo_backend(
    backends: Callable[[Handler], Awaitable[Backend]],
) -> Callable[[], Awaitable[Backend]]:
    """Factory of stream echo backends (echo until EOF, then EOF back)."""
    return lambda: backends(_echo)


AnyRelayServer = TcpRelayServer | NativeTcpRelayServer
RelayFactory = Callable[..., Awaitable[tuple[AnyRelayServer, tuple[str, int]]]]


@pytest.fixture(params=["asyncio", "native"])
def relay_server(request: pytest.FixtureRequest) -> type[AnyRelayServer]:
    """The TCP relay server class of each engine (`proxy.relayEngine`)."""
    return TcpRelayServer if request.param == "asyncio" else NativeTcpRelayServer


@pytest.fixture
async def relay(relay_server: type[AnyRelayServer]) -> AsyncIterator[RelayFactory]:
    """Start a relay server in fixed-destination mode; returns it and its listen address."""
    started: list[AnyRelayServer] = []

    async def start(
        selector: ListSelector, settings: TcpRelaySettings | None = None
    ) -> tuple[AnyRelayServer, tuple[str, int]]:
        server = relay_server(
            selector,
            settings=settings,
            stats=RelayStats(),
            destination=fixed_destination("10.96.0.10", 80),
        )
        await server.start([("127.0.0.1", 0)])
        started.append(server)
        return server, server.addresses[0]

    yield start
    for server in started:
        await server.aclose()
        assert server.active_connections == 0


@pytest.fixture
def blackhole() -> Iterator[Backend]:
    """A listener that never accepts and whose accept queue is full: SYNs go unanswered."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        # With backlog 0 the kernel queues one connection; the next SYN is dropped, not answered.
        for _ in range(2):
            filler = socket.socket()
            fillers.append(filler)
            filler.setblocking(False)
            filler.connect_ex(address)
        deadline = time.monotonic() + 2
        probe = socket.socket()
        fillers.append(probe)
        probe.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                probe.connect(address)
            except TimeoutError:
                break  # a connect that hangs: the hole is black
            except OSError:
                pass
            probe.close()
            probe = socket.socket()
            fillers.append(probe)
            probe.settimeout(0.2)
        else:
            pytest.fail("could not fill the blackhole listener's accept queue")
        yield Backend(address[0], address[1])
    finally:
        for sock in fillers:
            sock.close()
        listener.close()
