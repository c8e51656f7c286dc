"""The WAN's delay line: a userspace process that holds each packet for its link's delay.

This kernel has no `netem`, so the emulated WAN delays packets in userspace. The router
namespace's policy routing sends every packet that arrives from a site into a TUN device; this
process reads it, looks up the one-way delay between the packet's source and destination sites
(`DelayLookup`) and writes it back into the same TUN device after that delay. The kernel then
routes the returning packet (its input interface is now the TUN, which no rule diverts) out of
the destination site's veth through the main table.

Standard library only, run as `python -m rapproxy.testing.edge.forwarder` inside the router
namespace. It attaches to a TUN device the router already created (persistent, so if this
process dies the WAN drops packets instead of silently passing them undelayed).

Timing: held packets wait in a heap with one CLOCK_MONOTONIC timerfd armed for the earliest
(see `TimerFd` for why not `loop.call_later`: epoll's millisecond rounding). Wake-ups still come
late (~0.15 ms idle here, more under load), so every delayed packet is released that much early
(`bias`): measured at start, then tracked while packets flow. The calibration benchmark
(benchmarks/edge/wan_calibration.py) measures what is left.

Control: a UNIX socket speaking JSON lines. `{"op": "config", "config": {...}}` replaces the sites
and delays at once (a `WanConfig` document) and answers once the new delays apply to the next
packet read; `{"op": "stats"}` answers packet counts, the bias and the hold error (how late packets
left compared with the delay asked for).
On start it prints one line, `ready <bias_us>`, to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import heapq
import json
import math
import os
import signal
import statistics
import struct
import sys
from dataclasses import dataclass

from rapproxy.testing.edge.delays import DelayLookup, InvalidWanConfig, WanConfig

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
_MAX_PACKET = 65536
_BATCH = 64
_CALIBRATION_TIMERS = 60
_BIAS_GAIN = 0.01  # per released packet: settles within a few hundred packets
_LATE_CAP_SECONDS = 0.001  # one stall (GC, a descheduled vCPU) must not swing the bias
_EARLY_SECONDS = 20e-6  # release what is due within this much: cheaper than another wake-up
_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_TIMER_ABSTIME = 1


@dataclass(slots=True)
class Counters:
    received: int = 0
    sent: int = 0
    delayed: int = 0
    dropped: int = 0
    not_ipv4: int = 0
    error_sum: float = 0.0
    error_max: float = 0.0
    error_count: int = 0


def open_tun(name: str) -> int:
    """Attach to the TUN device `name` (IFF_TUN | IFF_NO_PI), non-blocking."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class TimerFd:
    """A CLOCK_MONOTONIC timerfd armed at absolute times: wake-ups without epoll's ms rounding.

    asyncio waits in `epoll_wait`, whose timeout is whole milliseconds (Python rounds it up), so
    a `call_at` fires up to 1 ms late, by an amount that depends on where the packet arrived
    within the millisecond. A timerfd in the same epoll set wakes the loop at the nanosecond
    deadline; only the scheduler's wake-up latency (~0.1-0.2 ms here) is left to calibrate.
    `loop.time()` is `time.monotonic()`, the same clock.
    """

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")
        self.fd: int = fd

    def arm(self, when: float) -> None:
        """Fire once at monotonic time `when` (seconds); replaces any earlier arming."""
        when = max(when, 1e-9)  # 0 would disarm
        seconds = int(when)
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(seconds, int((when - seconds) * 1e9)))
        if self._libc.timerfd_settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None):
            raise OSError(ctypes.get_errno(), "timerfd_settime")

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)

    def close(self) -> None:
        os.close(self.fd)


class DelayLine:
    """Reads packets from the TUN fd and writes each one back after its pair's delay.

    Held packets wait in a heap ordered by release time; one timerfd is armed for the head. A
    packet is released `bias` early, `bias` being how late wake-ups come: measured at start,
    then (unless fixed by `--bias-ms`) tracked as a moving average of the lateness of every
    release, since a busy loop wakes later than an idle one. Releases of one address pair never
    go backwards in time when the bias moves, so a flow's packets keep their order.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        lookup: DelayLookup,
        bias: float = 0.0,
        adaptive: bool = True,
    ) -> None:
        self.loop = loop
        self.fd = fd
        self.lookup = lookup
        self.bias = bias
        self.adaptive = adaptive
        self.counters = Counters()
        self.timer = TimerFd()
        # (release at, sequence, packet or None for a calibration probe, asked-for due time)
        self._held: list[tuple[float, int, bytes | None, float]] = []
        self._last_release: dict[bytes, float] = {}
        self._sequence = 0
        self._armed_at = math.inf
        self._probe: asyncio.Future[float] | None = None

    def start(self) -> None:
        self.loop.add_reader(self.fd, self._readable)
        self.loop.add_reader(self.timer.fd, self._due)

    def stop(self) -> None:
        self.loop.remove_reader(self.fd)
        self.loop.remove_reader(self.timer.fd)
        self.timer.close()

    def replace_lookup(self, lookup: DelayLookup) -> None:
        self.lookup = lookup
        self._last_release.clear()

    def _hold(self, release: float, packet: bytes | None, due: float) -> None:
        self._sequence += 1
        heapq.heappush(self._held, (release, self._sequence, packet, due))
        if release < self._armed_at:
            self._armed_at = release
            self.timer.arm(release)

    def _readable(self) -> None:
        now = self.loop.time()
        counters = self.counters
        last_release = self._last_release
        for _ in range(_BATCH):
            try:
                packet = os.read(self.fd, _MAX_PACKET)
            except BlockingIOError:
                return
            except OSError:
                counters.dropped += 1
                return
            counters.received += 1
            if len(packet) < 20 or packet[0] >> 4 != 4:
                counters.not_ipv4 += 1
                self._write(packet)
                continue
            pair = packet[12:20]
            delay = self.lookup.seconds(pair)
            if delay <= 0:
                self._write(packet)
                continue
            counters.delayed += 1
            release = now + max(0.0, delay - self.bias)
            previous = last_release.get(pair, 0.0)
            release = max(release, previous)
            last_release[pair] = release
            self._hold(release, packet, now + delay)

    def _due(self) -> None:
        self.timer.clear()
        now = self.loop.time()
        held = self._held
        counters = self.counters
        while held and held[0][0] <= now + _EARLY_SECONDS:
            release, _, packet, due = heapq.heappop(held)
            late = now - release
            if packet is None:  # a calibration probe
                if self._probe is not None and not self._probe.done():
                    self._probe.set_result(late)
                continue
            if self.adaptive:
                self.bias += _BIAS_GAIN * (min(late, _LATE_CAP_SECONDS) - self.bias)
            error = now - due
            counters.error_sum += error
            counters.error_count += 1
            counters.error_max = max(counters.error_max, error)
            self._write(packet)
        self._armed_at = held[0][0] if held else math.inf
        if held:
            self.timer.arm(self._armed_at)

    async def measure_lateness(self) -> float:
        """Median seconds a release comes after its time on this machine (idle loop)."""
        samples = []
        for i in range(_CALIBRATION_TIMERS):
            self._probe = self.loop.create_future()
            when = self.loop.time() + 0.0005 + (i % 7) * 0.0007
            self._hold(when, None, when)
            samples.append(await self._probe)
        self._probe = None
        return statistics.median(samples)

    def _write(self, packet: bytes) -> None:
        try:
            os.write(self.fd, packet)
            self.counters.sent += 1
        except OSError:
            self.counters.dropped += 1

    def stats(self) -> dict[str, float | int]:
        """Counters; `hold_error_*`: release time minus asked-for time of delayed packets."""
        c = self.counters
        return {
            "received": c.received,
            "sent": c.sent,
            "delayed": c.delayed,
            "dropped": c.dropped,
            "not_ipv4": c.not_ipv4,
            "held": len(self._held),
            "bias_us": round(self.bias * 1e6, 1),
            "hold_error_mean_us": round(c.error_sum / c.error_count * 1e6, 1)
            if c.error_count
            else 0.0,
            "hold_error_max_us": round(c.error_max * 1e6, 1),
            "hold_error_total_us": round(c.error_sum * 1e6, 1),
            "hold_error_count": c.error_count,
        }


class ControlServer:
    """The JSON-lines control socket: replace the config, read the counters."""

    def __init__(self, line: DelayLine) -> None:
        self.line = line

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while raw := await reader.readline():
                writer.write((json.dumps(self.answer(raw)) + "\n").encode())
                await writer.drain()
        finally:
            writer.close()

    def answer(self, raw: bytes) -> dict[str, object]:
        try:
            request = json.loads(raw)
            op = request.get("op")
            if op == "config":
                config = WanConfig.from_json(request.get("config"))
                self.line.replace_lookup(DelayLookup(config))
                return {"ok": True}
            if op == "stats":
                return {"ok": True, "stats": self.line.stats()}
            return {"ok": False, "error": f"op: unknown {op!r}"}
        except (ValueError, InvalidWanConfig, AttributeError) as error:
            return {"ok": False, "error": str(error)}


async def serve(tun: str, control: str, bias_override_ms: float | None) -> None:
    loop = asyncio.get_running_loop()
    fd = open_tun(tun)
    line = DelayLine(loop, fd, DelayLookup(WanConfig()), adaptive=bias_override_ms is None)
    line.start()
    line.bias = (
        bias_override_ms / 1000.0 if bias_override_ms is not None else await line.measure_lateness()
    )
    server = await asyncio.start_unix_server(ControlServer(line).handle, path=control)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"ready {line.bias * 1e6:.0f}", flush=True)
    try:
        await stop.wait()
    finally:
        line.stop()
        server.close()
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tun", required=True, help="existing TUN device to attach to")
    parser.add_argument("--control", required=True, help="path of the control UNIX socket")
    parser.add_argument(
        "--bias-ms", type=float, help="subtract this instead of the measured timer lateness"
    )
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.tun, args.control, args.bias_ms))
    except OSError as error:
        print(f"forwarder: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from error


if __name__ == "__main__":
    main()
