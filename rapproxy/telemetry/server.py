"""`GET /rap/v1/telemetry`: this node's figures for its peers, guarded against fake figures.

RAP sends traffic where the figures say there is room, so whoever can feed figures can attract
traffic. Two checks stand in front of the handler (design §3.5):

* the source address must be a cluster node's IP (an allowlist callback fed by the Node informer)
  — otherwise **403**;
* the request must carry `Authorization: Bearer <token>`, the shared token from a mounted Secret
  — otherwise **401** (compared in constant time).

The source check runs first, so a pod learns nothing about the token scheme. Errors are JSON
`{"error": ..., "reason": ...}`. The handler only reads the latest sample and the proxy's
counters; it never measures anything itself, so a slow probe cannot slow the peers' RTT samples.

The handler is added to an `aiohttp.web.Application` the daemon owns (`add_routes`), so it can
share the node-IP listener with other endpoints or have its own.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from aiohttp import web

from rapproxy.model.telemetry import NodeStats, node_stats_to_json

TELEMETRY_PATH = "/rap/v1/telemetry"

Clock = Callable[[], float]


class TokenError(ValueError):
    """The token file is missing or empty; the telemetry endpoint refuses to run without one."""


class TokenFile:
    """A shared token kept in a file (a mounted Secret), re-read when the file changes.

    Kubernetes updates mounted Secrets by swapping a symlink, so the file's identity and mtime are
    checked on each use (one `stat`) and the token is re-read only when they change.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""
        self.current()

    def current(self) -> str:
        try:
            st = self.path.stat()
        except OSError as error:
            if self._token:
                return self._token  # keep the last good token through a Secret swap
            raise TokenError(f"telemetry token file {self.path}: {error.strerror}") from error
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            token = self.path.read_text().strip()
            if not token:
                raise TokenError(f"telemetry token file {self.path}: empty")
            self._token, self._stamp = token, stamp
        return self._token


def _normalize(address: str | None) -> str | None:
    if address is None:
        return None
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _error(status: int, error: str, reason: str, **headers: str) -> web.Response:
    return web.json_response({"error": error, "reason": reason}, status=status, headers=headers)


class TelemetryEndpoint:
    """The handler: allowlist, token, then the latest sample as JSON.

    `stats` returns the latest `NodeStats` (None before the first sample → 503);
    `active_connections` maps `ip:port` to this proxy's open connections;
    `is_node_ip` says whether a source address belongs to a cluster node;
    `token` returns the current shared token (e.g. `TokenFile(path).current`).
    """

    def __init__(
        self,
        stats: Callable[[], NodeStats | None],
        active_connections: Callable[[], Mapping[str, int]],
        token: Callable[[], str],
        is_node_ip: Callable[[str], bool],
        clock: Clock = time.monotonic,
    ) -> None:
        self._stats = stats
        self._active = active_connections
        self._token = token
        self._is_node_ip = is_node_ip
        self._clock = clock
        self.refused: dict[int, int] = {401: 0, 403: 0}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(TELEMETRY_PATH, self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        source = _normalize(request.remote)
        if source is None or not self._is_node_ip(source):
            self.refused[403] += 1
            return _error(403, "forbidden", f"source {request.remote} is not a cluster node")
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            self.refused[401] += 1
            return _error(
                401, "unauthorized", "missing bearer token", **{"WWW-Authenticate": "Bearer"}
            )
        expected = self._token()
        if not hmac.compare_digest(presented.strip().encode(), expected.encode()):
            self.refused[401] += 1
            return _error(401, "unauthorized", "invalid token", **{"WWW-Authenticate": "Bearer"})
        stats = self._stats()
        if stats is None:
            return _error(503, "unavailable", "no sample yet")
        return web.json_response(node_stats_to_json(stats, self._clock(), self._active()))


def telemetry_app(endpoint: TelemetryEndpoint) -> web.Application:
    """A stand-alone application serving only the telemetry endpoint."""
    app = web.Application()
    endpoint.add_routes(app)
    return app
