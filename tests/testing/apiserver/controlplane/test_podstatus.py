"""The pod status the emulated kubelet writes, against what a real v1.28 kubelet reports.

The contract fixtures (../shared/fixtures/kube-api-v1.28) were recorded without a kubelet, so
they hold no init-container status. What a real kubelet reports for a pod whose one init
container waits and then exits 0 is written down here instead, as `kubectl get pod -o json`
shows it on a v1.28 node (containerd; IDs, digests and times shortened to placeholders), and the
renderer must produce the same shape. The one recorded fact that applies — conditions carry
`lastProbeTime: null` and keep fields such as `qosClass` the kubelet does not write (07-pods) —
is checked too.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from bpsctl import render as bpsctl_render
from rapproxy.testing.apiserver.controlplane.podstatus import PodReport, render_status

T0, T1, T2 = "2026-12-06T10:00:00Z", "2026-12-06T10:00:05Z", "2026-12-06T10:00:09Z"

POD: dict[str, Any] = {
    "metadata": {"name": "web-x7k2p", "namespace": "default", "uid": "u-1"},
    "spec": {
        "nodeName": "node-a",
        "restartPolicy": "Always",
        "initContainers": [
            {"name": "bps-wait", "image": "rapproxy:1", "command": ["rapproxy", "bps-wait"]}
        ],
        "containers": [{"name": "app", "image": "app:1"}],
    },
    # What the API server wrote at creation and binding (07-pods): the kubelet keeps it.
    "status": {
        "phase": "Pending",
        "qosClass": "BestEffort",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "True",
                "lastProbeTime": None,
                "lastTransitionTime": T0,
            }
        ],
    },
}

# A real kubelet v1.28, while the init container runs (kubectl: 0/1 Init:0/1).
REAL_WAITING: dict[str, Any] = {
    "phase": "Pending",
    "conditions": [
        {
            "type": "Initialized",
            "status": "False",
            "lastProbeTime": None,
            "lastTransitionTime": T0,
            "reason": "ContainersNotInitialized",
            "message": "containers with incomplete status: [bps-wait]",
        },
        {
            "type": "Ready",
            "status": "False",
            "lastProbeTime": None,
            "lastTransitionTime": T0,
            "reason": "ContainersNotReady",
            "message": "containers with unready status: [app]",
        },
        {
            "type": "ContainersReady",
            "status": "False",
            "lastProbeTime": None,
            "lastTransitionTime": T0,
            "reason": "ContainersNotReady",
            "message": "containers with unready status: [app]",
        },
        {"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": T0},
    ],
    "hostIP": "10.250.0.1",
    "hostIPs": [{"ip": "10.250.0.1"}],
    "podIP": "10.244.0.5",
    "podIPs": [{"ip": "10.244.0.5"}],
    "startTime": T0,
    "qosClass": "BestEffort",
    "initContainerStatuses": [
        {
            "name": "bps-wait",
            "state": {"running": {"startedAt": T0}},
            "lastState": {},
            "ready": False,
            "restartCount": 0,
            "image": "rapproxy:1",
            "imageID": "<image-id>",
            "containerID": "<container-id>",
            "started": True,
        }
    ],
    "containerStatuses": [
        {
            "name": "app",
            "state": {"waiting": {"reason": "PodInitializing"}},
            "lastState": {},
            "ready": False,
            "restartCount": 0,
            "image": "app:1",
            "imageID": "",
            "started": False,
        }
    ],
}

# The same pod after the init container exited 0 and the app became ready (kubectl: 1/1 Running).
REAL_RUNNING: dict[str, Any] = {
    **REAL_WAITING,
    "phase": "Running",
    "conditions": [
        {"type": "Initialized", "status": "True", "lastProbeTime": None, "lastTransitionTime": T1},
        {"type": "Ready", "status": "True", "lastProbeTime": None, "lastTransitionTime": T2},
        {
            "type": "ContainersReady",
            "status": "True",
            "lastProbeTime": None,
            "lastTransitionTime": T2,
        },
        {"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": T0},
    ],
    "initContainerStatuses": [
        {
            "name": "bps-wait",
            "state": {
                "terminated": {
                    "exitCode": 0,
                    "reason": "Completed",
                    "startedAt": T0,
                    "finishedAt": T1,
                    "containerID": "<container-id>",
                }
            },
            "lastState": {},
            "ready": True,
            "restartCount": 0,
            "image": "rapproxy:1",
            "imageID": "<image-id>",
            "containerID": "<container-id>",
            "started": False,
        }
    ],
    "containerStatuses": [
        {
            "name": "app",
            "state": {"running": {"startedAt": T1}},
            "lastState": {},
            "ready": True,
            "restartCount": 0,
            "image": "app:1",
            "imageID": "<image-id>",
            "containerID": "<container-id>",
            "started": True,
        }
    ],
}


def shape(value: Any) -> Any:
    """The status with runtime-specific IDs reduced to whether they are there."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "containerID":  # the emulator's are emulated://..., containerd's differ
                out[key] = "<container-id>" if item else ""
                continue
            if key == "imageID":
                out[key] = "<image-id>" if item else ""
                continue
            out[key] = shape(item)
        return out
    if isinstance(value, list):
        return [shape(v) for v in value]
    return value


def step(pod: dict[str, Any], report: PodReport, now: str) -> dict[str, Any]:
    pod = copy.deepcopy(pod)
    pod["status"] = render_status(pod, report, pod_ip="10.244.0.5", host_ip="10.250.0.1", now=now)
    return pod


def without_image_ids(value: Any) -> Any:
    # The emulator has no images, so every imageID is "": compare everything else exactly.
    if isinstance(value, dict):
        return {k: without_image_ids(v) for k, v in value.items() if k != "imageID"}
    if isinstance(value, list):
        return [without_image_ids(v) for v in value]
    return value


def test_a_waiting_init_container_looks_as_a_real_kubelet_reports_it() -> None:
    waiting = step(POD, PodReport("Pending", ready=False), T0)
    assert without_image_ids(shape(waiting["status"])) == without_image_ids(shape(REAL_WAITING))
    assert bpsctl_render.pod_status(waiting) == "Init:0/1"
    assert bpsctl_render.pod_ready_count(waiting) == "0/1"


def test_the_init_container_exits_0_then_the_pod_runs_as_a_real_kubelet_reports_it() -> None:
    waiting = step(POD, PodReport("Pending", ready=False), T0)
    initialized = step(waiting, PodReport("Running", ready=False, init_containers_done=1), T1)
    assert bpsctl_render.pod_status(initialized) == "Running"
    assert bpsctl_render.pod_ready_count(initialized) == "0/1"
    running = step(initialized, PodReport("Running", ready=True, init_containers_done=1), T2)
    expected = without_image_ids(shape(REAL_RUNNING))
    assert without_image_ids(shape(running["status"])) == expected
    assert bpsctl_render.pod_status(running) == "Running"
    assert bpsctl_render.pod_ready_count(running) == "1/1"


def test_restarting_a_failed_init_container_shows_crash_loop_back_off_and_the_last_exit() -> None:
    waiting = step(POD, PodReport("Pending", ready=False), T0)
    backing_off = step(
        waiting,
        PodReport(
            "Pending",
            ready=False,
            init_exit_code=2,
            init_backoff=True,
            backoff_seconds=0.4,
        ),
        T1,
    )
    (init,) = backing_off["status"]["initContainerStatuses"]
    assert init["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert (
        "restarting failed container=bps-wait pod=web-x7k2p"
        in (init["state"]["waiting"]["message"])
    )
    assert init["lastState"]["terminated"]["exitCode"] == 2
    assert init["lastState"]["terminated"]["reason"] == "Error"
    assert init["started"] is False and init["ready"] is False
    assert bpsctl_render.pod_status(backing_off) == "Init:CrashLoopBackOff"
    again = step(
        backing_off, PodReport("Pending", ready=False, init_restarts=1, init_exit_code=2), T2
    )
    (init,) = again["status"]["initContainerStatuses"]
    assert "running" in init["state"] and init["restartCount"] == 1
    assert init["lastState"]["terminated"]["exitCode"] == 2
    assert bpsctl_render.pod_status(again) == "Init:0/1"
    assert bpsctl_render.pod_restarts(again) == 1
    # The main container's restarts are its own: an init container's do not count there.
    assert again["status"]["containerStatuses"][0]["restartCount"] == 0


def test_a_failed_init_container_under_restart_policy_never_fails_the_pod() -> None:
    pod = copy.deepcopy(POD)
    pod["spec"]["restartPolicy"] = "Never"
    failed = step(pod, PodReport("Failed", ready=False, init_exit_code=1, message="x"), T1)
    status = failed["status"]
    assert status["phase"] == "Failed"
    assert status["initContainerStatuses"][0]["state"]["terminated"]["reason"] == "Error"
    assert status["containerStatuses"][0]["state"] == {"waiting": {"reason": "PodInitializing"}}
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Initialized"]["reason"] == "ContainersNotInitialized"
    assert bpsctl_render.pod_status(failed) == "Init:Error"


def test_transition_times_and_start_times_move_only_when_the_state_changes() -> None:
    first = step(POD, PodReport("Pending", ready=False), T0)
    again = step(first, PodReport("Pending", ready=False), T2)
    assert again["status"] == first["status"]
    ran = step(again, PodReport("Running", ready=True, init_containers_done=1), T2)
    init = ran["status"]["initContainerStatuses"][0]["state"]["terminated"]
    assert (init["startedAt"], init["finishedAt"]) == (T0, T2)
    scheduled = [c for c in ran["status"]["conditions"] if c["type"] == "PodScheduled"]
    assert scheduled[0]["lastTransitionTime"] == T0
    assert ran["status"]["qosClass"] == "BestEffort"


REPORTS = st.builds(
    PodReport,
    phase=st.sampled_from(["Pending", "Running", "Succeeded", "Failed"]),
    ready=st.booleans(),
    init_containers_done=st.integers(0, 2),
    restart_count=st.integers(0, 3),
    exit_code=st.none() | st.integers(0, 3),
    init_restarts=st.integers(0, 3),
    init_exit_code=st.none() | st.integers(1, 3),
    init_backoff=st.booleans(),
)


@given(reports=st.lists(REPORTS, min_size=1, max_size=6))
def test_a_pod_with_an_init_container_still_to_complete_is_never_ready(
    reports: list[PodReport],
) -> None:
    pod = copy.deepcopy(POD)
    pod["spec"]["initContainers"].append({"name": "second", "image": "x"})
    for i, report in enumerate(reports):
        pod = step(pod, report, f"2026-12-06T10:00:{i:02d}Z")
        status = pod["status"]
        conditions = {c["type"]: c["status"] for c in status["conditions"]}
        if report.init_containers_done < 2:
            assert conditions["Initialized"] == conditions["Ready"] == "False"
            assert bpsctl_render.pod_status(pod).startswith("Init:")
            assert bpsctl_render.pod_ready_count(pod) == "0/1"
            assert status["containerStatuses"][0]["state"] == {
                "waiting": {"reason": "PodInitializing"}
            }
        else:
            assert conditions["Initialized"] == "True"
        assert [c["type"] for c in status["conditions"]] == [
            "Initialized",
            "Ready",
            "ContainersReady",
            "PodScheduled",
        ]
