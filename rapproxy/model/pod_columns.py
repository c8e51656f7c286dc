"""How kubectl summarises a pod in one line: its READY, STATUS and RESTARTS columns.

Pure: raw pod JSON in, text out; tolerant of anything (a pod with no status yet, fields an old
kubelet leaves out). One implementation of kubectl's `printPod` rules, written from its
documented behaviour, shared by `bpsctl` (which shows pods beside their BackupPodSet roles) and
the emulated API server (whose server-side Table is what `kubectl get pods` prints), so both say
`Init:0/1` where a real cluster would — a phase alone calls a cold backup "Pending" and hides
which init container holds it.

STATUS: start from `status.reason` or the phase; while an init container has not completed, the
`Init:` form; once initialized, the reason of a main container (kubectl walks them from the
last, so the first one in spec order wins) that is waiting (`PodInitializing`,
`CrashLoopBackOff`, ...) or terminated (`Completed`, `Error`, or `ExitCode:N` / `Signal:N`);
`Completed` with a container still running reads `Running` or `NotReady` by the Ready condition;
a deletion timestamp wins as `Terminating` (`Unknown` when the node was lost).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Obj = Mapping[str, Any]


def _section(obj: Obj, key: str) -> Obj:
    value = obj.get(key)
    return value if isinstance(value, Mapping) else {}


def _list(obj: Obj, key: str) -> list[Obj]:
    return [v for v in obj.get(key) or [] if isinstance(v, Mapping)]


def _int(value: object, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def condition_true(pod: Obj, kind: str) -> bool:
    return any(
        c.get("type") == kind and c.get("status") == "True"
        for c in _list(_section(pod, "status"), "conditions")
    )


def _exit_text(terminated: Obj) -> str:
    signal = _int(terminated.get("signal"))
    return f"Signal:{signal}" if signal else f"ExitCode:{_int(terminated.get('exitCode'))}"


def init_status(pod: Obj) -> str | None:
    """`Init:...` while an init container has not completed, else None.

    The first init container that has not exited 0 decides: a failure shows its reason
    (`Init:Error`, or `Init:ExitCode:N` without one), a waiting one with a reason of its own shows
    it (`Init:CrashLoopBackOff`), anything else — running, or waiting for an earlier one — shows
    progress as `Init:<completed>/<declared>`. A sidecar (an init container with
    `restartPolicy: Always`) counts as done once started.
    """
    declared = _list(_section(pod, "spec"), "initContainers")
    sidecars = {str(c.get("name")) for c in declared if c.get("restartPolicy") == "Always"}
    for index, container in enumerate(_list(_section(pod, "status"), "initContainerStatuses")):
        state = _section(container, "state")
        terminated = _section(state, "terminated")
        if "terminated" in state and _int(terminated.get("exitCode"), -1) == 0:
            continue
        if container.get("name") in sidecars and container.get("started") is True:
            continue
        if "terminated" in state:
            reason = terminated.get("reason")
            return f"Init:{reason}" if reason else f"Init:{_exit_text(terminated)}"
        reason = _section(state, "waiting").get("reason")
        if reason and reason != "PodInitializing":
            return f"Init:{reason}"
        return f"Init:{index}/{len(declared)}"
    return None


def status_column(pod: Obj) -> str:
    """kubectl's STATUS column (see the module docstring)."""
    status = _section(pod, "status")
    reason = str(status.get("reason") or status.get("phase") or "Pending")
    for condition in _list(status, "conditions"):
        if condition.get("type") == "PodScheduled" and condition.get("reason") == "SchedulingGated":
            reason = "SchedulingGated"
    init = init_status(pod)
    if init is not None:
        reason = init
    if init is None or condition_true(pod, "Initialized"):
        running = False
        for container in reversed(_list(status, "containerStatuses")):
            state = _section(container, "state")
            waiting = _section(state, "waiting")
            terminated = _section(state, "terminated")
            if waiting.get("reason"):
                reason = str(waiting["reason"])
            elif terminated.get("reason"):
                reason = str(terminated["reason"])
            elif "terminated" in state:
                reason = _exit_text(terminated)
            elif container.get("ready") is True and "running" in state:
                running = True
        if reason == "Completed" and running:
            reason = "Running" if condition_true(pod, "Ready") else "NotReady"
    if _section(pod, "metadata").get("deletionTimestamp"):
        reason = "Unknown" if status.get("reason") == "NodeLost" else "Terminating"
    return reason


def ready_column(pod: Obj) -> str:
    """kubectl's READY column: ready main containers / declared main containers."""
    declared = len(_list(_section(pod, "spec"), "containers"))
    ready = sum(
        1
        for c in _list(_section(pod, "status"), "containerStatuses")
        if c.get("ready") is True and "running" in _section(c, "state")
    )
    return f"{ready}/{declared}"


def restarts(pod: Obj) -> int:
    """kubectl's RESTARTS: the init containers' while initializing, then the main ones'."""
    status = _section(pod, "status")
    initializing = init_status(pod) is not None and not condition_true(pod, "Initialized")
    key = "initContainerStatuses" if initializing else "containerStatuses"
    return sum(_int(c.get("restartCount")) for c in _list(status, key))
