"""What only the native relay engine has: its refusals, its build check, its callback rules.

The behaviours both engines share (half-close, resets, back-pressure, caps, dial attempts, idle,
churn, fd counts) are in test_tcp.py, which runs every test on both; these are the native
engine's own promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from rapproxy.config import ConfigError, from_mapping
from rapproxy.dataplane.native import (
    MAX_DIAL_ATTEMPTS,
    NativeEngineUnavailable,
    NativeTcpRelayServer,
    load_engine,
)
from rapproxy.dataplane.routing import Backend
from rapproxy.dataplane.tcp import InvalidTcpRelaySettings, TcpRelaySettings, fixed_destination

SERVICE = "default/web:80/TCP"


def test_a_missing_extension_is_a_clear_error_not_a_fallback(
    monkeypatch: pytest.MonkeyPatch, make_selector
) -> None:
    monkeypatch.setitem(sys.modules, "rapproxy.dataplane._native", None)  # import fails
    with pytest.raises(NativeEngineUnavailable, match=r"make install.*relayEngine: asyncio"):
        load_engine()
    with pytest.raises(NativeEngineUnavailable):
        NativeTcpRelayServer(make_selector([]), destination=fixed_destination("10.96.0.10", 80))


def test_a_destination_resolver_it_cannot_run_in_c_is_refused(make_selector) -> None:
    with pytest.raises(ValueError, match="intercepted_destination or fixed_destination"):
        NativeTcpRelayServer(make_selector([]), destination=lambda _t: ("10.96.0.10", 80))


def test_more_dial_attempts_than_it_tracks_are_refused(make_selector) -> None:
    settings = TcpRelaySettings(dial_timeouts=(0.1,) * (MAX_DIAL_ATTEMPTS + 1))
    with pytest.raises(InvalidTcpRelaySettings, match="dial_timeouts"):
        NativeTcpRelayServer(make_selector([]), settings=settings)
    with pytest.raises(ConfigError, match=r"^proxy\.dialTimeouts: relayEngine 'native'"):
        from_mapping({"proxy": {"dialTimeouts": [0.1] * (MAX_DIAL_ATTEMPTS + 1)}})
    many = from_mapping(
        {"proxy": {"relayEngine": "asyncio", "dialTimeouts": [0.1] * (MAX_DIAL_ATTEMPTS + 1)}}
    )
    assert len(many.proxy.dial_timeouts) == MAX_DIAL_ATTEMPTS + 1


async def test_a_callback_that_reenters_the_engine_is_refused_and_the_client_reset(
    echo_backend, make_selector, eventually
) -> None:
    backend = await echo_backend()
    seen: list[BaseException] = []

    class Reentrant(make_selector):  # type: ignore[misc,valid-type]
        def service_for(self, protocol: str, dst_ip: str, dst_port: int) -> str | None:
            try:
                server._engine.run()  # what no callback may do
            except RuntimeError as error:
                seen.append(error)
                raise
            return SERVICE

    server = NativeTcpRelayServer(
        Reentrant([backend]), destination=fixed_destination("10.96.0.10", 80)
    )
    await server.start([("127.0.0.1", 0)])
    try:
        address = server.addresses[0]
        try:
            reader, writer = await asyncio.open_connection(*address)
        except ConnectionResetError:
            pass
        else:
            async with asyncio.timeout(2):
                with contextlib.suppress(ConnectionResetError):
                    assert await reader.read() == b""
            writer.close()
        assert seen and "called from one of its callbacks" in str(seen[0])
        assert server.active_connections == 0
    finally:
        await server.aclose()


async def test_bytes_are_counted_when_the_relay_ends(
    echo_backend, make_selector, eventually, relay
) -> None:
    backend = await echo_backend()
    selector = make_selector([backend])
    server, address = await relay(selector)
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"x" * 1000)
    assert await reader.readexactly(1000) == b"x" * 1000
    writer.write_eof()
    assert await reader.read() == b""
    writer.close()
    await eventually(lambda: server.active_connections == 0, what="the relay to end")
    counters = server.stats.snapshot().services[SERVICE]
    assert (counters.bytes_from_clients, counters.bytes_to_clients) == (1000, 1000)


async def test_many_dials_timing_out_together_each_move_on_once(
    echo_backend, make_selector, eventually, blackhole: Backend
) -> None:
    """One timer for every dial: 100 clients whose first attempt hangs all reach the live one."""
    alive = await echo_backend()

    class FirstBlackhole(make_selector):  # type: ignore[misc,valid-type]
        def choose(self, service: str, client_ip: str, tried: frozenset[Backend]) -> Backend | None:
            return blackhole if not tried else (alive if alive not in tried else None)

    selector = FirstBlackhole([])
    server = NativeTcpRelayServer(
        selector,
        settings=TcpRelaySettings(dial_timeouts=(0.2, 1.0)),
        destination=fixed_destination("10.96.0.10", 80),
    )
    await server.start([("127.0.0.1", 0)])
    try:
        address = server.addresses[0]

        async def one(index: int) -> None:
            reader, writer = await asyncio.open_connection(*address)
            message = f"client {index}".encode()
            writer.write(message)
            writer.write_eof()
            assert await reader.read() == message
            writer.close()

        async with asyncio.timeout(10):
            await asyncio.gather(*(one(i) for i in range(100)))
        await eventually(lambda: server.active_connections == 0, what="every relay to end")
        assert selector.failed.count(blackhole) == 100
        assert selector.opened.count(alive) == 100
    finally:
        await server.aclose()


async def test_a_long_lived_connection_s_bytes_show_while_it_lasts(
    echo_backend, make_selector, eventually
) -> None:
    backend = await echo_backend()
    server = NativeTcpRelayServer(
        make_selector([backend]), destination=fixed_destination("10.96.0.10", 80)
    )
    await server.start([("127.0.0.1", 0)])
    try:
        reader, writer = await asyncio.open_connection(*server.addresses[0])
        writer.write(b"y" * 500)
        assert await reader.readexactly(500) == b"y" * 500

        def counted() -> tuple[int, int]:
            counters = server.stats.snapshot().services[SERVICE]
            return counters.bytes_from_clients, counters.bytes_to_clients

        await eventually(lambda: counted() == (500, 500), within=3, what="the bytes counted")
        writer.write(b"z" * 100)  # after a report: only the rest is added at the end
        assert await reader.readexactly(100) == b"z" * 100
        writer.close()
        await eventually(lambda: server.active_connections == 0, what="the relay to end")
        assert counted() == (600, 600)
    finally:
        await server.aclose()


def limit_leaving_free(free: int) -> int:
    """The RLIMIT_NOFILE under which exactly `free` more descriptors can be opened (the limit
    bounds descriptor numbers, and a new descriptor takes the lowest free number)."""
    lowest_free = os.dup(0)  # the number listdir's own descriptor will take, then give back
    os.close(lowest_free)
    used = {int(name) for name in os.listdir("/proc/self/fd")} - {lowest_free}
    limit = 0
    while free:
        if limit not in used:
            free -= 1
        limit += 1
    return limit


_ECHO_PROCESS = """
import socket, threading
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(16)
print(server.getsockname()[1], flush=True)
def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    threading.Thread(target=echo, args=(server.accept()[0],), daemon=True).start()
"""


@pytest.fixture
def echo_process() -> Iterator[Backend]:
    """An echo backend in a process of its own (its descriptors are not this process's)."""
    process = subprocess.Popen([sys.executable, "-c", _ECHO_PROCESS], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        yield Backend("127.0.0.1", int(process.stdout.readline()))
    finally:
        process.kill()
        process.wait()


async def test_out_of_descriptors_the_listener_waits_instead_of_spinning(
    make_selector, eventually, echo_process: Backend
) -> None:
    """EMFILE leaves the listening socket readable: a level-triggered wait would spin on it.
    The engine leaves the epoll set until a relay ends; clients meanwhile wait in the queue.
    The backend runs in another process, so only the relay spends this process's descriptors."""
    server = NativeTcpRelayServer(
        make_selector([echo_process]), destination=fixed_destination("10.96.0.10", 80)
    )
    await server.start([("127.0.0.1", 0)])
    clients = [socket.socket() for _ in range(3)]  # made now: connect() needs no descriptor
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    loop = asyncio.get_running_loop()
    try:
        for client in clients:
            client.setblocking(False)
        # Room for exactly one relay: its client and upstream sockets.
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit_leaving_free(2), hard))
        for client in clients:
            await loop.sock_connect(client, server.addresses[0])
        await eventually(lambda: server.active_connections == 1, what="one relay")
        cpu_before = time.process_time()
        await asyncio.sleep(0.3)  # long enough for a spinning loop to burn most of it
        assert time.process_time() - cpu_before < 0.15
        assert server.active_connections == 1
        async with asyncio.timeout(5):
            await loop.sock_sendall(clients[0], b"ping")
            assert await loop.sock_recv(clients[0], 4) == b"ping"
        # Descriptors again, and a relay ends: the listener is back, the queue is served.
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        clients[0].close()
        for client in clients[1:]:
            async with asyncio.timeout(5):
                await loop.sock_sendall(client, b"pong")
                assert await loop.sock_recv(client, 4) == b"pong"
            client.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for client in clients:
            client.close()
        await server.aclose()
