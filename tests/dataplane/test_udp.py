"""The UDP relay against real loopback sockets, on both event loops."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from rapproxy.dataplane.routing import Backend
from rapproxy.dataplane.stats import RelayStats
from rapproxy.dataplane.udp import InvalidUdpRelaySettings, UdpRelaySettings, UdpServicePort

SERVICE = "default/dns:53/UDP"


class Echo(asyncio.DatagramProtocol):
    """Echoes every datagram, prefixed with a tag naming this backend."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        self.transport: asyncio.DatagramTransport | None = None
        self.peers: set[Any] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.peers.add(addr)
        assert self.transport is not None
        self.transport.sendto(self.tag + data, addr)


class Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait(data)


@pytest.fixture
async def udp() -> AsyncIterator[
    tuple[
        Callable[[bytes], Awaitable[tuple[Backend, Echo]]],
        Callable[[tuple[str, int]], Awaitable[tuple[asyncio.DatagramTransport, Client]]],
    ]
]:
    """Factories for echo backends and clients on 127.0.0.1; all closed at teardown."""
    transports: list[asyncio.BaseTransport] = []
    loop = asyncio.get_running_loop()

    async def backend(tag: bytes) -> tuple[Backend, Echo]:
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: Echo(tag), local_addr=("127.0.0.1", 0)
        )
        transports.append(transport)
        port = transport.get_extra_info("sockname")[1]
        return Backend("127.0.0.1", port), protocol

    async def client(service: tuple[str, int]) -> tuple[asyncio.DatagramTransport, Client]:
        transport, protocol = await loop.create_datagram_endpoint(Client, remote_addr=service)
        transports.append(transport)
        return transport, protocol

    yield backend, client
    for transport in transports:
        transport.close()


@pytest.fixture
async def service_port() -> AsyncIterator[
    Callable[..., Awaitable[tuple[UdpServicePort, tuple[str, int]]]]
]:
    started: list[UdpServicePort] = []

    async def start(
        selector: Any, settings: UdpRelaySettings | None = None
    ) -> tuple[UdpServicePort, tuple[str, int]]:
        port = UdpServicePort(selector, SERVICE, settings=settings, stats=RelayStats())
        await port.start(("127.0.0.1", 0))
        started.append(port)
        return port, port.address

    yield start
    for port in started:
        await port.aclose()
        assert port.active_flows == 0


async def test_echo_including_datagrams_of_60k_and_the_ipv4_maximum(
    make_selector, udp, service_port
) -> None:
    make_backend, make_client = udp
    backend, _ = await make_backend(b"")
    selector = make_selector([backend])
    port, address = await service_port(selector)
    client, received = await make_client(address)
    for size in (5, 60 * 1024, 65507):
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        client.sendto(payload)
        async with asyncio.timeout(2):
            assert await received.received.get() == payload
    assert selector.opened == [backend]
    counters = port.stats.snapshot().services[SERVICE]
    assert counters.udp_datagrams_from_clients == 3
    assert counters.udp_datagrams_to_clients == 3
    assert counters.udp_flows_active == 1


async def test_many_clients_each_get_their_own_replies(make_selector, udp, service_port) -> None:
    make_backend, make_client = udp
    pool = [await make_backend(tag) for tag in (b"a:", b"b:", b"c:")]
    selector = make_selector([backend for backend, _ in pool])
    port, address = await service_port(selector)
    clients = [await make_client(address) for _ in range(60)]
    tags = {backend: echo.tag for backend, echo in pool}
    for round_ in range(3):
        for index, (transport, _) in enumerate(clients):
            transport.sendto(f"client {index} round {round_}".encode())
        async with asyncio.timeout(5):
            for index, (_, protocol) in enumerate(clients):
                reply = await protocol.received.get()
                # Its own payload, from the backend its flow chose (flows open in send order).
                assert (
                    reply
                    == tags[selector.chosen[index]] + f"client {index} round {round_}".encode()
                )
    assert port.active_flows == 60
    assert len(selector.opened) == 60
    # Round-robin spread the flows over all three backends.
    assert all(len(echo.peers) == 20 for _, echo in pool)


async def test_idle_flow_expires_and_the_next_datagram_opens_a_new_one(
    make_selector, eventually, udp, service_port
) -> None:
    make_backend, make_client = udp
    backend, _ = await make_backend(b"")
    selector = make_selector([backend])
    port, address = await service_port(selector, UdpRelaySettings(idle_timeout=0.3))
    client, received = await make_client(address)
    client.sendto(b"one")
    assert await received.received.get() == b"one"
    assert port.active_flows == 1
    await eventually(lambda: port.active_flows == 0, within=3, what="the flow to expire")
    assert selector.closed == [backend]
    client.sendto(b"two")
    async with asyncio.timeout(2):
        assert await received.received.get() == b"two"
    assert port.stats.snapshot().services[SERVICE].udp_flows_total == 2


async def test_flow_cap_drops_new_clients(make_selector, eventually, udp, service_port) -> None:
    make_backend, make_client = udp
    backend, _ = await make_backend(b"")
    port, address = await service_port(make_selector([backend]), UdpRelaySettings(max_flows=1))
    first, first_received = await make_client(address)
    first.sendto(b"in")
    assert await first_received.received.get() == b"in"
    second, _ = await make_client(address)
    second.sendto(b"over the cap")
    await eventually(
        lambda: port.stats.snapshot().services[SERVICE].udp_flows_rejected_by_cap == 1,
        what="the second client to be rejected",
    )
    assert port.active_flows == 1


async def test_backend_port_unreachable_ends_the_flow_and_reports_it(
    make_selector, refused_backend, eventually, udp, service_port
) -> None:
    make_backend, make_client = udp
    dead = refused_backend()
    alive, _ = await make_backend(b"")
    selector = make_selector([dead, alive])
    port, address = await service_port(selector)
    client, received = await make_client(address)
    client.sendto(b"lost")  # goes to `dead`; the ICMP error ends that flow
    await eventually(lambda: selector.failed == [dead], what="the refusal to be reported")
    await eventually(lambda: port.active_flows == 0, what="the flow to end")
    client.sendto(b"found")
    async with asyncio.timeout(2):
        assert await received.received.get() == b"found"


async def test_no_backend_drops_the_datagram(make_selector, eventually, udp, service_port) -> None:
    _, make_client = udp
    port, address = await service_port(make_selector([]))
    client, _ = await make_client(address)
    client.sendto(b"nobody home")
    await eventually(
        lambda: port.stats.snapshot().services[SERVICE].udp_flows_no_backend == 1,
        what="the flow to give up",
    )
    assert port.active_flows == 0


def test_settings_reject_nonsense_naming_the_field() -> None:
    with pytest.raises(InvalidUdpRelaySettings, match="idle_timeout"):
        UdpRelaySettings(idle_timeout=0)
    with pytest.raises(InvalidUdpRelaySettings, match="max_flows"):
        UdpRelaySettings(max_flows=0)


async def test_a_successor_serves_the_shared_socket_while_the_old_flows_still_get_replies(
    make_selector, eventually, udp, service_port
) -> None:
    make_backend, make_client = udp
    old_backend, old_echo = await make_backend(b"old:")
    new_backend, _ = await make_backend(b"new:")
    old, address = await service_port(make_selector([old_backend]))
    client, received = await make_client(address)
    client.sendto(b"1")
    async with asyncio.timeout(2):
        assert await received.received.get() == b"old:1"

    # What SCM_RIGHTS delivers is a new descriptor for the same socket: a dup.
    fd = old.socket_descriptor()
    assert fd is not None
    shared = socket.socket(fileno=os.dup(fd))
    new = UdpServicePort(make_selector([new_backend]), SERVICE, stats=RelayStats())
    await new.start(address, inherited=shared)
    try:
        assert new.address == address, "same port: the rules need not change"
        old.stop_reading()
        assert old.socket_descriptor() is None, "a draining port offers nothing to hand over"
        client.sendto(b"2")
        async with asyncio.timeout(2):
            assert await received.received.get() == b"new:2"
        # The old flow is still open: a late reply of its backend reaches the client.
        (flow_address,) = old_echo.peers
        assert old_echo.transport is not None
        old_echo.transport.sendto(b"late", flow_address)
        async with asyncio.timeout(2):
            assert await received.received.get() == b"late"
    finally:
        await new.aclose()
