"""Server-filled defaults of built-in kinds, as a v1.28 API server with default admission adds them.

Pure functions that take a freshly decoded object and return it completed: a Namespace gets its
`kubernetes.io/metadata.name` label, a Service its ClusterIP and policies, a Pod the
ServiceAccount token volume, tolerations and the rest (see the fixtures' README, fact 22).
Clients such as kubectl diff against these defaults, so they are worth matching field by field.
"""

from __future__ import annotations

import random
import time
from typing import Any

JsonObject = dict[str, Any]

SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # apimachinery's utilrand alphabet


def random_suffix(length: int = 5) -> str:
    return "".join(random.choice(SUFFIX_ALPHABET) for _ in range(length))


def now_rfc3339(offset_seconds: float = 0.0) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + offset_seconds))


def now_micro() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


def default_namespace(obj: JsonObject) -> None:
    name = obj["metadata"]["name"]
    labels = obj["metadata"].setdefault("labels", {})
    labels["kubernetes.io/metadata.name"] = name
    spec = obj.setdefault("spec", {})
    spec.setdefault("finalizers", ["kubernetes"])
    obj["status"] = {"phase": "Active"}


def default_service(obj: JsonObject, allocate_ip: Any) -> None:
    spec = obj.setdefault("spec", {})
    for port in spec.get("ports") or []:
        port.setdefault("protocol", "TCP")
        if "targetPort" not in port and "port" in port:
            port["targetPort"] = port["port"]
    spec.setdefault("type", "ClusterIP")
    if spec["type"] != "ExternalName":
        if spec.get("clusterIP") in (None, ""):
            spec["clusterIP"] = allocate_ip()
        if spec["clusterIP"] != "None":
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
        else:
            spec.setdefault("clusterIPs", ["None"])
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("internalTrafficPolicy", "Cluster")
    spec.setdefault("sessionAffinity", "None")
    if spec["type"] in ("NodePort", "LoadBalancer"):
        spec.setdefault("externalTrafficPolicy", "Cluster")
        for port in spec.get("ports") or []:
            port.setdefault("nodePort", random.randint(30000, 32767))
    obj["status"] = {"loadBalancer": {}}


def _default_container(container: JsonObject, token_volume: str | None) -> None:
    for port in container.get("ports") or []:
        port.setdefault("protocol", "TCP")
    container.setdefault("resources", {})
    if token_volume is not None:
        mounts = container.setdefault("volumeMounts", [])
        mounts.append(
            {
                "name": token_volume,
                "readOnly": True,
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
            }
        )
    container.setdefault("terminationMessagePath", "/dev/termination-log")
    container.setdefault("terminationMessagePolicy", "File")
    image = str(container.get("image", ""))
    tag = image.rsplit("/", 1)[-1]
    latest = ":" not in tag or tag.endswith(":latest")
    container.setdefault(
        "imagePullPolicy", "Always" if latest and "@" not in image else "IfNotPresent"
    )


def default_pod(obj: JsonObject) -> None:
    spec = obj.setdefault("spec", {})
    token_volume: str | None = None
    if spec.get("automountServiceAccountToken", True) is not False:
        token_volume = f"kube-api-access-{random_suffix()}"
        volumes = spec.setdefault("volumes", [])
        volumes.append(
            {
                "name": token_volume,
                "projected": {
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {
                            "configMap": {
                                "name": "kube-root-ca.crt",
                                "items": [{"key": "ca.crt", "path": "ca.crt"}],
                            }
                        },
                        {
                            "downwardAPI": {
                                "items": [
                                    {
                                        "path": "namespace",
                                        "fieldRef": {
                                            "apiVersion": "v1",
                                            "fieldPath": "metadata.namespace",
                                        },
                                    }
                                ]
                            }
                        },
                    ],
                    "defaultMode": 420,
                },
            }
        )
    for container in spec.get("initContainers") or []:
        _default_container(container, token_volume)
    for container in spec.get("containers") or []:
        _default_container(container, token_volume)
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("serviceAccountName", "default")
    spec.setdefault("serviceAccount", spec["serviceAccountName"])
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    tolerations = spec.setdefault("tolerations", [])
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        if not any(t.get("key") == key for t in tolerations):
            tolerations.append(
                {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            )
    spec.setdefault("priority", 0)
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    obj["status"] = {"phase": "Pending", "qosClass": _qos_class(spec)}


def _qos_class(spec: JsonObject) -> str:
    containers = list(spec.get("containers") or []) + list(spec.get("initContainers") or [])
    resources = [c.get("resources") or {} for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in resources):
        return "BestEffort"
    guaranteed = all(
        r.get("limits")
        and all(
            r["limits"].get(k) == (r.get("requests") or r["limits"]).get(k)
            for k in ("cpu", "memory")
        )
        and "cpu" in r["limits"]
        and "memory" in r["limits"]
        for r in resources
    )
    return "Guaranteed" if guaranteed else "Burstable"


def normalize_pod_status(obj: JsonObject) -> None:
    """Pod conditions always carry lastProbeTime/lastTransitionTime (null when unset)."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        cond.setdefault("lastProbeTime", None)
        cond.setdefault("lastTransitionTime", None)


def default_node(obj: JsonObject) -> None:
    spec = obj.setdefault("spec", {})
    taints = spec.setdefault("taints", [])
    if not any(t.get("key") == "node.kubernetes.io/not-ready" for t in taints):
        taints.append({"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"})
    status = obj.setdefault("status", {})
    status.setdefault("daemonEndpoints", {"kubeletEndpoint": {"Port": 0}})
    info = status.setdefault("nodeInfo", {})
    for key in (
        "machineID",
        "systemUUID",
        "bootID",
        "kernelVersion",
        "osImage",
        "containerRuntimeVersion",
        "kubeletVersion",
        "kubeProxyVersion",
        "operatingSystem",
        "architecture",
    ):
        info.setdefault(key, "")


def default_endpoint_slice(obj: JsonObject) -> None:
    for port in obj.get("ports") or []:
        port.setdefault("protocol", "TCP")


def default_crd(obj: JsonObject) -> None:
    spec = obj.setdefault("spec", {})
    spec.setdefault("conversion", {"strategy": "None"})
    storage = [v["name"] for v in spec.get("versions") or [] if v.get("storage")]
    obj["status"] = {
        "conditions": None,
        "acceptedNames": {"plural": "", "kind": ""},
        "storedVersions": storage,
    }


def generated_name(prefix: str) -> str:
    return prefix + random_suffix()
