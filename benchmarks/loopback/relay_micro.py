"""Micro-benchmark of the relay alone: wrk → (nothing | HAProxy | dataplane relay) → nginx.

Why this exists beside run.py: run.py measures the whole daemon behind iptables in a namespace;
this one isolates the data plane (fixed-destination mode, no iptables, no model, no balancer) on
127.0.0.1, so a change to `rapproxy/dataplane/` can be measured in a minute, and so a relay
crash under `Connection: close` load (the uvloop "double free" failure mode) shows up at once.

Usage: `.venv/bin/python benchmarks/loopback/relay_micro.py [--duration 5] [--loop uvloop]
[--workers 1] [--engines asyncio,native]` (each relay engine is a target of its own). Prints one line per (target, test): req/s, MB/s, p50/p99 latency and the proxy
process's CPU ms per 1000 requests. wrk is closed-loop: its percentiles under-report tail latency
(coordinated omission). Processes float over all cores, sharing them with wrk and nginx.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096 reuseport;
        location = / {{ return 200 "ok\\n"; }}
        location = /big {{ alias {dir}/big.bin; }}
    }}
}}
"""

HAPROXY_CONF = """
global
    nbthread 1
    maxconn 8000
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
listen relay
    bind 127.0.0.1:{port}
    server nginx 127.0.0.1:{backend_port}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def wait_listening(port: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {within} s")


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def run_wrk(url: str, connections: int, duration: float, close: bool) -> dict[str, float]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", url]
    if close:
        argv[1:1] = ["-H", "Connection: close"]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    requests = float(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    assert transfer is not None
    scale = {"B": 1e-6, "KB": 1e-3, "MB": 1.0, "GB": 1e3}[transfer.group(2)]
    errors = re.search(r"Socket errors: (.*)", out)
    latencies = dict(re.findall(r"\s+(50|99)%\s+([\d.]+\w+)", out))

    def ms(text: str) -> float:
        value, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    return {
        "requests": requests,
        "req_s": rate,
        "mb_s": float(transfer.group(1)) * scale,
        "p50_ms": ms(latencies["50"]),
        "p99_ms": ms(latencies["99"]),
        "errors": 0.0 if errors is None else 1.0,
        "error_text": errors.group(1) if errors else "",  # type: ignore[dict-item]
    }


async def serve(listen_port: int, backend_port: int, loop_name: str, engine: str) -> None:
    from rapproxy.dataplane.native import NativeTcpRelayServer
    from rapproxy.dataplane.routing import Backend, L4Protocol
    from rapproxy.dataplane.tcp import TcpRelayServer, TcpRelaySettings, fixed_destination

    backend = Backend("127.0.0.1", backend_port)

    class One:
        def service_for(self, protocol: L4Protocol, dst_ip: str, dst_port: int) -> str | None:
            return "bench"

        def choose(self, service: str, client_ip: str, tried: frozenset[Backend]) -> Backend | None:
            return None if backend in tried else backend

        def dial_failed(self, service: str, backend: Backend, client_ip: str) -> None:
            pass

        def connection_opened(
            self, service: str, backend: Backend, connect_seconds: float | None = None
        ) -> None:
            pass

        def first_response(
            self,
            service: str,
            backend: Backend,
            connect_seconds: float,
            response_seconds: float,
            queued: int | None = None,
        ) -> None:
            pass

        def response_started(self, service: str, backend: Backend) -> None:
            pass

        def request_started(self, service: str, backend: Backend) -> None:
            pass

        def connection_closed(self, service: str, backend: Backend, awaiting: bool = True) -> None:
            pass

    server_type = NativeTcpRelayServer if engine == "native" else TcpRelayServer
    server = server_type(
        One(),
        settings=TcpRelaySettings(reuse_port=True, max_connections=20000),
        destination=fixed_destination("10.96.0.10", 80),
    )
    await server.start([("127.0.0.1", listen_port)])
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    snapshot = server.stats.snapshot()
    await server.aclose()
    print(f"relay[{os.getpid()}] {engine} on {loop_name}: {snapshot}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--workers", type=int, default=1, help="relay processes (SO_REUSEPORT)")
    parser.add_argument(
        "--engines",
        default="asyncio,native",
        help="relay engines to measure side by side (proxy.relayEngine values, comma-separated)",
    )
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(serve(int(args.serve[0]), int(args.serve[1]), args.loop, args.serve[2]))
        else:
            asyncio.run(serve(int(args.serve[0]), int(args.serve[1]), args.loop, args.serve[2]))
        return

    for tool in ("nginx", "haproxy", "wrk"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            sys.exit(f"{tool} is not installed")
    with tempfile.TemporaryDirectory(prefix="relay-micro-") as tmp:
        work = Path(tmp)
        (work / "tmp").mkdir()
        (work / "big.bin").write_bytes(os.urandom(10 * 1024 * 1024))
        work.chmod(0o755)
        engines = [name.strip() for name in args.engines.split(",") if name.strip()]
        nginx_port, haproxy_port = free_port(), free_port()
        relay_ports = {engine: free_port() for engine in engines}
        (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, port=nginx_port))
        (work / "haproxy.cfg").write_text(
            HAPROXY_CONF.format(port=haproxy_port, backend_port=nginx_port)
        )
        procs: list[subprocess.Popen[bytes]] = []
        try:
            procs.append(subprocess.Popen(["nginx", "-c", str(work / "nginx.conf"), "-p", tmp]))
            haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(work / "haproxy.cfg")])
            procs.append(haproxy)
            targets: dict[str, tuple[int, list[int]]] = {
                "direct": (nginx_port, []),
                "haproxy": (haproxy_port, [haproxy.pid]),
            }
            relays: list[subprocess.Popen[bytes]] = []
            for engine, relay_port in relay_ports.items():
                serve_argv = [
                    "--loop",
                    args.loop,
                    "--serve",
                    str(relay_port),
                    str(nginx_port),
                    engine,
                ]
                started = [
                    subprocess.Popen([sys.executable, __file__, *serve_argv])
                    for _ in range(args.workers)
                ]
                relays.extend(started)
                procs.extend(started)
                targets[f"{engine}-{args.loop}x{args.workers}"] = (
                    relay_port,
                    [p.pid for p in started],
                )
            for port, _ in targets.values():
                wait_listening(port)
            tests = (
                ("keepalive", "/", 32, False),
                ("close", "/", 32, True),
                ("bulk", "/big", 4, False),
            )
            for test, path, conns, close in tests:
                for name, (port, pids) in targets.items():
                    before = cpu_seconds(pids) if pids else 0.0
                    result = run_wrk(f"http://127.0.0.1:{port}{path}", conns, args.duration, close)
                    cpu = (cpu_seconds(pids) - before) if pids else 0.0
                    per_1k = 1000 * 1000 * cpu / result["requests"] if result["requests"] else 0
                    print(
                        f"{test:9} {name:18} {result['req_s']:9.0f} req/s {result['mb_s']:8.1f} MB/s "
                        f"p50 {result['p50_ms']:6.2f} ms p99 {result['p99_ms']:6.2f} ms "
                        f"cpu {per_1k:6.1f} ms/1k req {result['error_text']}",
                        flush=True,
                    )
            for relay in relays:
                if relay.poll() is not None:
                    sys.exit(f"relay process {relay.pid} died with status {relay.returncode}")
        finally:
            for proc in reversed(procs):
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


if __name__ == "__main__":
    main()
