"""`rapproxy run`: wire the sources, the proxier, the sync runner and the HTTP servers together.

Every long-lived task lives in one TaskGroup. SIGTERM or SIGINT starts a drain: the listeners
close at once (no new connections here), the group is cancelled (informers, syncs, the BPS Lease
is released), and the relays already open may finish for up to `proxy.drainTimeout` seconds before
the rest are reset; a second signal ends the drain early. Rules are deliberately left in place on
exit, as kube-proxy leaves its rules: a DaemonSet rollout replaces this process, and its startup
rewrites the chains whole. `rapproxy cleanup` is the way to remove them.

Rolling updates lose nothing because a starting instance first takes the listening sockets over
from the running one (`dataplane.handover`, SCM_RIGHTS as in HAProxy's seamless reload): both then
accept from the same queues, and the old one's drain closes only its own descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import shutil
import signal
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rapproxy.bps.controller import default_identity, run_controller
from rapproxy.cluster.client import ENDPOINT_SLICES, NODES, SERVICES, ClientSettings, KubeClient
from rapproxy.cluster.informer import Callbacks, Informer
from rapproxy.cluster.static import Objects, StaticSource
from rapproxy.config import (
    KernelBackend,
    RapproxyConfiguration,
    handover_address,
    parse_host_port,
)
from rapproxy.dataplane.handover import HandoverServer, listener_name, take_over
from rapproxy.http.server import HttpServer, health_app, metrics_app
from rapproxy.model.service import LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME
from rapproxy.rules.apply import IptablesRunner
from rapproxy.rules.backend import detect_backend, tools_for
from rapproxy.rules.nft_apply import NftRunner
from rapproxy.sync.proxier import Proxier
from rapproxy.sync.runner import BoundedRunner, RunnerTimings
from rapproxy.telemetry.runtime import RapRuntime
from rapproxy.workers import WorkerPool, resolve_count

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


def nft_runners(
    config: RapproxyConfiguration,
    iptables: Sequence[IptablesRunner],
    exec_prefix: Sequence[str] = (),
) -> list[NftRunner]:
    """Kernel mode's nft runners (one per family iptables programs), when configured."""
    if config.dataplane.kernel_backend is not KernelBackend.NFTABLES:
        return []
    if shutil.which("nft") is None:
        raise StartupError("dataplane.kernelBackend: nftables needs the nft command (nftables)")
    return [NftRunner(runner.family, exec_prefix=exec_prefix) for runner in iptables]


def raise_fd_limit(max_connections: int) -> int:
    """Each relayed connection holds two descriptors; lift the soft limit to fit the cap.

    Returns the soft limit in force. Never above the hard limit: when that is too low for the
    configured cap, say so once, since the symptom (EMFILE on accept) is otherwise puzzling.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * max_connections + 1024
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < wanted:
        log.warning(
            "open-file limit %d is below the %d that proxy.maxConnections=%d needs",
            soft,
            wanted,
            max_connections,
        )
    return soft


async def run(config: RapproxyConfiguration, options: RunOptions) -> None:
    node_name = node_name_for(config)
    raise_fd_limit(config.proxy.max_connections)
    runners = await iptables_runners(options.exec_prefix) if options.intercept else []
    rap = RapRuntime(config, node_name)
    proxier = Proxier(
        config,
        node_name,
        iptables=runners,
        nftables=nft_runners(config, runners, options.exec_prefix),
        netns=options.netns,
        policy_factory=rap.policy_factory,
        telemetry=rap.tracker.snapshot,
        rap_settings=rap.settings,
    )
    proxier.extra_state["rap"] = rap.describe
    rap.tracker.on_change.append(proxier.telemetry_changed)
    runner = BoundedRunner(
        "proxy-rules",
        proxier.sync,
        RunnerTimings(
            min_interval=config.iptables.min_sync_period,
            max_interval=config.iptables.sync_period,
            retry_interval=config.iptables.retry_period,
        ),
    )

    proxier.request_sync = runner.request
    pool: WorkerPool | None = None  # the relay workers beyond this process, once listening
    loaded: list[Objects] = []  # the static source's latest load, for a pool made after it

    def changed() -> None:
        proxier.note_change()
        runner.request()

    def apply_objects(objects: Objects) -> None:
        proxier.tracker.replace_all(objects.services, objects.slices)
        loaded[:] = [objects]
        if pool is not None:
            pool.replace_all(objects.services, objects.slices)
        rap.nodes.replace_all(objects.nodes)
        changed()

    client: KubeClient | None = None
    sources: list[Callable[[], Coroutine[Any, Any, None]]] = []
    ready: list[asyncio.Event] = []
    if options.objects:
        source = StaticSource(list(options.objects), apply_objects)
        source.load_changed()  # the first load is synchronous: rules start from the files' state
        sources.append(source.run)
    else:
        client = await KubeClient.connect(
            ClientSettings(
                config.client_connection.kubeconfig,
                config.client_connection.context,
                config.client_connection.request_timeout,
            )
        )
        for informer in proxy_informers(client, proxier, config, changed, lambda: pool):
            sources.append(informer.run)
            ready.append(informer.synced)
        nodes = Informer(
            client,
            NODES,
            Callbacks(rap.nodes.upsert, rap.nodes.delete, rap.nodes.listed.set),
            relist_period=config.config_sync_period,
        )
        sources.append(nodes.run)
    sources.extend(rap.tasks())

    health_host, health_port = parse_host_port(config.healthz_bind_address, "healthzBindAddress")
    metrics_host, metrics_port = parse_host_port(config.metrics_bind_address, "metricsBindAddress")
    health_server = HttpServer(
        health_app(proxier.health, rap.routes(proxier.balancer.active_connection_counts)),
        health_host,
        health_port,
    )
    metrics_server = HttpServer(
        metrics_app(proxier.metrics, proxier.describe), metrics_host, metrics_port
    )

    handover_at = handover_address(config.proxy)
    inherited = await asyncio.to_thread(take_over, handover_at) if handover_at else {}
    if inherited:
        log.info("took over %d listening socket(s): %s", len(inherited), sorted(inherited))
    listen = (config.proxy.listen_address, config.proxy.tcp_port)
    tcp_inherited = inherited.pop(listener_name("tcp", *listen), None)
    health_inherited = inherited.pop(listener_name("healthz", health_host, health_port), None)
    metrics_inherited = inherited.pop(listener_name("metrics", metrics_host, metrics_port), None)
    udp_inherited = {n: inherited.pop(n) for n in list(inherited) if n.startswith("udp ")}
    for name, unused in inherited.items():
        log.info("not using the handed-over %s: this configuration does not listen there", name)
        unused.close()

    def offer() -> dict[str, int]:
        offered = proxier.listening_descriptors()
        for kind, server in (("healthz", health_server), ("metrics", metrics_server)):
            fd = server.listening_descriptor()
            if fd is not None:
                offered[listener_name(kind, server.host, server.port)] = fd
        return offered

    handover = HandoverServer(handover_at, offer) if handover_at else None

    def stop_serving() -> None:
        """Drain, step one: take no new connection; a successor holding the sockets takes them."""
        proxier.stop_accepting()
        health_server.stop_listening()
        metrics_server.stop_listening()

    stop = asyncio.Event()
    cut_drain = asyncio.Event()  # a second signal ends the drain at once

    def signalled() -> None:
        if stop.is_set():
            cut_drain.set()
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signalled)
    try:
        # A listener taken over is shared with the predecessor, which keeps serving it: accept
        # only once the first sync has given the balancer its Services, or the connections
        # accepted meanwhile would find nothing to route to and be reset.
        await proxier.start(
            inherited={listen: tcp_inherited} if tcp_inherited else None,
            inherited_udp=udp_inherited,
            accept=tcp_inherited is None,
        )
        workers = resolve_count(config.proxy.workers)
        if workers > 1:
            pool = WorkerPool(
                config,
                node_name,
                proxier.tcp.bound_descriptors(),
                workers - 1,
                rap.tracker,
                log_level=config.logging.level,
                log_format=config.logging.format,
            )
            for objects in loaded:
                pool.replace_all(objects.services, objects.slices)
            proxier.other_stats = pool.stats
            proxier.other_selections = pool.selections
            proxier.extra_state["workers"] = pool.describe
            pool.start()
        await health_server.start(health_inherited)
        await metrics_server.start(metrics_inherited)
        if handover is not None:
            await handover.start()
        log.info(
            "rapproxy on node %s: TCP %s, health %s, metrics %s, source %s, interception %s",
            node_name,
            ", ".join(f"{h}:{p}" for h, p in proxier.tcp.addresses),
            health_server.url,
            metrics_server.url,
            f"{len(options.objects)} objects file(s)"
            if options.objects
            else f"API {client.host}"
            if client
            else "?",
            "iptables " + ",".join(f"v{r.family}" for r in runners) if runners else "off",
        )
        async with asyncio.TaskGroup() as tasks:
            # First, so that collection is off before any list arrives.
            tasks.create_task(_freeze_after_first_sync(runner), name="gc-cold-start")
            for source_run in sources:
                tasks.create_task(source_run())
            tasks.create_task(_sync_when_ready(runner, ready), name="sync-runner")
            if tcp_inherited is not None:
                tasks.create_task(_accept_after_first_sync(runner, proxier), name="accept")
            tasks.create_task(proxier.run_weights(), name="kernel-weights")
            if client is not None and config.bps.enabled:
                # Leader-elected: every node campaigns, one reconciles; cancelling the group on
                # shutdown releases the Lease (before client.close() below) for a fast handover.
                tasks.create_task(
                    run_controller(
                        client, config.bps, default_identity(node_name), proxier.metrics.registry
                    ),
                    name="bps-controller",
                )
            await stop.wait()
            stop_serving()  # first, before the tasks' cancellation (the Lease release) runs
            log.info(
                "shutting down: no new connections; draining %d for up to %.0f s",
                proxier.tcp.active_connections,
                config.proxy.drain_timeout,
            )
            raise _Shutdown
    except* _Shutdown:
        pass
    finally:
        if handover is not None:
            await handover.aclose()
        stop_serving()
        drains = [_drain(proxier, config.proxy.drain_timeout, cut_drain)]
        if pool is not None:
            drains.append(pool.drain(config.proxy.drain_timeout, cut_drain))
        await asyncio.gather(*drains)
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
        await metrics_server.aclose()
        await health_server.aclose()
        await proxier.aclose()
        if client is not None:
            await client.close()


async def _drain(proxier: Proxier, seconds: float, cut: asyncio.Event) -> None:
    """Let the relays this process holds finish, for up to `seconds` or until `cut` is set.

    Rules are not touched: they send the node's traffic to the shared sockets, which a successor
    keeps serving. UDP service sockets stay open (not read) meanwhile, so the flows open here
    still get their replies until the drain ends.
    """
    if not proxier.tcp.active_connections:
        return
    started = time.monotonic()
    draining = asyncio.ensure_future(proxier.tcp.wait_drained())
    interrupted = asyncio.ensure_future(cut.wait())
    try:
        await asyncio.wait(
            {draining, interrupted}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        interrupted.cancel()
        draining.cancel()
        await asyncio.gather(draining, interrupted, return_exceptions=True)
    log.info(
        "drain ended after %.1f s%s: %d connection(s) left, reset",
        time.monotonic() - started,
        " (second signal)" if cut.is_set() else "",
        proxier.tcp.active_connections,
    )


async def _accept_after_first_sync(runner: BoundedRunner, proxier: Proxier) -> None:
    await runner.first_run_done.wait()
    await proxier.tcp.start_accepting()
    log.info("first sync done: accepting on the listener taken over")


async def _sync_when_ready(runner: BoundedRunner, ready: Sequence[asyncio.Event]) -> None:
    """Start syncing only once every informer has listed.

    Syncing earlier would render an empty table and remove every rule a previous instance left:
    a restart would black-hole all Services until the lists arrive.
    """
    for event in ready:
        await event.wait()
    await runner.run_forever()


# Longer than any cold start should take (10k Services: ~5 s); see _freeze_after_first_sync.
COLD_START_GC_WINDOW = 120.0


async def _freeze_after_first_sync(
    runner: BoundedRunner, window: float = COLD_START_GC_WINDOW
) -> None:
    """No cyclic garbage collection until the first sync has ended; then freeze what survived.

    The informers' first lists build the whole cluster in memory at once (10k Services with 50k
    endpoints are half a million objects) and nearly all of it lives as long as the process.
    While it is being built, every generation-2 collection walks everything built so far: in
    `benchmarks/scale/` that was about a second of the cold start in pauses of 0.1-0.5 s, all of
    it spent proving that live objects are live. Reference counting still frees what dies
    meanwhile; only reference cycles wait. `gc.freeze()` then moves the survivors out of the
    collector's sight, so later collections (which do run again) never pause the data plane to
    walk them. The price: cyclic garbage made meanwhile (a few request objects) is frozen too,
    and so is any cycle among the survivors that later becomes garbage: never collected. A
    `gc.collect()` first would walk the half million objects once more, on the event loop, right
    when the data plane starts serving; the snapshots are trees of frozen dataclasses, acyclic.

    If the first sync has not ended within `window` (an API server that does not answer, where
    every retry leaves an exception cycle behind), collection resumes as usual and nothing is
    frozen.
    """
    gc.disable()
    try:
        async with asyncio.timeout(window):
            await runner.first_run_done.wait()
    except TimeoutError:
        log.info("no first sync within %.0f s: garbage collection resumes unfrozen", window)
    else:
        gc.freeze()
    finally:
        gc.enable()


def service_label_selector(service_proxy_name: str) -> str:
    """kube-proxy's server-side filter for the Services a proxy instance handles."""
    if service_proxy_name:
        return f"{LABEL_SERVICE_PROXY_NAME}={service_proxy_name},!{LABEL_HEADLESS}"
    return f"!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}"


def proxy_informers(
    client: KubeClient,
    proxier: Proxier,
    config: RapproxyConfiguration,
    changed: Callable[[], None],
    workers: Callable[[], WorkerPool | None] = lambda: None,
) -> list[Informer]:
    """The Service and EndpointSlice informers; each event is recorded in the proxier's tracker
    and forwarded to the relay workers, if any (`workers()` is read per event: the pool starts
    after the informers are made)."""
    tracker = proxier.tracker

    def recorded(kind: str) -> Callable[[dict[str, Any]], None]:
        action: Callable[[dict[str, Any]], None] = getattr(tracker, kind)

        def handle(obj: dict[str, Any]) -> None:
            action(obj)
            pool = workers()
            if pool is not None:
                getattr(pool, kind)(obj)
            changed()

        return handle

    services = Informer(
        client,
        SERVICES,
        Callbacks(recorded("service_updated"), recorded("service_deleted")),
        label_selector=service_label_selector(config.service_proxy_name),
        relist_period=config.config_sync_period,
    )
    slices = Informer(
        client,
        ENDPOINT_SLICES,
        Callbacks(recorded("slice_updated"), recorded("slice_deleted")),
        relist_period=config.config_sync_period,
    )
    return [services, slices]


class _Shutdown(Exception):
    """Raised inside the TaskGroup to cancel every task on a signal."""


async def cleanup(exec_prefix: Sequence[str] = ()) -> int:
    """Remove every rapproxy chain, jump and nft table; returns how many tables had something."""
    removed = 0
    runners = await iptables_runners(exec_prefix)
    for runner in runners:
        if await runner.cleanup():
            removed += 1
    if shutil.which("nft") is not None:  # whatever the configured backend: everything goes
        for family in (4, 6):
            if await NftRunner(family, exec_prefix=exec_prefix).cleanup():
                removed += 1
    return removed
