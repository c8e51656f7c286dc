"""The open-loop connection load: outcome classes, summaries, and real runs on loopback.

The loopback runs matter most: a measurement that reports "0 refused" is only worth something if
the same code reports refusals and resets when they happen.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from rapproxy.testing.backend import HttpBackend
from rapproxy.testing.connload import (
    BAD_RESPONSE,
    OK,
    REFUSED,
    RESET,
    SURVIVED,
    TIMEOUT,
    TRUNCATED,
    Attempt,
    InvalidLoadSpec,
    LoadSpec,
    classify,
    latency_percentiles,
    run_load_async,
    timeline,
)


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (None, OK),
        (ConnectionRefusedError(), REFUSED),
        (ConnectionResetError(), RESET),
        (BrokenPipeError(), RESET),
        (TimeoutError(), TIMEOUT),
        (asyncio.IncompleteReadError(b"", 10), TRUNCATED),
        (OSError(113, "No route to host"), "error:EHOSTUNREACH"),
        (ValueError("x"), "error:ValueError"),
    ],
)
def test_each_way_a_connection_ends_has_its_class(error: Exception | None, outcome: str) -> None:
    assert classify(error) == outcome


def test_timeline_counts_outcomes_per_second_from_the_origin() -> None:
    attempts = [Attempt(100.2, OK, 0.001), Attempt(100.9, REFUSED, 0), Attempt(102.5, OK, 0.002)]
    assert timeline(attempts, origin=100.0) == [
        {"from": 0.0, "counts": {OK: 1, REFUSED: 1}},
        {"from": 2.0, "counts": {OK: 1}},
    ]


def test_percentiles_read_only_successful_attempts() -> None:
    attempts = [Attempt(0, OK, s / 1000) for s in range(1, 101)] + [Attempt(0, RESET, 99.0)]
    assert latency_percentiles(attempts, (50, 99)) == pytest.approx({"p50": 50.0, "p99": 99.0})
    assert latency_percentiles([Attempt(0, RESET, 1.0)], (50,)) == {}


@pytest.mark.parametrize(
    "fields",
    [{"port": 0}, {"rate": 0}, {"seconds": -1}, {"rate": 1e6, "seconds": 10}, {"long_interval": 0}],
)
def test_a_spec_out_of_range_is_rejected(fields: dict[str, float]) -> None:
    values: dict[str, float] = {"port": 80, "rate": 10, "seconds": 1} | fields
    with pytest.raises(InvalidLoadSpec):
        LoadSpec(
            "127.0.0.1",
            int(values["port"]),
            values["rate"],
            values["seconds"],
            **{k: v for k, v in fields.items() if k not in ("port", "rate", "seconds")},
        )


@pytest.fixture
async def backend_port() -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpBackend("b1", 0, b"b1\n"), "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_every_connection_to_a_live_backend_is_ok_and_long_ones_survive(
    backend_port: int,
) -> None:
    spec = LoadSpec("127.0.0.1", backend_port, rate=200, seconds=0.5, long_connections=2)
    report = await run_load_async(spec)
    assert report.counts() == {OK: 100}
    assert {a.backend for a in report.attempts} == {"b1"}, "who answered, from X-Backend"
    assert {a.peer for a in report.attempts} == {"127.0.0.1"}, "whom it saw, from X-Peer"
    assert [c.outcome for c in report.long] == [SURVIVED, SURVIVED]
    assert all(c.answered >= 2 for c in report.long)


async def test_refusals_are_counted_as_refused() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = placeholder.getsockname()[1]
        report = await run_load_async(LoadSpec("127.0.0.1", port, rate=100, seconds=0.2))
    assert report.counts() == {REFUSED: 20}


async def test_resets_and_wrong_answers_are_counted_as_such() -> None:
    served = 0

    async def reset_or_answer_404(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal served
        served += 1
        await reader.readuntil(b"\r\n\r\n")
        sock = writer.get_extra_info("socket")
        if served % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.write(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            writer.close()

    server = await asyncio.start_server(reset_or_answer_404, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        report = await run_load_async(LoadSpec("127.0.0.1", port, rate=200, seconds=0.2))
    finally:
        server.close()
        await server.wait_closed()
    counts = report.counts()
    assert set(counts) == {RESET, BAD_RESPONSE}
    assert sum(counts.values()) == 40


async def test_a_stop_file_ends_the_load_before_its_time(backend_port: int, tmp_path) -> None:
    stop = tmp_path / "stop"
    stop.write_text("")  # already there: not one connection may start
    spec = LoadSpec("127.0.0.1", backend_port, rate=100, seconds=30, stop_file=str(stop))
    async with asyncio.timeout(5):  # instead of the 30 s the spec allows
        report = await run_load_async(spec)
    assert report.counts() == {}
