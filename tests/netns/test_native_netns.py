"""The native relay engine behind a real iptables REDIRECT: the original destination, in C.

The engine reads SO_ORIGINAL_DST (IPv4) and IP6T_SO_ORIGINAL_DST (IPv6) itself; only a real NAT
rule records one. The listener and the client live in a throwaway namespace with the rule; the
relay dials an echo backend on the root namespace's loopback (its dialling socket is created in
the process's own namespace).
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from rapproxy.dataplane.native import NativeTcpRelayServer
from rapproxy.dataplane.routing import Backend
from rapproxy.dataplane.tcp import intercepted_destination
from rapproxy.model.service import L4Protocol, ServicePort, ServicePortName
from rapproxy.rules.apply import IptablesRunner
from rapproxy.rules.backend import detect_backend, tools_for
from rapproxy.rules.render import RedirectTarget, RuleConfig
from rapproxy.testing.netns import Namespace

pytestmark = pytest.mark.root


class Recording:
    """Every destination asked about maps to one service served by `backend`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.destinations: list[tuple[str, int]] = []

    def service_for(self, protocol: str, dst_ip: str, dst_port: int) -> str | None:
        self.destinations.append((dst_ip, dst_port))
        return "default/web:80/TCP"

    def choose(self, service: str, client_ip: str, tried: frozenset[Backend]) -> Backend | None:
        return None if tried else self.backend

    def dial_failed(self, service: str, backend: Backend, client_ip: str) -> None:
        pass

    def connection_opened(
        self, service: str, backend: Backend, connect_seconds: float | None = None
    ) -> None:
        pass

    def first_response(self, *args: object) -> None:
        pass

    def response_started(self, service: str, backend: Backend) -> None:
        pass

    def request_started(self, service: str, backend: Backend) -> None:
        pass

    def connection_closed(self, service: str, backend: Backend, awaiting: bool = True) -> None:
        pass


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write((await reader.read(100)).upper())
    await writer.drain()
    writer.close()


@pytest.mark.parametrize(
    ("family", "cidr", "cluster_ip"),
    [
        (socket.AF_INET, "10.96.0.0/16", "10.96.0.10"),
        (socket.AF_INET6, "fd00:96::/112", "fd00:96::10"),
    ],
)
async def test_redirected_client_is_routed_by_its_original_destination(
    netns: Namespace, family: int, cidr: str, cluster_ip: str
) -> None:
    backend_server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    backend = Backend("127.0.0.1", backend_server.sockets[0].getsockname()[1])
    selector = Recording(backend)
    await netns.add_local_route(cidr)
    listener = netns.socket(family, socket.SOCK_STREAM)
    listener.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
    host, port = listener.getsockname()[:2]
    server = NativeTcpRelayServer(selector, destination=intercepted_destination)
    await server.start([(host, port)], inherited={(host, port): listener})
    client = netns.socket(family, socket.SOCK_STREAM)
    try:
        runner = IptablesRunner(
            tools_for(
                await detect_backend(netns.exec_prefix), 6 if family == socket.AF_INET6 else 4
            ),
            exec_prefix=netns.exec_prefix,
        )
        service = ServicePort(
            name=ServicePortName("default", "web", "p", L4Protocol.TCP),
            port=80,
            target_port=8080,
            cluster_ips=(cluster_ip,),
        )
        await runner.sync([RedirectTarget(service, port)], RuleConfig())
        loop = asyncio.get_running_loop()
        client.setblocking(False)
        async with asyncio.timeout(5):
            await loop.sock_connect(client, (cluster_ip, 80))
            await loop.sock_sendall(client, b"ping")
            assert await loop.sock_recv(client, 16) == b"PING"
        assert selector.destinations == [(cluster_ip, 80)]
        await runner.cleanup()
    finally:
        client.close()
        await server.aclose()
        backend_server.close()
