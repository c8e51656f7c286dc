"""The status-only kubelet's default runtime: no processes, but cold backups stay cold.

Like KWOK, `StandInRuntime` runs nothing: init containers complete at once and the main
containers are Running and Ready (after `startup_delay`). One init container is different: a
cold backup's `rapproxy bps-wait` (any init container whose command runs `bps-wait`) must hold
its pod in `Init:i/n` until the BPS controller activates it, as it does on a real node, or the
emulator would show cold backups Running and Ready. So the stand-in runs the *real* waiter
(`serve_until_activated`): the same `POST /activate` with the pod's token as a Bearer credential
(read like the container would read it: its `RAPPROXY_ACTIVATION_TOKEN` env entry, a literal or
a downward-API annotation reference), the same 200-then-exit, the same `--timeout`.

Where it listens: the pod IPs of a status-only cluster are fiction (nothing routes 10.244.0.0/16),
so by default the waiter listens on `127.0.0.1` at a port of its own, and `target(bps, pod)`
maps a pod to that address — hand it to the controller as its `activation_target`
(`ControlPlane.activation_target` looks through every kubelet's runtime). With
`listen_on_pod_ip=True` it listens on the pod IP and the port from `--port`, for clusters whose
pod addresses are local (a loopback pod CIDR), where an unmodified controller reaches it.

A waiter that cannot run (no token: the real one exits 2) or times out (exits 1) fails like a
container: restarted with a doubling back-off under `restartPolicy` Always/OnFailure (the status
shows `Init:CrashLoopBackOff`), the pod Failed under `Never` (`Init:Error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rapproxy.bps.activation import (
    EXIT_TIMED_OUT,
    EXIT_USAGE,
    WaitTimedOut,
    serve_until_activated,
)
from rapproxy.model.bps import (
    DEFAULT_ACTIVATION_PORT,
    ENV_ACTIVATION_TOKEN,
    BackupPodSet,
    ObservedPod,
)
from rapproxy.testing.apiserver.controlplane.podstatus import PodReport
from rapproxy.testing.apiserver.controlplane.runtime import PodHandle, StatusReport

JsonObject = dict[str, Any]
WAITER_ARG = "bps-wait"
log = logging.getLogger(__name__)
_ANNOTATION_REF = re.compile(r"""^metadata\.annotations\[(['"])(.+)\1\]$""")


@dataclass(frozen=True, slots=True)
class WaiterArgs:
    """What the stand-in needs from a `bps-wait` command line."""

    port: int = DEFAULT_ACTIVATION_PORT
    timeout: float | None = None


def is_waiter(container: Mapping[str, Any]) -> bool:
    """An init container that runs `bps-wait` (as `rapproxy bps-wait` or `python -m ...`)."""
    return WAITER_ARG in _argv(container)


def _argv(container: Mapping[str, Any]) -> list[str]:
    return [str(a) for a in [*(container.get("command") or []), *(container.get("args") or [])]]


def waiter_args(container: Mapping[str, Any]) -> WaiterArgs:
    """`--port N` / `--port=N` and `--timeout S` from the waiter's argv (the rest is ignored)."""
    argv = _argv(container)
    values: dict[str, str] = {}
    for i, arg in enumerate(argv):
        for flag in ("--port", "--timeout"):
            if arg == flag and i + 1 < len(argv):
                values[flag] = argv[i + 1]
            elif arg.startswith(flag + "="):
                values[flag] = arg.split("=", 1)[1]
    try:
        port = int(values.get("--port", DEFAULT_ACTIVATION_PORT))
        timeout = float(values["--timeout"]) if "--timeout" in values else None
    except ValueError:
        return WaiterArgs()
    return WaiterArgs(port, timeout)


def waiter_token(pod: Mapping[str, Any], container: Mapping[str, Any]) -> str:
    """The token the waiter would read from its environment (downward API resolved)."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    for entry in container.get("env") or []:
        if not isinstance(entry, Mapping) or entry.get("name") != ENV_ACTIVATION_TOKEN:
            continue
        if "value" in entry:
            return str(entry["value"] or "").strip()
        path = ((entry.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath", "")
        match = _ANNOTATION_REF.match(str(path))
        if match:
            return str(annotations.get(match.group(2), "")).strip()
    return ""


def backoff(restarts: int, base: float, cap: float) -> float:
    """The kubelet's doubling restart back-off (10 s … 300 s there), scaled by `base`/`cap`."""
    return float(min(cap, base * 2**restarts))


@dataclass(slots=True)
class StandInHandle:
    namespace: str
    name: str
    uid: str
    task: asyncio.Task[None] | None = None


@dataclass(slots=True)
class StandInRuntime:
    """A `PodRuntime` that runs nothing but stand-in `bps-wait` waiters (see the module doc).

    `termination_delay` (capped by the pod's grace period) keeps a deleted pod in its
    terminating state for a while, so watchers can observe it.
    """

    startup_delay: float = 0.0
    termination_delay: float = 0.0
    listen_on_pod_ip: bool = False
    host: str = "127.0.0.1"
    backoff_base: float = 0.2
    backoff_cap: float = 5.0
    waiters: dict[str, tuple[str, int]] = field(default_factory=dict)  # pod uid → address
    activated: dict[str, float] = field(default_factory=dict)  # pod uid → time.time()

    async def start_pod(self, pod: JsonObject, pod_ip: str, report: StatusReport) -> PodHandle:
        meta = pod["metadata"]
        handle = StandInHandle(meta["namespace"], meta["name"], meta["uid"])
        inits = (pod.get("spec") or {}).get("initContainers") or []
        if not any(is_waiter(c) for c in inits):
            # Nothing to wait for: KWOK's instant pod, with no task to own.
            if self.startup_delay:
                await asyncio.sleep(self.startup_delay)
            await report(PodReport("Running", ready=True, init_containers_done=len(inits)))
            return handle
        handle.task = asyncio.get_running_loop().create_task(
            self._run(pod, pod_ip, inits, report), name=f"standin-{meta['name']}"
        )
        return handle

    async def stop_pod(self, handle: PodHandle, grace_seconds: float) -> None:
        assert isinstance(handle, StandInHandle)
        self.waiters.pop(handle.uid, None)
        if handle.task is not None and not handle.task.done():
            handle.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handle.task
        delay = min(self.termination_delay, grace_seconds)
        if delay > 0:
            await asyncio.sleep(delay)

    def target(self, _bps: BackupPodSet, pod: ObservedPod) -> tuple[str, int] | None:
        """Where this runtime's waiter for `pod` listens (an `activation_target`)."""
        return self.waiters.get(pod.uid)

    async def _run(
        self, pod: JsonObject, pod_ip: str, inits: Sequence[JsonObject], report: StatusReport
    ) -> None:
        policy = str((pod.get("spec") or {}).get("restartPolicy") or "Always")
        uid = pod["metadata"]["uid"]
        try:
            for index, container in enumerate(inits):
                if not is_waiter(container):
                    continue
                restarts = 0
                last_exit: int | None = None
                while True:
                    await report(
                        PodReport(
                            "Pending",
                            ready=False,
                            init_containers_done=index,
                            init_restarts=restarts,
                            init_exit_code=last_exit,
                        )
                    )
                    code = await self._wait(pod, pod_ip, container)
                    if code == 0:
                        break
                    last_exit = code
                    if policy == "Never":
                        await report(
                            PodReport(
                                "Failed",
                                ready=False,
                                init_containers_done=index,
                                init_exit_code=code,
                                message=f"init container {container.get('name')} exited {code}",
                            )
                        )
                        return
                    delay = backoff(restarts, self.backoff_base, self.backoff_cap)
                    await report(
                        PodReport(
                            "Pending",
                            ready=False,
                            init_containers_done=index,
                            init_restarts=restarts,
                            init_exit_code=code,
                            init_backoff=True,
                            backoff_seconds=delay,
                        )
                    )
                    await asyncio.sleep(delay)
                    restarts += 1
                self.activated[uid] = time.time()
            if self.startup_delay:
                await asyncio.sleep(self.startup_delay)
            await report(PodReport("Running", ready=True, init_containers_done=len(inits)))
        finally:
            self.waiters.pop(uid, None)

    async def _wait(self, pod: JsonObject, pod_ip: str, container: Mapping[str, Any]) -> int:
        """One run of the stand-in waiter: its exit code, as `rapproxy bps-wait` would exit."""
        args = waiter_args(container)
        token = waiter_token(pod, container)
        uid = pod["metadata"]["uid"]
        if not token:
            return EXIT_USAGE
        host, port = (pod_ip, args.port) if self.listen_on_pod_ip else (self.host, 0)

        def listening(bound_host: str, bound_port: int) -> None:
            self.waiters[uid] = (bound_host, bound_port)
            log.info(
                "stand-in bps-wait of %s/%s listening on %s:%d",
                pod["metadata"]["namespace"],
                pod["metadata"]["name"],
                bound_host,
                bound_port,
            )

        try:
            await serve_until_activated(host, port, token, args.timeout, on_listening=listening)
        except WaitTimedOut:
            return EXIT_TIMED_OUT
        except OSError as error:
            log.warning("stand-in bps-wait of %s cannot listen: %s", pod["metadata"]["name"], error)
            return EXIT_USAGE
        finally:
            self.waiters.pop(uid, None)
        return 0
