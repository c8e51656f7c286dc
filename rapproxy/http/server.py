"""The daemon's two HTTP servers (aiohttp), like kube-proxy's.

* health server (`healthzBindAddress`, default 0.0.0.0:10256): `/healthz`, `/livez`, and
  RAP's `/rap/v1/telemetry` for peers — it listens on the node IP, where peers reach it;
* metrics server (`metricsBindAddress`, default 127.0.0.1:10249): `/metrics` and
  `/debug/state` — local only by default, because debug state names clients' services.

Each server owns an `AppRunner`; `aclose()` stops it. Handlers only read snapshots.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rapproxy.http.health import HealthState
from rapproxy.http.metrics import ProxyMetrics

Route = tuple[str, str, Callable[[web.Request], Any]]  # (method, path, handler)


class HttpServer:
    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        self._site: web.BaseSite | None = None

    async def start(self, inherited: socket.socket | None = None) -> None:
        """Listen on host:port, or serve `inherited`, a predecessor's listening socket for it.

        A fresh bind sets SO_REUSEPORT, so that a successor that could not take the socket over
        (see `rapproxy.dataplane.handover`) can still bind beside this one.
        """
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site: web.BaseSite
        if inherited is not None:
            inherited.setblocking(False)
            site = web.SockSite(self._runner, inherited)
        else:
            site = web.TCPSite(
                self._runner, self.host, self.port, reuse_address=True, reuse_port=True
            )
        self._site = site
        await self._site.start()
        if self.port == 0:
            server = self._site._server  # the bound port is only known here
            sockets = getattr(server, "sockets", None) or []
            if sockets:
                self.port = sockets[0].getsockname()[1]

    def listening_descriptor(self) -> int | None:
        """The listening socket's descriptor while serving, for a handover."""
        server = self._site._server if self._site is not None else None
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].fileno()) if sockets else None

    def stop_listening(self) -> None:
        """Close the listener (a successor holding the same socket keeps serving it)."""
        server = self._site._server if self._site is not None else None
        if server is not None:
            server.close()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def health_app(health: HealthState, extra_routes: list[Route] | None = None) -> web.Application:
    async def healthz(_request: web.Request) -> web.Response:
        status, body = health.verdict(time.time(), check_node=True)
        return web.json_response(body, status=status)

    async def livez(_request: web.Request) -> web.Response:
        status, body = health.verdict(time.time(), check_node=False)
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", livez)
    for method, path, handler in extra_routes or []:
        app.router.add_route(method, path, handler)
    return app


def metrics_app(
    metrics: ProxyMetrics, debug_state: Callable[[], dict[str, Any]]
) -> web.Application:
    async def serve_metrics(_request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        response = web.Response(body=body)
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        response.charset = "utf-8"
        return response

    async def serve_debug_state(_request: web.Request) -> web.Response:
        return web.json_response(
            debug_state(), dumps=lambda o: json.dumps(o, indent=2, sort_keys=True, default=str)
        )

    app = web.Application()
    app.router.add_get("/metrics", serve_metrics)
    app.router.add_get("/debug/state", serve_debug_state)
    return app
