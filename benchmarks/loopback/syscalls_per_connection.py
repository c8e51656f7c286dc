"""System calls the relay makes per `Connection: close` connection, counted by strace.

Why: half of a short connection's proxy CPU is kernel time carried by the proxy's own system
calls (profile_close.py), and an event-loop relay makes many more of them than HAProxy does.
This counts them: the relay alone (relay_micro.py's fixed-destination server) under `strace -f
-c`, a trivial in-process backend, and N connections made one after another (one request, read to
EOF), so the counts divide by N. Not a load test: sequential, bounded, loopback only. Start-up
calls are not counted (strace attaches once the relay serves).

Usage: `.venv/bin/python benchmarks/loopback/syscalls_per_connection.py [--connections 500]
[--engine native|asyncio]`
(needs strace; strace slows every call, so read counts, not times).
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RELAY = Path(__file__).with_name("relay_micro.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def serve_backend(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--engine", choices=("native", "asyncio"), default="native")
    args = parser.parse_args()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    threading.Thread(target=serve_backend, args=(listener,), daemon=True).start()
    relay_port = free_port()
    with tempfile.TemporaryDirectory(prefix="relay-strace-") as tmp:
        out = Path(tmp) / "strace.txt"
        relay = subprocess.Popen(
            [
                sys.executable,
                str(RELAY),
                "--serve",
                str(relay_port),
                str(listener.getsockname()[1]),
                args.engine,
            ]
        )
        tracer: subprocess.Popen[bytes] | None = None
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", relay_port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        sys.exit("the relay did not start")
                    time.sleep(0.1)
            # Attached once the relay serves, so start-up is not counted; SIGINT detaches it.
            tracer = subprocess.Popen(["strace", "-f", "-c", "-o", str(out), "-p", str(relay.pid)])
            time.sleep(1.0)
            for _ in range(args.connections):
                with socket.create_connection(("127.0.0.1", relay_port), timeout=5) as conn:
                    conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    while conn.recv(4096):
                        pass
        finally:
            if tracer is not None:
                tracer.send_signal(signal.SIGINT)
                tracer.wait(timeout=30)
            relay.terminate()
            relay.wait(timeout=30)
        n = args.connections
        print(f"command: {' '.join(sys.argv)}")
        print(f"{n} connections; calls per connection (rows with at least 0.5 per connection):")
        for line in out.read_text().splitlines()[2:]:
            fields = line.split()
            if len(fields) >= 5 and fields[-1] != "total" and fields[3].isdigit():
                calls, name = int(fields[3]), fields[-1]
                if calls / n >= 0.5:
                    print(f"  {calls / n:5.1f}  {name}")


if __name__ == "__main__":
    main()
