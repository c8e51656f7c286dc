"""Relay worker processes: more than one core for the TCP data plane (`proxy.workers`).

Why processes: a Python relay is bound to one core by the interpreter lock, and with
`Connection: close` traffic it is CPU-bound (benchmarks/loopback). So the main process, which
keeps everything else (sources, rules, UDP, telemetry, HTTP, BPS), also relays, and starts
`workers - 1` children that only relay TCP.

How they share the work: every child inherits the main process's listening socket (`pass_fds`)
and accepts from the same queue. One shared queue rather than one SO_REUSEPORT socket each,
because a SO_REUSEPORT group hashes each new connection to one socket: the connections queued on
a worker that dies are reset with it, and a rolling update would have to hand over, and agree
on, one socket per worker. With a single inherited socket a dead worker loses nothing that was
still queued, and `dataplane.handover` keeps passing one descriptor (docs/architecture.md).

How they learn what to route: the children compute the table from the same inputs as the main
process. The main process forwards every Service and EndpointSlice event its sources record
(and the whole set to a new or restarted worker), and the RAP telemetry the main process
collects whenever it changes; each child runs its own `Proxier` without rules or UDP sockets.
Nothing crosses processes per connection. Each child reports its relay counters every second;
the main process sums them into /metrics and lists the workers in /debug/state. A child that
exits is started again (its counters are kept, so totals never run backwards), while the others
keep serving.

The channel is a unix socketpair carrying length-prefixed pickles: both ends are this program,
started by this program, so pickle's trust model holds.

Draining: on the main process's drain each child stops accepting, lets its relays finish for up
to `proxy.drainTimeout`, and exits. A child whose main process vanished (EOF on the channel,
e.g. `kill -9`) drains the same way, so no orphan keeps the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import random
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rapproxy.balancer.rap import rap_policy_factory
from rapproxy.config import RapproxyConfiguration
from rapproxy.dataplane.stats import RelayStatsSnapshot, merge_snapshots, retired
from rapproxy.model.telemetry import TelemetryTracker
from rapproxy.sync.proxier import Proxier
from rapproxy.telemetry.runtime import rap_settings

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
_STATS_EVERY = 1.0
_TELEMETRY_CHECK_EVERY = 0.25
_RESTART_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)
"""Wait before restarting a worker that ended, by how many times in a row it ended early."""
_LIVED_LONG = 30.0
"""A worker that ran this long before ending restarts with the shortest delay again."""
_EXIT_GRACE = 5.0
"""Beyond the drain timeout, how long to wait for a draining worker before SIGKILL."""


def resolve_count(configured: int) -> int:
    """`proxy.workers` as a number of processes: 0 means one per CPU."""
    if configured > 0:
        return configured
    return max(1, len(os.sched_getaffinity(0)))


def _frame(message: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


async def _read(reader: asyncio.StreamReader) -> tuple[Any, ...] | None:
    """The next message, or None once the other end has closed."""
    try:
        header = await reader.readexactly(_HEADER.size)
        (length,) = _HEADER.unpack(header)
        message: tuple[Any, ...] = pickle.loads(await reader.readexactly(length))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return message


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


# -- the main process's side --------------------------------------------------------------


@dataclass(slots=True)
class _Slot:
    index: int
    process: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    stats: RelayStatsSnapshot | None = None
    selections: dict[str, int] = field(default_factory=dict)
    started_at: float | None = None  # wall clock
    restarts: int = 0
    last_exit: str | None = None


class WorkerPool:
    """Owns the worker children: starts, feeds, restarts and drains them.

    The daemon records every source event here as well as in its own tracker; `start()` runs the
    children, `drain()` ends them. Counters and states are read at scrape time.
    """

    def __init__(
        self,
        config: RapproxyConfiguration,
        node_name: str,
        listeners: Sequence[int],
        count: int,
        telemetry: TelemetryTracker,
        *,
        log_level: str = "info",
        log_format: str = "text",
    ) -> None:
        self.config = config
        self.node_name = node_name
        self.listeners = tuple(listeners)
        self.telemetry = telemetry
        self.log_level = log_level
        self.log_format = log_format
        self.slots = [_Slot(i + 1) for i in range(count)]
        self._services: dict[str, Mapping[str, Any]] = {}
        self._slices: dict[str, Mapping[str, Any]] = {}
        self._retired: list[RelayStatsSnapshot] = []
        self._retired_selections: dict[str, int] = {}
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    # -- inputs, forwarded --------------------------------------------------------------------

    def service_updated(self, obj: Mapping[str, Any]) -> None:
        self._services[_key(obj)] = obj
        self._broadcast(("service_updated", obj))

    def service_deleted(self, obj: Mapping[str, Any]) -> None:
        self._services.pop(_key(obj), None)
        self._broadcast(("service_deleted", obj))

    def slice_updated(self, obj: Mapping[str, Any]) -> None:
        self._slices[_key(obj)] = obj
        self._broadcast(("slice_updated", obj))

    def slice_deleted(self, obj: Mapping[str, Any]) -> None:
        self._slices.pop(_key(obj), None)
        self._broadcast(("slice_deleted", obj))

    def replace_all(
        self, services: Iterable[Mapping[str, Any]], slices: Iterable[Mapping[str, Any]]
    ) -> None:
        self._services = {_key(o): o for o in services}
        self._slices = {_key(o): o for o in slices}
        self._broadcast(("replace_all", list(self._services.values()), list(self._slices.values())))

    def _broadcast(self, message: tuple[Any, ...]) -> None:
        live = [slot.writer for slot in self.slots if slot.writer is not None]
        if not live:
            return
        frame = _frame(message)
        for writer in live:
            if not writer.is_closing():
                writer.write(frame)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for slot in self.slots:
            self._tasks.append(loop.create_task(self._supervise(slot), name=f"worker-{slot.index}"))
        self._tasks.append(loop.create_task(self._forward_telemetry(), name="worker-telemetry"))

    async def drain(self, seconds: float, cut: asyncio.Event | None = None) -> None:
        """Tell every worker to stop accepting and drain for up to `seconds`; wait for them.

        `cut` set meanwhile (a second signal) ends the drain at once: workers are told again
        with no time left. Workers still there after the grace period are killed.
        """
        self._stopping = True
        self._broadcast(("drain", seconds))
        waiting = {
            asyncio.ensure_future(slot.process.wait())
            for slot in self.slots
            if slot.process is not None and slot.process.returncode is None
        }
        cut_wait = asyncio.ensure_future(cut.wait()) if cut is not None else None
        try:
            deadline = time.monotonic() + seconds + _EXIT_GRACE
            while waiting and (left := deadline - time.monotonic()) > 0:
                watched = waiting if cut_wait is None else {*waiting, cut_wait}
                done, _ = await asyncio.wait(watched, timeout=left, return_when="FIRST_COMPLETED")
                waiting -= done
                if cut_wait is not None and cut_wait in done:
                    self._broadcast(("drain", 0.0))
                    cut_wait = None
                    deadline = min(deadline, time.monotonic() + _EXIT_GRACE)
        finally:
            for future in waiting:
                future.cancel()
            if cut_wait is not None:
                cut_wait.cancel()
            for slot in self.slots:
                process = slot.process
                if process is not None and process.returncode is None:
                    log.warning(
                        "worker %d (pid %d) did not exit; killing it", slot.index, process.pid
                    )
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            await self.aclose()

    async def aclose(self) -> None:
        """Stop supervising (killing any worker still running); `drain()` first for a clean end."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # -- supervision ----------------------------------------------------------------------------

    async def _supervise(self, slot: _Slot) -> None:
        early_exits = 0
        while not self._stopping:
            began = time.monotonic()
            try:
                await self._run_once(slot)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                slot.last_exit = f"failed to run: {error!r}"
                log.exception("worker %d could not be run", slot.index)
            if self._stopping:
                return
            early_exits = 0 if time.monotonic() - began >= _LIVED_LONG else early_exits + 1
            delay = (
                _RESTART_DELAYS[min(early_exits, len(_RESTART_DELAYS)) - 1] if early_exits else 0
            )
            slot.restarts += 1
            log.warning(
                "worker %d ended (%s); starting it again in %.1f s",
                slot.index,
                slot.last_exit,
                delay,
            )
            await asyncio.sleep(delay)

    async def _run_once(self, slot: _Slot) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "rapproxy.workers",
                str(theirs.fileno()),
                *(str(fd) for fd in self.listeners),
                pass_fds=(theirs.fileno(), *self.listeners),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        slot.process = process
        slot.started_at = time.time()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        try:
            writer.write(
                _frame(
                    (
                        "init",
                        self.config,
                        self.node_name,
                        slot.index,
                        self.log_format,
                        self.log_level,
                        list(self._services.values()),
                        list(self._slices.values()),
                        self.telemetry.export(),
                    )
                )
            )
            slot.writer = writer
            while (message := await _read(reader)) is not None:
                if message[0] == "stats":
                    slot.stats, slot.selections = message[1], message[2]
        finally:
            slot.writer = None
            writer.close()
            if process.returncode is None and not self._stopping:
                # The channel broke but the process lives on: end it, it would drain forever.
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            try:
                code = await process.wait()
            except asyncio.CancelledError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                raise
            finally:
                if slot.stats is not None:
                    self._retired.append(retired(slot.stats))
                    if len(self._retired) > 16:
                        self._retired = [merge_snapshots(self._retired)]
                for placement, count in slot.selections.items():
                    self._retired_selections[placement] = (
                        self._retired_selections.get(placement, 0) + count
                    )
                slot.stats, slot.selections = None, {}
            slot.last_exit = f"exit status {code}"

    async def _forward_telemetry(self) -> None:
        seen = self.telemetry.version
        while True:
            await asyncio.sleep(_TELEMETRY_CHECK_EVERY)
            if self.telemetry.version != seen:
                seen = self.telemetry.version
                self._broadcast(("telemetry", self.telemetry.export()))

    # -- what the workers did -------------------------------------------------------------------

    def stats(self) -> list[RelayStatsSnapshot]:
        """The latest counters of every worker, and of those that ended."""
        return [*self._retired, *(s.stats for s in self.slots if s.stats is not None)]

    def selections(self) -> list[Mapping[str, int]]:
        return [self._retired_selections, *(s.selections for s in self.slots)]

    def describe(self, _now: float) -> list[dict[str, Any]]:
        return [
            {
                "index": slot.index,
                "pid": slot.process.pid
                if slot.process is not None and slot.process.returncode is None
                else None,
                "started_at": slot.started_at,
                "restarts": slot.restarts,
                "last_exit": slot.last_exit,
                "tcp_active": slot.stats.tcp_active if slot.stats is not None else None,
                "tcp_connections": sum(
                    c.tcp_connections_total for c in slot.stats.services.values()
                )
                if slot.stats is not None
                else None,
            }
            for slot in self.slots
        ]


# -- the worker's side ----------------------------------------------------------------------


async def serve(control_fd: int, listener_fds: Sequence[int]) -> None:
    """A worker's life: read `init`, relay on the inherited listeners, follow the main process."""
    control = socket.socket(fileno=control_fd)
    reader, writer = await asyncio.open_unix_connection(sock=control)
    init = await _read(reader)
    if init is None or init[0] != "init":
        raise SystemExit("worker: the main process sent no init message")
    _, config, node_name, index, log_format, log_level, services, slices, telemetry = init
    from rapproxy import logs

    logs.configure(log_format, log_level)
    assert isinstance(config, RapproxyConfiguration)
    settings = rap_settings(config)
    tracker = TelemetryTracker(node_name, settings)
    tracker.adopt(*telemetry)
    proxier = Proxier(
        config,
        node_name,
        policy_factory=rap_policy_factory(tracker.snapshot, settings, random.Random()),
        telemetry=tracker.snapshot,
        rap_settings=settings,
        udp=False,
    )
    proxier.tracker.replace_all(services, slices)
    listeners: dict[tuple[str, int], socket.socket] = {}
    for fd in listener_fds:
        sock = socket.socket(fileno=fd)
        name = sock.getsockname()
        listeners[(name[0], name[1])] = sock
    await proxier.start(list(listeners), inherited=listeners, accept=False)
    await proxier.sync()
    await proxier.tcp.start_accepting()
    log.info("worker %d (pid %d) relaying on %s", index, os.getpid(), sorted(listeners))

    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    drain_for = asyncio.Queue[float]()
    loop.add_signal_handler(signal.SIGTERM, drain_for.put_nowait, config.proxy.drain_timeout)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C: the main process decides

    def report() -> None:
        if not writer.is_closing():
            writer.write(
                _frame(("stats", proxier.stats.snapshot(), proxier.own_selection_counts()))
            )

    async def follow() -> None:
        while (message := await _read(reader)) is not None:
            kind = message[0]
            if kind == "telemetry":
                tracker.adopt(*message[1])
                continue
            if kind == "drain":
                drain_for.put_nowait(message[1])
                continue
            if kind == "replace_all":
                proxier.tracker.replace_all(message[1], message[2])
            else:
                getattr(proxier.tracker, kind)(message[1])
            proxier.note_change()
            changed.set()
        log.warning("worker %d: the main process is gone; draining", index)
        drain_for.put_nowait(config.proxy.drain_timeout)

    async def sync() -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(config.iptables.sync_period):
                    await changed.wait()
            changed.clear()
            try:
                await proxier.sync()
            except Exception:
                log.exception("worker %d: sync failed", index)
            await asyncio.sleep(config.iptables.min_sync_period)

    async def report_every_second() -> None:
        while True:
            await asyncio.sleep(_STATS_EVERY)
            report()

    tasks = [
        loop.create_task(follow()),
        loop.create_task(sync()),
        loop.create_task(report_every_second()),
    ]
    seconds = await drain_for.get()
    proxier.stop_accepting()
    if proxier.tcp.active_connections:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while True:
                    waiting = loop.create_task(proxier.tcp.wait_drained())
                    more = loop.create_task(drain_for.get())
                    done, _ = await asyncio.wait({waiting, more}, return_when="FIRST_COMPLETED")
                    waiting.cancel()
                    more.cancel()
                    if waiting in done or (more in done and more.result() <= 0):
                        break
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await proxier.aclose()
    report()
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()


def main(argv: Sequence[str]) -> None:
    """`python -m rapproxy.workers CONTROL_FD LISTENER_FD...` — started by `WorkerPool` only."""
    from rapproxy.cli import run_async

    control_fd, *listener_fds = (int(a) for a in argv)
    run_async(serve(control_fd, listener_fds))


if __name__ == "__main__":
    main(sys.argv[1:])
