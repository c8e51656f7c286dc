"""kubectl's READY, STATUS and RESTARTS columns, from hand-written pods (kubectl's printPod cases)."""

from __future__ import annotations

from typing import Any

import pytest

from rapproxy.model import pod_columns


def a_pod(
    *,
    inits: tuple[str, ...] = (),
    containers: tuple[str, ...] = ("app",),
    init_states: tuple[dict[str, Any], ...] = (),
    states: tuple[dict[str, Any], ...] = (),
    ready: tuple[bool, ...] = (),
    phase: str = "Pending",
    conditions: dict[str, str] | None = None,
    role: str = "primary",
    **status: Any,
) -> dict[str, Any]:
    """A pod with the given init/main container states (a dict per container, in order)."""
    return {
        "metadata": {"name": "p", "labels": {"rapproxy.io/role": role}},
        "spec": {
            "initContainers": [{"name": n} for n in inits],
            "containers": [{"name": n} for n in containers],
        },
        "status": {
            "phase": phase,
            "conditions": [{"type": k, "status": v} for k, v in (conditions or {}).items()],
            "initContainerStatuses": [
                {"name": n, "state": s, "restartCount": s.pop("_restarts", 0)}
                for n, s in zip(inits, init_states, strict=False)
            ],
            "containerStatuses": [
                {
                    "name": n,
                    "state": s,
                    "ready": r,
                    "restartCount": s.pop("_restarts", 0),
                }
                for n, s, r in zip(
                    containers, states, ready or (False,) * len(states), strict=False
                )
            ],
            **status,
        },
    }


RUNNING = {"running": {"startedAt": "2027-01-15T07:59:00Z"}}
INIT_DONE = {"terminated": {"exitCode": 0, "reason": "Completed"}}
PODINIT = {"waiting": {"reason": "PodInitializing"}}


@pytest.mark.parametrize(
    ("pod", "status", "ready"),
    [
        pytest.param(a_pod(), "Pending", "0/1", id="no-status-yet"),
        pytest.param(
            a_pod(inits=("bps-wait",), init_states=(dict(RUNNING),), states=(dict(PODINIT),)),
            "Init:0/1",
            "0/1",
            id="cold-backup-waiting",
        ),
        pytest.param(
            a_pod(
                inits=("a", "b"),
                init_states=(dict(INIT_DONE), dict(RUNNING)),
                states=(dict(PODINIT),),
            ),
            "Init:1/2",
            "0/1",
            id="second-of-two-init-containers",
        ),
        pytest.param(
            a_pod(
                inits=("bps-wait",),
                init_states=({"waiting": {"reason": "CrashLoopBackOff"}, "_restarts": 3},),
                states=(dict(PODINIT),),
            ),
            "Init:CrashLoopBackOff",
            "0/1",
            id="init-crash-loop",
        ),
        pytest.param(
            a_pod(
                inits=("bps-wait",),
                init_states=({"terminated": {"exitCode": 2, "reason": "Error"}},),
                phase="Failed",
            ),
            "Init:Error",
            "0/1",
            id="init-failed-under-restart-never",
        ),
        pytest.param(
            a_pod(inits=("w",), init_states=({"terminated": {"exitCode": 137, "signal": 9}},)),
            "Init:Signal:9",
            "0/1",
            id="init-killed-without-reason",
        ),
        pytest.param(
            a_pod(inits=("w",), init_states=({"terminated": {"exitCode": 3}},)),
            "Init:ExitCode:3",
            "0/1",
            id="init-exit-code-without-reason",
        ),
        pytest.param(
            a_pod(
                inits=("bps-wait",),
                init_states=(dict(INIT_DONE),),
                states=(dict(PODINIT),),
                conditions={"Initialized": "True"},
            ),
            "PodInitializing",
            "0/1",
            id="activated-main-container-starting",
        ),
        pytest.param(
            a_pod(
                inits=("bps-wait",),
                init_states=(dict(INIT_DONE),),
                states=(dict(RUNNING),),
                ready=(True,),
                phase="Running",
                conditions={"Initialized": "True", "Ready": "True"},
            ),
            "Running",
            "1/1",
            id="running-and-ready",
        ),
        pytest.param(
            a_pod(states=(dict(RUNNING),), ready=(False,), phase="Running"),
            "Running",
            "0/1",
            id="running-not-ready",
        ),
        pytest.param(
            a_pod(
                states=({"waiting": {"reason": "CrashLoopBackOff"}, "_restarts": 5},),
                phase="Running",
            ),
            "CrashLoopBackOff",
            "0/1",
            id="main-crash-loop",
        ),
        pytest.param(
            a_pod(
                states=({"terminated": {"exitCode": 0, "reason": "Completed"}},), phase="Succeeded"
            ),
            "Completed",
            "0/1",
            id="completed",
        ),
        pytest.param(
            a_pod(states=({"terminated": {"exitCode": 1, "reason": "Error"}},), phase="Failed"),
            "Error",
            "0/1",
            id="error",
        ),
        pytest.param(
            a_pod(
                containers=("app", "side"),
                states=({"terminated": {"exitCode": 0, "reason": "Completed"}}, dict(RUNNING)),
                ready=(False, True),
                phase="Running",
                conditions={"Ready": "False"},
            ),
            "NotReady",
            "1/2",
            id="one-completed-one-running-pod-not-ready",
        ),
        pytest.param(
            a_pod(phase="Failed", reason="Evicted"),
            "Evicted",
            "0/1",
            id="status-reason-wins-over-phase",
        ),
    ],
)
def test_status_and_ready_columns_follow_kubectl(
    pod: dict[str, Any], status: str, ready: str
) -> None:
    assert pod_columns.status_column(pod) == status
    assert pod_columns.ready_column(pod) == ready


def test_a_deleted_pod_is_terminating_whatever_its_containers_say() -> None:
    pod = a_pod(states=(dict(RUNNING),), ready=(True,), phase="Running")
    pod["metadata"]["deletionTimestamp"] = "2027-01-15T07:59:59Z"
    assert pod_columns.status_column(pod) == "Terminating"
    pod["status"]["reason"] = "NodeLost"
    assert pod_columns.status_column(pod) == "Unknown"


def test_restarts_count_init_containers_while_initializing_then_main_containers() -> None:
    crashing = a_pod(
        inits=("bps-wait",),
        init_states=({"waiting": {"reason": "CrashLoopBackOff"}, "_restarts": 4},),
        states=(dict(PODINIT),),
    )
    assert pod_columns.restarts(crashing) == 4
    running = a_pod(
        inits=("bps-wait",),
        init_states=({**INIT_DONE, "_restarts": 4},),
        states=({**RUNNING, "_restarts": 1},),
        conditions={"Initialized": "True"},
    )
    assert pod_columns.restarts(running) == 1
