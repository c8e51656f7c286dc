"""The native TCP relay (`proxy.relayEngine: native`): the I/O in C, every decision in Python.

Why: the asyncio relay spends about half of a short connection's CPU on Python and uvloop object
machinery (transports, a dial task, futures, callbacks; see
benchmarks/loopback/results/profile-close-2026-12-07.md). `_native.Engine` (_native.c) keeps a
connection as one C struct in its own epoll set and does accept, original destination, the
non-blocking dial and its timeouts, the byte copying with back-pressure, half-close, resets,
the idle sweep and the global cap. It runs on the asyncio loop's thread: the loop watches the
engine's epoll descriptor and calls `Engine.run()`, which handles every ready event in C. No
threads, no GIL hand-off.

What stays here, behind the same `BackendSelector` seam as the asyncio relay (so RAP and every
policy work unchanged): which service an original destination is, which backend to dial and
which next after a failure (kube-proxy's attempts and timeouts: the engine times each attempt
with `TcpRelaySettings.dial_timeouts`), and the accounting the selector and `RelayStats` keep —
dial time, time to the first response byte, requests in flight, the backend's FIN, the end.
Per `Connection: close` connection the engine calls Python five times (accept, opened,
answered, backend FIN, finished); nothing per chunk.

Differences from the asyncio relay, by design:
- While dialling, nothing is read from the client: its bytes wait in the kernel (the asyncio
  relay holds one read). A client reset still ends the dial at once.
- Byte counters are added once a second for live relays and when a relay ends, not per chunk.
- Destinations: the engine answers `intercepted_destination` (SO_ORIGINAL_DST, IPv4 and IPv6)
  and `fixed_destination` itself, in C; any other resolver is refused at construction.
- At most 8 dial attempts (the C engine keeps one deadline queue per attempt).

A missing extension is an error (`NativeEngineUnavailable`), never a silent fall-back to the
asyncio relay: `make install` builds it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from rapproxy.dataplane.routing import Backend, BackendSelector
from rapproxy.dataplane.stats import RelayStats, ServiceCounters
from rapproxy.dataplane.tcp import (
    CapRejections,
    DestinationResolver,
    FixedDestination,
    InvalidTcpRelaySettings,
    RelayView,
    TcpRelaySettings,
    intercepted_destination,
    listening_socket,
)

if TYPE_CHECKING:
    from rapproxy.dataplane._native import Engine

log = logging.getLogger(__name__)

MAX_DIAL_ATTEMPTS = 8
"""The native engine keeps one deadline queue per attempt index; more attempts are refused."""
_NOTHING_TRIED: frozenset[Backend] = frozenset()


class NativeEngineUnavailable(RuntimeError):
    """The C extension is not built (or fails to load): `make install` builds it."""


def load_engine() -> type[Engine]:
    """The engine class from the C extension, or NativeEngineUnavailable saying how to get it."""
    try:
        from rapproxy.dataplane._native import Engine as NativeEngine
    except ImportError as error:
        raise NativeEngineUnavailable(
            "proxy.relayEngine is 'native' but the C extension rapproxy.dataplane._native is not "
            f"built ({error}); run `make install` (needs gcc and the Python headers: "
            "`make deps` installs build-essential and python3-dev) or set "
            "proxy.relayEngine: asyncio"
        ) from error
    return NativeEngine


class _Relay:
    """What Python knows of one native relay: its service, backend and selector accounts."""

    __slots__ = (
        "backend",
        "client_ip",
        "connect_seconds",
        "counters",
        "queued",
        "service",
        "tried",
    )

    def __init__(
        self, service: str, counters: ServiceCounters, client_ip: str, backend: Backend
    ) -> None:
        self.service = service
        self.counters = counters
        self.client_ip = client_ip
        self.backend = backend
        self.tried = _NOTHING_TRIED
        self.queued: int | None = None
        self.connect_seconds = 0.0


class _Handler:
    """The engine's callbacks (see _native.pyi). Each one catches what it raises: an exception
    escaping into C would be reported as unraisable and reset the connection anyway."""

    __slots__ = ("server",)

    def __init__(self, server: NativeTcpRelayServer) -> None:
        self.server = server

    def accept(
        self, client_ip: str, dst_ip: str | None, dst_port: int
    ) -> tuple[_Relay, str, int] | None:
        server = self.server
        stats = server.stats
        try:
            if dst_ip is None:
                stats.tcp_unknown_destination += 1
                log.debug("closing client %s with no original destination", client_ip)
                return None
            selector = server.selector
            service = selector.service_for("TCP", dst_ip, dst_port)
            if service is None:
                stats.tcp_unknown_destination += 1
                log.debug("closing client for %s:%s: no such service", dst_ip, dst_port)
                return None
            counters = stats.service(service)
            counters.tcp_connections_total += 1
            backend = selector.choose(service, client_ip, _NOTHING_TRIED)
            if backend is None:
                counters.tcp_dial_exhausted += 1
                log.debug("no backend for service %s; resetting client %s", service, client_ip)
                return None
            counters.tcp_active += 1
            stats.tcp_active += 1
            return _Relay(service, counters, client_ip, backend), backend.ip, backend.port
        except Exception:
            log.exception("accepting a client from %s failed; resetting it", client_ip)
            return None

    def dial_failed(
        self, relay: _Relay, attempts_left: int, timed_out: bool
    ) -> tuple[str, int] | None:
        try:
            selector = self.server.selector
            backend = relay.backend
            relay.counters.dial_failures += 1
            log.debug(
                "dial %s:%s for service %s failed%s",
                backend.ip,
                backend.port,
                relay.service,
                " (timed out)" if timed_out else "",
            )
            selector.dial_failed(relay.service, backend, relay.client_ip)
            relay.tried = tried = relay.tried | {backend}
            following = selector.choose(relay.service, relay.client_ip, tried)
            if attempts_left <= 0 or following is None:
                relay.counters.tcp_dial_exhausted += 1
                log.debug(
                    "no backend reachable for service %s after %d attempt(s); resetting %s",
                    relay.service,
                    len(tried),
                    relay.client_ip,
                )
                return None
            relay.backend = following
            return following.ip, following.port
        except Exception:
            log.exception("choosing a backend after a failed dial failed (%s)", relay.service)
            return None

    def opened(self, relay: _Relay, connect_seconds: float) -> bool:
        try:
            relay.connect_seconds = connect_seconds
            relay.queued = self.server.selector.connection_opened(
                relay.service, relay.backend, connect_seconds
            )
            return True
        except Exception:
            log.exception(
                "selector.connection_opened failed for service %s; resetting client %s",
                relay.service,
                relay.client_ip,
            )
            return False

    def answered(self, relay: _Relay, response_seconds: float) -> None:
        try:
            selector = self.server.selector
            if response_seconds < 0:
                selector.response_started(relay.service, relay.backend)
            else:
                selector.first_response(
                    relay.service,
                    relay.backend,
                    relay.connect_seconds,
                    response_seconds,
                    relay.queued,
                )
        except Exception:
            log.exception("reporting a response failed for service %s", relay.service)

    def request_again(self, relay: _Relay) -> None:
        try:
            self.server.selector.request_started(relay.service, relay.backend)
        except Exception:
            log.exception("selector.request_started failed for service %s", relay.service)

    def backend_done(self, relay: _Relay, awaiting: bool) -> None:
        try:
            self.server.selector.connection_closed(relay.service, relay.backend, awaiting)
        except Exception:
            log.exception("selector.connection_closed failed for service %s", relay.service)

    def finished(
        self, relay: _Relay, bytes_from_client: int, bytes_to_client: int, awaiting: int, idle: bool
    ) -> None:
        server = self.server
        try:
            counters = relay.counters
            counters.bytes_from_clients += bytes_from_client
            counters.bytes_to_clients += bytes_to_client
            counters.tcp_active -= 1
            server.stats.tcp_active -= 1
            if idle:
                counters.tcp_idle_closed += 1
                log.debug("closed idle connection from %s (%s)", relay.client_ip, relay.service)
            if awaiting >= 0:
                server.selector.connection_closed(relay.service, relay.backend, bool(awaiting))
        except Exception:
            log.exception("accounting the end of a relay failed (service %s)", relay.service)
        finally:
            if server.active_connections == 0:
                server.drained.set()

    def progress(self, relay: _Relay, bytes_from_client: int, bytes_to_client: int) -> None:
        counters = relay.counters
        counters.bytes_from_clients += bytes_from_client
        counters.bytes_to_clients += bytes_to_client

    def rejected(self) -> None:
        try:
            self.server.reject_over_cap()
        except Exception:
            log.exception("counting a client over the connection cap failed")


class NativeTcpRelayServer:
    """Owns the TCP listeners and the native engine relaying what they accept.

    The same interface as `tcp.TcpRelayServer` (start, addresses, handover descriptors,
    start/stop accepting, drain, close), so the proxier, the workers and the handover use either.
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
        if len(self.settings.dial_timeouts) > MAX_DIAL_ATTEMPTS:
            raise InvalidTcpRelaySettings(
                f"dial_timeouts: the native relay engine makes at most {MAX_DIAL_ATTEMPTS} "
                f"attempts, got {len(self.settings.dial_timeouts)}"
            )
        if isinstance(destination, FixedDestination):
            self._fixed: tuple[str, int] | None = destination.address
        elif destination is intercepted_destination:
            self._fixed = None
        else:
            raise ValueError(
                "the native relay engine resolves destinations in C: pass "
                "intercepted_destination or fixed_destination(), not "
                f"{destination!r}"
            )
        self._engine_type = load_engine()
        self.closing = False
        self.accepting = True
        self.drained = asyncio.Event()
        self._sockets: list[socket.socket] = []
        self._listening = False
        self._engine: Engine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cap_rejections = CapRejections(self.stats, self.settings)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every listening socket, after start()."""
        bound: list[tuple[str, int]] = []
        for sock in self._sockets:
            name = sock.getsockname()
            bound.append((name[0], name[1]))
        return bound

    @property
    def active_connections(self) -> int:
        return self._engine.active if self._engine is not None else 0

    async def start(
        self,
        listen: Sequence[tuple[str, int]],
        *,
        inherited: Mapping[tuple[str, int], socket.socket] | None = None,
        accept: bool = True,
    ) -> None:
        """As `TcpRelayServer.start`: listen on each (host, port), or serve the inherited socket."""
        if self._engine is not None:
            raise RuntimeError("NativeTcpRelayServer.start() called twice")
        self._loop = loop = asyncio.get_running_loop()
        settings = self.settings
        engine = self._engine_type(
            _Handler(self),
            tuple(float(t) for t in settings.dial_timeouts),
            settings.idle_timeout or 0.0,
            settings.max_connections,
            max(settings.write_buffer_high, 4096),
            self._fixed,
        )
        self._engine = engine
        inherited = inherited or {}
        try:
            for host, port in listen:
                adopted = inherited.get((host, port))
                if adopted is not None:
                    adopted.setblocking(False)
                    sock = adopted
                else:
                    sock = listening_socket(host, port, reuse_port=settings.reuse_port)
                self._sockets.append(sock)
                # Accepted sockets inherit TCP_NODELAY from the listener: no syscall per client.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            loop.add_reader(engine.fileno(), engine.run)
        except BaseException:
            await self.aclose()
            raise
        if accept:
            self._listen()

    def _listen(self) -> None:
        engine = self._engine
        if engine is None or self._listening or self.closing or not self.accepting:
            return
        for sock in self._sockets:
            sock.listen(self.settings.backlog)
            engine.add_listener(sock.fileno())
        self._listening = True

    def bound_descriptors(self) -> list[int]:
        """The descriptor of every listening socket, accepting or not (for worker processes)."""
        return [sock.fileno() for sock in self._sockets]

    def listening_descriptors(self) -> dict[tuple[str, int], int]:
        """The descriptor of each listening socket by its bound (host, port), while accepting."""
        if self.closing or not self.accepting:
            return {}
        return {
            (name[0], name[1]): sock.fileno()
            for sock in self._sockets
            for name in [sock.getsockname()]
        }

    async def start_accepting(self) -> None:
        """Accept on listeners started with `accept=False` (a no-op for the others)."""
        self._listen()

    def stop_accepting(self) -> None:
        """Close the listeners, keep every relay: the first step of a drain."""
        self.accepting = False
        engine = self._engine
        for sock in self._sockets:
            if engine is not None and sock.fileno() >= 0:
                engine.remove_listener(sock.fileno())
            sock.close()
        self._sockets.clear()
        self._listening = False

    async def wait_drained(self) -> None:
        """Return once every relay has ended (bound it with `asyncio.timeout`)."""
        while self.active_connections:
            self.drained.clear()
            if self.active_connections:
                await self.drained.wait()

    def relay_views(self) -> list[RelayView]:
        """Every relay's descriptors and held bytes (tests, /debug)."""
        if self._engine is None:
            return []
        return [
            RelayView(
                client_fd=client_fd,
                upstream_fd=upstream_fd if upstream_fd >= 0 else None,
                dialing=dialing,
                held_from_client=from_client,
                held_to_client=to_client,
            )
            for client_fd, upstream_fd, dialing, from_client, to_client in (
                self._engine.connections()
            )
        ]

    def reject_over_cap(self) -> None:
        self._cap_rejections.count()

    def close(self) -> None:
        """Stop listening and reset every relay."""
        self.closing = True
        self.stop_accepting()
        if self._engine is not None:
            self._engine.reset_all()

    async def aclose(self) -> None:
        self.close()
        engine, self._engine = self._engine, None
        if engine is not None:
            if self._loop is not None:
                self._loop.remove_reader(engine.fileno())
            engine.close()
        self.drained.set()
