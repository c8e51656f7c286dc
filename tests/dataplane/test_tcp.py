"""The TCP relay against real loopback sockets, on both event loops."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import struct
import time

import pytest

from rapproxy.dataplane.routing import Backend
from rapproxy.dataplane.tcp import (
    InvalidTcpRelaySettings,
    TcpRelaySettings,
    fixed_destination,
)

SERVICE = "default/web:80/TCP"
FAST_DIALS = TcpRelaySettings(dial_timeouts=(0.3, 0.3, 0.3, 0.3))


async def connect(address: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(address[0], address[1])


async def assert_closed_by_relay(reader: asyncio.StreamReader, within: float) -> None:
    """The relay closed (FIN, with no data) or reset this client within `within` seconds."""
    async with asyncio.timeout(within):
        try:
            data = await reader.read()
        except ConnectionResetError:
            return
    assert data == b""


async def assert_refused_by_relay(address: tuple[str, int], within: float) -> None:
    """A client connecting now is closed or reset by the relay, without any data.

    The reset may come before the client's loop has even seen its connect complete (the native
    engine rejects in the same pass that accepts), so a connect that fails with a reset counts.
    """
    try:
        reader, writer = await connect(address)
    except ConnectionResetError:
        return
    try:
        await assert_closed_by_relay(reader, within)
    finally:
        writer.close()


def reset_on_close(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def test_echo_round_trip(echo_backend, make_selector, eventually, relay) -> None:
    backend = await echo_backend()
    selector = make_selector([backend])
    server, address = await relay(selector)
    reader, writer = await connect(address)
    writer.write(b"hello through the relay")
    assert await reader.readexactly(23) == b"hello through the relay"
    writer.close()
    await writer.wait_closed()
    await eventually(lambda: server.active_connections == 0, what="relay to finish")
    assert selector.opened == [backend]
    assert selector.closed == [backend]
    counters = server.stats.snapshot().services[SERVICE]
    assert counters.tcp_connections_total == 1
    assert counters.tcp_active == 0
    assert counters.bytes_from_clients == 23
    assert counters.bytes_to_clients == 23


async def test_50_megabytes_each_way_arrive_intact(echo_backend, make_selector, relay) -> None:
    backend = await echo_backend()
    _, address = await relay(make_selector([backend]))
    payload = random.randbytes(50 * 1024 * 1024)
    reader, writer = await connect(address)

    async def send() -> None:
        view = memoryview(payload)
        for offset in range(0, len(payload), 1024 * 1024):
            writer.write(view[offset : offset + 1024 * 1024])
            await writer.drain()
        writer.write_eof()

    async def receive() -> str:
        digest = hashlib.sha256()
        while chunk := await reader.read(1024 * 1024):
            digest.update(chunk)
        return digest.hexdigest()

    async with asyncio.timeout(30):
        _, echoed = await asyncio.gather(send(), receive())
    assert echoed == hashlib.sha256(payload).hexdigest()
    writer.close()


async def test_client_half_close_still_receives_the_reply(make_selector, backends, relay) -> None:
    async def count_then_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received = await reader.read()  # until the client's EOF
        writer.write(f"got {len(received)} bytes".encode())
        await writer.drain()
        writer.close()

    backend = await backends(count_then_reply)
    _, address = await relay(make_selector([backend]))
    reader, writer = await connect(address)
    writer.write(b"x" * 1000)
    writer.write_eof()
    async with asyncio.timeout(5):
        assert await reader.read() == b"got 1000 bytes"
    writer.close()


async def test_server_half_close_still_receives_the_client(make_selector, backends, relay) -> None:
    heard: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def greet_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        writer.write_eof()
        await writer.drain()
        heard.set_result(await reader.read())
        writer.close()

    backend = await backends(greet_then_listen)
    _, address = await relay(make_selector([backend]))
    reader, writer = await connect(address)
    async with asyncio.timeout(5):
        assert await reader.read() == b"hello"  # the server's EOF came through
        writer.write(b"still talking")
        writer.write_eof()
        assert await heard == b"still talking"
    writer.close()


async def test_backend_fin_reaches_the_client_right_behind_the_last_bytes(
    make_selector, eventually, relay
) -> None:
    """The response and the FIN behind it leave the relay together, not a loop iteration apart.

    Otherwise the client has read the response and closed before the FIN arrives, and keeps a
    TIME_WAIT socket per connection: under connection-per-request load its ports run out.
    """
    loop = asyncio.get_running_loop()

    def read_then_peek(sock: socket.socket) -> asyncio.Future[tuple[bytes, bytes | None]]:
        """Read the moment the socket turns readable, then look whether the FIN is there too."""
        done: asyncio.Future[tuple[bytes, bytes | None]] = loop.create_future()

        def on_readable() -> None:
            loop.remove_reader(sock)
            data = sock.recv(100)
            try:
                done.set_result((data, sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)))
            except BlockingIOError:
                done.set_result((data, None))  # no FIN yet

        loop.add_reader(sock, on_readable)
        return done

    with socket.socket() as listener, socket.socket() as client:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        backend = Backend("127.0.0.1", listener.getsockname()[1])
        selector = make_selector([backend])
        server, address = await relay(selector)
        client.setblocking(False)
        async with asyncio.timeout(5):
            await loop.sock_connect(client, address)
            await loop.sock_sendall(client, b"GET")
            upstream, _ = await loop.sock_accept(listener)
            with upstream:
                assert await loop.sock_recv(upstream, 3) == b"GET"
                upstream.send(b"ok\n")  # both queued at the relay before it reads either
                upstream.shutdown(socket.SHUT_WR)
                assert await read_then_peek(client) == (b"ok\n", b"")
        client.close()
        await eventually(lambda: server.active_connections == 0, what="the relay to finish")
    assert selector.closed == [backend]


async def test_backend_reset_resets_the_client(make_selector, eventually, backends, relay) -> None:
    async def reset_after_first_bytes(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.read(1)
        reset_on_close(writer)
        writer.transport.abort()

    backend = await backends(reset_after_first_bytes)
    server, address = await relay(make_selector([backend]))
    reader, writer = await connect(address)
    writer.write(b"x")
    async with asyncio.timeout(2):
        with pytest.raises(ConnectionResetError):
            await reader.read(1)
    writer.close()
    await eventually(lambda: server.active_connections == 0, what="relay to finish")


async def test_client_reset_resets_the_backend(make_selector, eventually, backends, relay) -> None:
    outcome: asyncio.Future[BaseException | bytes] = asyncio.get_running_loop().create_future()

    async def wait_for_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ready")
        try:
            outcome.set_result(await reader.read())
        except ConnectionResetError as error:
            outcome.set_result(error)
        writer.close()

    backend = await backends(wait_for_client)
    server, address = await relay(make_selector([backend]))
    reader, writer = await connect(address)
    assert await reader.readexactly(5) == b"ready"
    writer.write(b"partial request")
    await writer.drain()
    await asyncio.sleep(0)
    reset_on_close(writer)
    writer.transport.abort()
    async with asyncio.timeout(2):
        assert isinstance(await outcome, ConnectionResetError)
    await eventually(lambda: server.active_connections == 0, what="relay to finish")


async def test_refused_dial_retries_on_another_backend(
    echo_backend, make_selector, refused_backend, relay
) -> None:
    dead = refused_backend()
    alive = await echo_backend()
    selector = make_selector([dead, alive])
    _, address = await relay(selector, FAST_DIALS)
    reader, writer = await connect(address)
    writer.write(b"ping")
    async with asyncio.timeout(5):
        assert await reader.readexactly(4) == b"ping"
    assert selector.failed == [dead]
    assert selector.chosen == [dead, alive]
    assert selector.opened == [alive]
    writer.close()


async def test_client_is_closed_when_every_backend_refuses(
    make_selector, refused_backend, eventually, relay
) -> None:
    dead = [refused_backend() for _ in range(3)]
    selector = make_selector(dead)
    server, address = await relay(selector, FAST_DIALS)
    reader, writer = await connect(address)
    await assert_closed_by_relay(reader, within=5)
    assert sorted(selector.failed, key=lambda b: b.port) == sorted(dead, key=lambda b: b.port)
    assert selector.opened == []
    assert server.stats.snapshot().services[SERVICE].tcp_dial_exhausted == 1
    writer.close()
    await eventually(lambda: server.active_connections == 0, what="relay to finish")


async def test_connect_timeout_moves_on_to_the_next_backend(
    echo_backend, make_selector, relay, blackhole: Backend
) -> None:
    alive = await echo_backend()
    selector = make_selector([blackhole, alive])
    settings = TcpRelaySettings(dial_timeouts=(0.2, 0.2))
    _, address = await relay(selector, settings)
    started = time.monotonic()
    reader, writer = await connect(address)
    writer.write(b"ping")
    async with asyncio.timeout(5):
        assert await reader.readexactly(4) == b"ping"
    assert time.monotonic() - started >= 0.19  # uvloop timers round to milliseconds
    assert selector.failed == [blackhole]
    writer.close()


async def test_client_bytes_wait_unread_while_dialling(
    echo_backend, make_selector, eventually, relay, blackhole: Backend
) -> None:
    alive = await echo_backend()
    settings = TcpRelaySettings(dial_timeouts=(0.5, 0.5))
    server, address = await relay(make_selector([blackhole, alive]), settings)
    reader, writer = await connect(address)
    payload = random.randbytes(8 * 1024 * 1024)
    writer.write(payload)
    # The kernel buffers fill and the rest backs up in our own transport: nobody is reading.
    await eventually(
        lambda: writer.transport.get_write_buffer_size() > 0, what="the client to back up"
    )
    (only_relay,) = server.relay_views()
    assert only_relay.dialing
    assert only_relay.held_from_client <= 256 * 1024
    writer.write_eof()
    async with asyncio.timeout(10):
        assert await reader.read() == payload
    writer.close()


async def test_clients_resetting_while_dialling_leave_no_relay_behind(
    make_selector, eventually, relay, blackhole: Backend
) -> None:
    server, address = await relay(make_selector([blackhole]), TcpRelaySettings(dial_timeouts=(5,)))

    async def connect_and_reset() -> None:
        _, writer = await connect(address)
        reset_on_close(writer)
        writer.transport.abort()

    await asyncio.gather(*(connect_and_reset() for _ in range(200)))
    # Long before the 5 s connect timeout: the resets themselves end the relays.
    await eventually(lambda: server.active_connections == 0, within=2, what="every relay to finish")
    assert server.stats.snapshot().tcp_active == 0
    assert server.stats.snapshot().services[SERVICE].tcp_active == 0


async def test_close_while_dialling_finishes_every_relay(
    make_selector, eventually, relay, blackhole: Backend
) -> None:
    server, address = await relay(make_selector([blackhole]), TcpRelaySettings(dial_timeouts=(5,)))
    writers = [(await connect(address))[1] for _ in range(50)]
    await eventually(lambda: server.active_connections == 50, what="all clients accepted")
    async with asyncio.timeout(2):
        await server.aclose()
    assert server.active_connections == 0
    for writer in writers:
        writer.close()


async def test_idle_connection_is_closed(echo_backend, make_selector, relay) -> None:
    backend = await echo_backend()
    server, address = await relay(make_selector([backend]), TcpRelaySettings(idle_timeout=0.4))
    reader, writer = await connect(address)
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    assert loop.time() - quiet_since >= 0.4
    assert server.stats.snapshot().services[SERVICE].tcp_idle_closed == 1
    writer.close()


async def test_busy_connection_outlives_the_idle_timeout(
    echo_backend, make_selector, relay
) -> None:
    backend = await echo_backend()
    server, address = await relay(make_selector([backend]), TcpRelaySettings(idle_timeout=0.4))
    reader, writer = await connect(address)
    loop = asyncio.get_running_loop()
    started = loop.time()
    while loop.time() - started < 1.2:
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        await asyncio.sleep(0.05)
    assert server.stats.snapshot().services[SERVICE].tcp_idle_closed == 0
    writer.close()


async def test_connection_cap_rejects_new_clients(
    echo_backend, make_selector, eventually, relay
) -> None:
    backend = await echo_backend()
    server, address = await relay(make_selector([backend]), TcpRelaySettings(max_connections=2))
    held = []
    for _ in range(2):
        reader, writer = await connect(address)
        writer.write(b"hi")
        assert await reader.readexactly(2) == b"hi"
        held.append(writer)
    await assert_refused_by_relay(address, within=2)
    assert server.stats.snapshot().tcp_rejected_by_cap == 1
    held.pop().close()
    await eventually(lambda: server.active_connections == 1, what="a slot to free up")
    reader, writer = await connect(address)
    writer.write(b"again")
    assert await reader.readexactly(5) == b"again"
    writer.close()
    for held_writer in held:
        held_writer.close()


async def test_slow_reader_pauses_the_writer(make_selector, backends, relay) -> None:
    """Back-pressure: a backend that stops reading must not make the relay buffer without bound."""
    release = asyncio.Event()
    total: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def read_later(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        total.set_result(len(await reader.read()))
        writer.close()

    backend = await backends(read_later)
    settings = TcpRelaySettings(write_buffer_high=64 * 1024, write_buffer_low=16 * 1024)
    server, address = await relay(make_selector([backend]), settings)
    _, writer = await connect(address)
    chunk = b"z" * 65536
    sent = 0
    # Write until the client's own buffer backs up: the relay stopped reading from us.
    while writer.transport.get_write_buffer_size() < 4 * 1024 * 1024 and sent < 64 * 1024 * 1024:
        writer.write(chunk)
        sent += len(chunk)
        await asyncio.sleep(0)
    assert sent < 64 * 1024 * 1024, "the relay never pushed back"
    (only_relay,) = server.relay_views()
    assert only_relay.held_from_client <= 64 * 1024 + 512 * 1024
    release.set()
    writer.write_eof()
    async with asyncio.timeout(10):
        await writer.drain()
        assert await total == sent
    writer.close()


async def test_500_concurrent_clients_each_get_their_own_bytes(
    echo_backend, make_selector, eventually, relay
) -> None:
    pool = [await echo_backend() for _ in range(3)]
    selector = make_selector(pool)
    server, address = await relay(selector)

    async def one_client(index: int) -> None:
        reader, writer = await connect(address)
        message = f"client {index} ".encode() * 50
        writer.write(message)
        writer.write_eof()
        assert await reader.read() == message
        writer.close()

    async with asyncio.timeout(20):
        await asyncio.gather(*(one_client(i) for i in range(500)))
    await eventually(lambda: server.active_connections == 0, what="all relays to finish")
    assert len(selector.opened) == 500
    assert len(selector.closed) == 500
    assert server.stats.snapshot().services[SERVICE].tcp_connections_total == 500


async def test_a_failing_selector_closes_both_sides_and_never_reaches_the_loop(
    make_selector, eventually, backends, relay
) -> None:
    backend_saw: asyncio.Future[bytes | BaseException] = asyncio.get_running_loop().create_future()

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            backend_saw.set_result(await reader.read())
        except ConnectionResetError as error:
            backend_saw.set_result(error)
        writer.close()

    class Broken(make_selector):  # type: ignore[misc,valid-type]
        def connection_opened(
            self, service: str, backend: Backend, connect_seconds: float | None = None
        ) -> None:
            raise RuntimeError("selector bug")

    backend = await backends(record)
    server, address = await relay(Broken([backend]))
    await assert_refused_by_relay(address, within=2)
    async with asyncio.timeout(2):
        outcome = await backend_saw
    assert outcome == b"" or isinstance(outcome, ConnectionResetError)
    await eventually(lambda: server.active_connections == 0, what="the relay to finish")


async def test_both_sides_of_a_relay_have_nodelay(echo_backend, make_selector, relay) -> None:
    backend = await echo_backend()
    server, address = await relay(make_selector([backend]))
    reader, writer = await connect(address)
    writer.write(b"x")
    assert await reader.readexactly(1) == b"x"
    (only_relay,) = server.relay_views()
    for fd in (only_relay.client_fd, only_relay.upstream_fd):
        assert fd is not None
        with socket.socket(fileno=socket.dup(fd)) as sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    writer.close()


async def test_ipv6_listener_relays_to_an_ipv6_backend(
    make_selector, eventually, relay_server
) -> None:
    async def echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()

    backend_server = await asyncio.start_server(echo_once, "::1", 0)
    backend = Backend("::1", backend_server.sockets[0].getsockname()[1])
    selector = make_selector([backend])
    clients: list[str] = []
    original_choose = selector.choose

    def choose(service: str, client_ip: str, tried: frozenset[Backend]) -> Backend | None:
        clients.append(client_ip)
        return original_choose(service, client_ip, tried)

    selector.choose = choose
    server = relay_server(selector, destination=fixed_destination("fd00::10", 80))
    try:
        await server.start([("127.0.0.1", 0), ("::1", 0)])
        v4, v6 = server.addresses
        assert v4[0] == "127.0.0.1" and v6[0] == "::1"
        reader, writer = await asyncio.open_connection("::1", v6[1])
        writer.write(b"six!")
        async with asyncio.timeout(2):
            assert await reader.readexactly(4) == b"six!"
        assert clients == ["::1"]
        writer.close()
    finally:
        await server.aclose()
        backend_server.close()


async def test_unknown_destination_closes_the_client(make_selector, relay) -> None:
    selector = make_selector([], service=None)
    server, address = await relay(selector)
    await assert_refused_by_relay(address, within=2)
    assert server.stats.snapshot().tcp_unknown_destination == 1


async def test_connection_close_churn_with_client_resets_leaks_nothing(
    make_selector, eventually, open_fds, backends, relay
) -> None:
    """2000 short HTTP-style connections, a tenth reset mid-stream by the client."""
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"

    async def http_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(response)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    pool = [await backends(http_close) for _ in range(2)]
    fds_before = open_fds()
    selector = make_selector(pool)
    server, address = await relay(selector)
    rng = random.Random(7)
    plans = [rng.random() < 0.1 for _ in range(2000)]
    completed = 0

    async def one_client(reset_midway: bool) -> None:
        nonlocal completed
        reader, writer = await connect(address)
        try:
            if reset_midway:
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
                await asyncio.sleep(0)
                reset_on_close(writer)
                writer.transport.abort()
                return
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert await reader.read() == response
            completed += 1
        finally:
            writer.close()

    semaphore = asyncio.Semaphore(64)

    async def bounded(reset_midway: bool) -> None:
        async with semaphore:
            await one_client(reset_midway)

    async with asyncio.timeout(40):
        await asyncio.gather(*(bounded(plan) for plan in plans))
    assert completed == plans.count(False)
    await eventually(lambda: server.active_connections == 0, what="all relays to finish")
    await server.aclose()
    await eventually(lambda: open_fds() <= fds_before, what=f"fds back to {fds_before}")
    assert len(selector.opened) == len(selector.closed)


def test_settings_reject_nonsense_naming_the_field() -> None:
    with pytest.raises(InvalidTcpRelaySettings, match="dial_timeouts"):
        TcpRelaySettings(dial_timeouts=())
    with pytest.raises(InvalidTcpRelaySettings, match="max_connections"):
        TcpRelaySettings(max_connections=0)
    with pytest.raises(InvalidTcpRelaySettings, match="write_buffer_low"):
        TcpRelaySettings(write_buffer_high=10, write_buffer_low=20)
    with pytest.raises(InvalidTcpRelaySettings, match="idle_timeout"):
        TcpRelaySettings(idle_timeout=0)


async def test_relay_reports_connect_time_and_time_to_the_first_response_byte(
    make_selector, backends, relay
) -> None:
    # What RAP's latency signal is made of: the dial's duration, and the time from the
    # request's first byte going upstream to the first byte coming back (the pod's 80 ms).
    async def slow_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        await asyncio.sleep(0.08)
        writer.write(b"done")
        await writer.drain()
        writer.close()

    backend = await backends(slow_reply)
    selector = make_selector([backend])
    _, address = await relay(selector)
    for delay_before_request in (0.0, 0.05):  # sent during the dial, and well after it
        reader, writer = await connect(address)
        await asyncio.sleep(delay_before_request)
        writer.write(b"request")
        async with asyncio.timeout(5):
            assert await reader.read() == b"done"
        writer.close()
    assert len(selector.responses) == 2
    for reported, connect_seconds, response_seconds in selector.responses:
        assert reported == backend
        assert 0 <= connect_seconds < 0.05
        # Timed from the request, not from the connection: the 50 ms wait is not counted.
        assert 0.075 <= response_seconds < 0.125
    assert all(t is not None and 0 <= t < 0.05 for t in selector.connect_times)


async def test_relay_reports_requests_in_flight_not_merely_open_connections(
    make_selector, backends, eventually, relay
) -> None:
    # RAP prices a pod's queue by the requests awaiting an answer. A keep-alive connection
    # between requests, or one whose answer came and whose close is still on its way, is open
    # but queues nothing.
    answer = asyncio.Event()

    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(100):
            await answer.wait()
            answer.clear()
            writer.write(b"answer")
            await writer.drain()
        writer.close()

    backend = await backends(keep_alive)
    selector = make_selector([backend])
    _, address = await relay(selector)
    reader, writer = await connect(address)
    for _request in range(2):
        writer.write(b"request")
        await eventually(lambda: selector.awaiting[backend] == 1, what="a request in flight")
        answer.set()
        async with asyncio.timeout(5):
            assert await reader.read(100) == b"answer"
        await eventually(lambda: selector.awaiting[backend] == 0, what="the request answered")
        assert selector.opened == [backend] and not selector.closed, "still one open connection"
    assert len(selector.responses) == 1, "only the connection's first response is timed"
    writer.close()
    await eventually(lambda: selector.closed == [backend], what="the relay to close")
    assert selector.closed_awaiting == [False] and selector.awaiting[backend] == 0

    # A pod that closes without answering: its close ends the request in flight too.
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.close()

    selector.backends = [await backends(hang_up)]
    reader, writer = await connect(address)
    writer.write(b"request")
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()
    await eventually(lambda: len(selector.closed) == 2, what="the relay to close")
    assert selector.closed_awaiting == [False, True]
    assert all(n == 0 for n in selector.awaiting.values()), selector.awaiting


# -- drain and handover ------------------------------------------------------------------------


async def test_stop_accepting_keeps_open_relays_and_wait_drained_returns_when_they_end(
    echo_backend, make_selector, relay
) -> None:
    backend = await echo_backend()
    server, address = await relay(make_selector([backend]))
    reader, writer = await connect(address)
    writer.write(b"before")
    assert await reader.readexactly(6) == b"before"

    server.stop_accepting()
    assert server.listening_descriptors() == {}, "a draining server offers nothing to hand over"
    with pytest.raises(ConnectionRefusedError):
        await connect(address)
    writer.write(b"during the drain")
    assert await reader.readexactly(16) == b"during the drain"
    draining = asyncio.create_task(server.wait_drained())
    await asyncio.sleep(0.05)  # the drain must not end while the relay lives
    assert not draining.done()
    writer.close()
    async with asyncio.timeout(2):
        await draining
    assert server.active_connections == 0


async def test_a_listener_passed_in_is_served_instead_of_a_fresh_bind(
    echo_backend, make_selector, relay_server
) -> None:
    backend = await echo_backend()
    inherited = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    inherited.bind(("127.0.0.1", 0))
    inherited.listen(16)
    address = inherited.getsockname()
    queued = socket.create_connection(address)  # waits in the accept queue, as after a handover
    queued.setblocking(False)
    server = relay_server(make_selector([backend]), destination=fixed_destination("10.96.0.10", 80))
    await server.start([address], inherited={address: inherited})
    try:
        assert server.listening_descriptors() == {address: inherited.fileno()}
        reader, writer = await asyncio.open_connection(sock=queued)
        writer.write(b"queued")
        assert await reader.readexactly(6) == b"queued"
        writer.close()
    finally:
        await server.aclose()


async def test_a_listener_taken_over_without_accepting_leaves_connections_queued_until_told(
    echo_backend, make_selector, eventually, relay_server
) -> None:
    backend = await echo_backend()
    inherited = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    inherited.bind(("127.0.0.1", 0))
    inherited.listen(16)  # the predecessor's listener: already listening
    address = inherited.getsockname()
    server = relay_server(make_selector([backend]), destination=fixed_destination("10.96.0.10", 80))
    await server.start([address], inherited={address: inherited}, accept=False)
    try:
        reader, writer = await connect(address)  # completes: the kernel queues it
        writer.write(b"waiting")
        await asyncio.sleep(0.1)  # long enough for an accept that should not happen
        assert server.active_connections == 0
        await server.start_accepting()
        assert await reader.readexactly(7) == b"waiting"
        writer.close()
        await eventually(lambda: server.active_connections == 0, what="relay to finish")
    finally:
        await server.aclose()
