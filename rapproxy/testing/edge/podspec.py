"""From a pod object to what the process runtime does: argv, environment, probes, restarts.

Pure: no I/O. The emulated kubelet's process runtime (`runtime.py`) asks this module how to run
each container of a pod, so the Kubernetes semantics it reproduces are testable without
processes:

* a container runs `command` + `args` as given (there are no images: the image name is ignored,
  so a container without `command` cannot run and is rejected, naming the field);
* `$(VAR)` in command and args expands from the container's environment, `$$(VAR)` stays a
  literal `$(VAR)`, an unknown `$(VAR)` is left as is — as the kubelet does;
* the environment is the runtime's base environment (PATH and the like, standing in for the
  image's) plus `env` entries: literal `value`s and the downward API's `fieldRef`s (status.podIP,
  status.hostIP, metadata.name/namespace/uid, metadata.labels['k'], metadata.annotations['k']
  — how a cold backup's `bps-wait` gets its activation token —, spec.nodeName,
  spec.serviceAccountName), and
  `POD_IP` always, so an experiment pod can bind its own address;
* `python`/`python3` as the executable mean this interpreter (`sys.executable`, so pods use the
  project's environment), and a bare name is looked up first beside it (the venv's `rapproxy`);
* readiness: an `httpGet` or `tcpSocket` readinessProbe (named ports resolved against the
  container's ports, host defaulting to the pod IP), with Kubernetes' defaults for the timings;
  `exec` probes run the command; without a probe, a running container is ready;
* restarts follow `restartPolicy` with the kubelet's doubling back-off, scaled down here.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JsonObject = dict[str, Any]
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_KEYED_FIELD = re.compile(r"""^metadata\.(labels|annotations)\[(['"])(.+)\2\]$""")


class InvalidPodSpec(ValueError):
    """The pod cannot be run by the process runtime; the message names the field."""


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    """A readiness probe with Kubernetes' defaults filled in (seconds)."""

    kind: str  # "http" | "tcp" | "exec"
    host: str
    port: int
    path: str = "/"
    command: tuple[str, ...] = ()
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3


@dataclass(frozen=True, slots=True)
class ContainerPlan:
    """How to run one container: the argv to exec, its environment and working directory."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str | None
    readiness: ProbeSpec | None


@dataclass(frozen=True, slots=True)
class PodPlan:
    """Init containers (run to completion, in order), then the main containers."""

    init: tuple[ContainerPlan, ...]
    main: tuple[ContainerPlan, ...]
    restart_policy: str
    grace_seconds: float


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: known variables replaced, `$$` → `$`, others kept."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR.sub(replace, text)


def resolve_executable(name: str, interpreter: str) -> str:
    """`python`/`python3` → this interpreter; a bare name beside it first, then on PATH."""
    if name in ("python", "python3"):
        return interpreter
    if "/" in name:
        return name
    beside = Path(interpreter).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name) or name


def _field(pod: JsonObject, path: str, pod_ip: str, host_ip: str, where: str) -> str:
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    values = {
        "status.podIP": pod_ip,
        "status.hostIP": host_ip,
        "metadata.name": metadata.get("name", ""),
        "metadata.namespace": metadata.get("namespace", ""),
        "metadata.uid": metadata.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
    }
    if path in values:
        return str(values[path])
    keyed = _KEYED_FIELD.match(path)
    if keyed is not None:
        # An absent key gives an empty value, as the kubelet does.
        return str((metadata.get(keyed.group(1)) or {}).get(keyed.group(3), ""))
    raise InvalidPodSpec(f"{where}.valueFrom.fieldRef.fieldPath: {path!r} is not emulated")


def container_env(
    pod: JsonObject,
    container: JsonObject,
    where: str,
    *,
    pod_ip: str,
    host_ip: str,
    base: Mapping[str, str],
) -> dict[str, str]:
    """The environment of a container: base, POD_IP, then its `env` in order."""
    env = dict(base)
    env["POD_IP"] = pod_ip
    for i, entry in enumerate(container.get("env") or []):
        here = f"{where}.env[{i}]"
        name = entry.get("name")
        if not name:
            raise InvalidPodSpec(f"{here}.name: required")
        if "valueFrom" in entry:
            ref = (entry["valueFrom"] or {}).get("fieldRef")
            if ref is None:
                raise InvalidPodSpec(f"{here}.valueFrom: only fieldRef is emulated")
            env[name] = _field(pod, str(ref.get("fieldPath", "")), pod_ip, host_ip, here)
        else:
            env[name] = expand(str(entry.get("value", "")), env)
    return env


def _port(container: JsonObject, value: Any, where: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    for port in container.get("ports") or []:
        if port.get("name") == value:
            return int(port["containerPort"])
    raise InvalidPodSpec(f"{where}.port: no container port named {value!r}")


def readiness_probe(
    container: JsonObject, where: str, pod_ip: str, env: Mapping[str, str], period: float | None
) -> ProbeSpec | None:
    """The container's readinessProbe, defaults applied; `period` overrides periodSeconds."""
    probe = container.get("readinessProbe")
    if not probe:
        return None
    where = f"{where}.readinessProbe"
    timings = {
        "initial_delay": float(probe.get("initialDelaySeconds", 0)),
        "period": period if period is not None else float(probe.get("periodSeconds", 10)),
        "timeout": float(probe.get("timeoutSeconds", 1)),
        "success_threshold": int(probe.get("successThreshold", 1)),
        "failure_threshold": int(probe.get("failureThreshold", 3)),
    }
    if "httpGet" in probe:
        get = probe["httpGet"] or {}
        if (get.get("scheme") or "HTTP").upper() != "HTTP":
            raise InvalidPodSpec(f"{where}.httpGet.scheme: only HTTP is emulated")
        return ProbeSpec(
            "http",
            get.get("host") or pod_ip,
            _port(container, get.get("port"), f"{where}.httpGet"),
            get.get("path") or "/",
            **timings,  # type: ignore[arg-type]
        )
    if "tcpSocket" in probe:
        tcp = probe["tcpSocket"] or {}
        return ProbeSpec(
            "tcp",
            tcp.get("host") or pod_ip,
            _port(container, tcp.get("port"), f"{where}.tcpSocket"),
            **timings,  # type: ignore[arg-type]
        )
    if "exec" in probe:
        command = (probe["exec"] or {}).get("command") or []
        if not command:
            raise InvalidPodSpec(f"{where}.exec.command: required")
        return ProbeSpec(
            "exec",
            pod_ip,
            0,
            command=tuple(expand(str(c), env) for c in command),
            **timings,  # type: ignore[arg-type]
        )
    raise InvalidPodSpec(f"{where}: expected httpGet, tcpSocket or exec")


def container_plan(
    pod: JsonObject,
    container: JsonObject,
    where: str,
    *,
    pod_ip: str,
    host_ip: str,
    base_env: Mapping[str, str],
    interpreter: str,
    probe_period: float | None = None,
) -> ContainerPlan:
    name = str(container.get("name") or "")
    command: Sequence[Any] = container.get("command") or []
    if not command:
        raise InvalidPodSpec(
            f"{where}.command: required (images are not run here; give the command to execute)"
        )
    env = container_env(pod, container, where, pod_ip=pod_ip, host_ip=host_ip, base=base_env)
    words = [expand(str(word), env) for word in [*command, *(container.get("args") or [])]]
    words[0] = resolve_executable(words[0], interpreter)
    return ContainerPlan(
        name,
        tuple(words),
        env,
        container.get("workingDir"),
        readiness_probe(container, where, pod_ip, env, probe_period),
    )


def pod_plan(
    pod: JsonObject,
    *,
    pod_ip: str,
    host_ip: str,
    base_env: Mapping[str, str] | None = None,
    interpreter: str,
    probe_period: float | None = None,
) -> PodPlan:
    """Everything needed to run `pod`, or `InvalidPodSpec` naming the first unusable field."""
    spec = pod.get("spec") or {}
    base = dict(os.environ if base_env is None else base_env)

    def plans(kind: str) -> tuple[ContainerPlan, ...]:
        return tuple(
            container_plan(
                pod,
                container,
                f"spec.{kind}[{i}]",
                pod_ip=pod_ip,
                host_ip=host_ip,
                base_env=base,
                interpreter=interpreter,
                probe_period=probe_period,
            )
            for i, container in enumerate(spec.get(kind) or [])
        )

    main = plans("containers")
    if not main:
        raise InvalidPodSpec("spec.containers: at least one container is required")
    policy = spec.get("restartPolicy") or "Always"
    if policy not in ("Always", "OnFailure", "Never"):
        raise InvalidPodSpec(f"spec.restartPolicy: {policy!r}")
    grace = spec.get("terminationGracePeriodSeconds")
    return PodPlan(plans("initContainers"), main, policy, float(30 if grace is None else grace))


def should_restart(policy: str, exit_code: int) -> bool:
    """Whether a main container that exited with `exit_code` is started again."""
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


def should_retry_init(policy: str) -> bool:
    """A failed init container is retried unless the pod never restarts (then the pod fails)."""
    return policy != "Never"


def backoff_seconds(restarts: int, base: float, cap: float) -> float:
    """The kubelet's doubling crash-loop back-off (10 s … 5 min there; `base` … `cap` here)."""
    return float(min(cap, base * (2 ** max(0, restarts))))
