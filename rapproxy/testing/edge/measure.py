"""Measurements taken from inside an emulated site: ICMP ping and HTTP request/response load.

Module-level functions returning plain data, so `Namespace.call` can run them in a worker inside
a node or client namespace. There is no `ping` binary on these machines; `icmp_rtts` sends echo
requests on a raw socket (root). `http_load` is a closed-loop keep-alive client, bounded in
requests and time; like wrk and hey it under-reports tail latency (coordinated omission).
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import statistics
import struct
import time
from dataclasses import dataclass

_ICMP_ECHO_REQUEST = 8
_ICMP_ECHO_REPLY = 0
_WARMUP_SECONDS = 0.5


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp_rtts(
    host: str, count: int = 20, interval: float = 0.02, timeout: float = 2.0
) -> list[float]:
    """Round-trip times in seconds of `count` echo requests to `host`; lost ones are left out."""
    ident = os.getpid() & 0xFFFF
    rtts: list[float] = []
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        for sequence in range(count):
            payload = struct.pack("!d", time.perf_counter()) + b"rapproxy-edge".ljust(48, b".")
            header = struct.pack("!BBHHH", _ICMP_ECHO_REQUEST, 0, 0, ident, sequence)
            packet = struct.pack(
                "!BBHHH", _ICMP_ECHO_REQUEST, 0, _checksum(header + payload), ident, sequence
            )
            sent = time.perf_counter()
            sock.sendto(packet + payload, (host, 0))
            deadline = sent + timeout
            while (remaining := deadline - time.perf_counter()) > 0:
                readable, _, _ = select.select([sock], [], [], remaining)
                if not readable:
                    break
                data = sock.recv(2048)
                offset = (data[0] & 0x0F) * 4
                kind, _, _, got_ident, got_sequence = struct.unpack(
                    "!BBHHH", data[offset : offset + 8]
                )
                if kind == _ICMP_ECHO_REPLY and got_ident == ident and got_sequence == sequence:
                    rtts.append(time.perf_counter() - sent)
                    break
            pause = interval - (time.perf_counter() - sent)
            if pause > 0:
                time.sleep(pause)  # pacing the probe, not synchronising with anything
    return rtts


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What a load run achieved: completed requests, rate and latency percentiles (seconds)."""

    requests: int
    errors: int
    seconds: float
    rate: float
    p50: float
    p90: float
    p99: float
    mean: float


class _Client(asyncio.Protocol):
    """One keep-alive connection sending the next GET as soon as the last response is whole."""

    def __init__(self, request: bytes, run: _Run) -> None:
        self.request = request
        self.run = run
        self.buffer = b""
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        if not self.run.more():
            self.transport.close()
            return
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head, found, rest = self.buffer.partition(b"\r\n\r\n")
            if not found:
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            ok = head.startswith(b"HTTP/1.1 200")
            self.run.done(time.perf_counter() - self.sent_at, ok)
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _Run:
    def __init__(self, max_requests: int, deadline: float, warmup_until: float) -> None:
        self.max_requests = max_requests
        self.deadline = deadline
        self.warmup_until = warmup_until
        self.started = 0
        self.latencies: list[float] = []
        self.errors = 0
        self.measure_start: float | None = None

    def more(self) -> bool:
        if self.started >= self.max_requests or time.perf_counter() >= self.deadline:
            return False
        self.started += 1
        return True

    def done(self, latency: float, ok: bool) -> None:
        now = time.perf_counter()
        if now < self.warmup_until:
            return
        if self.measure_start is None:
            self.measure_start = now
        if ok:
            self.latencies.append(latency)
        else:
            self.errors += 1


async def _load(
    host: str, port: int, connections: int, seconds: float, max_requests: int
) -> LoadResult:
    warmup = _WARMUP_SECONDS
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    run = _Run(max_requests, start + warmup + seconds, start + warmup)
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    clients = []
    for _ in range(connections):
        _, client = await asyncio.wait_for(
            loop.create_connection(lambda: _Client(request, run), host, port), 5.0
        )
        clients.append(client)
    await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), warmup + seconds + 10.0)
    end = time.perf_counter()
    measured = end - (run.measure_start or end)
    latencies = sorted(run.latencies)
    if not latencies:
        return LoadResult(0, run.errors, measured, 0.0, 0.0, 0.0, 0.0, 0.0)

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return LoadResult(
        len(latencies),
        run.errors,
        measured,
        len(latencies) / measured if measured > 0 else 0.0,
        pct(0.50),
        pct(0.90),
        pct(0.99),
        statistics.fmean(latencies),
    )


def http_load(
    host: str,
    port: int,
    connections: int = 16,
    seconds: float = 3.0,
    max_requests: int = 200_000,
) -> LoadResult:
    """Closed-loop keep-alive GETs on `connections` connections for `seconds` after a warm-up.

    Latencies of the first half second are not counted (connection set-up, slow start).
    """
    return asyncio.run(_load(host, port, connections, seconds, max_requests))


def wait_port(host: str, port: int, within: float = 10.0) -> float:
    """Seconds until a TCP connect to host:port succeeds; raises TimeoutError after `within`."""
    start = time.perf_counter()
    deadline = start + within
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return time.perf_counter() - start
        except OSError as error:
            if time.perf_counter() > deadline:
                raise TimeoutError(
                    f"{host}:{port} not accepting after {within}s: {error}"
                ) from error
            time.sleep(0.02)  # polling a condition with a deadline


def download_seconds(url: str, expected_bytes: int, timeout: float = 30.0) -> float:
    """Seconds to GET `url` and read its whole body (at least `expected_bytes`)."""
    import urllib.request

    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body = response.read()
    elapsed = time.perf_counter() - start
    if len(body) < expected_bytes:
        raise OSError(f"{url}: {len(body)} bytes, expected {expected_bytes}")
    return elapsed


def http_post_status(url: str, bearer_token: str = "", timeout: float = 5.0) -> int:
    """Status of one empty POST (e.g. a cold backup's activation); error statuses too."""
    import urllib.error
    import urllib.request

    headers = {"Authorization": f"Bearer {bearer_token}"} if bearer_token else {}
    request = urllib.request.Request(url, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:  # carries a socket: must not cross processes
        error.close()
        return int(error.code)
