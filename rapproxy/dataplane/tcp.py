"""The TCP relay: accept intercepted connections, dial a backend, copy bytes both ways.

This is the all-Python engine (`proxy.relayEngine: asyncio`); `native.py` is the default one,
the same behaviours with the I/O in C. Both serve the interface of `TcpRelayServer` below and
pass the same tests; what the native engine does differently is listed in its docstring.

Why Protocols and not streams: a StreamReader/StreamWriter pair costs a coroutine wake-up and a
buffer copy per chunk; a relay built from two `asyncio.Protocol` objects writes each chunk straight
from one transport's `data_received` into the other transport (uvloop measures ~2.4x the echo
rate). The price is that every piece of connection state is explicit, which is also what makes the
edge cases below testable.

Shape of one relay (`_TcpRelay`): a client side accepted by the listener and, once a dial
succeeds, an upstream side. Each side is a small Protocol whose `peer` is the other side.

- While the upstream is being dialled, at most one read from the client is held: the first chunk
  that arrives pauses the client transport until the upstream is connected. The transport is
  not paused up front (uvloop would ignore a pause made in `connection_made` anyway) so that a
  client that gives up or resets during a slow dial is noticed at once and its dial cancelled,
  instead of holding a backend connection for a client that is gone.
- Back-pressure: when a side's transport buffers more than the high-water mark, the loop calls that
  side's `pause_writing`, which pauses *reading on the peer*; `resume_writing` resumes it. Memory
  per connection is bounded by the two high-water marks.
- Half-close: EOF from one side becomes `write_eof()` on the other (eof_received returns True so
  the transport stays open for the reply). When both directions have seen EOF, both are closed.
- FIN right behind the last data: the loops read a socket once per readiness event, so a response
  and the FIN that follows it arrive as two callbacks a loop iteration apart, and uvloop's
  `write_eof()` waits for yet another iteration. Meanwhile the client has read the response and
  closed first, which leaves its socket in TIME_WAIT: with one connection per request that
  exhausts the client's ports to the service (connect() then spends milliseconds searching for a
  free port). So after a short read among an upstream's first few the relay peeks (MSG_PEEK)
  whether only the FIN is left; if so it forwards the EOF at once, and an EOF forwarded to a
  transport with nothing left to send is a direct shutdown(SHUT_WR). The FIN then leaves right
  behind the data and the relay, not the client, is the first to close, as with HAProxy.
- Accounting: the selector counts a backend busy with a connection from the dial until the
  backend's FIN, or the relay's end when no FIN comes (least-connections and RAP's queue signal
  read these counts), and is told how long the dial took and how long the first response byte
  took after the request's first byte (RAP's latency signal).
- Reset: when one side dies with an error (ECONNRESET, EPIPE, ...), the other is aborted with
  SO_LINGER 0 so a RST really goes out and the peer learns promptly — a FIN would lie.
- Dialling follows kube-proxy userspace (`proxysocket.go`, `EndpointDialTimeouts`): up to four
  attempts with connect timeouts 250 ms, 500 ms, 1 s, 2 s, each on a backend the selector has not
  been asked about before for this connection, reporting every failure (outlier detection,
  affinity reset). A refused dial is retried on the next backend at once; waiting would only add
  latency. All attempts failing (or no backend) resets the client.
- Idle timeout: a single sweeper per server checks "touched" flags every idle_timeout/4 instead of
  re-arming a timer per chunk; a relay silent in both directions for between 1 and 1.25 idle
  timeouts is closed.
- A global cap on concurrent relays: a client over it is closed at once, counted, and logged at
  most once per interval (a log line per rejected client would turn overload into disk I/O).
- TCP_NODELAY: both loops set it on every TCP transport they create (the stock loop only when
  the socket's proto is IPPROTO_TCP, hence the listener is created with it); not repeated.

Robustness: a naive uvloop relay was seen to abort the process ("double free or corruption") under
Connection: close load. So every callback is guarded: a side never touches its transport after it
has closed or lost it, close/abort happen at most once per side, the peer is only written while it
is open, and every callback body catches unexpected exceptions, logs them with context and resets
the relay instead of letting them reach the loop's exception handler. The stress tests run under
uvloop and count file descriptors.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import functools
import logging
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from rapproxy.dataplane.original_dst import NoOriginalDestination, original_destination
from rapproxy.dataplane.routing import Backend, BackendSelector
from rapproxy.dataplane.stats import RelayStats, ServiceCounters

log = logging.getLogger(__name__)

DestinationResolver = Callable[[asyncio.BaseTransport], tuple[str, int]]
"""Maps an accepted client transport to the (ip, port) it was trying to reach."""

_LINGER_ZERO = struct.pack("ii", 1, 0)
_NOTHING_TRIED: frozenset[Backend] = frozenset()
_DIAL_TICKS_PER_TIMEOUT = 5
_UNCOUNTED = ServiceCounters()  # placeholder until a side knows its service; never exported
_PEEK_BELOW = 64 * 1024
"""Peek for a trailing FIN only after reads shorter than this (both loops read up to 256 KiB):
a read that filled most of the buffer says more is queued, and bulk transfers skip the syscall."""
_FIN_PEEKS = 4
"""Peek after at most this many reads per upstream: a connection-per-request exchange ends within
its first few reads, and a long-lived connection (keep-alive) should not pay a syscall per read."""
_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT


def _borrow(family: int, transport: asyncio.BaseTransport) -> _socket.socket:
    """A socket object on the transport's descriptor, for one call; the caller must detach() it.

    The loops' own socket objects refuse recv/shutdown (uvloop's) or wrap them; a bare
    `_socket.socket` costs no syscall to make and closes nothing once detached.
    """
    fd = transport.get_extra_info("socket").fileno()
    return _socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fd)


def intercepted_destination(transport: asyncio.BaseTransport) -> tuple[str, int]:
    """The default resolver: the original destination iptables REDIRECT recorded."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        raise NoOriginalDestination("transport has no socket to ask for SO_ORIGINAL_DST")
    return original_destination(sock)


@dataclass(frozen=True, slots=True)
class FixedDestination:
    """A resolver that claims every client wanted (ip, port): one listener, one service.

    A class rather than a closure so the native engine can read `address` and answer in C.
    """

    address: tuple[str, int]

    def __call__(self, _transport: asyncio.BaseTransport) -> tuple[str, int]:
        return self.address


def fixed_destination(ip: str, port: int) -> FixedDestination:
    """Serves a service without iptables — loopback tests and benchmarks use it."""
    return FixedDestination((ip, port))


@dataclass(frozen=True, slots=True)
class RelayView:
    """One relay as either engine sees it, for tests and /debug (not the connection path)."""

    client_fd: int
    upstream_fd: int | None
    """None while no upstream socket exists (or, for the asyncio engine, while dialling)."""
    dialing: bool
    held_from_client: int
    """Bytes read from the client that the upstream socket has not taken yet."""
    held_to_client: int


def listening_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A bound, non-blocking, not yet listening TCP socket for (host, port); IPv6 is V6ONLY."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP, not 0: accepted sockets inherit it, and the stock loop
    # sets TCP_NODELAY only on sockets whose proto says TCP.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _fd(transport: asyncio.BaseTransport | None) -> int:
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock.fileno() if sock is not None else -1


def _buffered(side: _Side | None) -> int:
    if side is None or side.transport is None or side.closing:
        return 0
    return side.transport.get_write_buffer_size()


class InvalidTcpRelaySettings(ValueError):
    """A TcpRelaySettings field is out of range; the message names the field."""


@dataclass(frozen=True, slots=True)
class TcpRelaySettings:
    """Tunables of the TCP relay. Times are seconds."""

    dial_timeouts: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    """Connect timeout of each dial attempt; its length is the number of attempts."""
    idle_timeout: float | None = 3600.0
    """Close a relay with no bytes in either direction for this long; None: never."""
    max_connections: int = 10_000
    """Concurrent relays (each holds two file descriptors); clients over it are closed at once."""
    write_buffer_high: int = 256 * 1024
    write_buffer_low: int = 64 * 1024
    backlog: int = 4096
    reuse_port: bool = False
    """SO_REUSEPORT on the listeners, so several worker processes can share the port."""
    cap_log_interval: float = 10.0
    """At most one 'connection cap reached' log line per this many seconds."""

    def __post_init__(self) -> None:
        if not self.dial_timeouts or any(t <= 0 for t in self.dial_timeouts):
            raise InvalidTcpRelaySettings(
                f"dial_timeouts: need at least one positive timeout, got {self.dial_timeouts!r}"
            )
        if self.idle_timeout is not None and self.idle_timeout <= 0:
            raise InvalidTcpRelaySettings(
                f"idle_timeout: must be positive or None, got {self.idle_timeout!r}"
            )
        if self.max_connections < 1:
            raise InvalidTcpRelaySettings(
                f"max_connections: must be at least 1, got {self.max_connections!r}"
            )
        if not 0 <= self.write_buffer_low <= self.write_buffer_high:
            raise InvalidTcpRelaySettings(
                "write_buffer_low: must be between 0 and write_buffer_high, got "
                f"{self.write_buffer_low!r} (high {self.write_buffer_high!r})"
            )
        if self.backlog < 1:
            raise InvalidTcpRelaySettings(f"backlog: must be at least 1, got {self.backlog!r}")


class _Side(asyncio.Protocol):
    """One end of a relay. Never touches its transport after closing or losing it."""

    __slots__ = (
        "closing",
        "counters",
        "eof",
        "failed",
        "family",
        "lost",
        "peer",
        "pending",
        "relay",
        "sink",
        "touched",
        "transport",
    )

    def __init__(self, relay: _TcpRelay, family: int) -> None:
        self.relay = relay
        self.family = family
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        # The peer's transport while it is open: what data_received writes to. A separate
        # attribute so the per-chunk path is one load and one test.
        self.sink: asyncio.Transport | None = None
        self.counters = _UNCOUNTED
        self.pending: list[bytes] = []
        self.closing = False  # we called close/abort, or the transport was lost
        self.lost = False  # connection_lost has run
        self.failed = False  # ... with an error (reset, broken pipe): the peer gets a RST too
        self.eof = False  # the remote end sent FIN
        self.touched = False  # bytes arrived since the idle sweeper last looked

    # -- callbacks from the transport -------------------------------------------------------

    def eof_received(self) -> bool:
        try:
            if self.eof:  # already seen by peeking (_UpstreamSide.data_received)
                return True
            self.eof = True
            peer = self.peer
            if peer is not None and not peer.closing:
                if peer.eof:
                    self.relay.close_both()
                else:
                    peer.send_eof()
        except Exception:
            self.relay.fail("eof_received")
        return True  # keep the transport open: the other direction may still carry a reply

    def pause_writing(self) -> None:
        # Our transport holds more than high water: stop reading from the side that fills it.
        try:
            peer = self.peer
            if peer is not None and not peer.closing and not peer.eof:
                cast(asyncio.Transport, peer.transport).pause_reading()
        except Exception:
            self.relay.fail("pause_writing")

    def resume_writing(self) -> None:
        try:
            peer = self.peer
            if peer is not None and not peer.closing and not peer.eof:
                cast(asyncio.Transport, peer.transport).resume_reading()
        except Exception:
            self.relay.fail("resume_writing")

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.closing = True
            self.lost = True
            self.failed = exc is not None
            peer = self.peer
            if peer is not None:
                peer.sink = None
            if peer is not None and not peer.closing:
                if exc is None:
                    peer.close()
                else:
                    peer.reset()
            self.relay.side_lost(self, exc)
        except Exception:
            self.relay.fail("connection_lost")

    # -- actions ----------------------------------------------------------------------------

    def send_eof(self) -> None:
        """Half-close our direction: FIN after what is buffered, right now if nothing is."""
        transport = cast(asyncio.Transport, self.transport)
        if transport.get_write_buffer_size() == 0:
            # transport.write_eof() would only queue the shutdown for the next loop iteration.
            # The transport is not told: nothing is ever written to it after this, and its own
            # later shutdown could fail with ENOTCONN once the peer has closed too.
            sock = _borrow(self.family, transport)
            try:
                sock.shutdown(socket.SHUT_WR)
                return
            except OSError:
                pass  # let the transport try, and report whatever is wrong its usual way
            finally:
                sock.detach()
        transport.write_eof()

    def close(self) -> None:
        """Flush what is buffered, then FIN and close."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        if self.peer is not None:
            self.peer.sink = None
        self.transport.close()

    def reset(self) -> None:
        """Drop what is buffered and send a RST (SO_LINGER 0, then abort)."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        if self.peer is not None:
            self.peer.sink = None
        transport = self.transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # already gone: abort() below still closes it
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        transport.abort()

    def close_if_drained_else_reset(self) -> None:
        if self.closing or self.transport is None:
            return
        if self.transport.get_write_buffer_size() == 0:
            self.close()
        else:
            self.reset()


class _ClientSide(_Side):
    __slots__ = ("first_send",)

    def __init__(self, relay: _TcpRelay, family: int) -> None:
        super().__init__(relay, family)
        self.first_send = False  # wired with nothing sent yet: time the first chunk's send

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        try:
            self.relay.accepted()
        except Exception:
            self.relay.fail("accept")

    def data_received(self, data: bytes) -> None:
        try:
            sink = self.sink
            if sink is not None:
                sink.write(data)
                self.touched = True
                self.counters.bytes_from_clients += len(data)
                if self.first_send:
                    self.first_send = False
                    self.relay.request_sent()
                if not self.relay.awaiting:
                    self.relay.request_again()
            elif self.peer is None:
                # Still dialling: hold this one chunk and read no more until connected.
                self.pending.append(data)
                cast(asyncio.Transport, self.transport).pause_reading()
            # else: the peer is closed; what it can no longer take is dropped.
        except Exception:
            self.relay.fail("client data_received")


class _UpstreamSide(_Side):
    __slots__ = ("abandoned", "peeks_left", "timing")

    def __init__(self, relay: _TcpRelay, family: int) -> None:
        super().__init__(relay, family)
        self.abandoned = False  # the dial attempt gave up on this socket
        self.peeks_left = _FIN_PEEKS
        self.timing = False  # wired, and no response byte seen yet: time the first one

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def eof_received(self) -> bool:
        if not self.eof:
            self.relay.backend_done()
        return super().eof_received()

    def data_received(self, data: bytes) -> None:
        try:
            sink = self.sink
            if sink is not None:
                sink.write(data)
                self.touched = True
                self.counters.bytes_to_clients += len(data)
                relay = self.relay
                if relay.awaiting:
                    relay.answered(self.timing)
                    self.timing = False
                if self.peeks_left and len(data) < _PEEK_BELOW:
                    self.peeks_left -= 1
                    if self.only_fin_left():
                        self.eof_received()  # reported again by the loop later, then ignored
            elif self.peer is None:
                # Connected, but the dial task has not wired us yet (one loop iteration).
                self.pending.append(data)
                cast(asyncio.Transport, self.transport).pause_reading()
            # else: the peer is closed; what it can no longer take is dropped.
        except Exception:
            self.relay.fail("upstream data_received")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.abandoned:
            self.closing = True
            self.lost = True
            return
        super().connection_lost(exc)

    def only_fin_left(self) -> bool:
        """Whether everything the upstream sent has been read and its FIN is all that is left."""
        sock = _borrow(self.family, cast(asyncio.Transport, self.transport))
        try:
            return sock.recv(1, _PEEK_FLAGS) == b""
        except OSError:  # EAGAIN: nothing queued, the usual case; anything else: not now
            return False
        finally:
            sock.detach()

    def abandon(self) -> None:
        # create_connection() closes its own transport when it fails or is cancelled; touching
        # it here too would be a second close of the same handle.
        self.abandoned = True
        self.closing = True


class _TcpRelay:
    """The state of one client connection and its (eventual) upstream."""

    __slots__ = (
        "awaiting",
        "backend",
        "client",
        "client_ip",
        "connect_seconds",
        "counters",
        "dial_deadline",
        "dial_task",
        "dial_timed_out",
        "dialing",
        "finished",
        "idle_ticks",
        "opened",
        "queued",
        "registered",
        "request_at",
        "server",
        "service",
        "upstream",
    )

    def __init__(self, server: TcpRelayServer, family: int) -> None:
        self.server = server
        self.client = _ClientSide(self, family)
        self.upstream: _UpstreamSide | None = None
        self.service: str | None = None
        self.counters: ServiceCounters | None = None
        self.backend: Backend | None = None
        self.client_ip = ""
        self.dial_task: asyncio.Task[None] | None = None
        self.dial_deadline = 0.0  # loop time at which the current dial attempt times out
        self.dial_timed_out = False  # the dial watchdog cancelled the task for its deadline
        self.dialing = False
        self.opened = False  # counted by the selector: connection_opened, no closed yet
        self.awaiting = False  # opened, and its latest request not yet answered
        self.registered = False  # counted as active and held in server.relays
        self.finished = False
        self.idle_ticks = 0
        self.connect_seconds = 0.0  # how long the successful dial took
        self.queued: int | None = None  # requests in flight to the backend when it was opened
        self.request_at = 0.0  # loop time the request's first byte went upstream

    def accepted(self) -> None:
        server = self.server
        client = self.client
        transport = cast(asyncio.Transport, client.transport)
        if server.closing:
            client.reset()
            return
        if len(server.relays) >= server.settings.max_connections:
            server.reject_over_cap()
            client.reset()
            return
        try:
            dst_ip, dst_port = server.destination(transport)
        except OSError as error:
            server.stats.tcp_unknown_destination += 1
            log.debug("closing client with no original destination: %s", error)
            client.reset()
            return
        service = server.selector.service_for("TCP", dst_ip, dst_port)
        if service is None:
            server.stats.tcp_unknown_destination += 1
            log.debug("closing client for %s:%s: no such service", dst_ip, dst_port)
            client.reset()
            return
        peername = transport.get_extra_info("peername")
        self.client_ip = peername[0] if peername else ""
        self.service = service
        counters = client.counters = server.stats.service(service)
        self.counters = counters
        counters.tcp_connections_total += 1
        counters.tcp_active += 1
        server.stats.tcp_active += 1
        server.relays.add(self)
        self.registered = True
        self.dialing = True
        self.dial_task = task = server.loop.create_task(self.dial())
        # A done callback, not a `finally` in dial(): a task cancelled before its first step
        # (the client reset right after connecting) never runs its body at all.
        task.add_done_callback(self.dial_done)

    async def dial(self) -> None:
        try:
            await self._dial_attempts()
        except Exception:
            log.exception(
                "dialling for service %s failed unexpectedly; closing client %s",
                self.service,
                self.client_ip,
            )
            # The upstream may be connected but not yet wired to the client: reset it too.
            self.client.reset()
            if self.upstream is not None:
                self.upstream.reset()

    def dial_done(self, _task: asyncio.Task[None]) -> None:
        try:
            self.dialing = False
            self.dial_task = None
            if self.upstream is None:
                self.client.reset()  # cancelled or gave up: nothing will ever serve this client
            self.maybe_finish()
        except Exception:
            self.fail("dial_done")

    async def _dial_attempts(self) -> None:
        server = self.server
        selector = server.selector
        service = cast(str, self.service)
        counters = cast(ServiceCounters, self.counters)
        loop = server.loop
        dials = server.dials
        tried = _NOTHING_TRIED
        for timeout in server.settings.dial_timeouts:
            if self.client.closing:
                return
            backend = selector.choose(service, self.client_ip, tried)
            if backend is None:
                break
            tried = tried | {backend}
            upstream = _UpstreamSide(self, socket.AF_INET6 if ":" in backend.ip else socket.AF_INET)
            started = loop.time()
            self.dial_deadline = started + timeout
            dials.add(self)
            try:
                await loop.create_connection(
                    lambda: upstream,  # noqa: B023 -- awaited before the next iteration
                    backend.ip,
                    backend.port,
                )
            except asyncio.CancelledError:
                if not self.dial_timed_out:
                    upstream.abandon()
                    raise
                # The watchdog's cancellation, not the owner's: this attempt timed out.
                self.dial_timed_out = False
                cast(asyncio.Task[None], self.dial_task).uncancel()
                error: OSError | None = TimeoutError(f"connect timed out after {timeout} s")
            except OSError as failure:  # ConnectionRefusedError, unreachable, ...
                error = failure
            except BaseException:
                upstream.abandon()
                raise
            else:
                error = None
            finally:
                dials.discard(self)
            if error is not None:
                upstream.abandon()
                counters.dial_failures += 1
                log.debug(
                    "dial %s:%s for service %s failed: %r", backend.ip, backend.port, service, error
                )
                selector.dial_failed(service, backend, self.client_ip)
                continue
            self.connected(upstream, backend, loop.time() - started)
            return
        counters.tcp_dial_exhausted += 1
        log.debug(
            "no backend reachable for service %s after %d attempt(s); resetting client %s",
            service,
            len(tried),
            self.client_ip,
        )
        self.client.reset()

    def connected(
        self, upstream: _UpstreamSide, backend: Backend, connect_seconds: float = 0.0
    ) -> None:
        client = self.client
        self.upstream = upstream
        self.backend = backend
        if client.closing:
            upstream.close()
            return
        self.queued = self.server.selector.connection_opened(
            cast(str, self.service), backend, connect_seconds
        )
        self.opened = True
        self.awaiting = True
        self.connect_seconds = connect_seconds
        # Time to the first response byte, from the request's first byte: sent right below when
        # it arrived during the dial, else when the client sends it (a server that speaks
        # first is timed from now). Not when the upstream spoke before being wired: that one
        # loop iteration says nothing about the pod.
        self.request_at = self.server.loop.time()
        client.first_send = not client.pending
        upstream.timing = not upstream.pending
        settings = self.server.settings
        client_transport = cast(asyncio.Transport, client.transport)
        upstream_transport = cast(asyncio.Transport, upstream.transport)
        counters = cast(ServiceCounters, self.counters)
        upstream.counters = counters
        client.peer = upstream
        upstream.peer = client
        # Deliver what arrived on either side before the two were wired together.
        if upstream.pending:
            self.answered(timed=False)  # a server that spoke first
        for data in upstream.pending:
            client_transport.write(data)
            counters.bytes_to_clients += len(data)
        upstream.pending.clear()
        if upstream.lost:  # between connect and now: pass on how it ended, write nothing to it
            if upstream.failed:
                client.reset()
            else:
                client.close()
            return
        client_transport.set_write_buffer_limits(
            settings.write_buffer_high, settings.write_buffer_low
        )
        upstream_transport.set_write_buffer_limits(
            settings.write_buffer_high, settings.write_buffer_low
        )
        for data in client.pending:
            upstream_transport.write(data)
            counters.bytes_from_clients += len(data)
        client.pending.clear()
        client.sink = upstream_transport
        upstream.sink = client_transport
        if client.eof and upstream.eof:
            self.close_both()
            return
        if upstream.eof:
            client_transport.write_eof()
        if client.eof:
            upstream_transport.write_eof()
        else:
            client_transport.resume_reading()
        if not upstream.eof:
            upstream_transport.resume_reading()

    def backend_done(self) -> None:
        """The backend sent its FIN: it is no longer busy with this connection.

        Reported to the selector now rather than when both sides have closed, because with
        one connection per request the client's next connection arrives before this relay's
        close callbacks have run, and the balancer would count the finished one as queued.
        """
        if not self.opened:
            return
        self.opened = False
        awaiting, self.awaiting = self.awaiting, False
        try:
            self.server.selector.connection_closed(
                cast(str, self.service), cast(Backend, self.backend), awaiting
            )
        except Exception:
            log.exception("selector.connection_closed failed for service %s", self.service)

    def request_sent(self) -> None:
        self.request_at = self.server.loop.time()

    def answered(self, timed: bool) -> None:
        """The upstream began to answer: the first response is timed (`timed`), every one ends
        a request in flight (so the balancer counts queues, not open connections)."""
        self.awaiting = False
        server = self.server
        service = cast(str, self.service)
        backend = cast(Backend, self.backend)
        try:
            if timed:
                server.selector.first_response(
                    service,
                    backend,
                    self.connect_seconds,
                    server.loop.time() - self.request_at,
                    self.queued,
                )
            else:
                server.selector.response_started(service, backend)
        except Exception:
            log.exception("reporting a response failed for service %s", self.service)

    def request_again(self) -> None:
        """An answered connection sent more: its next request (keep-alive) is in flight."""
        if not self.opened:
            return  # the backend has closed: nothing more will be answered
        self.awaiting = True
        try:
            self.server.selector.request_started(
                cast(str, self.service), cast(Backend, self.backend)
            )
        except Exception:
            log.exception("selector.request_started failed for service %s", self.service)

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        if side is self.client and self.dial_task is not None:
            self.dial_task.cancel()
        self.maybe_finish()

    def maybe_finish(self) -> None:
        if self.finished or self.dialing or not self.client.lost:
            return
        upstream = self.upstream
        if upstream is not None and not upstream.lost:
            return
        self.finished = True
        if not self.registered:
            return
        server = self.server
        server.relays.discard(self)
        server.stats.tcp_active -= 1
        if self.counters is not None:
            self.counters.tcp_active -= 1
        if self.opened:
            self.opened = False
            awaiting, self.awaiting = self.awaiting, False
            try:
                server.selector.connection_closed(
                    cast(str, self.service), cast(Backend, self.backend), awaiting
                )
            except Exception:
                log.exception("selector.connection_closed failed for service %s", self.service)
        if not server.relays:
            server.drained.set()

    def close_both(self) -> None:
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()

    def reset_both(self) -> None:
        if self.dial_task is not None:
            self.dial_task.cancel()
        self.client.reset()
        if self.upstream is not None:
            self.upstream.reset()

    def close_idle(self) -> None:
        if self.counters is not None:
            self.counters.tcp_idle_closed += 1
        log.debug("closing idle connection from %s (service %s)", self.client_ip, self.service)
        self.client.close_if_drained_else_reset()
        if self.upstream is not None:
            self.upstream.close_if_drained_else_reset()

    def fail(self, where: str) -> None:
        """An unexpected exception in a callback: log it with context, reset the relay."""
        log.exception(
            "relay bug in %s (service %s, client %s); resetting the connection",
            where,
            self.service,
            self.client_ip,
        )
        try:
            self.reset_both()
        except Exception:
            log.exception("resetting the relay after a bug failed too")


class CapRejections:
    """Clients closed by the global connection cap: counted at once, logged at most once per
    `cap_log_interval` (a log line per rejected client would turn overload into disk I/O)."""

    def __init__(self, stats: RelayStats, settings: TcpRelaySettings) -> None:
        self._stats = stats
        self._settings = settings
        self._unlogged = 0
        self._last_logged = float("-inf")

    def count(self) -> None:
        self._stats.tcp_rejected_by_cap += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last_logged >= self._settings.cap_log_interval:
            log.warning(
                "connection cap of %d reached: closed %d new client(s) since the last report",
                self._settings.max_connections,
                self._unlogged,
            )
            self._last_logged = now
            self._unlogged = 0


class TcpRelayServer:
    """Owns the TCP listeners and every relay they accepted.

    Usage: `server = TcpRelayServer(selector); await server.start([("0.0.0.0", 15001)])`;
    `server.addresses` tells the bound ports; `await server.aclose()` stops listening and resets
    every relay. One listening socket per address (give one IPv4 and one IPv6 address for dual
    stack; IPv6 listeners are V6ONLY).
    """

    def __init__(
        self,
        selector: BackendSelector,
        *,
        settings: TcpRelaySettings | None = None,
        stats: RelayStats | None = None,
        destination: DestinationResolver = intercepted_destination,
    ) -> None:
        self.selector = selector
        self.settings = settings if settings is not None else TcpRelaySettings()
        self.stats = stats if stats is not None else RelayStats()
        self.destination = destination
        self.relays: set[_TcpRelay] = set()
        self.closing = False
        self.accepting = True
        self.drained = asyncio.Event()
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.dials: set[_TcpRelay] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cap_rejections = CapRejections(self.stats, self.settings)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("TcpRelayServer.start() has not been called")
        return self._loop

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every listening socket, after start()."""
        bound: list[tuple[str, int]] = []
        for server in self._servers:
            for sock in server.sockets:
                name = sock.getsockname()
                bound.append((name[0], name[1]))
        return bound

    @property
    def active_connections(self) -> int:
        return len(self.relays)

    async def start(
        self,
        listen: Sequence[tuple[str, int]],
        *,
        inherited: Mapping[tuple[str, int], socket.socket] | None = None,
        accept: bool = True,
    ) -> None:
        """Listen on each (host, port); port 0 lets the kernel choose.

        An address in `inherited` is served with that already listening socket (a predecessor's,
        see `handover`) instead of a fresh bind; this server owns it from then on. With
        `accept=False` nothing is accepted until `start_accepting()` (and a fresh socket does
        not even listen until then): a successor that takes a listener over must not accept
        connections it cannot route yet; meanwhile they wait in the shared queue for whichever
        process accepts them.
        """
        if self._servers:
            raise RuntimeError("TcpRelayServer.start() called twice")
        self._loop = asyncio.get_running_loop()
        inherited = inherited or {}
        try:
            for host, port in listen:
                adopted = inherited.get((host, port))
                if adopted is not None:
                    adopted.setblocking(False)
                sock = (
                    adopted
                    if adopted is not None
                    else listening_socket(host, port, reuse_port=self.settings.reuse_port)
                )
                try:
                    server = await self._loop.create_server(
                        functools.partial(self._new_client, sock.family),
                        sock=sock,
                        backlog=self.settings.backlog,
                        start_serving=accept,
                    )
                except BaseException:
                    sock.close()
                    raise
                self._servers.append(server)
        except BaseException:
            await self.aclose()
            raise
        if self.settings.idle_timeout is not None:
            self._sweeper = self._loop.create_task(self._sweep_idle(self.settings.idle_timeout))
        self._watchdog = self._loop.create_task(
            self._watch_dials(min(self.settings.dial_timeouts) / _DIAL_TICKS_PER_TIMEOUT)
        )

    def bound_descriptors(self) -> list[int]:
        """The descriptor of every listening socket, accepting or not (for worker processes)."""
        return [sock.fileno() for server in self._servers for sock in server.sockets]

    def listening_descriptors(self) -> dict[tuple[str, int], int]:
        """The descriptor of each listening socket by its bound (host, port), while accepting."""
        if self.closing or not self.accepting:
            return {}
        bound: dict[tuple[str, int], int] = {}
        for server in self._servers:
            for sock in server.sockets:
                name = sock.getsockname()
                bound[(name[0], name[1])] = sock.fileno()
        return bound

    async def start_accepting(self) -> None:
        """Accept on listeners started with `accept=False` (a no-op for the others)."""
        if self.closing or not self.accepting:
            return
        for server in self._servers:
            await server.start_serving()

    def stop_accepting(self) -> None:
        """Close the listeners, keep every relay: the first step of a drain.

        A listener shared with a successor (passed over by `handover`) lives on in that process,
        with every connection still queued on it; only this process stops taking them.
        """
        self.accepting = False
        for server in self._servers:
            server.close()

    async def wait_drained(self) -> None:
        """Return once every relay has ended (bound it with `asyncio.timeout`).

        Call `stop_accepting()` first, or new relays keep arriving. Relays that remain when the
        caller gives up are left alone: `aclose()` resets them.
        """
        while self.relays:
            self.drained.clear()
            if self.relays:
                await self.drained.wait()

    def relay_views(self) -> list[RelayView]:
        """Every relay's descriptors and held bytes (tests, /debug)."""
        views = []
        for relay in self.relays:
            client, upstream = relay.client, relay.upstream
            views.append(
                RelayView(
                    client_fd=_fd(client.transport),
                    upstream_fd=_fd(upstream.transport) if upstream is not None else None,
                    dialing=relay.dialing,
                    held_from_client=sum(map(len, client.pending)) + _buffered(upstream),
                    held_to_client=_buffered(client)
                    + (sum(map(len, upstream.pending)) if upstream is not None else 0),
                )
            )
        return views

    def _new_client(self, family: int) -> _ClientSide:
        return _TcpRelay(self, family).client

    def reject_over_cap(self) -> None:
        self._cap_rejections.count()

    async def _watch_dials(self, tick: float) -> None:
        """Cancel dial attempts past their deadline.

        One periodic scan instead of an `asyncio.timeout()` per dial: a per-connection timer
        costs ~9 us of CPU on uvloop, a large share of a short connection's budget. The price is
        resolution: an attempt times out between its timeout and a fifth of the shortest one
        later.
        """
        loop = self.loop
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            expired = [relay for relay in self.dials if relay.dial_deadline <= now]
            for relay in expired:
                self.dials.discard(relay)
                if relay.dial_task is not None and not relay.dial_timed_out:
                    relay.dial_timed_out = True
                    relay.dial_task.cancel()

    async def _sweep_idle(self, idle_timeout: float) -> None:
        ticks_to_idle = 4
        while True:
            await asyncio.sleep(idle_timeout / ticks_to_idle)
            for relay in list(self.relays):
                try:
                    if relay.dialing or relay.finished:
                        continue
                    upstream = relay.upstream
                    if relay.client.touched or (upstream is not None and upstream.touched):
                        relay.client.touched = False
                        if upstream is not None:
                            upstream.touched = False
                        relay.idle_ticks = 0
                        continue
                    relay.idle_ticks += 1
                    if relay.idle_ticks >= ticks_to_idle:
                        relay.close_idle()
                except Exception:
                    relay.fail("idle sweep")

    def close(self) -> None:
        """Stop listening and reset every relay; `aclose()` also waits for them to go."""
        self.closing = True
        for server in self._servers:
            server.close()
        for task in (self._sweeper, self._watchdog):
            if task is not None:
                task.cancel()
        for relay in list(self.relays):
            relay.reset_both()

    async def aclose(self) -> None:
        self.close()
        tasks = [relay.dial_task for relay in self.relays if relay.dial_task is not None]
        tasks.extend(task for task in (self._sweeper, self._watchdog) if task is not None)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.relays:
            self.drained.clear()
            if self.relays:
                try:
                    async with asyncio.timeout(5.0):
                        await self.drained.wait()
                except TimeoutError:
                    log.warning("%d relay(s) did not close within 5 s", len(self.relays))
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self._sweeper = None
        self._watchdog = None
