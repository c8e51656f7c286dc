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
    lines = render.pods_table([cold, primary], NOW, wide=False).splitlines()
    assert [line.split()[:4] for line in lines[1:]] == [
        ["primary", "p", "yes", "Running"],
        ["cold-backup", "c", "no", "Waiting"],
    ]
