"""`rapproxy run`: wire the sources, the proxier, the sync runner and the HTTP servers together.

Every long-lived task lives in one TaskGroup; SIGTERM or SIGINT cancels the group, and the
shutdown path closes listeners and relays. Rules are deliberately left in place on exit, as
kube-proxy leaves its rules: a DaemonSet rollout replaces this process within seconds, and its
startup rewrites the chains whole. `rapproxy cleanup` is the way to remove them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rapproxy.cluster.static import Objects, StaticSource
from rapproxy.config import RapproxyConfiguration, parse_host_port
from rapproxy.http.server import HttpServer, health_app, metrics_app
from rapproxy.rules.apply import IptablesRunner
from rapproxy.rules.backend import detect_backend, tools_for
from rapproxy.sync.proxier import Proxier
from rapproxy.sync.runner import BoundedRunner, RunnerTimings

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The daemon cannot start; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class RunOptions:
    objects: Sequence[Path] = ()
    intercept: bool = True
    netns: str | None = None
    exec_prefix: tuple[str, ...] = field(default_factory=tuple)


def node_name_for(config: RapproxyConfiguration) -> str:
    return config.hostname_override or os.environ.get("NODE_NAME") or socket.gethostname()


async def iptables_runners(exec_prefix: Sequence[str] = ()) -> list[IptablesRunner]:
    """One runner per address family this host can program, on the backend in use."""
    backend = await detect_backend(exec_prefix)
    runners = [IptablesRunner(tools_for(backend, 4), exec_prefix=exec_prefix)]
    if shutil.which(tools_for(backend, 6).restore) and socket.has_ipv6:
        runners.append(IptablesRunner(tools_for(backend, 6), exec_prefix=exec_prefix))
    return runners


async def run(config: RapproxyConfiguration, options: RunOptions) -> None:
    if not options.objects:
        raise StartupError(
            "no source of Services: give --objects FILE... (Kubernetes YAML). Following a live "
            "API server (--kubeconfig / in-cluster) is not implemented in this version."
        )
    node_name = node_name_for(config)
    runners = await iptables_runners(options.exec_prefix) if options.intercept else []
    proxier = Proxier(config, node_name, iptables=runners, netns=options.netns)
    runner = BoundedRunner(
        "proxy-rules",
        proxier.sync,
        RunnerTimings(
            min_interval=config.iptables.min_sync_period,
            max_interval=config.iptables.sync_period,
            retry_interval=config.iptables.retry_period,
        ),
    )

    def apply_objects(objects: Objects) -> None:
        proxier.tracker.replace_all(objects.services, objects.slices)
        proxier.note_change()
        runner.request()

    source = StaticSource(list(options.objects), apply_objects)
    health_host, health_port = parse_host_port(config.healthz_bind_address, "healthzBindAddress")
    metrics_host, metrics_port = parse_host_port(config.metrics_bind_address, "metricsBindAddress")
    health_server = HttpServer(health_app(proxier.health), health_host, health_port)
    metrics_server = HttpServer(
        metrics_app(proxier.metrics, proxier.describe), metrics_host, metrics_port
    )

    await proxier.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await health_server.start()
        await metrics_server.start()
        log.info(
            "rapproxy on node %s: TCP %s, health %s, metrics %s, %d objects file(s), interception %s",
            node_name,
            ", ".join(f"{h}:{p}" for h, p in proxier.tcp.addresses),
            health_server.url,
            metrics_server.url,
            len(options.objects),
            "iptables " + ",".join(f"v{r.family}" for r in runners) if runners else "off",
        )
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(runner.run_forever(), name="sync-runner")
            tasks.create_task(source.run(), name="objects-source")
            await stop.wait()
            log.info("shutting down")
            raise _Shutdown
    except* _Shutdown:
        pass
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
        await metrics_server.aclose()
        await health_server.aclose()
        await proxier.aclose()


class _Shutdown(Exception):
    """Raised inside the TaskGroup to cancel every task on a signal."""


async def cleanup(exec_prefix: Sequence[str] = ()) -> int:
    """Remove every rapproxy chain and jump; returns how many families had something."""
    removed = 0
    for runner in await iptables_runners(exec_prefix):
        if await runner.cleanup():
            removed += 1
    return removed
