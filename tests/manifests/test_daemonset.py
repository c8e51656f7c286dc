"""The rendered DaemonSet, RBAC and configuration have the properties docs/security.md promises.

Asserted on kustomize's output for both modes, i.e. on what an operator actually applies, not on
the source files, so a patch in an overlay cannot silently undo a property of the base.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import yaml

from rapproxy import config

OVERLAYS = ("replace-kube-proxy", "beside-kube-proxy")
Render = Callable[[str], list[dict[str, Any]]]
Find = Callable[..., dict[str, Any]]


@pytest.fixture(params=OVERLAYS)
def objects(request: pytest.FixtureRequest, render: Render) -> list[dict[str, Any]]:
    return render(f"overlays/{request.param}")


def pod_spec(objects: list[dict[str, Any]], find: Find) -> dict[str, Any]:
    spec: dict[str, Any] = find(objects, "DaemonSet", "rapproxy")["spec"]["template"]["spec"]
    return spec


def container(objects: list[dict[str, Any]], find: Find) -> dict[str, Any]:
    (only_container,) = pod_spec(objects, find)["containers"]
    return dict(only_container)


def loaded_config(objects: list[dict[str, Any]], find: Find) -> config.RapproxyConfiguration:
    text = find(objects, "ConfigMap", "rapproxy-config")["data"]["rapproxy.yaml"]
    return config.from_yaml(text)


def test_embedded_configuration_loads_and_validates(
    objects: list[dict[str, Any]], find: Find
) -> None:
    loaded_config(objects, find)  # raises ConfigError naming the field if it is invalid


def test_runs_on_every_node_in_the_host_network_with_node_critical_priority(
    objects: list[dict[str, Any]], find: Find
) -> None:
    spec = pod_spec(objects, find)
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert not spec.get("hostPID") and not spec.get("hostIPC")
    env = {e["name"]: e for e in container(objects, find)["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_has_only_net_admin_and_net_raw_and_a_read_only_root(
    objects: list[dict[str, Any]], find: Find
) -> None:
    security = container(objects, find)["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert security.get("privileged", False) is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsUser"] == 0
    assert pod_spec(objects, find)["securityContext"]["seccompProfile"] == {
        "type": "RuntimeDefault"
    }


def test_mounts_only_the_xtables_lock_and_kernel_modules_from_the_host(
    objects: list[dict[str, Any]], find: Find
) -> None:
    volumes = {v["name"]: v for v in pod_spec(objects, find)["volumes"]}
    host_paths = {name: v["hostPath"] for name, v in volumes.items() if "hostPath" in v}
    assert host_paths == {
        "xtables-lock": {"path": "/run/xtables.lock", "type": "FileOrCreate"},
        "lib-modules": {"path": "/lib/modules", "type": "Directory"},
    }
    mounts = {m["name"]: m for m in container(objects, find)["volumeMounts"]}
    assert mounts["xtables-lock"]["mountPath"] == "/run/xtables.lock"
    assert mounts["lib-modules"] == {
        "name": "lib-modules",
        "mountPath": "/lib/modules",
        "readOnly": True,
    }


def test_probes_and_telemetry_use_the_configured_healthz_port(
    objects: list[dict[str, Any]], find: Find
) -> None:
    c = container(objects, find)
    cfg = loaded_config(objects, find)
    _host, healthz_port = config.parse_host_port(cfg.healthz_bind_address, "healthzBindAddress")
    assert healthz_port == cfg.rap.telemetry_port
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": healthz_port}
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": healthz_port}
    metrics_host, _port = config.parse_host_port(cfg.metrics_bind_address, "metricsBindAddress")
    assert metrics_host == "127.0.0.1", "/metrics and /debug/state must stay on loopback"


def test_requests_cpu_and_memory_and_limits_only_memory(
    objects: list[dict[str, Any]], find: Find
) -> None:
    resources = container(objects, find)["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert set(resources["limits"]) == {"memory"}


def test_updates_start_the_new_pod_beside_the_old_and_nothing_blocks_the_surge(
    objects: list[dict[str, Any]], find: Find
) -> None:
    strategy = find(objects, "DaemonSet", "rapproxy")["spec"]["updateStrategy"]
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    # In the host network every declared container port is a host port; the scheduler would
    # refuse the surge pod on a node whose old pod holds it, and the update would stall.
    spec = pod_spec(objects, find)
    for c in [*spec["containers"], *spec.get("initContainers", [])]:
        assert not c.get("ports"), f"{c['name']} declares ports: {c['ports']}"
    # The handover is an abstract unix socket in the host network: no hostPath for it.
    proxy = loaded_config(objects, find).proxy
    assert (config.handover_address(proxy) or "").startswith("@")
    # The drain ends on its own before the kubelet's SIGKILL.
    assert proxy.drain_timeout < spec["terminationGracePeriodSeconds"]


def test_mounts_the_generated_config_and_token_where_the_config_expects_them(
    objects: list[dict[str, Any]], find: Find
) -> None:
    c = container(objects, find)
    volumes = {v["name"]: v for v in pod_spec(objects, find)["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    config_map = find(objects, "ConfigMap", "rapproxy-config")
    secret = find(objects, "Secret", "rapproxy-telemetry-token")

    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    config_path = mounts["config"]["mountPath"]
    assert f"--config={config_path}" in c["args"]

    assert volumes["telemetry-token"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert set(secret["data"]) == {"token"}
    token_dir = mounts["telemetry-token"]["mountPath"]
    assert loaded_config(objects, find).rap.token_file == f"{token_dir}/token"


def test_rbac_names_every_grant_and_leases_only_in_the_namespaced_role(
    objects: list[dict[str, Any]],
) -> None:
    # That the rules grant exactly the calls the code makes is proven by running the code:
    # tests/integration/test_rbac.py. Here, the shape any such grant must have.
    granted = set()
    for role in (o for o in objects if o["kind"] in ("ClusterRole", "Role")):
        for rule in role["rules"]:
            assert set(rule) == {"apiGroups", "resources", "verbs"}, role["metadata"]["name"]
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        granted.add((role["kind"], group, resource, verb))
    assert not any("*" in part for grant in granted for part in grant)
    leases = ("coordination.k8s.io", "leases")
    assert {kind for kind, *call in granted if tuple(call[:2]) == leases} == {"Role"}
    assert {tuple(call[:2]) for kind, *call in granted if kind == "Role"} == {leases}
    assert [o["kind"] for o in objects].count("Role") == 1


def test_leases_are_granted_in_the_configured_lease_namespace_to_the_daemonset(
    objects: list[dict[str, Any]], find: Find
) -> None:
    role = find(objects, "Role", "rapproxy-leader-election")
    binding = find(objects, "RoleBinding", "rapproxy-leader-election")
    assert role["metadata"]["namespace"] == loaded_config(objects, find).bps.lease_namespace
    assert binding["metadata"]["namespace"] == role["metadata"]["namespace"]
    account = pod_spec(objects, find)["serviceAccountName"]
    daemonset_namespace = find(objects, "DaemonSet", "rapproxy")["metadata"]["namespace"]
    for binding in (o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": daemonset_namespace}
        ]


def test_beside_mode_differs_from_replacing_only_in_proxy_name_and_ports(
    render: Render, find: Find
) -> None:
    replace = config.to_mapping(loaded_config(render("overlays/replace-kube-proxy"), find))
    beside = config.to_mapping(loaded_config(render("overlays/beside-kube-proxy"), find))

    def leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out = {}
        for key, value in tree.items():
            path = f"{prefix}{key}"
            out.update(leaves(value, f"{path}.") if isinstance(value, dict) else {path: value})
        return out

    replace_leaves, beside_leaves = leaves(replace), leaves(beside)
    differing = {k for k in replace_leaves if replace_leaves[k] != beside_leaves[k]}
    assert differing == {
        "serviceProxyName",
        "healthzBindAddress",
        "metricsBindAddress",
        "rap.telemetryPort",
    }
    assert replace["serviceProxyName"] == ""
    assert beside["serviceProxyName"] == "rapproxy"


def test_replace_mode_dials_the_api_server_directly(render: Render, find: Find) -> None:
    objects = render("overlays/replace-kube-proxy")
    c = container(objects, find)
    (source,) = c["envFrom"]
    config_map = find(objects, "ConfigMap", "rapproxy-apiserver")
    assert source["configMapRef"]["name"] == config_map["metadata"]["name"]
    assert set(config_map["data"]) == {"KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"}
    assert "envFrom" not in container(render("overlays/beside-kube-proxy"), find)


def test_image_is_pinned_to_a_tag(objects: list[dict[str, Any]], find: Find) -> None:
    image = container(objects, find)["image"]
    assert ":" in image.rsplit("/", 1)[-1]
    assert not image.endswith(":latest")


def test_base_configuration_file_is_the_replace_mode_one(render: Render, find: Find) -> None:
    base = yaml.safe_load(
        find(render("base"), "ConfigMap", "rapproxy-config")["data"]["rapproxy.yaml"]
    )
    assert base["serviceProxyName"] == ""
