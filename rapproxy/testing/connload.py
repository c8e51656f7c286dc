"""An open-loop connection load that records how every single connection ended.

Why not wrk or hey: they report errors as totals, and they are closed-loop (a stalled proxy slows
the client down instead of failing its requests, so an outage shows as fewer requests rather than
as failures). Handover and failover measurements need the opposite: connections started at a fixed
rate whatever happens, each classified (ok, refused, reset, timeout, ...) with its start time, so
a report can say "0 refused, 0 reset" and draw the timeline around a kill.

Two kinds of traffic, against an HTTP backend (`rapproxy.testing.backend`):
- short connections: one `GET` over HTTP/1.0 per connection, opened at `rate` per second for
  `seconds`; the server closes after its response;
- long connections: opened first, each sends a keep-alive request every `long_interval` seconds
  until the load ends or the connection breaks; the report says when each broke and why.

`run_load(spec)` is picklable both ways, so it runs through `Namespace.call` inside a client
namespace. Classification and the summaries are pure functions, tested without sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OK = "ok"
REFUSED = "refused"
RESET = "reset"
TIMEOUT = "timeout"
TRUNCATED = "truncated"  # closed before a complete response: the FIN lied
BAD_RESPONSE = "bad-response"
SKIPPED = "skipped"  # the client itself could not keep up: never started
SURVIVED = "survived"  # a long connection still answering when the load ended


class InvalidLoadSpec(ValueError):
    """A LoadSpec field is out of range; the message names it."""


@dataclass(frozen=True, slots=True)
class LoadSpec:
    host: str
    port: int
    rate: float
    """Short connections started per second (open loop)."""
    seconds: float
    long_connections: int = 0
    long_interval: float = 0.2
    connect_timeout: float = 2.0
    response_timeout: float = 5.0
    max_in_flight: int = 4000
    """Short connections allowed open at once; a start beyond it is recorded as `skipped`."""
    ready_file: str | None = None
    """Written once every long connection has had its first answer (a start signal for tests)."""
    stop_file: str | None = None
    """When this file exists, no more connections are started (checked before each): for a load
    that must last until an event the caller waits for; `seconds` stays the upper bound."""
    path: str = "/"

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise InvalidLoadSpec(f"port: {self.port} is not a port")
        if not self.rate > 0 or not self.seconds > 0:
            raise InvalidLoadSpec(f"rate and seconds must be positive: {self.rate}, {self.seconds}")
        if self.rate * self.seconds > 1_000_000:
            raise InvalidLoadSpec("rate * seconds: more than a million connections is not a test")
        if self.long_connections < 0 or self.long_interval <= 0:
            raise InvalidLoadSpec("long_connections must be >= 0 and long_interval positive")
        if self.connect_timeout <= 0 or self.response_timeout <= 0 or self.max_in_flight < 1:
            raise InvalidLoadSpec("timeouts must be positive and max_in_flight at least 1")


@dataclass(frozen=True, slots=True)
class Attempt:
    started: float  # wall clock (time.time()), comparable across processes
    outcome: str
    seconds: float  # from start to outcome
    backend: str = ""  # who answered: the response's X-Backend header (testing.backend sets it)
    peer: str = ""  # whom the backend saw connecting: its X-Peer header (the proxy, or us)


@dataclass(frozen=True, slots=True)
class LongConnection:
    opened: float
    ended: float
    outcome: str  # SURVIVED, or why it broke
    answered: int
    last_answer: float | None


@dataclass(frozen=True, slots=True)
class LoadReport:
    spec: LoadSpec
    started: float
    ended: float
    attempts: tuple[Attempt, ...]
    long: tuple[LongConnection, ...] = field(default=())

    def counts(self, since: float = float("-inf"), until: float = float("inf")) -> Counter[str]:
        """Short-connection outcomes among those started in [since, until)."""
        return Counter(a.outcome for a in self.attempts if since <= a.started < until)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def classify(error: BaseException | None) -> str:
    """The outcome class of a connection that ended with `error` (None: a complete answer)."""
    if error is None:
        return OK
    if isinstance(error, ConnectionRefusedError):
        return REFUSED
    if isinstance(error, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return RESET
    if isinstance(error, TimeoutError):
        return TIMEOUT
    if isinstance(error, asyncio.IncompleteReadError):
        return TRUNCATED
    if isinstance(error, _BadResponse):
        return BAD_RESPONSE
    if isinstance(error, OSError) and error.errno is not None:
        return f"error:{errno.errorcode.get(error.errno, error.errno)}"
    return f"error:{type(error).__name__}"


def timeline(
    attempts: Iterable[Attempt], origin: float, bucket: float = 1.0
) -> list[dict[str, Any]]:
    """Outcome counts per `bucket` seconds of start time, relative to `origin`."""
    buckets: dict[int, Counter[str]] = {}
    for attempt in attempts:
        index = int((attempt.started - origin) // bucket)
        buckets.setdefault(index, Counter())[attempt.outcome] += 1
    return [
        {"from": index * bucket, "counts": dict(sorted(buckets[index].items()))}
        for index in sorted(buckets)
    ]


def latency_percentiles(attempts: Sequence[Attempt], points: Sequence[float]) -> dict[str, float]:
    """Percentiles (nearest rank) of the seconds of the successful attempts, in milliseconds."""
    ok = sorted(a.seconds for a in attempts if a.outcome == OK)
    if not ok:
        return {}
    return {
        f"p{point:g}": 1000 * ok[min(len(ok) - 1, max(0, round(point / 100 * len(ok)) - 1))]
        for point in points
    }


class _BadResponse(Exception):
    """The server answered something other than HTTP 200."""


async def _read_response(reader: asyncio.StreamReader) -> tuple[str, str]:
    """Read one 200 response whole; returns its X-Backend and X-Peer headers ("" when absent)."""
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
        raise _BadResponse(head[:64])
    length = 0
    backend = peer = ""
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        name = key.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"x-backend":
            backend = value.strip().decode(errors="replace")
        elif name == b"x-peer":
            peer = value.strip().decode(errors="replace")
    await reader.readexactly(length)
    return backend, peer


async def _short(spec: LoadSpec) -> tuple[str, str, str]:
    """(outcome, backend, peer) of one connection with one request."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(spec.connect_timeout):
            reader, writer = await asyncio.open_connection(spec.host, spec.port)
        writer.write(f"GET {spec.path} HTTP/1.0\r\nHost: {spec.host}\r\n\r\n".encode())
        async with asyncio.timeout(spec.response_timeout):
            backend, peer = await _read_response(reader)
            if await reader.read(1):
                raise _BadResponse(b"more than one response")
    except Exception as error:
        return classify(error), "", ""
    finally:
        if writer is not None:
            writer.close()
    return OK, backend, peer


async def _long(spec: LoadSpec, until: float, first_answer: asyncio.Event) -> LongConnection:
    opened = time.time()
    answered = 0
    last: float | None = None
    writer: asyncio.StreamWriter | None = None
    outcome = SURVIVED
    request = f"GET {spec.path} HTTP/1.1\r\nHost: {spec.host}\r\n\r\n".encode()
    try:
        async with asyncio.timeout(spec.connect_timeout):
            reader, writer = await asyncio.open_connection(spec.host, spec.port)
        while time.time() < until:
            if writer.is_closing():  # ended while we paced: say how, not "closed transport"
                raise reader.exception() or asyncio.IncompleteReadError(b"", None)
            writer.write(request)
            async with asyncio.timeout(spec.response_timeout):
                await _read_response(reader)
            answered += 1
            last = time.time()
            first_answer.set()
            await asyncio.sleep(spec.long_interval)  # pacing, not synchronisation
    except Exception as error:
        outcome = classify(error)
    finally:
        first_answer.set()  # a failed first request must not leave the ready file unwritten
        if writer is not None:
            writer.close()
    return LongConnection(opened, time.time(), outcome, answered, last)


def _mark_ready(path: str) -> None:
    Path(path).write_text("ready\n")


def _exists(path: str) -> bool:
    return Path(path).exists()


async def run_load_async(spec: LoadSpec) -> LoadReport:
    loop = asyncio.get_running_loop()
    started = time.time()
    until = started + spec.seconds
    answers = [asyncio.Event() for _ in range(spec.long_connections)]
    longs = [asyncio.create_task(_long(spec, until, event)) for event in answers]
    for event in answers:
        await event.wait()
    if spec.ready_file:
        _mark_ready(spec.ready_file)
    attempts: list[Attempt] = []
    in_flight: set[asyncio.Task[None]] = set()

    async def one(at: float) -> None:
        begun = loop.time()
        outcome, backend, peer = await _short(spec)
        attempts.append(Attempt(at, outcome, loop.time() - begun, backend, peer))

    total = int(spec.rate * spec.seconds)
    origin = loop.time()
    wall_origin = time.time()
    for index in range(total):
        due = origin + index / spec.rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # the open loop's schedule
        at = wall_origin + index / spec.rate
        if spec.stop_file is not None and _exists(spec.stop_file):
            break
        if len(in_flight) >= spec.max_in_flight:
            attempts.append(Attempt(at, SKIPPED, 0.0))
            continue
        task = asyncio.create_task(one(at))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.gather(*in_flight)
    long_results = await asyncio.gather(*longs)
    attempts.sort(key=lambda a: a.started)
    return LoadReport(spec, started, time.time(), tuple(attempts), tuple(long_results))


def run_load(spec: LoadSpec) -> LoadReport:
    """Run the load on a fresh loop (uvloop when available); for `Namespace.call`."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a hard dependency on Linux
        return asyncio.run(run_load_async(spec))
    with contextlib.closing(uvloop.new_event_loop()) as loop:
        return loop.run_until_complete(run_load_async(spec))
