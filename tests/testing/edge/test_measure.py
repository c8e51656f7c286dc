"""The in-namespace measurements, checked on loopback against a real HTTP server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from rapproxy.testing.backend import HttpBackend
from rapproxy.testing.edge.measure import http_load, icmp_rtts, wait_port


@pytest.fixture
async def backend_port() -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpBackend("b", 0.0, b"b\n"), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_http_load_counts_completed_requests_and_orders_its_percentiles(
    backend_port: int,
) -> None:
    result = await asyncio.to_thread(http_load, "127.0.0.1", backend_port, 4, 0.3)
    assert result.requests > 50
    assert result.errors == 0
    assert 0 < result.p50 <= result.p90 <= result.p99
    assert result.rate == pytest.approx(result.requests / result.seconds)


async def test_wait_port_gives_up_at_its_deadline_on_a_closed_port() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
        with pytest.raises(TimeoutError, match=f"127.0.0.1:{port}"):
            await asyncio.to_thread(wait_port, "127.0.0.1", port, 0.2)


@pytest.mark.root
async def test_icmp_rtts_answers_one_round_trip_per_echo() -> None:
    rtts = await asyncio.to_thread(icmp_rtts, "127.0.0.1", 3, 0.0)
    assert len(rtts) == 3
    assert all(0 < rtt < 0.1 for rtt in rtts)
