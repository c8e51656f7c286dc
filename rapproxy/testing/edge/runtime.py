"""The emulated kubelet's process runtime: each pod's containers as real processes on its node.

Plugged into the emulated control plane as its `PodRuntime` (one per node, e.g.
`EmulatedApiServer(nodes=cluster.kubelet_configs(), runtime_factory=cluster.runtime_for)`).
For each pod the kubelet binds to the node, `start_pod`:

1. adds the pod's IP (allocated by the kubelet from the node's pod CIDR) as a /32 on the node
   namespace's loopback — pods share their node's network namespace (as host-network pods would)
   and get their own address, which is cheap (no namespace per pod) and routed across the WAN
   because the router sends the node's whole pod CIDR to it. A pod's server should bind
   `$(POD_IP)`: two pods on one node binding 0.0.0.0 to the same port would collide, and so
   would a pod and the node's rapproxy. Outgoing connections leave from the node's address
   unless the process binds its pod IP first;
2. runs the init containers one after another, each to completion (a failed one is retried
   with back-off, or fails the pod under `restartPolicy: Never`), reporting progress — so a cold
   backup's `rapproxy bps-wait` init container really holds the pod Pending until activated;
3. starts the main containers, reports Running, and Ready once every container's readiness
   probe passes (a running container without a probe is ready at once);
4. restarts exited containers per `restartPolicy` with a doubling back-off, or reports
   Succeeded/Failed with the exit code.

Every container is its own process group, started inside the node's cgroup and network
namespace (`PodHost.spawn`). `stop_pod` sends SIGTERM to every group, SIGKILL after the grace
period, then removes the pod's address. Output goes to one log file per container in `log_dir`.
How command, env and probes are read from the spec is `podspec.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rapproxy.testing.apiserver.controlplane import PodHandle, PodReport, StatusReport
from rapproxy.testing.edge.podspec import (
    ContainerPlan,
    InvalidPodSpec,
    PodPlan,
    ProbeSpec,
    backoff_seconds,
    pod_plan,
    should_restart,
    should_retry_init,
)

JsonObject = dict[str, Any]
log = logging.getLogger(__name__)
_KILL_WAIT_SECONDS = 5.0


class PodHost(Protocol):
    """What the runtime needs from a node (an `EdgeNode` is one)."""

    name: str

    @property
    def ip(self) -> str: ...

    async def spawn(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdout: Any = None,
        stderr: Any = None,
        start_new_session: bool = False,
    ) -> asyncio.subprocess.Process: ...

    async def add_pod_address(self, ip: str) -> None: ...

    async def remove_pod_address(self, ip: str) -> None: ...

    def socket(self, family: int = ..., type: int = ...) -> socket.socket: ...


@dataclass(eq=False, slots=True)
class ProcessPodHandle:
    """A running pod: its supervisor task and each container's current process."""

    namespace: str
    name: str
    uid: str
    pod_ip: str
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    address_added: bool = False
    failure: str = ""  # why the pod could not run (the kubelet's status has no room for it)


class _Status:
    """Aggregates container states into the pod's report, sent only when it changes."""

    def __init__(self, report: StatusReport, inits: int, mains: int) -> None:
        self._report = report
        self.inits_done = 0
        self.inits = inits
        self.phase = "Pending"
        self.ready: dict[int, bool] = dict.fromkeys(range(mains), False)
        self.exit_code: int | None = None
        self.message = ""
        self.restarts = 0  # the main containers'
        # The current init container: its restarts, last failed exit, and whether the runtime
        # is backing off before starting it again (CrashLoopBackOff in the status).
        self.init_restarts = 0
        self.init_exit_code: int | None = None
        self.init_backoff: float | None = None
        self._last: PodReport | None = None

    async def publish(self) -> None:
        current = PodReport(
            self.phase,
            ready=self.phase == "Running" and all(self.ready.values()),
            init_containers_done=self.inits_done,
            restart_count=self.restarts,
            exit_code=self.exit_code,
            message=self.message,
            init_restarts=self.init_restarts,
            init_exit_code=self.init_exit_code,
            init_backoff=self.init_backoff is not None,
            backoff_seconds=self.init_backoff or 0.0,
        )
        if current != self._last:
            self._last = current
            await self._report(current)


class ProcessRuntime:
    """`PodRuntime` running pods as processes on one emulated node."""

    def __init__(
        self,
        node: PodHost,
        *,
        log_dir: Path,
        probe_period: float | None = None,
        backoff_base: float = 0.2,
        backoff_cap: float = 5.0,
        interpreter: str = sys.executable,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.node = node
        self.log_dir = log_dir
        self.probe_period = probe_period
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.interpreter = interpreter
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.pods: set[ProcessPodHandle] = set()

    # -- PodRuntime ---------------------------------------------------------------------------

    async def start_pod(self, pod: JsonObject, pod_ip: str, report: StatusReport) -> PodHandle:
        metadata = pod["metadata"]
        handle = ProcessPodHandle(metadata["namespace"], metadata["name"], metadata["uid"], pod_ip)
        self.pods.add(handle)
        try:
            plan = pod_plan(
                pod,
                pod_ip=pod_ip,
                host_ip=self.node.ip,
                base_env=self.base_env,
                interpreter=self.interpreter,
                probe_period=self.probe_period,
            )
        except InvalidPodSpec as error:
            handle.failure = str(error)
            await report(PodReport("Failed", ready=False, exit_code=128, message=str(error)))
            return handle
        handle.task = asyncio.get_running_loop().create_task(
            self._supervise(handle, plan, report),
            name=f"pod-{self.node.name}-{handle.namespace}/{handle.name}",
        )
        return handle

    async def stop_pod(self, handle: PodHandle, grace_seconds: float) -> None:
        assert isinstance(handle, ProcessPodHandle)
        if handle.task is not None and not handle.task.done():
            handle.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handle.task
        await self._terminate(list(handle.processes.values()), grace_seconds)
        if handle.address_added:
            handle.address_added = False
            with contextlib.suppress(Exception):
                await self.node.remove_pod_address(handle.pod_ip)
        self.pods.discard(handle)

    async def aclose(self, grace_seconds: float = 1.0) -> None:
        """Stop every pod still running here (the cluster's teardown calls it)."""
        for handle in list(self.pods):
            await self.stop_pod(handle, grace_seconds)

    # -- supervision ----------------------------------------------------------------------------

    async def _supervise(
        self, handle: ProcessPodHandle, plan: PodPlan, report: StatusReport
    ) -> None:
        status = _Status(report, len(plan.init), len(plan.main))
        try:
            await self.node.add_pod_address(handle.pod_ip)
            handle.address_added = True
            for container in plan.init:
                if not await self._run_init(handle, plan, container, status):
                    return
                status.inits_done += 1
                status.init_restarts, status.init_exit_code = 0, None
                await status.publish()
            status.phase = "Running"
            await status.publish()
            codes = await asyncio.gather(
                *(
                    self._run_main(handle, plan, i, container, status)
                    for i, container in enumerate(plan.main)
                )
            )
            failed = [code for code in codes if code != 0]
            status.exit_code = failed[0] if failed else 0
            status.phase = "Failed" if failed else "Succeeded"
            await status.publish()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a pod that cannot start says why, in its status
            log.exception(
                "pod %s/%s on %s failed to run", handle.namespace, handle.name, self.node.name
            )
            status.phase, status.message, status.exit_code = "Failed", str(error), 128
            handle.failure = str(error)
            await status.publish()

    async def _run_init(
        self, handle: ProcessPodHandle, plan: PodPlan, container: ContainerPlan, status: _Status
    ) -> bool:
        while True:
            process = await self._spawn(handle, container)
            status.init_backoff = None
            await status.publish()  # running (again)
            code = await process.wait()
            if code == 0:
                return True
            status.init_exit_code = code
            if not should_retry_init(plan.restart_policy):
                status.phase, status.exit_code = "Failed", code
                status.message = f"init container {container.name} exited with {code}"
                handle.failure = status.message
                await status.publish()
                return False
            delay = backoff_seconds(status.init_restarts, self.backoff_base, self.backoff_cap)
            status.init_backoff = delay
            await status.publish()
            await asyncio.sleep(delay)
            status.init_restarts += 1

    async def _run_main(
        self,
        handle: ProcessPodHandle,
        plan: PodPlan,
        index: int,
        container: ContainerPlan,
        status: _Status,
    ) -> int:
        attempts = 0
        while True:
            process = await self._spawn(handle, container)
            readiness = asyncio.get_running_loop().create_task(
                self._track_readiness(process, container, index, status)
            )
            try:
                code = await process.wait()
            finally:
                await cancel_and_wait(readiness)
            status.ready[index] = False
            if not should_restart(plan.restart_policy, code):
                await status.publish()
                return code
            status.restarts += 1
            await status.publish()
            await asyncio.sleep(backoff_seconds(attempts, self.backoff_base, self.backoff_cap))
            attempts += 1

    async def _track_readiness(
        self,
        process: asyncio.subprocess.Process,
        container: ContainerPlan,
        index: int,
        status: _Status,
    ) -> None:
        probe = container.readiness
        if probe is None:
            status.ready[index] = True
            await status.publish()
            return
        await asyncio.sleep(probe.initial_delay)
        successes = failures = 0
        while process.returncode is None:
            if await self._probe(probe):
                successes, failures = successes + 1, 0
                if not status.ready[index] and successes >= probe.success_threshold:
                    status.ready[index] = True
                    await status.publish()
            else:
                successes, failures = 0, failures + 1
                if status.ready[index] and failures >= probe.failure_threshold:
                    status.ready[index] = False
                    await status.publish()
            await asyncio.sleep(probe.period)  # the probe's own cadence

    async def _probe(self, probe: ProbeSpec) -> bool:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives as the probe completes, and the readiness loop then never ended (a test's
        # teardown hung on it under load).
        try:
            async with asyncio.timeout(probe.timeout):
                return await self._probe_once(probe)
        except (OSError, TimeoutError, ValueError):
            return False

    async def _probe_once(self, probe: ProbeSpec) -> bool:
        if probe.kind == "exec":
            process = await self.node.spawn(
                list(probe.command),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                return await process.wait() == 0
            finally:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    await process.wait()
        loop = asyncio.get_running_loop()
        sock = self.node.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        with sock:
            await loop.sock_connect(sock, (probe.host, probe.port))
            if probe.kind == "tcp":
                return True
            request = (
                f"GET {probe.path} HTTP/1.1\r\nHost: {probe.host}:{probe.port}\r\n"
                "User-Agent: kube-probe/1.28\r\nConnection: close\r\n\r\n"
            )
            await loop.sock_sendall(sock, request.encode())
            head = await loop.sock_recv(sock, 4096)
            parts = head.split(b" ", 2)
            return len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400

    # -- processes -----------------------------------------------------------------------------

    async def _spawn(
        self, handle: ProcessPodHandle, container: ContainerPlan
    ) -> asyncio.subprocess.Process:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / f"{handle.namespace}_{handle.name}_{container.name}.log"
        with path.open("ab") as output:
            process = await self.node.spawn(
                list(container.argv),
                env=container.env,
                cwd=container.cwd,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        handle.processes[container.name] = process
        return process

    async def _terminate(
        self, processes: list[asyncio.subprocess.Process], grace_seconds: float
    ) -> None:
        live = [p for p in processes if p.returncode is None]
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        if live:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(p.wait() for p in live)), max(0.0, grace_seconds)
                )
        for process in live:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        for process in live:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), _KILL_WAIT_SECONDS)


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait until it has ended, cancelling again if it swallowed the first.

    A task may survive one cancel (a cancellation caught by wait_for as its inner awaitable
    completes, on 3.11); awaiting it once would then wait for as long as it runs.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    if not task.cancelled():
        task.result()  # an error of its own still surfaces, as awaiting it did
