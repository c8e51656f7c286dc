"""`EmulatedApiServer`: the emulated kube-apiserver as one object tests can hold.

Owns the listening socket (plain HTTP on loopback), the `Store`/`Registry` behind it, the
garbage collector task and, optionally, a small control plane (scheduler, EndpointSlice
controller, one status-only kubelet per node). It also exposes the fault-injection knobs
(dropping watches, failing requests, latency, compaction) and stop/start on the same port with
the state kept, so tests can play "the API server restarted".
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

from rapproxy.testing.apiserver.controlplane import ControlPlane, KubeletConfig, PodRuntime
from rapproxy.testing.apiserver.gc import GarbageCollector
from rapproxy.testing.apiserver.handlers import ApiHandlers, Faults
from rapproxy.testing.apiserver.registry import Registry
from rapproxy.testing.apiserver.store import DEFAULT_HISTORY_SIZE, Store


class EmulatedApiServer:
    """An in-process Kubernetes API server speaking the real REST/watch protocol.

    Usage::

        async with EmulatedApiServer(nodes=["node-a"]) as api:
            kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
            ...  # kubernetes-asyncio / kubectl against api.url
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        history_size: int = DEFAULT_HISTORY_SIZE,
        bookmark_interval: float = 60.0,
        nodes: Sequence[str | KubeletConfig] = (),
        control_plane: bool | None = None,
        heartbeat_interval: float = 10.0,
        gc_delay: float = 0.05,
        runtime_factory: Callable[[str], PodRuntime] | None = None,
        store: Store | None = None,
        socket_factory: Callable[[], socket.socket] | None = None,
    ) -> None:
        # `socket_factory` makes the listening socket (unbound): e.g. `Namespace.socket`, so a
        # daemon inside a test network namespace can reach an API server run by the test.
        self._socket_factory = socket_factory or (
            lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        )
        self.host = host
        self.port = port
        self.store = store or Store(history_size=history_size)
        self.registry = Registry(self.store)
        self.faults = Faults()
        self.handlers = ApiHandlers(
            self.registry,
            self.faults,
            bookmark_interval=bookmark_interval,
            server_address=lambda: f"{self.host}:{self.port}",
        )
        self.gc = GarbageCollector(self.registry, delay=gc_delay)
        run_control_plane = bool(nodes) if control_plane is None else control_plane
        self.control_plane: ControlPlane | None = (
            ControlPlane(
                self.registry,
                nodes=list(nodes),
                heartbeat_interval=heartbeat_interval,
                runtime_factory=runtime_factory,
            )
            if run_control_plane
            else None
        )
        self._runner: web.AppRunner | None = None

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        """Listen (again) on the same port; first start picks a free port if port=0."""
        if self._runner is not None:
            return
        runner = web.AppRunner(self.handlers.app(), access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        sock = self._socket_factory()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        site = web.SockSite(runner, sock)
        await site.start()
        self._runner = runner
        self.gc.start()
        if self.control_plane is not None:
            await self.control_plane.start()

    async def stop(self) -> None:
        """Close the socket and every open watch; the state stays for a later start()."""
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        if self.control_plane is not None:
            await self.control_plane.stop()
        await self.gc.stop()
        self.store.drop_watches()
        await runner.cleanup()

    async def __aenter__(self) -> EmulatedApiServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- fault injection ------------------------------------------------------------------
    def drop_watches(self) -> int:
        """End every open watch stream now (clients see a clean end of the body)."""
        return self.store.drop_watches()

    def fail_next(self, count: int, status: int = 500) -> None:
        """Answer the next `count` requests with `status` (500 InternalError or 429)."""
        self.faults.fail_remaining = count
        self.faults.fail_status = status

    def set_latency(self, seconds: float) -> None:
        """Delay every request by `seconds` before it is handled."""
        self.faults.latency = seconds

    def compact(self) -> None:
        """Forget all history: watches and exact lists from older versions get 410."""
        self.store.compact()

    # -- client configuration -------------------------------------------------------------
    def kubeconfig(self, namespace: str = "default") -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulated", "cluster": {"server": self.url}}],
            "users": [{"name": "emulated", "user": {"token": "emulated"}}],
            "contexts": [
                {
                    "name": "emulated",
                    "context": {"cluster": "emulated", "user": "emulated", "namespace": namespace},
                }
            ],
            "current-context": "emulated",
            "preferences": {},
        }

    def write_kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        """Write a kubeconfig usable by kubernetes-asyncio and kubectl (JSON is valid YAML)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.kubeconfig(namespace), indent=2))
        return target
