"""A backend for tests, benchmarks and the demo: HTTP and UDP, answering with its own name.

Runs as a real process (a "pod"), so the proxy dials it over real sockets. Each HTTP response
says which backend served it (`X-Backend` header and the body's first line), which is how tests
check balancing, affinity and failover, and whom it saw the connection come from (`X-Peer`):
the proxy's address when a relay dialled it, the client's own when the kernel DNATed it. Per-request CPU work and response size are configurable,
so an experiment can make a node's backends expensive and overload that node for real.

    python -m rapproxy.testing.backend --name b1 --http 0.0.0.0:8080 --udp 0.0.0.0:5353 \
        [--work-ms 5] [--size 1024] [--ready-file PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:  # the backend process itself never loads the namespace harness (pyroute2)
    from rapproxy.testing.netns import Namespace


def burn(milliseconds: float) -> None:
    """Spend CPU, not wall time: sleeping would not load the node."""
    deadline = time.perf_counter() + milliseconds / 1000
    x = 0
    while time.perf_counter() < deadline:
        x += 1


class HttpBackend(asyncio.Protocol):
    """A minimal HTTP/1.1 server: keep-alive, Connection: close, any method, any path."""

    def __init__(self, name: str, work_ms: float, body: bytes) -> None:
        self.name = name
        self.work_ms = work_ms
        self.body = body
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = 0
            close = head.startswith(b"GET") and b"HTTP/1.0" in head.split(b"\r\n", 1)[0]
            for line in head.split(b"\r\n")[1:]:
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value.strip() or 0)
                elif key.strip().lower() == b"connection":
                    close = value.strip().lower() == b"close"
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.respond(close)
            if close:
                return

    def respond(self, close: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.work_ms:
            burn(self.work_ms)
        headers = (
            f"HTTP/1.1 200 OK\r\nContent-Length: {len(self.body)}\r\n"
            f"X-Backend: {self.name}\r\nX-Peer: {self.peer}\r\nContent-Type: text/plain\r\n"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
        )
        self.transport.write(headers.encode() + self.body)
        if close:
            self.transport.close()


class UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.prefix = f"{name}:".encode()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            # The reply is the same size as the request (name prefix replaces its first bytes),
            # so a 60 KB datagram comes back as 60 KB and truncation would show.
            self.transport.sendto(self.prefix + data[len(self.prefix) :], addr)


def _mark_ready(path: Path) -> None:
    path.write_text("ready\n")


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "0.0.0.0", int(port)


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    body = (args.name + "\n").encode()
    if args.size > len(body):
        body += b"x" * (args.size - len(body) - 1) + b"\n"
    closers = []
    if args.http:
        host, port = _split(args.http)
        server = await loop.create_server(
            lambda: HttpBackend(args.name, args.work_ms, body), host, port, reuse_address=True
        )
        closers.append(server.close)
    if args.udp:
        host, port = _split(args.udp)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: UdpEcho(args.name), local_addr=(host, port)
        )
        closers.append(transport.close)
    if args.ready_file:
        _mark_ready(Path(args.ready_file))
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for close in closers:
        close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--http", help="HOST:PORT for HTTP")
    parser.add_argument("--udp", help="HOST:PORT for UDP echo")
    parser.add_argument("--work-ms", type=float, default=0.0, help="CPU milliseconds per request")
    parser.add_argument("--size", type=int, default=0, help="response body bytes")
    parser.add_argument("--ready-file", help="written once listening")
    asyncio.run(serve(parser.parse_args(argv)))


def _ready(path: Path) -> bool:
    return path.exists()  # a stat of a local file: not worth a thread


async def start_in(
    namespace: Namespace,
    name: str,
    ready_file: Path,
    *,
    http: str = "0.0.0.0:8080",
    udp: str | None = None,
    within: float = 10.0,
) -> None:
    """Start this backend as a process inside `namespace` and wait until it serves.

    Readiness is the backend's own `--ready-file`, written once its sockets listen; the process
    is the namespace's, so it dies with it.
    """
    argv = [sys.executable, "-m", "rapproxy.testing.backend", "--name", name, "--http", http]
    if udp is not None:
        argv += ["--udp", udp]
    await namespace.spawn([*argv, "--ready-file", str(ready_file)])
    deadline = time.monotonic() + within
    while not _ready(ready_file):
        if time.monotonic() > deadline:
            raise TimeoutError(f"backend {name}: {ready_file} did not appear within {within:g} s")
        await asyncio.sleep(0.05)  # polling a file another process writes


if __name__ == "__main__":
    main()
