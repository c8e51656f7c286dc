"""Scale benchmark (issue 3): 10,000 Services x 5 endpoints through the emulated API server.

What it measures, end to end, with the real daemon (`rapproxy run --kubeconfig`) in a fresh
network namespace with real iptables (whatever backend the host uses; nft here):

* **first sync, cold start**: objects already in the API; from spawning the daemon until every
  service port is applied — `rapproxy_service_ports{protocol="TCP"}` reports them all AND a real
  connection to the first and to the last Service's ClusterIP reaches one of its endpoints (which
  needs the nat REDIRECT rule and the relay's table; without the rule the connection is refused);
* **first sync, daemon already running**: the daemon up on an empty API; from the moment the
  last object is written until the same condition holds (the informers receive everything as
  watch events instead of a list);
* **change-to-applied**: one EndpointSlice edited (one of its five endpoints replaced by a new
  address) via the registry; from that write until a real connection to the Service's ClusterIP
  is served by the new endpoint. p50/p99 over N changes spaced apart. The daemon's own
  `rapproxy_network_programming_duration_seconds` is reported beside it;
* **iptables rewrites during the changes**: `nft monitor` runs in the namespace for the whole
  change phase and every RAPPROXY rule write is timestamped, so the run shows whether an
  endpoint-only change rewrote rules (it must not) and which changes overlapped a periodic resync;
* **memory**: the daemon's VmRSS sampled every 100 ms, and VmHWM (its peak) at the end.

`--kernel` (issue 13) runs every Service in kernel mode (`dataplane.mode: kernel`, policy `rap`):
each Service's three first endpoints are on this node, the other two on `node-b`, and the node's
load comes from a file (`rap.loadSource: file:`). During the change phase the benchmark also
flips that file between overloaded (CPU 0.95) and idle (0.1) — each onset of overload moves
every Service's weights (local endpoints 1/3 → 0.7/3 each, remote 0 → 0.15) — and times, from
the file write, the transaction that writes them (`nft monitor`: the first burst of rule events
on RAPPROXY-SVC chains alone after it), while the endpoint changes keep being measured as above
(on the local endpoints, which keep a share the probe can see).

`--legacy` makes the namespace look like a node whose kubelet uses iptables-legacy (its hint
chain `KUBE-IPTABLES-HINT`), so the daemon writes through iptables-legacy-restore: on this host
iptables-nft-restore grows superlinearly with the number of chains (kube-proxy's layout has six
per Service here: 1,000 Services' full write 2.7 s, 2,000 16 s), and kernel mode at 10k never
finished its first write. `nft monitor` sees nothing of legacy tables, so there the weight write
is timed by polling Service 0's weighted chain (`iptables -S`, every 0.5 s) until it changes.

`--kernel --nftables` sets `dataplane.kernelBackend: nftables`: kernel mode in rapproxy's own nft
table (rules/nftables.py). There a weight write is ~120k rule events in batches of 500 Services
(sync/proxier.py), and `nft monitor` printing them would compete with the daemon for the two
CPUs, so the monitor does not run; the weight write is timed from the load file's write to the
daemon's own log line written when the last batch's `nft` has exited (JSON logs, ms timestamps:
`--log-format json`), and only writes that moved at least 90% of the Services count.

Every endpoint is live: `10.244.0.0/14` is a local route in the namespace and one backend
process listens on 0.0.0.0:8080, answering each connection with the address it was reached at
(i.e. the endpoint the relay chose). The probe runs in a worker process inside the namespace.

Usage (root): `.venv/bin/python benchmarks/scale/run.py [--services N] [--changes N]
[--spacing S] [--set key=value ...] [--profile] [--output DIR]`.
Results: `benchmarks/scale/results/scale-<UTC date-time>.{md,json}`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import io
import ipaddress
import json
import os
import platform
import pstats
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rapproxy.model.service import ServicePortName
from rapproxy.rules.kernel import service_chain
from rapproxy.testing import probes
from rapproxy.testing.apiserver import EmulatedApiServer
from rapproxy.testing.apiserver.resources import ENDPOINT_SLICES, SERVICES
from rapproxy.testing.netns import Namespace

RAPPROXY = str(Path(sys.executable).with_name("rapproxy"))
HERE = Path(__file__).resolve()
SERVICE_NET = ipaddress.ip_network("10.96.0.0/16")
ENDPOINT_NET = ipaddress.ip_network("10.244.0.0/14")  # 10.244-10.247: first endpoints + changes
FIRST_ENDPOINT = int(ipaddress.ip_address("10.244.0.1"))
CHANGED_ENDPOINT = int(ipaddress.ip_address("10.246.0.1"))
BACKEND_PORT = 8080
METRICS = "http://127.0.0.1:10249/metrics"
SETTLE = 60.0


# -- objects -----------------------------------------------------------------------------------


def cluster_ip(index: int) -> str:
    return str(SERVICE_NET[256 + index])  # 10.96.1.0 onwards, clear of .0.x


def endpoint_ip(index: int, slot: int, per_service: int) -> str:
    return str(ipaddress.ip_address(FIRST_ENDPOINT + index * per_service + slot))


def service_name(index: int) -> str:
    return f"svc-{index:05d}"


def svc0_name() -> ServicePortName:
    """Service 0's port as the daemon names it (its weighted chain's name is hashed from it)."""
    return ServicePortName("default", service_name(0), "http")


def service(index: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(index), "namespace": "default"},
        "spec": {
            "clusterIP": cluster_ip(index),
            "ports": [{"name": "http", "port": 80, "targetPort": BACKEND_PORT}],
        },
    }


LOCAL_SLOTS = 3  # --kernel: endpoints 0-2 on this node, the rest on REMOTE_NODE
REMOTE_NODE = "node-b"


def endpoints(ips: list[str], local_slots: int | None = None) -> list[dict[str, Any]]:
    return [
        {
            "addresses": [ip],
            "conditions": {"ready": True},
            "nodeName": "node" if local_slots is None or slot < local_slots else REMOTE_NODE,
        }
        for slot, ip in enumerate(ips)
    ]


def endpoint_slice(index: int, per_service: int, local_slots: int | None = None) -> dict[str, Any]:
    name = service_name(index)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-abcde",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}],
        "endpoints": endpoints(
            [endpoint_ip(index, s, per_service) for s in range(per_service)], local_slots
        ),
    }


def create_all(
    api: EmulatedApiServer, count: int, per_service: int, local_slots: int | None = None
) -> float:
    """Write every Service and its slice through the registry (validated, defaulted)."""
    started = time.monotonic()
    for index in range(count):
        api.registry.create(
            ENDPOINT_SLICES, "default", endpoint_slice(index, per_service, local_slots)
        )
        api.registry.create(SERVICES, "default", service(index))
    return time.monotonic() - started


# -- processes inside the namespace ------------------------------------------------------------


async def serve_addresses(port: int) -> None:
    """The backend: answer each connection with the local address it reached, then close."""

    async def answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{writer.get_extra_info('sockname')[0]}\n".encode())
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "0.0.0.0", port, backlog=1024)
    async with server:
        await server.serve_forever()


def ask(ip: str, port: int, timeout: float = 2.0) -> str:
    """Which endpoint serves a new connection to ip:port ("" when the connection fails)."""
    try:
        with socket.create_connection((ip, port), timeout=timeout) as sock:
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(64)
                if not chunk:
                    break
                data += chunk
            return data.decode().strip()
    except OSError:
        return ""


def served(targets: list[str], port: int) -> bool:
    """Probe (runs in the namespace): every target ClusterIP reaches an endpoint."""
    return all(ask(ip, port, 1.0).startswith("10.24") for ip in targets)


def watch_for(ip: str, port: int, wanted: str, within: float) -> tuple[float, float, int, str]:
    """Probe (runs in the namespace): connect until `wanted` serves a connection.

    Returns (monotonic time of the first attempt, monotonic time `wanted` answered, attempts,
    the last answer). CLOCK_MONOTONIC is one clock for every process on the machine, so the
    caller can subtract its own timestamps. On timeout the second value is 0.
    """
    first = time.monotonic()
    attempts = 0
    answer = ""
    while time.monotonic() - first < within:
        attempts += 1
        answer = ask(ip, port)
        if answer == wanted:
            return first, time.monotonic(), attempts, answer
    return first, 0.0, attempts, answer


def metric(text: str, name: str, labels: str = "") -> float | None:
    pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", re.M)
    found = pattern.search(text)
    return float(found.group(1)) if found else None


def histogram(text: str, name: str) -> dict[str, float]:
    buckets = {
        m.group(1): float(m.group(2))
        for m in re.finditer(rf'^{re.escape(name)}_bucket{{le="([^"]+)"}} (\S+)$', text, re.M)
    }
    return {
        "count": metric(text, f"{name}_count") or 0.0,
        "sum": metric(text, f"{name}_sum") or 0.0,
        **{f"le_{k}": v for k, v in buckets.items()},
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in KiB (empty when the process is gone)."""
    values: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    except OSError:
        pass
    return values


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Result:
    services: int
    per_service: int
    daemon_flags: list[str]
    create_seconds: float = 0.0
    cold_first_sync: float = 0.0
    cold_listed_rss_mib: float = 0.0
    cold_daemon_cpu_seconds: float = 0.0  # the daemon's own CPU time to its first full sync
    cold_machine_busy: float = 0.0  # share of all CPUs busy meanwhile (every process)
    warm_first_sync: float = 0.0
    warm_create_seconds: float = 0.0
    changes: list[dict[str, float]] = field(default_factory=list)
    invalid_changes: int = 0
    rule_writes: list[dict[str, Any]] = field(default_factory=list)
    rss_samples: list[tuple[float, float]] = field(default_factory=list)  # (t, MiB)
    peak_rss_mib: float = 0.0
    steady_rss_mib: float = 0.0
    iptables_rules: int = 0
    metrics_after: dict[str, Any] = field(default_factory=dict)
    # --kernel: per onset of overload, seconds from the load file's write to the weight write's
    # first rule event, and that write's rule events; writes seen in all; unmatched onsets.
    weight_writes: list[dict[str, Any]] = field(default_factory=list)
    weight_bursts: int = 0
    weight_notes: list[str] = field(default_factory=list)
    profile: str | None = None
    notes: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, node: Namespace, api: EmulatedApiServer, kubeconfig: Path, args: Any):
        self.node = node
        self.api = api
        self.kubeconfig = kubeconfig
        self.args = args
        self.daemon: asyncio.subprocess.Process | None = None
        self.daemon_started = 0.0
        self.rss: list[tuple[float, float]] = []
        self._sampler: asyncio.Task[None] | None = None
        self.profile_path: Path | None = None  # set: the next daemon runs under cProfile
        self.load_file = kubeconfig.parent / "node-load.json"  # --kernel: the node's load
        self.set_load(0.1)

    def set_load(self, cpu: float) -> float:
        """Write the node's load figure (whole, by rename); returns when (monotonic)."""
        partial = self.load_file.with_suffix(".tmp")
        partial.write_text(json.dumps({"cpu": cpu, "memory": 0.2}))
        partial.replace(self.load_file)
        return time.monotonic()

    def flags(self) -> list[str]:
        if self.args.kernel:
            flags = ["--node-name", "node", "--lb-policy", "rap"]
            flags += ["--set", "dataplane.mode=kernel"]
            flags += ["--set", f"rap.loadSource=file:{self.load_file}"]
            if self.args.nftables:
                flags += ["--set", "dataplane.kernelBackend=nftables", "--log-format", "json"]
        else:
            flags = ["--node-name", "node", "--lb-policy", "round-robin"]
        for setting in self.args.set:
            flags += ["--set", setting]
        return flags

    async def start_daemon(self, log_path: Path) -> None:
        argv = [RAPPROXY, "run", "--kubeconfig", str(self.kubeconfig), *self.flags()]
        if self.profile_path is not None:
            # cProfile, not a sampler: py-spy slowed the cold start five-fold here
            argv = [sys.executable, "-m", "cProfile", "-o", str(self.profile_path), *argv]
        log = log_path.open("ab")
        self.daemon_started = time.monotonic()
        self.daemon = await self.node.spawn(argv, stdout=log, stderr=log)
        log.close()
        self._sampler = asyncio.create_task(self._sample_rss())

    def daemon_pid(self) -> int:
        assert self.daemon is not None
        return self.daemon.pid  # `ip netns exec` execs the command: same pid

    async def _sample_rss(self) -> None:
        while True:
            status = proc_status(self.daemon_pid())
            if "VmRSS" in status:
                self.rss.append((time.monotonic() - self.daemon_started, status["VmRSS"] / 1024))
            await asyncio.sleep(0.1)

    async def stop_daemon(self) -> dict[str, int]:
        status = proc_status(self.daemon_pid())
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        if self.daemon is not None and self.daemon.returncode is None:
            self.daemon.send_signal(signal.SIGTERM)  # a clean exit: cProfile writes its file
            try:
                await asyncio.wait_for(self.daemon.wait(), 60)
            except TimeoutError:
                self.daemon.kill()
                await self.daemon.wait()
        self.daemon = None
        return status

    async def metrics_text(self) -> str:
        status, body = await self.node.call(probes.http_get, METRICS, 2.0)
        return body if status == 200 else ""

    async def applied(self, count: int) -> bool:
        """Every service port counted by the daemon, and first and last Service served."""
        try:
            text = await self.metrics_text()
        except OSError:
            return False
        # +1: the registry seeds default/kubernetes, as a real cluster has it
        if metric(text, "rapproxy_service_ports", '{protocol="TCP"}') != count + 1:
            return False
        return await self.node.call(served, [cluster_ip(0), cluster_ip(count - 1)], 80)

    async def until(self, check: Callable[[], Awaitable[bool]], within: float = SETTLE) -> float:
        """Monotonic time at which `check()` first held.

        --kernel polls every 0.25 s instead of 0.01 s: each check scrapes /metrics, which in
        kernel mode carries a weight per endpoint (50,000 series here), and scraping that
        continuously would be most of what the daemon does while it starts."""
        deadline = time.monotonic() + within
        pause = 0.25 if self.args.kernel else 0.01
        while time.monotonic() < deadline:
            if await check():
                return time.monotonic()
            await asyncio.sleep(pause)
        raise TimeoutError(f"not applied within {within}s")


async def rule_monitor(node: Namespace, events: list[tuple[float, str]]) -> None:
    """Timestamp every nft event on RAPPROXY chains (a rewrite shows as a burst of them).

    nft prints a transaction's events once it is committed: the first one is when the rules
    took effect."""
    process = await node.spawn(
        ["nft", "monitor", "rules"],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    try:
        while line := await process.stdout.readline():
            if b"RAPPROXY" in line:
                events.append((time.monotonic(), line.decode(errors="replace").strip()))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def bursts(events: list[tuple[float, str]], gap: float = 1.0) -> list[dict[str, Any]]:
    """Group rule events into rewrites: (start, end, how many rule lines, whether any touched a
    chain other than RAPPROXY-SVC-*: a weight write touches those alone)."""
    groups: list[dict[str, Any]] = []
    for at, line in events:
        only_svc = "RAPPROXY-SVC-" in line and "RAPPROXY-SERVICES" not in line
        if groups and at - groups[-1]["end"] <= gap:
            groups[-1]["end"] = at
            groups[-1]["events"] += 1
            groups[-1]["svc_only"] = groups[-1]["svc_only"] and only_svc
        else:
            groups.append({"start": at, "end": at, "events": 1, "svc_only": only_svc})
    return groups


async def chain_text(node: Namespace, tool: str, chain: str) -> str:
    done = await node.exec([tool, "-w", "-t", "nat", "-S", chain], check=False)
    return done.stdout


async def time_weight_writes(
    node: Namespace, tool: str, chain: str, onsets: list[float], seen: list[tuple[float, float]]
) -> None:
    """--legacy: for each onset, when Service 0's weighted chain first changed after it (the
    recovery writes between onsets change it too; only the first change after an onset counts)."""
    matched = 0
    last = await chain_text(node, tool, chain)
    while True:
        # Every legacy command reads the whole table under the xtables lock the daemon's writes
        # wait for: polled every 50 ms it held the daemon up (results/...-kernel-legacy-stopped).
        await asyncio.sleep(0.5)
        text = await chain_text(node, tool, chain)
        if not text or text == last:
            continue
        changed = time.monotonic()
        last = text
        waiting = [onset for onset in onsets[matched:] if onset <= changed]
        if waiting:
            seen.append((waiting[-1], changed))
            matched += len(waiting)


def logged(
    log_path: Path, wall_offset: float, pattern: re.Pattern[str]
) -> list[tuple[float, re.Match[str]]]:
    """(monotonic time, match) of each daemon log line (JSON lines) whose message matches."""
    found: list[tuple[float, re.Match[str]]] = []
    for line in log_path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        match = pattern.search(str(record.get("msg", "")))
        if match is None:
            continue
        stamp = datetime.datetime.strptime(record["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")
        wall = stamp.replace(tzinfo=datetime.UTC).timestamp()
        found.append((wall - wall_offset, match))
    return found


def nft_weight_writes(
    log_path: Path, wall_offset: float, at_least: float
) -> list[tuple[float, int, float]]:
    """--nftables: (monotonic end, service ports, seconds) of each weight write the daemon logged
    that wrote at least `at_least` service ports."""
    pattern = re.compile(r"kernel weights of (\d+) service ports written in ([\d.]+) s")
    return [
        (at, int(match.group(1)), float(match.group(2)))
        for at, match in logged(log_path, wall_offset, pattern)
        if int(match.group(1)) >= at_least
    ]


def overloads_seen(log_path: Path, wall_offset: float) -> list[float]:
    """When the daemon's telemetry found this node overloaded (its own log line)."""
    pattern = re.compile(r"^this node is overloaded")
    return [at for at, _ in logged(log_path, wall_offset, pattern)]


async def flip_load(
    bench: Bench, onsets: list[float], stop: asyncio.Event, high: float, low: float
) -> None:
    """--kernel: overload the node for `high` s, then let it recover for `low` s, until stopped;
    records when each overload was written. Recovery takes ~5 telemetry samples (+0.1 each)
    before the local share is back at 1, so every onset moves every Service's weights."""
    while not stop.is_set():
        onsets.append(bench.set_load(0.95))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), high)
        bench.set_load(0.1)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), low)


async def measure(args: Any, workdir: Path) -> Result:
    result = Result(args.services, args.endpoints, [])
    node = await Namespace.create("scale")
    try:
        await node.add_local_route(str(SERVICE_NET))
        await node.add_local_route(str(ENDPOINT_NET))
        await node.spawn(
            [sys.executable, str(HERE), "--serve-addresses", str(BACKEND_PORT)],
            stdout=asyncio.subprocess.DEVNULL,
        )
        if args.legacy:
            await node.exec(["iptables-legacy", "-w", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"])
        api = EmulatedApiServer(socket_factory=node.socket, bookmark_interval=5.0)
        await api.start()
        try:
            kubeconfig = api.write_kubeconfig(workdir / "kubeconfig")
            bench = Bench(node, api, kubeconfig, args)
            result.daemon_flags = bench.flags()
            log_path = workdir / "daemon.log"

            # 1. Daemon running on an empty API; then every object is written.
            await bench.start_daemon(log_path)
            await node.call(probes.wait_http, "http://127.0.0.1:10256/livez", 30.0)
            local_slots = LOCAL_SLOTS if args.kernel else None
            result.warm_create_seconds = create_all(api, args.services, args.endpoints, local_slots)
            written = time.monotonic()
            result.warm_first_sync = await bench.until(lambda: bench.applied(args.services))
            result.warm_first_sync -= written
            progress(f"warm first sync {result.warm_first_sync:.2f}s")
            await bench.stop_daemon()
            await node.exec([RAPPROXY, "cleanup"])

            # 2. Cold start: the objects exist; a fresh daemon lists them.
            bench.rss.clear()
            if args.profile:
                bench.profile_path = workdir / "cold.prof"
            busy_before = machine_busy()
            await bench.start_daemon(log_path)
            done = await bench.until(lambda: bench.applied(args.services))
            result.cold_first_sync = done - bench.daemon_started
            result.cold_daemon_cpu_seconds = cpu_seconds(bench.daemon_pid())
            busy_after = machine_busy()
            result.cold_machine_busy = (busy_after[0] - busy_before[0]) / max(
                1, busy_after[1] - busy_before[1]
            )
            result.cold_listed_rss_mib = proc_status(bench.daemon_pid()).get("VmRSS", 0) / 1024
            progress(f"cold first sync {result.cold_first_sync:.2f}s")
            if args.nftables:
                listed = await node.exec(["nft", "list", "chains", "ip"])
                result.notes.append(
                    f"kernel mode (nftables): {listed.stdout.count('chain svc-')} svc chains, "
                    f"{listed.stdout.count('chain sep-')} endpoint chains after the cold start"
                )
            save = "iptables-legacy-save" if args.legacy else "iptables-save"
            saved = await node.exec([save, "-t", "nat"])
            result.iptables_rules = saved.stdout.count("-A RAPPROXY-SERVICES")
            if args.kernel:
                result.notes.append(
                    f"kernel mode: {saved.stdout.count(chr(10) + ':RAPPROXY-')} RAPPROXY chains, "
                    f"{saved.stdout.count(chr(10) + '-A RAPPROXY-')} rules after the cold start"
                )

            # 3. Endpoint changes, each measured from the registry write to a real connection
            #    being served by the new endpoint.
            events: list[tuple[float, str]] = []
            monitor = None if args.nftables else asyncio.create_task(rule_monitor(node, events))
            wall_offset = time.time() - time.monotonic()
            polled: list[tuple[float, float]] = []
            onsets: list[float] = []
            poller = (
                asyncio.create_task(
                    time_weight_writes(
                        node, "iptables-legacy", service_chain(svc0_name(), "SVC"), onsets, polled
                    )
                )
                if args.kernel and args.legacy
                else None
            )
            await asyncio.sleep(0.5)  # let nft monitor subscribe before the first change
            rng = random.Random(3)
            phase_start = time.monotonic()
            windows: list[tuple[float, float]] = []
            stop_flipping = asyncio.Event()
            flipper = (
                asyncio.create_task(
                    flip_load(bench, onsets, stop_flipping, args.overload_s, args.recover_s)
                )
                if args.kernel
                else None
            )
            for number in range(args.changes):
                index = rng.randrange(args.services)
                # kernel: a local endpoint, which keeps a share whatever the load
                slot = rng.randrange(LOCAL_SLOTS if args.kernel else args.endpoints)
                new_ip = str(ipaddress.ip_address(CHANGED_ENDPOINT + number))
                await asyncio.sleep(args.spacing)
                probe = asyncio.create_task(
                    node.call(watch_for, cluster_ip(index), 80, new_ip, 10.0)
                )
                await asyncio.sleep(0.03)  # the probe is connecting (checked below)

                def replace(obj: dict[str, Any], slot: int = slot, ip: str = new_ip) -> None:
                    obj["endpoints"][slot]["addresses"] = [ip]

                written = time.monotonic()
                api.registry.mutate(
                    ENDPOINT_SLICES, "default", f"{service_name(index)}-abcde", replace
                )
                first, seen, attempts, last = await probe
                if not seen:
                    result.invalid_changes += 1
                    result.notes.append(f"change {number}: not seen in 10 s (last {last!r})")
                    continue
                if first > written:  # the probe began after the write: an upper bound
                    result.notes.append(f"change {number}: probe began {first - written:.3f}s late")
                windows.append((written, seen))
                result.changes.append(
                    {
                        "service": index,
                        "at": written - phase_start,
                        "seconds": seen - written,
                        "attempts": attempts,
                    }
                )
            if flipper is not None:
                stop_flipping.set()
                await flipper
                bench.set_load(0.1)
                await asyncio.sleep(3.0)  # the last onset's write
            await asyncio.sleep(0.5)
            if monitor is not None:
                monitor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await monitor
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
                for onset, changed in polled:
                    result.weight_writes.append(
                        {
                            "at": onset - phase_start,
                            "seconds": changed - onset,
                            "rule_events": 0,
                            "events_seconds": 0.0,
                        }
                    )
                result.weight_notes.append(
                    "iptables-legacy: timed by polling Service 0's weighted chain every 0.5 s "
                    f"(each poll a legacy table read); {len(onsets)} onsets, {len(polled)} seen"
                )
            elif args.nftables:
                writes = nft_weight_writes(log_path, wall_offset, 0.9 * args.services)
                overload_times = overloads_seen(log_path, wall_offset)
                result.weight_bursts = len(writes)
                for onset in onsets:
                    after = [w for w in writes if w[0] >= onset]
                    if not after:
                        result.weight_notes.append(
                            f"onset at +{onset - phase_start:.1f} s: no write"
                        )
                        continue
                    end, ports, seconds = after[0]
                    observed = [at for at in overload_times if onset <= at <= end]
                    result.weight_writes.append(
                        {
                            "at": onset - phase_start,
                            "seconds": end - onset,
                            "rule_events": ports,
                            "events_seconds": seconds,
                            # From the daemon's telemetry seeing the overload to the write.
                            "from_sample": end - observed[0] if observed else None,
                        }
                    )
                result.weight_notes.append(
                    "nftables: timed to the daemon's log line after the write's last batch "
                    "(`rule_events` here: the service ports written; `nft monitor` not run)"
                )
            elif args.kernel:
                weight_bursts = [b for b in bursts(events, gap=0.2) if b["svc_only"]]
                result.weight_bursts = len(weight_bursts)
                for onset in onsets:
                    after = [b for b in weight_bursts if b["start"] >= onset]
                    if not after:
                        result.weight_notes.append(
                            f"onset at +{onset - phase_start:.1f} s: no write"
                        )
                        continue
                    first = after[0]
                    result.weight_writes.append(
                        {
                            "at": onset - phase_start,
                            "seconds": first["start"] - onset,
                            "rule_events": first["events"],
                            "events_seconds": first["end"] - first["start"],
                        }
                    )
            for burst in bursts(events):
                overlapping = [
                    i
                    for i, (a, b) in enumerate(windows)
                    if burst["start"] <= b and burst["end"] >= a
                ]
                result.rule_writes.append(
                    {
                        "at": burst["start"] - phase_start,
                        "seconds": burst["end"] - burst["start"],
                        "rule_events": burst["events"],
                        "during_changes": overlapping,
                    }
                )
            text = await bench.metrics_text()
            result.metrics_after = {
                "service_ports_tcp": metric(text, "rapproxy_service_ports", '{protocol="TCP"}'),
                "sync_duration": histogram(text, "rapproxy_sync_proxy_rules_duration_seconds"),
                "programming_latency": histogram(
                    text, "rapproxy_network_programming_duration_seconds"
                ),
                "sync_failures": metric(text, "rapproxy_sync_proxy_rules_failures_total"),
                "kernel_weight_writes": metric(text, "rapproxy_kernel_weight_writes_total"),
                "kernel_weight_write_duration": histogram(
                    text, "rapproxy_kernel_weight_write_duration_seconds"
                ),
            }
            result.steady_rss_mib = proc_status(bench.daemon_pid()).get("VmRSS", 0) / 1024
            status = await bench.stop_daemon()
            result.peak_rss_mib = status.get("VmHWM", 0) / 1024
            result.rss_samples = [(round(t, 2), round(m, 1)) for t, m in bench.rss[::10]]
            if args.profile:
                result.profile = profile_summary(workdir / "cold.prof")
        finally:
            await api.stop()
    finally:
        node.destroy()
    return result


def profile_summary(path: Path) -> str:
    """The top of the cold-start daemon's profile, by own time and by cumulative time."""
    if not path.exists():
        return "(no profile written)"
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    return out.getvalue()


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- the report --------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: p99 of 100 values is the 99th smallest."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.4999)))
    return ordered[rank - 1]


def verdict(value: float, target: float) -> str:
    return "meets" if value <= target else "MISSES"


def render(result: Result, meta: dict[str, Any]) -> str:
    latencies = [c["seconds"] for c in result.changes]
    p50 = percentile(latencies, 50) if latencies else float("nan")
    p99 = percentile(latencies, 99) if latencies else float("nan")
    worst = max(latencies) if latencies else float("nan")
    lines = [
        f"# Scale benchmark, {meta['when']}" + (f" — {meta['label']}" if meta["label"] else ""),
        "",
        f"Command: `{meta['command']}`",
        "",
        f"{result.services} Services x {result.per_service} endpoints (one TCP port each), "
        "emulated API server in the benchmark process listening inside the namespace; "
        f"daemon flags `{' '.join(result.daemon_flags)}`; iptables "
        f"{meta['iptables']}. Machine: {meta['machine']}; load average before "
        f"{meta['load_before']}, after {meta['load_after']}.",
        "",
        "| figure | measured | target | |",
        "|---|---|---|---|",
        f"| first sync, cold start (daemon spawned → all applied) | {result.cold_first_sync:.2f} s"
        f" | ≤ 5 s | {verdict(result.cold_first_sync, 5)} |",
        f"| first sync, daemon running (last object written → all applied) | "
        f"{result.warm_first_sync:.2f} s | ≤ 5 s | {verdict(result.warm_first_sync, 5)} |",
        f"| — the daemon's CPU time to that point | {result.cold_daemon_cpu_seconds:.2f} s"
        f" | | all CPUs {result.cold_machine_busy:.0%} busy meanwhile |",
        f"| change → applied, p50 ({len(latencies)} changes) | {p50 * 1000:.1f} ms | | |",
        f"| change → applied, p99 | {p99 * 1000:.1f} ms | ≤ 100 ms | {verdict(p99, 0.1)} |",
        f"| change → applied, worst | {worst * 1000:.1f} ms | | |",
        f"| peak RSS (VmHWM) | {result.peak_rss_mib:.0f} MiB | ≤ 300 MB | "
        f"{verdict(result.peak_rss_mib * 1.048576, 300)} |",
        f"| RSS after the changes | {result.steady_rss_mib:.0f} MiB | | |",
        "",
        f"Writing the {2 * result.services} objects into the registry took "
        f"{result.warm_create_seconds:.1f} s (not part of any figure). "
        f"RAPPROXY-SERVICES held {result.iptables_rules} rules after the cold start.",
        "",
        "## iptables writes during the change phase",
        "",
    ]
    if "dataplane.kernelBackend=nftables" in result.daemon_flags:
        lines += [
            "Not watched: with the nftables backend an endpoint change of a kernel-mode Service "
            "is a rules write by design, and `nft monitor` was not run (see the weight writes "
            "below).",
            "",
        ]
    else:
        lines += [
            f"{len(result.rule_writes)} rewrite(s) of the RAPPROXY chains seen by `nft monitor` "
            f"during {len(latencies)} endpoint-only changes "
            "(periodic full resyncs every `iptables.syncPeriod` are expected; "
            "a rewrite per change is not):",
            "",
        ]
    for write in result.rule_writes:
        lines.append(
            f"- at +{write['at']:.1f} s, {write['rule_events']} rule events over "
            f"{write['seconds'] * 1000:.0f} ms; overlapping change windows: "
            f"{write['during_changes'] or 'none'}"
        )
    if result.weight_writes or result.weight_notes:
        seconds = [w["seconds"] for w in result.weight_writes]
        lines += [
            "",
            "## Kernel mode: weight writes after a telemetry change (issue 13)",
            "",
            f"{len(result.weight_writes)} onsets of overload, each moving every Service's "
            "weights; from the load file's write to "
            + (
                "the daemon's log line after the last batch of the weight write (nftables)"
                if "dataplane.kernelBackend=nftables" in result.daemon_flags
                else "the first rule event of the weight write (a transaction touching "
                "RAPPROXY-SVC chains alone) seen by `nft monitor`"
            )
            + ". This includes waiting for the next telemetry sample (`rap.telemetryInterval`, 1 s) "
            "(and, before weights followed each sample, for the next weight period, "
            "`dataplane.weightPeriod`, 1 s), then computing and "
            f"writing. {result.weight_bursts} weight writes were seen in all.",
            "",
        ]
        if seconds:
            lines += [
                f"- file write → weights in force: p50 {percentile(seconds, 50):.2f} s, p99 "
                f"{percentile(seconds, 99):.2f} s, worst {max(seconds):.2f} s "
                f"(target ≤ 1 s p99: {verdict(percentile(seconds, 99), 1.0)})",
                "- each: "
                + ", ".join(
                    f"+{w['at']:.0f} s: {w['seconds']:.2f} s ({w['rule_events']} events)"
                    for w in result.weight_writes
                ),
            ]
            from_sample = [
                w["from_sample"] for w in result.weight_writes if w.get("from_sample") is not None
            ]
            if from_sample:
                lines.append(
                    "- the daemon's telemetry sample that found the overload (its log line"
                    " `this node is overloaded`) → weights in force: p50 "
                    f"{percentile(from_sample, 50):.2f} s, p99 {percentile(from_sample, 99):.2f}"
                    f" s, worst {max(from_sample):.2f} s over {len(from_sample)} onsets (target"
                    f" ≤ 1 s p99: {verdict(percentile(from_sample, 99), 1.0)}); the rest of the"
                    " figure above is the wait for that sample (`rap.telemetryInterval`, 1 s)"
                )
        duration = result.metrics_after.get("kernel_weight_write_duration") or {}
        if duration.get("count"):
            lines.append(
                f"- the daemon's own `rapproxy_kernel_weight_write_duration_seconds` (compute, "
                f"render, iptables-restore): {int(duration['count'])} writes, mean "
                f"{duration['sum'] / duration['count']:.2f} s; buckets "
                + ", ".join(
                    f"≤{k[3:]}: {int(v)}" for k, v in duration.items() if k.startswith("le_")
                )
            )
        lines += [f"- {note}" for note in result.weight_notes]
    slow = sorted(result.changes, key=lambda c: -c["seconds"])[:5]
    lines += [
        "",
        "Slowest changes: "
        + ", ".join(f"#{result.changes.index(c)} {c['seconds'] * 1000:.0f} ms" for c in slow),
        "",
        "## The daemon's own view (after the run)",
        "",
        "```",
        json.dumps(result.metrics_after, indent=1),
        "```",
    ]
    if result.notes:
        lines += ["", f"{result.invalid_changes} change(s) not measured. Notes:"]
        lines += [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def iptables_version() -> str:
    return subprocess.run(
        ["iptables", "--version"], check=False, capture_output=True, text=True
    ).stdout.strip()


async def main_async(args: Any) -> int:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%MZ")
    meta = {
        "when": when,
        "command": " ".join(
            shlex.quote(a)
            for a in [
                *(
                    [f"PYTHONPATH={os.environ['PYTHONPATH']}"]
                    if os.environ.get("PYTHONPATH")
                    else []
                ),
                ".venv/bin/python",
                *sys.argv,
            ]
        ),
        "label": args.label,
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "iptables": iptables_version(),
        "load_before": load_average(),
    }
    with tempfile.TemporaryDirectory(prefix="rap-scale-") as tmp:
        try:
            result = await measure(args, Path(tmp))
        except BaseException:
            print((Path(tmp) / "daemon.log").read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        log_lines = (Path(tmp) / "daemon.log").read_text(errors="replace").splitlines()
        log_tail = log_lines[-15:]
        # What explains an outlier: every warning and error, and every sync of a second or more.
        log_notable = [
            line
            for line in log_lines[:-15]
            if '"level": "warning"' in line
            or '"level": "error"' in line
            or re.search(r"synced .* in \d{4,}\.\d ms", line)
        ][-200:]
    meta["load_after"] = load_average()
    report = render(result, meta)
    args.output.mkdir(parents=True, exist_ok=True)
    stem = f"scale-{when}" + (f"-{args.label}" if args.label else "")
    (args.output / f"{stem}.md").write_text(report)
    (args.output / f"{stem}.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "result": asdict(result),
                "daemon_log_notable": log_notable,
                "daemon_log_tail": log_tail,
            },
            indent=1,
        )
    )
    if result.profile:
        (args.output / f"{stem}-profile.txt").write_text(result.profile)
    print(report)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=5)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--spacing", type=float, default=0.2, help="seconds between changes")
    parser.add_argument("--set", action="append", default=[], help="daemon setting key=value")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the cold-start daemon (inflates its figures)",
    )
    parser.add_argument("--output", type=Path, default=HERE.parent / "results")
    parser.add_argument("--label", default="", help="names the result files (e.g. a variant)")
    parser.add_argument(
        "--kernel",
        action="store_true",
        help="every Service in kernel mode; flip the node's load to time weight writes",
    )
    parser.add_argument(
        "--legacy",
        action="store_true",
        help="the namespace's kubelet hint says iptables-legacy: the daemon writes there",
    )
    parser.add_argument(
        "--nftables",
        action="store_true",
        help="--kernel through rapproxy's nft tables (dataplane.kernelBackend: nftables)",
    )
    parser.add_argument("--overload-s", type=float, default=1.5, help="--kernel: overloaded for")
    parser.add_argument("--recover-s", type=float, default=7.0, help="--kernel: then idle for")
    parser.add_argument("--serve-addresses", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_addresses:
        asyncio.run(serve_addresses(args.serve_addresses))
        return 0
    if os.geteuid() != 0:
        print("needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
