"""The delay line itself, driven through a packet socket standing in for the TUN device.

A SOCK_SEQPACKET socketpair keeps packet boundaries like a TUN fd does, so the forwarder's real
read → hold → write path runs here without root.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import time
from collections.abc import AsyncIterator

import pytest

from rapproxy.testing.edge.delays import DelayLookup, DelayMatrix, Site, WanConfig
from rapproxy.testing.edge.forwarder import ControlServer, DelayLine

CONFIG = WanConfig(
    (Site.of("a", ["10.10.1.0/24"]), Site.of("b", ["10.10.2.0/24"])),
    DelayMatrix({("a", "b"): 40.0}),
)


def packet(source: str, destination: str, marker: int) -> bytes:
    header = bytes([0x45, 0, 0, 24]) + bytes(8)
    addresses = ipaddress.IPv4Address(source).packed + ipaddress.IPv4Address(destination).packed
    return header + addresses + marker.to_bytes(4, "big")


@pytest.fixture
async def wire() -> AsyncIterator[tuple[DelayLine, socket.socket]]:
    tun_end, far_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tun_end.setblocking(False)
    far_end.setblocking(False)
    line = DelayLine(asyncio.get_running_loop(), tun_end.fileno(), DelayLookup(CONFIG))
    line.start()
    try:
        yield line, far_end
    finally:
        line.stop()
        tun_end.close()
        far_end.close()


async def receive(sock: socket.socket) -> tuple[bytes, float]:
    data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 2048), 5.0)
    return data, time.monotonic()


async def test_a_packet_between_delayed_sites_comes_back_after_the_delay(
    wire: tuple[DelayLine, socket.socket],
) -> None:
    _, far = wire
    sent = time.monotonic()
    far.send(packet("10.10.1.2", "10.10.2.2", 1))
    data, arrived = await receive(far)
    assert data == packet("10.10.1.2", "10.10.2.2", 1)
    assert 0.040 <= arrived - sent < 0.060


async def test_the_reverse_direction_and_unknown_addresses_pass_at_once(
    wire: tuple[DelayLine, socket.socket],
) -> None:
    _, far = wire
    sent = time.monotonic()
    far.send(packet("10.10.2.2", "10.10.1.2", 1))
    far.send(packet("10.10.1.2", "192.0.2.1", 2))
    first, _ = await receive(far)
    second, arrived = await receive(far)
    assert [first[-1], second[-1]] == [1, 2]
    assert arrived - sent < 0.020


async def test_packets_of_one_pair_keep_their_order(wire: tuple[DelayLine, socket.socket]) -> None:
    line, far = wire
    for marker in range(50):
        far.send(packet("10.10.1.2", "10.10.2.2", marker))
    markers = [(await receive(far))[0][-1] for _ in range(50)]
    assert markers == list(range(50))
    assert line.stats()["delayed"] == 50


async def test_a_new_config_applies_to_the_next_packet(
    wire: tuple[DelayLine, socket.socket],
) -> None:
    line, far = wire
    answer = ControlServer(line).answer(
        json.dumps({"op": "config", "config": CONFIG.with_delays(DelayMatrix()).to_json()}).encode()
    )
    assert answer == {"ok": True}
    sent = time.monotonic()
    far.send(packet("10.10.1.2", "10.10.2.2", 7))
    _, arrived = await receive(far)
    assert arrived - sent < 0.020


def test_the_control_socket_refuses_bad_requests_with_a_reason() -> None:
    line = DelayLine.__new__(DelayLine)
    server = ControlServer(line)
    assert server.answer(b'{"op": "reboot"}') == {"ok": False, "error": "op: unknown 'reboot'"}
    bad = server.answer(b'{"op": "config", "config": {"sites": {"a": "x"}}}')
    assert bad["ok"] is False
    assert "sites.a" in str(bad["error"])
