"""The loopback testbed: one private network namespace holding a backend and three ways to reach it.

Both benchmarks in this directory (`run.py`, `churn.py`) stand on it. Inside ONE fresh namespace:

- nginx (one worker) on 10.200.0.2:8080, a lo address standing in for a pod: `/` returns "ok\\n",
  `/big` a 10 MB file for bulk transfer;
- HAProxy (`nbthread 1`, `mode tcp`) bound to 10.96.0.20:80, forwarding to nginx, and also
  reached at 10.96.0.40:80 through an iptables REDIRECT to its port 15002 — the same
  interception path rapproxy pays, so the two proxies can be compared like for like;
- rapproxy, the real daemon started through its CLI, serving Service 10.96.0.10:80 → nginx (one
  endpoint, round-robin) via its own iptables REDIRECT to its listener on :15001;
- a kernel DNAT rule (nat OUTPUT, in a chain of our own) from 10.96.0.30:80 to nginx: plain
  DNAT, the floor any kernel path is judged against;
- the same rapproxy serving a second Service, 10.96.0.50:80 → nginx, in kernel mode (annotation
  `rapproxy.io/dataplane: kernel`, policy `rap`): its own DNAT chains, kube-proxy's layout, no
  relay on the path (issue 13's fast path).

`ip route add local 10.96.0.0/16 dev lo` makes the service addresses reachable inside the
namespace (without it connect() fails before nat OUTPUT runs) and lets HAProxy bind 10.96.0.20.

Safety: everything happens inside the namespace; there is no route out of it. The namespace name
is unique (`rapbench-<pid>-<n>`); `close()` kills every process started here and every process
still inside the namespace, then deletes it. It is idempotent and registered with atexit, and
`install_signal_handlers()` turns SIGTERM/SIGHUP/SIGINT into SystemExit so `finally` blocks run.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from rapproxy.testing.load import WRK_SUMMARY_LUA

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"

BACKEND_IP = "10.200.0.2"
BACKEND_PORT = 8080
RAPPROXY_VIP = "10.96.0.10"
HAPROXY_VIP = "10.96.0.20"
DNAT_VIP = "10.96.0.30"
HAPROXY_NAT_VIP = "10.96.0.40"
HAPROXY_NAT_PORT = 15002
KERNEL_VIP = "10.96.0.50"
REDIS_VIP = "10.96.0.60"
REDIS_PORT = 6379
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_PORT = 80
BIG_BODY_BYTES = 10 * 1024 * 1024
DNAT_CHAIN = "BENCH-DNAT"
TOOLS = ("ip", "iptables", "nginx", "haproxy", "wrk", "curl")

_names = itertools.count()


class TestbedError(RuntimeError):
    """The testbed could not be built or a component died; the message says which."""


@dataclass(frozen=True, slots=True)
class Target:
    """One way of reaching the backend: a name, a base URL and the process doing the work."""

    name: str
    url: str
    process: str | None  # "haproxy", "rapproxy" or None for the kernel / no proxy
    note: str


TARGETS = (
    Target("direct", f"http://{BACKEND_IP}:{BACKEND_PORT}", None, "wrk → nginx"),
    Target(
        "haproxy",
        f"http://{HAPROXY_VIP}:{SERVICE_PORT}",
        "haproxy",
        "HAProxy 1 thread, mode tcp, bound to the VIP (no NAT)",
    ),
    Target(
        "haproxy-nat",
        f"http://{HAPROXY_NAT_VIP}:{SERVICE_PORT}",
        "haproxy",
        f"VIP → iptables REDIRECT → the same HAProxy on :{HAPROXY_NAT_PORT} (rapproxy's NAT path)",
    ),
    Target(
        "rapproxy",
        f"http://{RAPPROXY_VIP}:{SERVICE_PORT}",
        "rapproxy",
        "ClusterIP → iptables REDIRECT → rapproxy :15001 → nginx",
    ),
    Target(
        "dnat",
        f"http://{DNAT_VIP}:{SERVICE_PORT}",
        None,
        "nat OUTPUT DNAT → nginx (kernel only)",
    ),
    Target(
        "kernel",
        f"http://{KERNEL_VIP}:{SERVICE_PORT}",
        "rapproxy",  # not on the path: its CPU shows what the daemon costs meanwhile
        "rapproxy kernel mode: ClusterIP → RAPPROXY-SERVICES → SVC (RAP weights) → SEP → DNAT "
        "→ nginx (no relay)",
    ),
)


def require_root_and_tools() -> None:
    """Exit with a clear message when not root or a tool is missing."""
    if os.geteuid() != 0:
        sys.exit(
            "this benchmark needs root: it creates a network namespace and iptables rules in it. "
            "Run it as root, e.g. `sudo make bench-loopback`."
        )
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not (VENV_BIN / "rapproxy").exists():
        missing.append(str(VENV_BIN / "rapproxy") + " (run `make install`)")
    if missing:
        sys.exit("missing tools: " + ", ".join(missing) + " (`make deps` installs the Debian ones)")


def install_signal_handlers() -> None:
    """SIGTERM, SIGHUP and SIGINT raise SystemExit, so every `finally` and atexit hook runs."""

    def _exit(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, _exit)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # After the comm field: state is fields[0], utime is field 14 of the full line → index 11.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def first_line(argv: Sequence[str]) -> str:
    """The first non-empty line a `--version`-style command prints, on stdout or stderr."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({error})"
    for line in (done.stdout + "\n" + done.stderr).splitlines():
        if line.strip():
            return line.strip()
    return "unknown"


def machine_note() -> dict[str, object]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": os.uname().release,
        "pinning": "none (processes float over all cores; wrk, nginx and the proxy share them)",
    }


def versions() -> dict[str, str]:
    python = str(VENV_BIN / "python")
    git = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=12"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "python": first_line([python, "-c", "import sys; print(sys.version.split()[0])"]),
        "uvloop": first_line([python, "-c", "import uvloop; print(uvloop.__version__)"]),
        "rapproxy": first_line([str(VENV_BIN / "rapproxy"), "version"]),
        "rapproxy_commit": git.stdout.strip() or "unknown",
        "haproxy": first_line(["haproxy", "-v"]),
        "nginx": first_line(["nginx", "-v"]),
        "wrk": first_line(["wrk", "-v"]),
        "iptables": first_line(["iptables", "-V"]),
        "kernel": os.uname().release,
    }


_NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 120s;
  sendfile on;
  client_body_temp_path {dir}/tmp;
  proxy_temp_path {dir}/tmp;
  fastcgi_temp_path {dir}/tmp;
  uwsgi_temp_path {dir}/tmp;
  scgi_temp_path {dir}/tmp;
  server {{
    listen {ip}:{port} backlog=4096;
    location = / {{ default_type text/plain; return 200 "ok\\n"; }}
    location = /big {{ root {dir}/www; try_files /big.bin =404; }}
  }}
}}
"""

_HAPROXY_CFG = """\
global
  nbthread {threads}
  maxconn 8192
defaults
  mode tcp
  timeout connect 5s
  timeout client 120s
  timeout server 120s
listen bench
  bind {vip}:{port}
  bind 0.0.0.0:{nat_port}
  server backend {ip}:{backend_port}
"""

_OBJECTS = """\
apiVersion: v1
kind: Service
metadata: {{name: bench, namespace: default}}
spec:
  type: ClusterIP
  clusterIP: {vip}
  ports: [{{name: http, port: {port}, targetPort: {backend_port}, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: bench-1
  namespace: default
  labels: {{kubernetes.io/service-name: bench}}
addressType: IPv4
endpoints:
- addresses: [{ip}]
  conditions: {{ready: true, serving: true, terminating: false}}
  nodeName: n1
ports: [{{name: http, port: {backend_port}, protocol: TCP}}]
---
apiVersion: v1
kind: Service
metadata:
  name: bench-kernel
  namespace: default
  annotations: {{rapproxy.io/dataplane: kernel, rapproxy.io/lb-policy: rap}}
spec:
  type: ClusterIP
  clusterIP: {kernel_vip}
  ports: [{{name: http, port: {port}, targetPort: {backend_port}, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: bench-kernel-1
  namespace: default
  labels: {{kubernetes.io/service-name: bench-kernel}}
addressType: IPv4
endpoints:
- addresses: [{ip}]
  conditions: {{ready: true, serving: true, terminating: false}}
  nodeName: n1
ports: [{{name: http, port: {backend_port}, protocol: TCP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: redis, namespace: default}}
spec:
  type: ClusterIP
  clusterIP: {redis_vip}
  ports: [{{name: redis, port: {redis_port}, targetPort: {redis_port}, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: redis-1
  namespace: default
  labels: {{kubernetes.io/service-name: redis}}
addressType: IPv4
endpoints:
- addresses: [{ip}]
  conditions: {{ready: true, serving: true, terminating: false}}
  nodeName: n1
ports: [{{name: redis, port: {redis_port}, protocol: TCP}}]
"""


class Testbed:
    """The namespace, its processes and files. Use as a context manager; `close()` is idempotent."""

    def __init__(self) -> None:
        self.name = f"rapbench-{os.getpid()}-{next(_names)}"
        self.dir = Path(tempfile.mkdtemp(prefix="rapbench-"))
        self.dir.chmod(0o755)  # nginx workers run as nobody and must read www/big.bin
        self.processes: dict[str, subprocess.Popen[Any]] = {}
        self._log_files: list[object] = []
        self._created = False
        self._closed = False
        self.haproxy_threads = 1
        atexit.register(self.close)

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(
        self,
        *,
        with_haproxy: bool = True,
        with_dnat: bool = True,
        extra_args: Sequence[str] = (),
        haproxy_threads: int = 1,
        with_redis: bool = False,
    ) -> None:
        """Build everything; `extra_args` go to `rapproxy run` (e.g. `--set=proxy.workers=2`).

        `with_redis`: also redis-server on the backend address (port 6379), served by rapproxy
        as Service `redis` on REDIS_VIP, for redis-benchmark."""
        self.haproxy_threads = haproxy_threads
        self._create_namespace()
        self._write_files()
        self._start_nginx()
        if with_redis:
            self._start(
                "redis",
                [
                    "redis-server",
                    "--bind",
                    BACKEND_IP,
                    "--port",
                    str(REDIS_PORT),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "no",
                    "--dir",
                    str(self.dir),
                ],
            )
        if with_haproxy:
            self._start("haproxy", ["haproxy", "-db", "-f", str(self.dir / "haproxy.cfg")])
        if with_dnat:
            self._install_dnat()
        self._start(
            "rapproxy",
            [
                "env",
                "NODE_NAME=n1",
                str(VENV_BIN / "rapproxy"),
                "run",
                "--objects",
                str(self.dir / "objects.yaml"),
                "--lb-policy",
                "round-robin",
                "--no-bps",
                "--log-level",
                "info",
                "--set",
                "iptables.minSyncPeriod=0.1",
                *extra_args,
            ],
        )
        targets = [t for t in TARGETS if with_haproxy or not t.name.startswith("haproxy")]
        targets = [t for t in targets if with_dnat or t.name not in ("dnat", "haproxy-nat")]
        for target in targets:
            self.wait_for_ok(target.url + "/", target.name)
        if with_dnat:
            self.verify_dnat()
        self.verify_kernel()
        if with_redis:
            self.wait_for_redis()
        self.verify_big_body()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for name, process in reversed(list(self.processes.items())):
            _stop(process, name)
        if self._created:
            # Anything still inside (an nginx worker, a wrk we lost track of) dies with it.
            leftovers = self.ns_pids()
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while self.ns_pids() and time.monotonic() < deadline:
                time.sleep(0.05)
            subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)
            self._created = False
        for log_file in self._log_files:
            with contextlib.suppress(Exception):
                log_file.close()  # type: ignore[attr-defined]
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- building ---------------------------------------------------------------------------

    def _create_namespace(self) -> None:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self._created = True
        for command in (
            "ip link set lo up",
            f"ip addr add {BACKEND_IP}/32 dev lo",
            f"ip route add local {SERVICE_CIDR} dev lo",
        ):
            self.check(command.split())

    def _write_files(self) -> None:
        (self.dir / "www").mkdir()
        (self.dir / "tmp").mkdir()
        with open(self.dir / "www" / "big.bin", "wb") as big:
            big.write(os.urandom(BIG_BODY_BYTES))
        (self.dir / "nginx.conf").write_text(
            _NGINX_CONF.format(dir=self.dir, ip=BACKEND_IP, port=BACKEND_PORT)
        )
        (self.dir / "haproxy.cfg").write_text(
            _HAPROXY_CFG.format(
                vip=HAPROXY_VIP,
                port=SERVICE_PORT,
                nat_port=HAPROXY_NAT_PORT,
                threads=self.haproxy_threads,
                ip=BACKEND_IP,
                backend_port=BACKEND_PORT,
            )
        )
        (self.dir / "objects.yaml").write_text(
            _OBJECTS.format(
                vip=RAPPROXY_VIP,
                kernel_vip=KERNEL_VIP,
                port=SERVICE_PORT,
                ip=BACKEND_IP,
                backend_port=BACKEND_PORT,
                redis_vip=REDIS_VIP,
                redis_port=REDIS_PORT,
            )
        )
        (self.dir / "summary.lua").write_text(WRK_SUMMARY_LUA)

    def _start_nginx(self) -> None:
        self._start("nginx", ["nginx", "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir)])

    def _install_dnat(self) -> None:
        for rule in (
            f"-t nat -N {DNAT_CHAIN}",
            f"-t nat -A {DNAT_CHAIN} -d {DNAT_VIP}/32 -p tcp --dport {SERVICE_PORT} "
            f"-j DNAT --to-destination {BACKEND_IP}:{BACKEND_PORT}",
            f"-t nat -A {DNAT_CHAIN} -d {HAPROXY_NAT_VIP}/32 -p tcp --dport {SERVICE_PORT} "
            f"-j REDIRECT --to-ports {HAPROXY_NAT_PORT}",
            f"-t nat -I OUTPUT 1 -j {DNAT_CHAIN}",
        ):
            self.check(["iptables", "-w", *rule.split()])

    def _start(self, name: str, argv: Sequence[str]) -> None:
        log_file = open(self.dir / f"{name}.log", "wb")  # noqa: SIM115 -- closed in close()
        self._log_files.append(log_file)
        # `ip netns exec` and `env` both exec, so the Popen pid is the daemon itself.
        self.processes[name] = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *argv],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    # -- inspection -------------------------------------------------------------------------

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def check(self, argv: Sequence[str], timeout: float = 30) -> str:
        done = subprocess.run(
            self.exec_argv(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise TestbedError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr}")
        return done.stdout

    def ns_pids(self) -> list[int]:
        done = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False
        )
        return [int(p) for p in done.stdout.split()]

    def pid(self, name: str) -> int:
        process = self.processes[name]
        if process.poll() is not None:
            raise TestbedError(f"{name} exited with {process.returncode}; log:\n{self.log(name)}")
        return process.pid

    def wait_for_redis(self, deadline_s: float = 20) -> None:
        """Until redis answers PING both directly and through rapproxy's ClusterIP."""
        deadline = time.monotonic() + deadline_s
        for host in (BACKEND_IP, REDIS_VIP):
            while True:
                done = subprocess.run(
                    self.exec_argv(["redis-cli", "-h", host, "-p", str(REDIS_PORT), "ping"]),
                    capture_output=True,
                    text=True,
                    timeout=10,
                    check=False,
                )
                if done.stdout.strip() == "PONG":
                    break
                if time.monotonic() > deadline:
                    raise TestbedError(f"redis at {host} did not answer PING: {done.stderr}")
                time.sleep(0.2)

    def process_tree(self, name: str) -> list[int]:
        """The process and its children (rapproxy's relay workers), for CPU accounting."""
        main = self.pid(name)
        pids = [main]
        with contextlib.suppress(OSError), open(f"/proc/{main}/task/{main}/children") as f:
            pids += [int(p) for p in f.read().split()]
        return pids

    def redis_benchmark(
        self, host: str, *, clients: int = 50, requests: int = 100_000
    ) -> dict[str, float]:
        """redis-benchmark GET inside the namespace: rps and latency percentiles (ms)."""
        argv = ["redis-benchmark", "-h", host, "-p", str(REDIS_PORT), "-t", "get"]
        argv += ["-c", str(clients), "-n", str(requests), "--csv"]
        done = subprocess.run(
            self.exec_argv(argv), capture_output=True, text=True, timeout=300, check=False
        )
        rows = list(csv.reader(done.stdout.splitlines()))
        if done.returncode != 0 or len(rows) < 2:
            raise TestbedError(f"redis-benchmark failed ({done.returncode}): {done.stderr}")
        header, values = rows[0], rows[1]
        return {k: float(v) for k, v in zip(header[1:], values[1:], strict=True)}

    def nginx_worker_pid(self) -> int | None:
        master = self.pid("nginx")
        with contextlib.suppress(OSError), open(f"/proc/{master}/task/{master}/children") as f:
            children = f.read().split()
            if children:
                return int(children[0])
        return None

    def log(self, name: str, tail: int = 40) -> str:
        path = self.dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-tail:])

    def get(self, url: str, timeout: float = 2) -> str:
        done = subprocess.run(
            self.exec_argv(["curl", "-sS", "--max-time", str(timeout), url]),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise TestbedError(f"GET {url}: curl exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def wait_for_ok(self, url: str, name: str, deadline_s: float = 20) -> None:
        deadline = time.monotonic() + deadline_s
        last = ""
        while time.monotonic() < deadline:
            for process_name, process in self.processes.items():
                if process.poll() is not None:
                    raise TestbedError(
                        f"{process_name} exited ({process.returncode}) while waiting for {name}:"
                        f"\n{self.log(process_name)}"
                    )
            try:
                if self.get(url, timeout=1) == "ok\n":
                    return
            except TestbedError as error:
                last = str(error)
            time.sleep(0.1)
        raise TestbedError(f"{name} did not answer 'ok' at {url} within {deadline_s}s: {last}")

    def verify_big_body(self) -> None:
        done = subprocess.run(
            self.exec_argv(
                [
                    "curl",
                    "-sS",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %{size_download}",
                    f"http://{BACKEND_IP}:{BACKEND_PORT}/big",
                ]
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.stdout != f"200 {BIG_BODY_BYTES}":
            raise TestbedError(f"GET /big: expected 200 {BIG_BODY_BYTES}, got {done.stdout!r}")

    def dnat_packets(self) -> int:
        """Packets (= new connections: only the first packet of a flow traverses nat) DNATed."""
        out = self.check(["iptables", "-w", "-t", "nat", "-L", DNAT_CHAIN, "-n", "-v", "-x"])
        for line in out.splitlines():
            if "DNAT" in line and DNAT_VIP in line:
                return int(line.split()[0])
        raise TestbedError(f"DNAT rule not found in {DNAT_CHAIN}:\n{out}")

    def verify_dnat(self) -> None:
        """Prove the DNAT path reaches nginx: the body is nginx's and the rule's counter moved.

        Nothing listens on the DNAT VIP itself, so an "ok" there can only come through the rule.
        """
        before = self.dnat_packets()
        body = self.get(f"http://{DNAT_VIP}:{SERVICE_PORT}/")
        after = self.dnat_packets()
        if body != "ok\n" or after != before + 1:
            raise TestbedError(
                f"DNAT path not verified: body {body!r}, rule counter {before} → {after}"
            )

    def kernel_packets(self) -> int:
        """Connections the kernel-mode Service's endpoint chain DNATed (first packets, as above).

        Found by its DNAT target in rapproxy's own chains: rapproxy names them by hash.
        """
        out = self.check(["iptables-save", "-c", "-t", "nat"])
        for line in out.splitlines():
            if line.startswith("[") and "-A RAPPROXY-SEP-" in line and "-j DNAT" in line:
                packets = line[1:].split(":", 1)[0]
                return int(packets)
        raise TestbedError(f"no RAPPROXY-SEP DNAT rule for the kernel-mode Service:\n{out}")

    def verify_kernel(self) -> None:
        """Prove the kernel-mode Service is served by its DNAT rules, not by the proxy's fallback
        REDIRECT (which would answer "ok" too): the endpoint chain's counter must move."""
        deadline = time.monotonic() + 20
        while True:
            try:
                before = self.kernel_packets()
                break
            except TestbedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        body = self.get(f"http://{KERNEL_VIP}:{SERVICE_PORT}/")
        after = self.kernel_packets()
        if body != "ok\n" or after != before + 1:
            raise TestbedError(
                f"kernel path not verified: body {body!r}, SEP counter {before} → {after}"
            )

    def wrk(
        self,
        url: str,
        *,
        duration: float,
        connections: int,
        close: bool = False,
        timeout_s: str = "5s",
    ) -> dict[str, float]:
        """Run wrk (1 thread) inside the namespace; the summary comes from a Lua done() hook."""
        argv = [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",  # wrk takes whole seconds only
            f"--timeout={timeout_s}",
            "-s",
            str(self.dir / "summary.lua"),
        ]
        if close:
            argv += ["-H", "Connection: close"]
        argv.append(url)
        done = subprocess.run(
            self.exec_argv(argv),
            capture_output=True,
            text=True,
            timeout=duration + 60,
            check=False,
        )
        for line in done.stdout.splitlines():
            if line.startswith("WRKJSON "):
                summary: dict[str, float] = json.loads(line[len("WRKJSON ") :])
                return summary
        raise TestbedError(
            f"wrk printed no summary (exit {done.returncode}): {done.stdout}\n{done.stderr}"
        )


def _stop(process: subprocess.Popen[Any], name: str) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        print(f"{name} ignored SIGTERM for 5 s; killing it", file=sys.stderr)
        process.kill()
        process.wait(timeout=5)
