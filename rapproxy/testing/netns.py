"""Network namespaces for tests: closed little worlds with real kernels, and a promise to clean up.

Real iptables, real conntrack, real sockets — but never on the machine's own network. Every test
that needs root networking builds its nodes and clients here: a `Namespace` per node or client,
veth pairs between them, addresses, routes that stay inside, and processes started inside.

Guarantees, because a leaked namespace or process outlives the test run:
- names are unique per process (`rap-<pid>-<counter>`), so pytest-xdist workers never collide,
  and a namespace left by a killed run can be recognised (its pid is gone) and swept;
- `destroy()` kills every process inside the namespace (the ones started here and any they
  forked), closes helper workers, then removes the namespace; it is idempotent and never raises
  for something already gone;
- every namespace this process created is destroyed at interpreter exit, whatever the tests did;
- there is no way here to add a default route or to connect a namespace to the root namespace:
  `add_route` refuses default routes and veth pairs are only created between two `Namespace`s.

Namespace creation and removal are synchronous (pyroute2's `netns`, no event loop needed, so
they work from `atexit` and `finally`). Link, address and route changes use pyroute2's
`AsyncIPRoute` (its synchronous `IPRoute` cannot run inside a running event loop, which is where
tests live). Processes are started with `ip netns exec`, the standard launcher (it also gives the
process the namespace's view of /sys).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import importlib
import importlib.util
import ipaddress
import itertools
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psutil  # type: ignore[import-untyped,unused-ignore]  # types-psutil not a dependency
from pyroute2 import AsyncIPRoute
from pyroute2 import netns as pyroute2_netns

NETNS_DIR = "/run/netns"
NAME_PREFIX = "rap-"
_NAME_PATTERN = re.compile(r"^rap-(\d+)-(\d+)$")
_TERM_GRACE_SECONDS = 2.0
_KILL_WAIT_SECONDS = 5.0
_LOCAL_TABLE = 255
_SCOPE_HOST = 254
_SCOPE_LINK = 253
_PROTO_STATIC = 4

T = TypeVar("T")

_counter = itertools.count()
_veth_counter = itertools.count()
_registry_lock = threading.Lock()
_live: dict[str, Namespace] = {}


class NamespaceError(RuntimeError):
    """A namespace operation failed; the message names the namespace and the operation."""


@dataclass(frozen=True, slots=True)
class Veth:
    """Both ends of a veth pair: `ifname` in the namespace it was created from."""

    ifname: str
    peer_ifname: str
    ip: str
    peer_ip: str
    prefix: int


CALL_WORKERS = 4
"""Worker processes per namespace for `Namespace.call`; each is started only when needed."""


class Namespace:
    """One network namespace owned by this process. Create with `await Namespace.create()`."""

    def __init__(self, name: str, tag: str = "") -> None:
        # Use `create`; this only wraps a namespace that already exists.
        self.name = name
        self.tag = tag
        self._popens: list[subprocess.Popen[Any]] = []
        self._processes: list[asyncio.subprocess.Process] = []
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._destroyed = False
        self._inode = os.stat(self.path).st_ino

    def __repr__(self) -> str:
        tag = f" {self.tag}" if self.tag else ""
        return f"<Namespace {self.name}{tag}>"

    @classmethod
    async def create(cls, tag: str = "") -> Namespace:
        """A fresh namespace with loopback up; `tag` only shows in `repr` (e.g. "node-a")."""
        name = f"{NAME_PREFIX}{os.getpid()}-{next(_counter)}"
        try:
            pyroute2_netns.create(name)
        except OSError as error:
            raise NamespaceError(f"{name}: create failed: {error}") from error
        namespace = cls(name, tag)
        with _registry_lock:
            _live[name] = namespace
        try:
            await namespace.link_up("lo")
        except BaseException:
            namespace.destroy()
            raise
        return namespace

    @property
    def path(self) -> str:
        return os.path.join(NETNS_DIR, self.name)

    @property
    def exec_prefix(self) -> tuple[str, ...]:
        """Prefix for argv to run a command inside: `("ip", "netns", "exec", name)`."""
        return ("ip", "netns", "exec", self.name)

    # -- processes -----------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = 30.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command inside and wait for it (blocks; fine for quick commands)."""
        return subprocess.run(
            [*self.exec_prefix, *argv],
            check=check,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    async def exec(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        time_limit: float = 30.0,
    ) -> subprocess.CompletedProcess[str]:
        """`run` for async code: the event loop keeps running while the command does."""
        full = [*self.exec_prefix, *argv]
        process = await asyncio.create_subprocess_exec(
            *full,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(
                process.communicate(input.encode() if input is not None else None), time_limit
            )
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        returncode = process.returncode if process.returncode is not None else -1
        result = subprocess.CompletedProcess(
            full, returncode, out.decode(errors="replace"), err.decode(errors="replace")
        )
        if check:
            result.check_returncode()
        return result

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a long-running process inside; it is killed by `destroy`."""
        process: subprocess.Popen[Any] = subprocess.Popen([*self.exec_prefix, *argv], **kwargs)
        self._popens.append(process)
        return process

    async def spawn(self, argv: Sequence[str], **kwargs: Any) -> asyncio.subprocess.Process:
        """`popen` for async code (an `asyncio.subprocess.Process`); killed by `destroy`."""
        process = await asyncio.create_subprocess_exec(*self.exec_prefix, *argv, **kwargs)
        self._processes.append(process)
        return process

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run `function(*args)` in a worker process that lives inside the namespace.

        The worker is started with `spawn` (no fork of a process that has threads and an event
        loop), so `function` must be a module-level function and its arguments and result must
        pickle. The function is found again in the worker by module name or, for modules that
        are not importable by name (pytest's importlib mode, `__main__`), by file path.

        Calls run side by side, up to CALL_WORKERS at once: a long one (a load that lasts until
        an event) must not hold back a probe or a second load. Workers start only when calls
        overlap, and no state is kept in them between calls.
        """
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=CALL_WORKERS,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_enter_namespace,
                initargs=(self.name,),
            )
        module = sys.modules.get(function.__module__)
        reference = (function.__module__, getattr(module, "__file__", None), function.__qualname__)
        loop = asyncio.get_running_loop()
        result: T = await loop.run_in_executor(self._pool, _call_by_reference, reference, args)
        return result

    def socket(
        self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
    ) -> socket.socket:
        """A socket that lives in the namespace, usable from this process and its event loop."""
        sock: socket.socket = pyroute2_netns.create_socket(self.name, family, type, proto)
        return sock

    def pids(self) -> list[int]:
        """Every process currently in this namespace (ours by construction)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino == self._inode:
                    found.append(int(entry))
            except OSError:
                continue  # exited meanwhile, or a zombie
        return found

    # -- links, addresses, routes --------------------------------------------------------------

    async def link_up(self, ifname: str) -> None:
        async with AsyncIPRoute(netns=self.name) as ipr:
            await ipr.link("set", index=await self._index(ipr, ifname), state="up")

    async def add_address(self, ifname: str, cidr: str) -> None:
        """Add `cidr` (e.g. "10.0.0.1/24", "fd00::1/64") to `ifname`."""
        interface = ipaddress.ip_interface(cidr)
        async with AsyncIPRoute(netns=self.name) as ipr:
            await ipr.addr(
                "add",
                index=await self._index(ipr, ifname),
                address=str(interface.ip),
                prefixlen=interface.network.prefixlen,
            )

    async def add_local_route(self, cidr: str) -> None:
        """`ip route add local CIDR dev lo`: addresses in CIDR are delivered locally.

        Without a route, connect() to a ClusterIP fails with "Network is unreachable" before the
        nat OUTPUT chain ever sees the packet (this namespace has no default route, on purpose).
        """
        network = ipaddress.ip_network(cidr, strict=False)
        async with AsyncIPRoute(netns=self.name) as ipr:
            await ipr.route(
                "add",
                dst=str(network),
                type="local",
                table=_LOCAL_TABLE,
                scope=_SCOPE_HOST,
                proto=_PROTO_STATIC,
                oif=await self._index(ipr, "lo"),
                family=socket.AF_INET6 if network.version == 6 else socket.AF_INET,
            )

    async def add_route(self, cidr: str, *, via: str | None = None, dev: str | None = None) -> None:
        """A route to CIDR via a neighbour or out of a device. Default routes are refused."""
        network = ipaddress.ip_network(cidr, strict=False)
        if network.prefixlen == 0:
            raise NamespaceError(f"{self.name}: refusing a default route ({cidr})")
        if via is None and dev is None:
            raise NamespaceError(f"{self.name}: route {cidr} needs via or dev")
        spec: dict[str, Any] = {
            "dst": str(network),
            "family": socket.AF_INET6 if network.version == 6 else socket.AF_INET,
            "proto": _PROTO_STATIC,
        }
        async with AsyncIPRoute(netns=self.name) as ipr:
            if via is not None:
                spec["gateway"] = via
            if dev is not None:
                spec["oif"] = await self._index(ipr, dev)
                if via is None:
                    spec["scope"] = _SCOPE_LINK
            await ipr.route("add", **spec)

    async def add_veth_peer(
        self,
        other: Namespace,
        my_ip: str,
        peer_ip: str,
        prefix: int = 24,
        *,
        ifname: str | None = None,
        peer_ifname: str | None = None,
    ) -> Veth:
        """A veth pair between this namespace and `other`, addressed and up on both ends."""
        if other is self or other.name == self.name:
            raise NamespaceError(f"{self.name}: a veth pair needs two namespaces")
        number = next(_veth_counter)
        ifname = ifname or f"rv{number}a"
        peer_ifname = peer_ifname or f"rv{number}b"
        peer_fd = os.open(other.path, os.O_RDONLY)
        try:
            async with AsyncIPRoute(netns=self.name) as ipr:
                await ipr.link(
                    "add",
                    ifname=ifname,
                    kind="veth",
                    peer={"ifname": peer_ifname, "net_ns_fd": peer_fd},
                )
        finally:
            os.close(peer_fd)
        await self.add_address(ifname, f"{my_ip}/{prefix}")
        await other.add_address(peer_ifname, f"{peer_ip}/{prefix}")
        await self.link_up(ifname)
        await other.link_up(peer_ifname)
        return Veth(ifname, peer_ifname, my_ip, peer_ip, prefix)

    @staticmethod
    async def _index(ipr: AsyncIPRoute, ifname: str) -> int:
        indexes = await ipr.link_lookup(ifname=ifname)
        if not indexes:
            raise NamespaceError(f"no interface {ifname!r}")
        index: int = indexes[0]
        return index

    # -- teardown ------------------------------------------------------------------------------

    def destroy(self) -> None:
        """Kill everything inside, then remove the namespace. Idempotent; safe in `finally`."""
        if self._destroyed:
            return
        self._destroyed = True
        try:
            self._stop_processes()
        finally:
            with _registry_lock:
                _live.pop(self.name, None)
            with contextlib.suppress(FileNotFoundError):
                pyroute2_netns.remove(self.name)

    async def aclose(self) -> None:
        """`destroy` for async code: also reaps the asyncio subprocesses started by `spawn`."""
        processes = list(self._processes)
        self.destroy()
        for process in processes:
            with contextlib.suppress(ProcessLookupError, TimeoutError):
                await asyncio.wait_for(process.wait(), _KILL_WAIT_SECONDS)

    async def __aenter__(self) -> Namespace:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _stop_processes(self) -> None:
        # Polite first to the processes we started (servers flush, coverage writes), then no
        # mercy for anything still in the namespace, including their own children.
        for popen in self._popens:
            if popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    popen.terminate()
        for process in self._processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
        deadline = time.monotonic() + _TERM_GRACE_SECONDS
        for popen in self._popens:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(max(0.0, deadline - time.monotonic()))
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + _KILL_WAIT_SECONDS
        while True:
            remaining = [pid for pid in self.pids() if pid != os.getpid()]
            if not remaining:
                break
            for pid in remaining:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise NamespaceError(f"{self.name}: processes {remaining} survived SIGKILL")
            time.sleep(0.01)  # polling for the kernel to finish the kills, not synchronisation
            for popen in self._popens:
                popen.poll()  # reap, so killed children do not linger as zombies
        for popen in self._popens:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(_KILL_WAIT_SECONDS)


@contextlib.asynccontextmanager
async def namespace(tag: str = "") -> AsyncIterator[Namespace]:
    """`async with namespace("node-a") as ns:` — destroyed on exit, even on failure."""
    created = await Namespace.create(tag)
    try:
        yield created
    finally:
        await created.aclose()


def child_processes() -> list[psutil.Process]:
    """This process's descendants still alive, for "left nothing behind" checks.

    The multiprocessing resource tracker (started by `Namespace.call`'s workers) lives as long
    as this process and is not a leftover.
    """
    return [
        child
        for child in psutil.Process().children(recursive=True)
        if "resource_tracker" not in " ".join(child.cmdline())
    ]


def live_namespaces() -> list[str]:
    """Names of the namespaces this process created and has not destroyed yet."""
    with _registry_lock:
        return sorted(_live)


def destroy_all() -> None:
    """Destroy every namespace this process still owns (registered to run at exit)."""
    with _registry_lock:
        owned = list(_live.values())
    for owned_namespace in owned:
        with contextlib.suppress(Exception):
            owned_namespace.destroy()


def sweep_stale_namespaces() -> list[str]:
    """Remove `rap-<pid>-<n>` namespaces whose creating process is gone (a killed test run).

    Only names of exactly this harness's pattern are touched, and only when their pid is dead,
    so namespaces of a concurrently running worker are never removed. Returns what was removed.
    """
    removed = []
    for name in pyroute2_netns.listnetns():
        match = _NAME_PATTERN.match(name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        stale = Namespace(name)
        stale.destroy()
        removed.append(name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _call_by_reference(reference: tuple[str, str | None, str], args: tuple[Any, ...]) -> Any:
    module_name, module_file, qualname = reference
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            if module_file is None:
                raise
            spec = importlib.util.spec_from_file_location(module_name, module_file)
            if spec is None or spec.loader is None:
                raise
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part)
    return target(*args)


def _enter_namespace(name: str) -> None:
    # Runs first in a `call` worker: move this (single-threaded, freshly spawned) process in.
    pyroute2_netns.setns(name, flags=0)


atexit.register(destroy_all)
