"""The pod status a kubelet (v1.28) writes, computed from what a runtime reports.

Pure: no I/O, no clock reads (`now` is an argument). The emulated kubelet hands each `PodReport`
of its runtime, the pod and its previous status to `render_status`, and writes the result through
`pods/status`. Kept apart from the kubelet so the shapes can be compared field by field in tests,
and so the status-only runtime and the process runtime cannot drift apart: both go through here.

What a real kubelet reports, and this reproduces:

* while init container *i* of *n* runs: phase `Pending`; `Initialized`, `Ready` and
  `ContainersReady` False with reasons `ContainersNotInitialized` / `ContainersNotReady` and
  messages naming the containers (`containers with incomplete status: [bps-wait]`); init
  containers before *i* `terminated` (exit 0, `Completed`), *i* `running`, the rest and every
  main container `waiting` with reason `PodInitializing` — kubectl prints `Init:i/n`;
* a failed init container under `restartPolicy` Always/OnFailure: `waiting` `CrashLoopBackOff`
  while backing off, its exit in `lastState.terminated` (`Error`), `restartCount` counting the
  restarts — kubectl prints `Init:CrashLoopBackOff`; under `Never` the pod is `Failed` and the
  container stays `terminated` (`Error`) — kubectl prints `Init:Error`;
* the pod IP from the moment the sandbox exists, i.e. while init containers still run (a cold
  backup must be reachable for its activation);
* `lastTransitionTime` and `startedAt` move only when the state they stamp changes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

JsonObject = dict[str, Any]
CONDITION_ORDER = ("Initialized", "Ready", "ContainersReady", "PodScheduled")
BACKOFF_MESSAGE = "back-off {seconds}s restarting failed container={name} pod={pod}"


@dataclass(frozen=True, slots=True)
class PodReport:
    """What a runtime says about a pod: phase, readiness, init progress, exits.

    `init_containers_done` counts init containers that exited 0; the next one (if any) is the
    current one. `init_restarts`, `init_exit_code` and `init_backoff` describe the current init
    container: how often it was restarted, its last non-zero exit, and whether the kubelet is
    backing off before the next start. `restart_count` and `exit_code` are the main containers'.
    """

    phase: str  # Pending | Running | Succeeded | Failed
    ready: bool
    init_containers_done: int = 0
    restart_count: int = 0
    exit_code: int | None = None
    message: str = ""
    init_restarts: int = 0
    init_exit_code: int | None = None
    init_backoff: bool = False
    backoff_seconds: float = 10.0


def initialized(spec: Mapping[str, Any], report: PodReport) -> bool:
    return report.init_containers_done >= len(spec.get("initContainers") or [])


def _terminated(code: int, started: str, finished: str) -> JsonObject:
    return {
        "exitCode": code,
        "reason": "Completed" if code == 0 else "Error",
        "startedAt": started,
        "finishedAt": finished,
    }


def _base(container: Mapping[str, Any]) -> JsonObject:
    return {"name": container.get("name", ""), "image": container.get("image", ""), "imageID": ""}


def container_id(pod: Mapping[str, Any], name: str, restarts: int) -> str:
    """A stable ID per container instance, as a runtime gives one to each (re)start."""
    uid = (pod.get("metadata") or {}).get("uid", "")
    digest = hashlib.sha256(f"{uid}/{name}/{restarts}".encode()).hexdigest()
    return f"emulated://{digest}"


def _started_instance(state: Mapping[str, Any]) -> bool:
    return "running" in state or "terminated" in state


def _kept(state: JsonObject, previous: Mapping[str, Any] | None, restarts: int) -> JsonObject:
    """The previous state when it is the same one (running stays running): stable timestamps."""
    if previous is None or previous.get("restartCount") != restarts:
        return state
    old = previous.get("state")
    if isinstance(old, Mapping) and set(old) == set(state):
        kind = next(iter(state))
        if kind == "waiting" or (
            kind == "terminated" and old[kind].get("exitCode") != state[kind].get("exitCode")
        ):
            return state
        return {kind: dict(old[kind])}
    return state


def _init_statuses(
    pod: Mapping[str, Any], report: PodReport, previous: Mapping[str, Mapping[str, Any]], now: str
) -> list[JsonObject]:
    spec = pod.get("spec") or {}
    pod_name = (pod.get("metadata") or {}).get("name", "")
    out = []
    for i, container in enumerate(spec.get("initContainers") or []):
        name = str(container.get("name", ""))
        old = previous.get(name)
        began = ((old or {}).get("state") or {}).get("running", {}).get("startedAt", now)
        last: JsonObject = {}
        restarts = 0
        if i < report.init_containers_done:
            state: JsonObject = {"terminated": _terminated(0, began, now)}
        elif i == report.init_containers_done:
            restarts = report.init_restarts
            code = report.init_exit_code
            if code is not None:
                last = _kept_last(code, restarts, old, now)
            if report.phase == "Failed" and code is not None:
                state, last = {"terminated": _terminated(code, began, now)}, {}
            elif report.init_backoff:
                seconds = max(1, round(report.backoff_seconds))
                message = BACKOFF_MESSAGE.format(seconds=seconds, name=name, pod=pod_name)
                state = {"waiting": {"reason": "CrashLoopBackOff", "message": message}}
            else:
                state = {"running": {"startedAt": now}}
        else:
            state = {"waiting": {"reason": "PodInitializing"}}
        state = _kept(state, old, restarts)
        status = _base(container)
        if _started_instance(state):
            status["containerID"] = container_id(pod, name, restarts)
            if "terminated" in state:
                state["terminated"]["containerID"] = status["containerID"]
        status.update(
            state=state,
            lastState=last,
            ready=i < report.init_containers_done,
            restartCount=restarts,
            started="running" in state,
        )
        out.append(status)
    return out


def _kept_last(code: int, restarts: int, old: Mapping[str, Any] | None, now: str) -> JsonObject:
    """The last termination, stamped once: the same exit at the same restart count is kept."""
    if old is not None and old.get("restartCount") == restarts:
        previous = (old.get("lastState") or {}).get("terminated")
        if isinstance(previous, Mapping) and previous.get("exitCode") == code:
            return {"terminated": dict(previous)}
    return {"terminated": _terminated(code, now, now)}


def _main_statuses(
    pod: Mapping[str, Any], report: PodReport, previous: Mapping[str, Mapping[str, Any]], now: str
) -> list[JsonObject]:
    spec = pod.get("spec") or {}
    init_done = initialized(spec, report)
    out = []
    for container in spec.get("containers") or []:
        old = previous.get(str(container.get("name", "")))
        status = _base(container)
        if not init_done:
            state: JsonObject = {"waiting": {"reason": "PodInitializing"}}
        elif report.phase in ("Succeeded", "Failed"):
            code = report.exit_code
            if code is None:
                code = 0 if report.phase == "Succeeded" else 1
            began = ((old or {}).get("state") or {}).get("running", {}).get("startedAt", now)
            state = {"terminated": _terminated(code, began, now)}
        elif report.phase == "Running":
            state = {"running": {"startedAt": now}}
        else:
            state = {"waiting": {"reason": "ContainerCreating"}}
        state = _kept(state, old, report.restart_count)
        if _started_instance(state):
            status["containerID"] = container_id(
                pod, str(container.get("name", "")), report.restart_count
            )
            if "terminated" in state:
                state["terminated"]["containerID"] = status["containerID"]
        status.update(
            state=state,
            lastState=dict((old or {}).get("lastState") or {}) if report.restart_count else {},
            ready=report.ready and "running" in state,
            restartCount=report.restart_count,
            started="running" in state,
        )
        out.append(status)
    return out


def _unready(statuses: Sequence[Mapping[str, Any]]) -> str:
    """The kubelet's list form in condition messages: `[a b]`."""
    return "[" + " ".join(str(s["name"]) for s in statuses if not s["ready"]) + "]"


def _conditions(
    report: PodReport,
    *,
    inits: Sequence[JsonObject],
    mains: Sequence[JsonObject],
    previous: Sequence[Mapping[str, Any]],
    now: str,
    init_done: bool,
) -> list[JsonObject]:
    completed = report.phase == "Succeeded"
    ready = report.ready and report.phase == "Running" and init_done
    wanted: dict[str, tuple[bool, str, str]] = {
        "Initialized": (
            init_done,
            "" if init_done else "ContainersNotInitialized",
            "" if init_done else f"containers with incomplete status: {_unready(inits)}",
        ),
        "Ready": (
            ready,
            "" if ready else ("PodCompleted" if completed else "ContainersNotReady"),
            "" if ready or completed else f"containers with unready status: {_unready(mains)}",
        ),
        "PodScheduled": (True, "", ""),
    }
    wanted["ContainersReady"] = wanted["Ready"]
    if completed and init_done:
        wanted["Initialized"] = (True, "PodCompleted", "")
    old = {str(c.get("type")): c for c in previous if isinstance(c, Mapping)}
    out = []
    for kind in CONDITION_ORDER:
        value, reason, message = wanted[kind]
        text = "True" if value else "False"
        current = old.get(kind)
        condition: JsonObject = {"type": kind, "status": text, "lastProbeTime": None}
        if current is not None and current.get("status") == text:
            condition["lastTransitionTime"] = current.get("lastTransitionTime")
        else:
            condition["lastTransitionTime"] = now
        if reason:
            condition["reason"] = reason
        if message:
            condition["message"] = message
        out.append(condition)
    return out


def render_status(
    pod: Mapping[str, Any],
    report: PodReport,
    *,
    pod_ip: str,
    host_ip: str,
    now: str,
) -> JsonObject:
    """The pod's next `.status`: its current one (kept fields such as `qosClass`) updated."""
    spec = pod.get("spec") or {}
    status: JsonObject = dict(pod.get("status") or {})
    previous_init = {
        str(s.get("name")): s
        for s in status.get("initContainerStatuses") or []
        if isinstance(s, Mapping)
    }
    previous_main = {
        str(s.get("name")): s
        for s in status.get("containerStatuses") or []
        if isinstance(s, Mapping)
    }
    inits = _init_statuses(pod, report, previous_init, now)
    mains = _main_statuses(pod, report, previous_main, now)
    init_done = initialized(spec, report)
    status["phase"] = report.phase
    status["conditions"] = _conditions(
        report,
        inits=inits,
        mains=mains,
        previous=status.get("conditions") or [],
        now=now,
        init_done=init_done,
    )
    status["hostIP"] = host_ip
    status["hostIPs"] = [{"ip": host_ip}]
    status["podIP"] = pod_ip
    status["podIPs"] = [{"ip": pod_ip}]
    status.setdefault("startTime", now)
    if inits:
        status["initContainerStatuses"] = inits
    else:
        status.pop("initContainerStatuses", None)
    status["containerStatuses"] = mains
    if report.message and report.phase == "Failed":
        status["message"] = report.message
    return status
