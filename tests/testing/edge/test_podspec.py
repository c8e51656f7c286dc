"""How the process runtime reads a pod: argv, environment, readiness probes, restarts."""

from __future__ import annotations

from typing import Any

import pytest

from rapproxy.testing.edge.podspec import (
    InvalidPodSpec,
    backoff_seconds,
    expand,
    pod_plan,
    should_restart,
    should_retry_init,
)

INTERPRETER = "/opt/venv/bin/python"
BASE_ENV = {"PATH": "/usr/bin"}


def pod(containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "web-0", "namespace": "demo", "uid": "u-1"},
        "spec": {"nodeName": "node-2", "containers": containers, **spec},
    }


def plan(p: dict[str, Any], probe_period: float | None = None) -> Any:
    return pod_plan(
        p,
        pod_ip="10.244.2.5",
        host_ip="10.10.2.2",
        base_env=BASE_ENV,
        interpreter=INTERPRETER,
        probe_period=probe_period,
    )


def test_variables_expand_like_the_kubelet_does() -> None:
    env = {"POD_IP": "10.244.2.5"}
    assert expand("--http=$(POD_IP):8080", env) == "--http=10.244.2.5:8080"
    assert expand("$$(POD_IP)", env) == "$(POD_IP)"
    assert expand("$(NOT_SET)", env) == "$(NOT_SET)"


def test_command_and_args_run_as_given_with_python_meaning_this_interpreter() -> None:
    container = {
        "name": "web",
        "image": "ignored:latest",
        "command": ["python", "-m", "rapproxy.testing.backend"],
        "args": ["--name", "$(POD_NAME)", "--http", "$(POD_IP):8080"],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
    }
    web = plan(pod([container])).main[0]
    assert web.argv == (
        INTERPRETER,
        *("-m", "rapproxy.testing.backend", "--name", "web-0", "--http", "10.244.2.5:8080"),
    )
    assert web.env["POD_IP"] == "10.244.2.5"
    assert web.env["PATH"] == "/usr/bin"


def test_the_downward_api_gives_pod_and_host_addresses() -> None:
    env = [
        {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "URL", "value": "http://$(MY_IP):80"},
    ]
    web = plan(pod([{"name": "c", "command": ["true"], "env": env}])).main[0]
    assert (web.env["MY_IP"], web.env["HOST"], web.env["NODE"]) == (
        "10.244.2.5",
        "10.10.2.2",
        "node-2",
    )
    assert web.env["URL"] == "http://10.244.2.5:80"


def test_annotations_reach_the_environment_like_a_cold_backups_activation_token() -> None:
    p = pod([{"name": "c", "command": ["true"]}])
    p["metadata"]["annotations"] = {"rapproxy.io/activation-token": "s3cret"}
    path = "metadata.annotations['rapproxy.io/activation-token']"
    env = [
        {"name": "TOKEN", "valueFrom": {"fieldRef": {"fieldPath": path}}},
        {"name": "MISSING", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['x']"}}},
    ]
    p["spec"]["containers"][0]["env"] = env
    main = plan(p).main[0]
    assert (main.env["TOKEN"], main.env["MISSING"]) == ("s3cret", "")


def test_an_unemulated_field_reference_names_the_field() -> None:
    env = [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.podIPs"}}}]
    with pytest.raises(InvalidPodSpec, match=r"spec\.containers\[0\]\.env\[0\]\.valueFrom"):
        plan(pod([{"name": "c", "command": ["true"], "env": env}]))


def test_a_container_without_a_command_cannot_run_from_its_image() -> None:
    with pytest.raises(InvalidPodSpec, match=r"spec\.initContainers\[0\]\.command"):
        plan(pod([{"name": "c", "command": ["true"]}], initContainers=[{"name": "i"}]))


def test_init_containers_are_planned_in_order_before_the_main_ones() -> None:
    inits = [{"name": "first", "command": ["true"]}, {"name": "second", "command": ["true"]}]
    planned = plan(pod([{"name": "c", "command": ["true"]}], initContainers=inits))
    assert [c.name for c in planned.init] == ["first", "second"]
    assert planned.restart_policy == "Always"
    assert planned.grace_seconds == 30.0


def test_an_http_readiness_probe_resolves_named_ports_and_kubernetes_defaults() -> None:
    container = {
        "name": "c",
        "command": ["true"],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
    }
    probe = plan(pod([container])).main[0].readiness
    assert (probe.kind, probe.host, probe.port, probe.path) == (
        "http",
        "10.244.2.5",
        8080,
        "/healthz",
    )
    assert (probe.period, probe.timeout, probe.failure_threshold) == (10.0, 1.0, 3)


def test_the_emulation_can_shorten_the_probe_period() -> None:
    container = {
        "name": "c",
        "command": ["true"],
        "readinessProbe": {"tcpSocket": {"port": 9000}, "periodSeconds": 10},
    }
    probe = plan(pod([container]), probe_period=0.2).main[0].readiness
    assert (probe.kind, probe.port, probe.period) == ("tcp", 9000, 0.2)


def test_a_probe_on_an_unknown_named_port_names_the_field() -> None:
    container = {"name": "c", "command": ["true"], "readinessProbe": {"tcpSocket": {"port": "x"}}}
    with pytest.raises(InvalidPodSpec, match=r"readinessProbe\.tcpSocket\.port"):
        plan(pod([container]))


@pytest.mark.parametrize(
    ("policy", "code", "restart"),
    [
        ("Always", 0, True),
        ("Always", 1, True),
        ("OnFailure", 0, False),
        ("OnFailure", 2, True),
        ("Never", 1, False),
    ],
)
def test_restart_follows_the_restart_policy(policy: str, code: int, restart: bool) -> None:
    assert should_restart(policy, code) is restart


def test_failed_init_containers_are_retried_unless_the_pod_never_restarts() -> None:
    assert should_retry_init("Always") and should_retry_init("OnFailure")
    assert not should_retry_init("Never")


def test_back_off_doubles_up_to_its_cap() -> None:
    assert [backoff_seconds(n, 0.2, 1.0) for n in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
