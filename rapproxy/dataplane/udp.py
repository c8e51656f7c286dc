"""The UDP relay: one socket per UDP service port, one upstream socket per client.

UDP has no connection, and REDIRECT leaves no SO_ORIGINAL_DST to read on an unconnected socket,
so each UDP service port gets its own socket (the rules REDIRECT `clusterIP:port/udp` to it) and
the service is fixed per socket. A client is recognised by its source address; its first datagram
creates a *flow*: a backend chosen by the selector and a connected datagram socket towards it.
Replies arriving on that socket are sent back to the client from the service socket, from the exact
address the client's datagram reached (see `udp_socket`), so conntrack rewrites their source to the
ClusterIP the client spoke to.

Decisions that differ from kube-proxy userspace mode, and why:
- Flows expire after `idle_timeout` (default 30 s) with no datagram either way. kube-proxy used
  250 ms, which silently breaks request/response protocols whose server takes longer than that to
  answer: the reply arrives on a socket that is already gone. 30 s matches the order of the
  kernel's own UDP conntrack timeouts.
- Datagrams up to 65507 bytes (the IPv4 maximum) pass whole; both loops read datagrams into a
  buffer larger than that. kube-proxy read into 4 KiB and truncated larger ones.
- Flows are capped (`max_flows`): a spoofed-source flood cannot make the proxy open unbounded
  sockets. Datagrams of new clients over the cap are dropped and counted.
- An ICMP port-unreachable from the backend (surfacing as `error_received(ConnectionRefusedError)`
  on the connected socket) ends the flow and is reported as a dial failure; the client's next
  datagram picks a backend again.

Flows are reported to the selector through `connection_opened`/`connection_closed`, like TCP
connections, so least-connection style policies see UDP load too.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, cast

from rapproxy.dataplane.routing import Backend, BackendSelector
from rapproxy.dataplane.stats import RelayStats, ServiceCounters
from rapproxy.dataplane.udp_socket import PktinfoDatagramSocket

log = logging.getLogger(__name__)

_NOTHING_TRIED: frozenset[Backend] = frozenset()

Address = tuple[Any, ...]
"""A socket address as the loop reports it: (ip, port) or, for IPv6, (ip, port, flow, scope)."""


def _buffered(transport: asyncio.DatagramTransport) -> int:
    """Bytes the loop holds for this socket (both loops implement it; the stubs lack it)."""
    size: int = cast(asyncio.WriteTransport, transport).get_write_buffer_size()
    return size


class InvalidUdpRelaySettings(ValueError):
    """A UdpRelaySettings field is out of range; the message names the field."""


@dataclass(frozen=True, slots=True)
class UdpRelaySettings:
    """Tunables of a UDP service port. Times are seconds."""

    idle_timeout: float = 30.0
    """A flow with no datagram in either direction for this long is closed."""
    max_flows: int = 4096
    """Concurrent client flows per service port; new clients over it are dropped."""
    pending_datagrams: int = 64
    """Datagrams held per flow while its upstream socket is being opened; more are dropped."""
    dial_attempts: int = 4
    """Backends tried when opening the upstream socket fails (rare for UDP)."""
    max_buffered_bytes: int = 4 * 1024 * 1024
    """Per socket: datagrams that would queue beyond this in the loop's buffer are dropped.

    A socket whose kernel buffer is full makes the loop queue datagrams in memory, without
    bound; for UDP, dropping is the honest answer to overload."""
    drop_log_interval: float = 10.0

    def __post_init__(self) -> None:
        if self.idle_timeout <= 0:
            raise InvalidUdpRelaySettings(
                f"idle_timeout: must be positive, got {self.idle_timeout!r}"
            )
        if self.max_flows < 1:
            raise InvalidUdpRelaySettings(f"max_flows: must be at least 1, got {self.max_flows!r}")
        if self.pending_datagrams < 1:
            raise InvalidUdpRelaySettings(
                f"pending_datagrams: must be at least 1, got {self.pending_datagrams!r}"
            )
        if self.dial_attempts < 1:
            raise InvalidUdpRelaySettings(
                f"dial_attempts: must be at least 1, got {self.dial_attempts!r}"
            )


class _UdpFlow(asyncio.DatagramProtocol):
    """One client's flow: a connected socket towards the chosen backend."""

    def __init__(self, port: UdpServicePort, client: Address, local: str | None) -> None:
        self.port = port
        self.client = client
        self.local = local  # the address the client's datagrams arrive at: replies leave from it
        self.client_ip = str(client[0])
        self.backend: Backend | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: list[bytes] = []
        self.setup_task: asyncio.Task[None] | None = None
        self.touched = False
        self.idle_ticks = 0
        self.closed = False
        self.opened = False

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            if len(self.pending) < self.port.settings.pending_datagrams:
                self.pending.append(data)
            else:
                self.port.counters.udp_datagrams_dropped += 1
            return
        if _buffered(transport) > self.port.settings.max_buffered_bytes:
            self.port.counters.udp_datagrams_dropped += 1
            return
        transport.sendto(data)
        self.touched = True

    def datagram_received(self, data: bytes, addr: Address) -> None:
        try:
            if self.closed:
                return
            self.touched = True
            self.port.counters.udp_datagrams_to_clients += 1
            self.port.counters.bytes_to_clients += len(data)
            self.port.reply(data, self.client, self.local)
        except Exception:
            log.exception("UDP service %s: relaying a reply failed", self.port.service)
            self.close()

    def error_received(self, exc: Exception) -> None:
        try:
            if self.closed:
                return
            log.debug(
                "UDP service %s: backend %s answered %r; ending flow of %s",
                self.port.service,
                self.backend,
                exc,
                self.client,
            )
            if isinstance(exc, ConnectionRefusedError) and self.backend is not None:
                self.port.report_dial_failed(self.backend, self.client_ip)
            self.close()
        except Exception:
            log.exception("UDP service %s: handling a socket error failed", self.port.service)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.close()
        except Exception:
            log.exception("UDP service %s: closing a flow failed", self.port.service)

    async def open(self) -> None:
        """Choose a backend and connect a socket to it; then flush what the client sent."""
        port = self.port
        tried = _NOTHING_TRIED
        try:
            for _ in range(port.settings.dial_attempts):
                backend = port.selector.choose(port.service, self.client_ip, tried)
                if backend is None:
                    break
                tried = tried | {backend}
                try:
                    await port.loop.create_datagram_endpoint(
                        lambda: self, remote_addr=(backend.ip, backend.port)
                    )
                except OSError as error:
                    log.debug(
                        "UDP service %s: socket to %s failed: %r", port.service, backend, error
                    )
                    port.report_dial_failed(backend, self.client_ip)
                    continue
                self.backend = backend
                if self.closed:
                    cast(asyncio.DatagramTransport, self.transport).close()
                    return
                port.selector.connection_opened(port.service, backend)
                self.opened = True
                transport = cast(asyncio.DatagramTransport, self.transport)
                for data in self.pending:
                    transport.sendto(data)
                self.pending.clear()
                return
            port.counters.udp_flows_no_backend += 1
            port.counters.udp_datagrams_dropped += len(self.pending)
            log.debug("UDP service %s: no backend for client %s", port.service, self.client)
            self.close()
        except Exception:
            log.exception("UDP service %s: opening a flow for %s failed", port.service, self.client)
            self.close()
        finally:
            self.setup_task = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.pending.clear()
        if self.setup_task is not None and self.setup_task is not asyncio.current_task():
            self.setup_task.cancel()
        if self.transport is not None:
            self.transport.close()
        self.port.flow_closed(self)


class UdpServicePort:
    """Owns one UDP service socket and the client flows behind it.

    Usage: `port = UdpServicePort(selector, "default/dns:53/UDP"); await port.start(("0.0.0.0",
    0))`; `port.address` is the bound address the rules REDIRECT to; `await port.aclose()`.
    """

    def __init__(
        self,
        selector: BackendSelector,
        service: str,
        *,
        settings: UdpRelaySettings | None = None,
        stats: RelayStats | None = None,
    ) -> None:
        self.selector = selector
        self.service = service
        self.settings = settings if settings is not None else UdpRelaySettings()
        self.stats = stats if stats is not None else RelayStats()
        self.counters: ServiceCounters = self.stats.service(service)
        self.flows: dict[Address, _UdpFlow] = {}
        self._transport: PktinfoDatagramSocket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._drops_unlogged = 0
        self._drop_last_logged = float("-inf")
        self._reading = True

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("UdpServicePort.start() has not been called")
        return self._loop

    @property
    def address(self) -> tuple[str, int]:
        if self._transport is None:
            raise RuntimeError("UdpServicePort.start() has not been called")
        name = self._transport.get_extra_info("sockname")
        return (name[0], name[1])

    async def start(self, bind: tuple[str, int], *, inherited: socket.socket | None = None) -> None:
        """Bind the service socket; port 0 lets the kernel choose (see `address`).

        With `inherited` (a predecessor's socket for this service port, see `handover`), that
        socket is served instead, and keeps its port: the rules need not change.
        """
        if self._transport is not None:
            raise RuntimeError("UdpServicePort.start() called twice")
        self._loop = asyncio.get_running_loop()
        self._transport = PktinfoDatagramSocket(
            self._loop, bind, self.from_client, inherited=inherited
        )
        self._sweeper = self._loop.create_task(self._sweep_idle())

    def socket_descriptor(self) -> int | None:
        """The service socket's descriptor while it reads, for a handover."""
        transport = self._transport
        if transport is None or transport.is_closing() or not self.reading:
            return None
        return transport.fileno()

    @property
    def reading(self) -> bool:
        return self._reading

    def stop_reading(self) -> None:
        """A drain: no new datagrams here (a successor reads the shared socket); flows that
        exist keep relaying replies until they idle out or the port is closed."""
        self._reading = False
        if self._transport is not None:
            self._transport.stop_reading()

    def from_client(self, data: bytes, client: Address, local: str | None = None) -> None:
        counters = self.counters
        counters.udp_datagrams_from_clients += 1
        counters.bytes_from_clients += len(data)
        flow = self.flows.get(client)
        if flow is None:
            if self._transport is None or self._transport.is_closing():
                return
            if len(self.flows) >= self.settings.max_flows:
                counters.udp_flows_rejected_by_cap += 1
                counters.udp_datagrams_dropped += 1
                self._log_drop()
                return
            flow = self.flows[client] = _UdpFlow(self, client, local)
            counters.udp_flows_total += 1
            counters.udp_flows_active += 1
            flow.pending.append(data)
            flow.setup_task = self.loop.create_task(flow.open())
            return
        flow.send(data)

    def reply(self, data: bytes, client: Address, local: str | None = None) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if not transport.sendto(data, client, local):
            self.counters.udp_datagrams_dropped += 1

    def report_dial_failed(self, backend: Backend, client_ip: str) -> None:
        self.counters.dial_failures += 1
        try:
            self.selector.dial_failed(self.service, backend, client_ip)
        except Exception:
            log.exception("selector.dial_failed failed for UDP service %s", self.service)

    def flow_closed(self, flow: _UdpFlow) -> None:
        if self.flows.get(flow.client) is flow:
            del self.flows[flow.client]
            self.counters.udp_flows_active -= 1
        if flow.opened and flow.backend is not None:
            flow.opened = False
            try:
                self.selector.connection_closed(self.service, flow.backend)
            except Exception:
                log.exception("selector.connection_closed failed for UDP service %s", self.service)

    def _log_drop(self) -> None:
        self._drops_unlogged += 1
        now = time.monotonic()
        if now - self._drop_last_logged >= self.settings.drop_log_interval:
            log.warning(
                "UDP service %s: flow cap of %d reached: dropped %d datagram(s) of new clients",
                self.service,
                self.settings.max_flows,
                self._drops_unlogged,
            )
            self._drop_last_logged = now
            self._drops_unlogged = 0

    async def _sweep_idle(self) -> None:
        ticks_to_idle = 4
        while True:
            await asyncio.sleep(self.settings.idle_timeout / ticks_to_idle)
            for flow in list(self.flows.values()):
                try:
                    if flow.touched:
                        flow.touched = False
                        flow.idle_ticks = 0
                        continue
                    flow.idle_ticks += 1
                    if flow.idle_ticks >= ticks_to_idle:
                        log.debug("UDP service %s: flow of %s idle", self.service, flow.client)
                        flow.close()
                except Exception:
                    log.exception("UDP service %s: idle sweep failed", self.service)

    def close(self) -> None:
        """Close the service socket and every flow; `aclose()` also waits for the tasks."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._transport is not None:
            self._transport.close()
        for flow in list(self.flows.values()):
            flow.close()

    async def aclose(self) -> None:
        tasks = [f.setup_task for f in self.flows.values() if f.setup_task is not None]
        self.close()
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._sweeper = None

    @property
    def active_flows(self) -> int:
        return len(self.flows)
