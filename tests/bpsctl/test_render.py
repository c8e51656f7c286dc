"""bpsctl's renderer: exact text from hand-written objects, no cluster, no event loop."""

from __future__ import annotations

from typing import Any

import pytest

from bpsctl import render

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def stamp(seconds_ago: float) -> str:
    import datetime

    at = datetime.datetime.fromtimestamp(NOW - seconds_ago, tz=datetime.UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def bps(name: str, status: dict[str, Any] | None = None, **spec: int) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {
            "name": name,
            "namespace": "default",
            "creationTimestamp": stamp(300),
            "generation": 2,
        },
        "spec": {"replicas": 3, "hotBackups": 2, "coldBackups": 1, **spec},
    }
    if status is not None:
        obj["status"] = status
    return obj


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (5, "5s"),
        (119, "119s"),
        (125, "2m5s"),
        (600, "10m"),
        (3 * 3600 + 60, "3h1m"),
        (30 * 3600, "30h"),
        (5 * 86400, "5d"),
    ],
)
def test_ages_read_like_kubectls(seconds: float, text: str) -> None:
    assert render.age(NOW - seconds, NOW) == text


def test_a_set_the_controller_has_not_seen_renders_zeros_not_an_error() -> None:
    text = render.status_table([bps("fresh")], NOW, all_namespaces=False, wide=True)
    header, row = (line.split() for line in text.splitlines())
    assert header == [
        "NAME", "PRIMARY", "HOT", "COLD", "LAST-FAILOVER", "AGE", "AVAILABLE", "PROGRESSING", "GENERATION",
    ]  # fmt: skip
    assert row == ["fresh", "0/3", "0/2", "0/1", "<none>", "5m", "-", "-", "2", "(observed", "-)"]


def test_last_failover_column_says_when_and_how_long() -> None:
    status = {
        "readyReplicas": 3,
        "readyHotBackups": 2,
        "coldBackups": 1,
        "lastFailover": {"detectedAt": stamp(42), "durations": {"restored": 0.0431}},
    }
    text = render.status_table([bps("web", status)], NOW, all_namespaces=False, wide=False)
    assert text.splitlines()[1].split() == [
        "web", "3/3", "2/2", "1/1", "42s", "ago,", "restored", "in", "43", "ms", "5m",
    ]  # fmt: skip


def test_failover_timeline_lists_reached_stages_in_order_with_offsets() -> None:
    failover = {
        "failedPod": "web-a",
        "reason": "terminating",
        "node": "node-b",
        "promotedPod": "web-h",
        "detectedAt": "2027-01-15T08:00:00.000Z",
        "promotedAt": "2027-01-15T08:00:00.012Z",
        "replacementCreatedAt": "2027-01-15T08:00:00.013Z",
        "durations": {"promoted": 0.012, "replacementCreated": 0.013},
        "handlingSeconds": 0.0131,
    }
    lines = render.failover_timeline(failover).splitlines()
    assert lines[0] == "failed primary:  web-a (terminating) on node-b"
    assert lines[1] == "new primary:     web-h"
    stages = [line.split()[0] for line in lines[3:-1]]
    assert stages == ["detected", "promoted", "replacement"]
    assert lines[4].endswith("+12 ms")
    assert lines[-1] == "controller handling (event → writes acknowledged): 13 ms"


def test_pods_sort_by_role_and_a_waiting_cold_backup_says_so() -> None:
    def pod(name: str, role: str, **status: Any) -> dict[str, Any]:
        return {
            "metadata": {"name": name, "labels": {"rapproxy.io/role": role}},
            "spec": {"nodeName": "node-a"},
            "status": status,
        }

    cold = pod(
        "c",
        "cold-backup",
        phase="Pending",
        podIP="10.0.0.3",
        initContainerStatuses=[{"name": "bps-wait", "state": {"running": {}}}],
    )
    primary = pod("p", "primary", phase="Running", conditions=[{"type": "Ready", "status": "True"}])
    cold["spec"]["initContainers"] = [{"name": "bps-wait"}]
    cold["spec"]["containers"] = primary["spec"]["containers"] = [{"name": "app"}]
    cold["status"]["containerStatuses"] = [
        {"name": "app", "ready": False, "state": {"waiting": {"reason": "PodInitializing"}}}
    ]
    primary["status"]["containerStatuses"] = [
        {"name": "app", "ready": True, "restartCount": 2, "state": {"running": {}}}
    ]
    lines = render.pods_table([cold, primary], NOW, wide=False).splitlines()
    assert lines[0].split() == [
        *("ROLE", "POD", "READY", "STATUS", "RESTARTS", "NODE", "IP", "AGE")
    ]
    assert [line.split()[:5] for line in lines[1:]] == [
        ["primary", "p", "1/1", "Running", "2"],
        ["cold-backup", "c", "0/1", "Init:0/1", "0"],
    ]


# -- kubectl's STATUS and READY columns ---------------------------------------------------------


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
    assert render.pod_status(pod) == status
    assert render.pod_ready_count(pod) == ready


def test_a_deleted_pod_is_terminating_whatever_its_containers_say() -> None:
    pod = a_pod(states=(dict(RUNNING),), ready=(True,), phase="Running")
    pod["metadata"]["deletionTimestamp"] = stamp(1)
    assert render.pod_status(pod) == "Terminating"
    pod["status"]["reason"] = "NodeLost"
    assert render.pod_status(pod) == "Unknown"


def test_restarts_count_init_containers_while_initializing_then_main_containers() -> None:
    crashing = a_pod(
        inits=("bps-wait",),
        init_states=({"waiting": {"reason": "CrashLoopBackOff"}, "_restarts": 4},),
        states=(dict(PODINIT),),
    )
    assert render.pod_restarts(crashing) == 4
    running = a_pod(
        inits=("bps-wait",),
        init_states=({**INIT_DONE, "_restarts": 4},),
        states=({**RUNNING, "_restarts": 1},),
        conditions={"Initialized": "True"},
    )
    assert render.pod_restarts(running) == 1


def test_describe_flags_a_cold_backup_that_is_ready_before_activation() -> None:
    hot_cold = a_pod(
        role="cold-backup",
        inits=("bps-wait",),
        init_states=(dict(INIT_DONE),),
        states=(dict(RUNNING),),
        ready=(True,),
        phase="Running",
        conditions={"Initialized": "True", "Ready": "True"},
    )
    waiting = a_pod(
        role="cold-backup",
        inits=("bps-wait",),
        init_states=(dict(RUNNING),),
        states=(dict(PODINIT),),
        conditions={"Initialized": "False", "Ready": "False"},
    )
    waiting["metadata"]["name"] = "q"
    text = render.describe(bps("web", coldBackups=2), [hot_cold, waiting], [], NOW)
    problems = text.split("Problems:\n", 1)[1].split("Last failover:", 1)[0].splitlines()
    assert problems == [
        "  cold backup p is Ready before activation (Running): "
        "its bps-wait init container did not hold it"
    ]
    assert "Problems:" not in render.describe(bps("web"), [waiting], [], NOW)
