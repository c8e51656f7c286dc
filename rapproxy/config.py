"""RapproxyConfiguration: every setting of the daemon, its default, its meaning, its validation.

Settings are nested frozen dataclasses (as kopf does), so the rest of the code gets typed,
immutable values and never looks a string up in a dict. Field names mirror
`KubeProxyConfiguration` where the two overlap (`healthzBindAddress`, `metricsBindAddress`,
`iptables.minSyncPeriod`, `iptables.syncPeriod`, `clientConnection.kubeconfig`, ...), so an
operator migrating from kube-proxy recognises them.

Three sources, later ones winning: the YAML file, `RAPPROXY_*` environment variables (the field
path in upper snake case: `RAPPROXY_RAP_OVERLOAD_THRESHOLD=0.9`), and command-line flags
(`--set rap.overloadThreshold=0.9`). Every field carries a `doc` in its metadata; the
configuration reference in docs/ is generated from these, so it cannot drift.

Pure: parsing takes text and mappings, never reads files or the environment itself.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from rapproxy.model.service import DataplaneMode, LbPolicy

API_VERSION = "rapproxy.io/v1alpha1"
KIND = "RapproxyConfiguration"


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the field path."""


def _doc(text: str, **kwargs: Any) -> Any:
    return field(metadata={"doc": text}, **kwargs)


@dataclass(frozen=True, slots=True)
class ClientConnection:
    kubeconfig: str = _doc(
        "Path to a kubeconfig; empty means the files of $KUBECONFIG, as kubectl reads them, "
        "then in-cluster config.",
        default="",
    )
    context: str = _doc("kubeconfig context to use; empty means the current context.", default="")
    request_timeout: float = _doc("Seconds before an API request is abandoned.", default=30.0)


@dataclass(frozen=True, slots=True)
class IptablesSettings:
    min_sync_period: float = _doc(
        "Minimum seconds between two rule syncs; changes arriving faster are coalesced.",
        default=1.0,
    )
    sync_period: float = _doc(
        "Maximum seconds between full, idempotent resyncs of rules and data plane.", default=30.0
    )
    retry_period: float = _doc("Seconds before a failed sync is retried.", default=2.0)
    node_port_addresses: tuple[str, ...] = _doc(
        "CIDRs whose local addresses accept NodePort traffic; empty means every local address "
        "except loopback.",
        default=(),
    )


class RelayEngine(enum.StrEnum):
    """What runs the userspace TCP relay (rapproxy/dataplane/tcp.py and native.py)."""

    ASYNCIO = "asyncio"  # asyncio Protocols on uvloop, all Python
    NATIVE = "native"  # the C engine (_native.c) on the loop's thread; decisions in Python


NATIVE_MAX_DIAL_ATTEMPTS = 8
"""The native engine's limit on proxy.dialTimeouts (one deadline queue per attempt)."""


@dataclass(frozen=True, slots=True)
class ProxySettings:
    tcp_port: int = _doc(
        "Port of the single TCP listener every TCP service is redirected to.", default=15001
    )
    udp_port_range: str = _doc(
        "Range (first-last) of ports for the per-service-port UDP sockets.", default="15100-15999"
    )
    listen_address: str = _doc(
        "Address the TCP listener binds; the IPv6 listener binds '::' when IPv6 services exist.",
        default="0.0.0.0",
    )
    dial_timeouts: tuple[float, ...] = _doc(
        "Connect timeout of each dial attempt, each on an endpoint not tried before for that "
        "connection; the number of entries is the number of attempts (kube-proxy userspace: "
        "0.25, 0.5, 1, 2).",
        default=(0.25, 0.5, 1.0, 2.0),
    )
    idle_timeout: float = _doc(
        "Seconds a TCP connection may carry no bytes either way before both sides are closed.",
        default=3600.0,
    )
    udp_idle_timeout: float = _doc(
        "Seconds a UDP client flow is kept without traffic.", default=30.0
    )
    max_connections: int = _doc(
        "Cap on concurrent proxied TCP connections; new ones beyond it are closed at once.",
        default=65536,
    )
    max_udp_flows: int = _doc("Cap on concurrent UDP client flows per service port.", default=4096)
    workers: int = _doc(
        "Processes that accept and relay TCP connections, all on the one listening socket "
        "(inherited, one accept queue): the main process and workers - 1 relay-only children "
        "fed the same Services and telemetry. 0: one per CPU. Each process balances with what "
        "it measures itself, so RAP's queue signal sees 1/workers of the node's connections "
        "(docs/architecture.md).",
        default=1,
    )
    relay_engine: RelayEngine = _doc(
        "What relays TCP connections. 'native': a C engine built with the package (make "
        "install), driven from the event loop's thread: accept, original destination, dial "
        "and its timeouts, byte copying, half-close, resets, idle and cap in C; the "
        "balancing decisions and accounting stay in Python, so every lbPolicy works the same. "
        "'asyncio': the all-Python relay on uvloop. A missing native build is an error at "
        "start, never a silent fall-back. The native engine adds a connection's bytes to the "
        "counters once a second rather than per read, and allows at most 8 dialTimeouts.",
        default=RelayEngine.NATIVE,
    )
    drain_timeout: float = _doc(
        "Seconds a stopping rapproxy (SIGTERM) keeps relaying the TCP connections it already "
        "has, after it stopped accepting new ones; those still open then are reset. Keep it "
        "below the pod's terminationGracePeriodSeconds (30 in the manifests), or the kubelet's "
        "SIGKILL ends the drain first.",
        default=25.0,
    )
    handover_socket: str = _doc(
        "Unix socket through which a starting rapproxy takes the listening sockets over from the "
        "one running on the node, so a rolling update refuses no connection: '@name' is an "
        "abstract socket (scoped to the network namespace: the host's, for the DaemonSet), "
        "'/path' a socket file; empty means '@rapproxy-handover-<proxy.tcpPort>'; "
        "'disabled' turns handover off.",
        default="",
    )
    lb_policy: LbPolicy = _doc(
        "Default balancing policy; a Service overrides it with annotation rapproxy.io/lb-policy.",
        default=LbPolicy.RAP,
    )


class KernelBackend(enum.StrEnum):
    """Which kernel interface programs kernel-mode Services (rules/kernel.py, rules/nftables.py)."""

    IPTABLES = "iptables"
    NFTABLES = "nftables"


@dataclass(frozen=True, slots=True)
class DataplaneSettings:
    mode: DataplaneMode = _doc(
        "Default data plane of a Service: 'userspace' (the relay, every RAP policy) or "
        "'kernel' (DNAT in the kernel, probabilities from RAP's telemetry weights); a Service "
        "overrides it with annotation rapproxy.io/dataplane.",
        default=DataplaneMode.USERSPACE,
    )
    kernel_backend: KernelBackend = _doc(
        "Kernel mode: 'iptables' (chains beside the userspace redirects, written with "
        "iptables-restore; kube-proxy's iptables layout) or 'nftables' (rapproxy's own nft "
        "tables 'ip rapproxy' and 'ip6 rapproxy', hooked before iptables' nat, written with "
        "'nft -f'; only the changed Services are written, needs the nft command). Userspace "
        "Services keep their iptables redirects either way.",
        default=KernelBackend.IPTABLES,
    )
    weight_period: float = _doc(
        "Kernel mode: the longest time in seconds between two recomputations of the endpoint "
        "weights; every telemetry sample (this node's or a peer's) also triggers one at once.",
        default=1.0,
    )
    weight_threshold: float = _doc(
        "Kernel mode: a Service's probabilities are rewritten only when some endpoint's share "
        "(with nftables' shared node splits: some node's) moved by more than this (0..1); "
        "endpoint changes are always written.",
        default=0.05,
    )
    kernel_sample_share: float = _doc(
        "Kernel mode, policy rap, while this node is overloaded: the fraction (0..1, below 1) "
        "of a Service's new connections the kernel REDIRECTs to the proxy, whose per-connection "
        "rap decisions set the weights for the rest. While the node copes every connection "
        "stays in the kernel. The default keeps kernel mode within 0.9x of userspace rap in the "
        "edge grid's overloaded cells (0.2 did in 3-4 of 9: a random split cannot time "
        "connections around a throttled pod's stalls); lower it to spend less proxy CPU on an "
        "overloaded node. 0: weights from telemetry alone (rap-aimd's split). Not used with "
        "ClientIP affinity.",
        default=0.8,
    )
    masquerade_all: bool = _doc(
        "Kernel mode: SNAT every connection to a Service (kube-proxy's masqueradeAll).",
        default=False,
    )
    cluster_cidrs: tuple[str, ...] = _doc(
        "Kernel mode: pod CIDRs; connections to a ClusterIP from outside them are SNATed "
        "(kube-proxy's clusterCIDR). Empty: only hairpin and external-Cluster traffic is.",
        default=(),
    )
    masquerade_bit: int = _doc(
        "Kernel mode: the fwmark bit (0-31) that asks for SNAT in rapproxy's POSTROUTING chain "
        "(kube-proxy's masqueradeBit).",
        default=14,
    )
    node_mark_mask: int = _doc(
        "Kernel mode with nftables: the fwmark bits (contiguous, at least two; default "
        "0xff0000, bits 16-23) that carry the node a layout's shared draw picked to the "
        "Service's own chain, on a Service's first packet in nat prerouting/output only. The "
        "draw clears them first and the Service's chain again as it DNATs, so they mean "
        "nothing afterwards, but whatever another component had in them is lost: choose bits "
        "no other component (CNI, policy agent) uses. A field of n bits tells 2^n - 2 nodes "
        "apart; a Service whose endpoints are on more nodes gets weights of its own.",
        default=0x00FF0000,
    )


@dataclass(frozen=True, slots=True)
class RapWeights:
    cpu: float = _doc("Weight of available CPU in a node's score.", default=1.0)
    memory: float = _doc("Weight of available memory in a node's score.", default=1.0)
    rtt: float = _doc("Weight of minRTT/RTT in a node's score.", default=1.0)


@dataclass(frozen=True, slots=True)
class RapSettings:
    overload_threshold: float = _doc(
        "CPU or memory utilization (0-1) at which the local node counts as overloaded.",
        default=0.8,
    )
    exit_threshold: float = _doc(
        "Utilization below which an overloaded node counts as healthy again (hysteresis).",
        default=0.7,
    )
    spill_backoff: float = _doc(
        "While the local node is overloaded, each local sample multiplies the share of new "
        "connections it keeps by this (0: send everything away at once, the paper's switch).",
        default=0.7,
    )
    spill_recovery: float = _doc(
        "Once the local node is below exitThreshold, each local sample adds this to its share "
        "(1: take everything back at once).",
        default=0.1,
    )
    spill_margin: float = _doc(
        "Policy rap: the local endpoints' expected cost must exceed the best remote's by this "
        "fraction before traffic spills; it all returns once the local queue has drained and "
        "its cost is back within this fraction.",
        default=0.25,
    )
    latency_rise: float = _doc(
        "Policy rap: weight of a measured connect or service time above the running average "
        "(1: jump to it, as a peak-EWMA does; above latencyFall the average settles above the "
        "mean). A figure not sampled for a while gives the next sample more weight.",
        default=0.05,
    )
    latency_fall: float = _doc(
        "Policy rap: weight of a measured connect or service time below the running average.",
        default=0.05,
    )
    spill_needs_overload: bool = _doc(
        "Policy rap: spill only while the local node is overloaded by its telemetry "
        "(overloadThreshold/exitThreshold); a queue on a node with CPU to spare is the "
        "clients' concurrency, which a remote pod would queue as well, a round trip further. "
        "false: the local queue's cost alone decides.",
        default=True,
    )
    signal_hold: float = _doc(
        "Policy rap: seconds an endpoint's own measurements are trusted as they are; after "
        "that they slide back to the telemetry prior over as many seconds again.",
        default=2.0,
    )
    weights: RapWeights = _doc("Score weights.", default_factory=RapWeights)
    top_candidates: int = _doc(
        "How many nodes share spilled traffic: the best-scored (rap-aimd, at random weighted "
        "by score) or those with the cheapest priors (rap, power of two choices among their "
        "endpoints).",
        default=3,
    )
    telemetry_interval: float = _doc("Seconds between polls of each peer's telemetry.", default=1.0)
    stale_after_periods: int = _doc(
        "A node's figures older than this many intervals count as unknown.", default=3
    )
    rtt_ewma_alpha: float = _doc("Weight of a new RTT sample in the moving average.", default=0.3)
    telemetry_port: int = _doc(
        "Port of GET /rap/v1/telemetry on the node IP (served on the healthz server).",
        default=10256,
    )
    load_source: str = _doc(
        "Where this node's CPU and memory figures come from: 'host' (psutil), "
        "'cgroup:/sys/fs/cgroup/PATH' (a cgroup v2 directory standing for the node) or "
        '\'file:/PATH\' (JSON {"cpu": 0.9, "memory": 0.3}, for emulations that inject load).',
        default="host",
    )
    token_file: str = _doc(
        "File holding the shared telemetry token (mounted from a Secret); empty disables "
        "peer polling and serving.",
        default="",
    )


@dataclass(frozen=True, slots=True)
class BpsSettings:
    enabled: bool = _doc("Run the BackupPodSet controller (leader-elected).", default=True)
    lease_name: str = _doc("Name of the leader-election Lease.", default="rapproxy-bps")
    lease_namespace: str = _doc("Namespace of the Lease.", default="kube-system")
    lease_duration: float = _doc("Seconds a leader's Lease is valid.", default=15.0)
    renew_deadline: float = _doc("Seconds a leader keeps trying to renew.", default=10.0)
    retry_period: float = _doc("Seconds between attempts to acquire or renew.", default=2.0)
    ready_grace: float = _doc(
        "Seconds a running pod may report Ready=False before it counts as failed; counted from "
        "the latest of the Ready=False transition, the pod's creation and its containers' start "
        "(so also a new or just-activated pod's start-up allowance).",
        default=5.0,
    )
    activation_timeout: float = _doc(
        "Seconds to wait for a cold backup to confirm activation.", default=10.0
    )


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    format: str = _doc("Log format: 'text' or 'json'.", default="text")
    level: str = _doc("Log level: debug, info, warning or error.", default="info")


@dataclass(frozen=True, slots=True)
class RapproxyConfiguration:
    hostname_override: str = _doc(
        "This node's name; defaults to the NODE_NAME environment variable, then the hostname.",
        default="",
    )
    service_proxy_name: str = _doc(
        "Empty: handle every Service not claimed by another proxy (replace kube-proxy). Set: "
        "handle only Services labelled service.kubernetes.io/service-proxy-name=<this>.",
        default="",
    )
    healthz_bind_address: str = _doc(
        "host:port of /healthz, /livez and the telemetry endpoint.", default="0.0.0.0:10256"
    )
    metrics_bind_address: str = _doc(
        "host:port of /metrics and /debug/state.", default="127.0.0.1:10249"
    )
    config_sync_period: float = _doc(
        "Seconds between informer re-lists when watches stay quiet (0 disables).", default=900.0
    )
    client_connection: ClientConnection = _doc(
        "How to reach the API server.", default_factory=ClientConnection
    )
    iptables: IptablesSettings = _doc("Rule sync settings.", default_factory=IptablesSettings)
    proxy: ProxySettings = _doc("Data plane settings.", default_factory=ProxySettings)
    dataplane: DataplaneSettings = _doc(
        "Userspace or kernel forwarding.", default_factory=DataplaneSettings
    )
    rap: RapSettings = _doc("RAP policy and telemetry settings.", default_factory=RapSettings)
    bps: BpsSettings = _doc("BackupPodSet controller settings.", default_factory=BpsSettings)
    logging: LoggingSettings = _doc("Logging.", default_factory=LoggingSettings)


# -- names ----------------------------------------------------------------------------------------


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _snake_upper(name: str) -> str:
    return name.upper()


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)(h|ms|m|s))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(value: object, path: str) -> float:
    """Seconds from a number or a Go-style duration string ("1s", "500ms", "1m30s")."""
    if isinstance(value, bool):
        raise ConfigError(f"{path}: {value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION.match(value.strip()):
        seconds = sum(
            float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(value.strip())
        )
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            raise ConfigError(
                f"{path}: {value!r} is not a duration (use seconds or e.g. '1s', '500ms', '1m')"
            ) from None
    else:
        raise ConfigError(f"{path}: {value!r} is not a duration")
    if not math.isfinite(seconds):
        raise ConfigError(f"{path}: {value!r} is not a finite duration")
    if seconds < 0:
        raise ConfigError(f"{path}: {value!r} must not be negative")
    return seconds


# -- building from mappings -----------------------------------------------------------------------

T = TypeVar("T")


def _hints(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: object, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: must be a mapping")
        return _build(hint, value, path)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: {value!r} is not a boolean")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: {value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
        raise ConfigError(f"{path}: {value!r} is not an integer")
    if hint is float:
        # Every float setting in this file is either seconds or a ratio; both accept numbers,
        # and durations accept Go-style strings too.
        return parse_duration(value, path) if isinstance(value, str) else _number(value, path)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: {value!r} is not a string")
        return value
    if isinstance(hint, type) and issubclass(hint, enum.StrEnum):
        try:
            return hint(str(value))
        except ValueError:
            allowed = ", ".join(p.value for p in hint)
            raise ConfigError(f"{path}: {value!r} is not one of {allowed}") from None
    if origin is tuple:
        (item_hint, _ellipsis) = typing.get_args(hint)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: must be a list")
        return tuple(_convert(item, item_hint, f"{path}[{i}]") for i, item in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{path}: unsupported union setting")  # none exist; keep it loud
    raise ConfigError(f"{path}: unsupported setting type {hint!r}")


def _number(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path}: {value!r} is not a number")
    # Every float setting is seconds, a ratio or a weight: NaN would slip through every `<`
    # comparison in validate(), and a negative number through those that only check an upper bound.
    if not math.isfinite(value):
        raise ConfigError(f"{path}: {value!r} is not a finite number")
    if value < 0:
        raise ConfigError(f"{path}: {value!r} must not be negative")
    return float(value)


def _build(cls: type[T], raw: Mapping[str, Any], path: str) -> T:
    hints = _hints(cls)
    by_camel = {camel(f.name): f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(by_camel), key=str)  # YAML keys need not be strings
    if unknown:
        where = f"{path}." if path else ""
        known = ", ".join(sorted(by_camel))
        raise ConfigError(f"{where}{unknown[0]}: unknown field (known fields: {known})")
    kwargs = {}
    for key, value in raw.items():
        f = by_camel[key]
        kwargs[f.name] = _convert(value, hints[f.name], f"{path}.{key}" if path else key)
    return cls(**kwargs)


def from_mapping(raw: Mapping[str, Any]) -> RapproxyConfiguration:
    """Build and validate a configuration from a parsed RapproxyConfiguration document."""
    body = dict(raw)
    api_version = body.pop("apiVersion", API_VERSION)
    kind = body.pop("kind", KIND)
    if api_version != API_VERSION:
        raise ConfigError(f"apiVersion: {api_version!r}: expected {API_VERSION!r}")
    if kind != KIND:
        raise ConfigError(f"kind: {kind!r}: expected {KIND!r}")
    config = _build(RapproxyConfiguration, body, "")
    validate(config)
    return config


def from_yaml(text: str) -> RapproxyConfiguration:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"not valid YAML: {error}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("the configuration must be a YAML mapping")
    return from_mapping(raw)


def _set_path(tree: dict[str, Any], path: str, value: object) -> None:
    parts = path.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{path}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _env_paths(cls: type[Any], prefix: str = "") -> Iterable[tuple[str, str]]:
    """(ENV_SUFFIX, camel.path) for every leaf setting."""
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        path = f"{prefix}.{camel(f.name)}" if prefix else camel(f.name)
        env = path.replace(".", "_")
        env = re.sub(r"(?<!^)(?=[A-Z])", "_", env).upper().replace("__", "_")
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            yield from _env_paths(hint, path)
        else:
            yield env, path


def env_variable_names() -> dict[str, str]:
    """`RAPPROXY_*` variable → field path, e.g. RAPPROXY_RAP_OVERLOAD_THRESHOLD → rap.overloadThreshold."""
    return {f"RAPPROXY_{env}": path for env, path in _env_paths(RapproxyConfiguration)}


def load(
    yaml_text: str | None,
    environ: Mapping[str, str],
    overrides: Iterable[str] = (),
) -> RapproxyConfiguration:
    """File, then environment, then `path=value` overrides; validated as a whole."""
    tree: dict[str, Any] = {}
    if yaml_text is not None:
        try:
            raw = yaml.safe_load(yaml_text)
        except yaml.YAMLError as error:
            raise ConfigError(f"not valid YAML: {error}") from None
        if raw is not None and not isinstance(raw, Mapping):
            raise ConfigError("the configuration must be a YAML mapping")
        tree = dict(raw or {})
    for variable, path in env_variable_names().items():
        if variable in environ:
            _set_path(tree, path, environ[variable])
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"--set {override!r}: expected path=value")
        path, value = override.split("=", 1)
        try:
            parsed: object = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            # Not YAML (`[::]:10256`): take it as text; the field's conversion judges it and
            # names the field if it is wrong.
            parsed = value
        _set_path(tree, path.strip(), parsed)
    return from_mapping(tree)


# -- validation -----------------------------------------------------------------------------------


def parse_host_port(value: str, path: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(f"{path}: {value!r} is not host:port")
    port = int(port_text)
    if not 0 <= port < 65536:
        raise ConfigError(f"{path}: port {port} out of range")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{path}: {host!r} is not an IP address") from None
    return host, port


def parse_port_range(value: str, path: str) -> range:
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value)
    if not match:
        raise ConfigError(f"{path}: {value!r} is not a range like 15100-15999")
    first, last = int(match.group(1)), int(match.group(2))
    if not 0 < first <= last < 65536:
        raise ConfigError(f"{path}: {value!r} must satisfy 0 < first <= last < 65536")
    return range(first, last + 1)


_UNIX_PATH_MAX = 107  # sun_path is 108 bytes, one of them the terminating (or leading) NUL


def handover_address(proxy: ProxySettings) -> str | None:
    """Where the handover socket lives ('@name' abstract, or a path); None when it is off."""
    value = proxy.handover_socket
    if value == "disabled":
        return None
    if value == "":
        value = f"@rapproxy-handover-{proxy.tcp_port}"
    if not (value.startswith("@") and len(value) > 1) and not value.startswith("/"):
        raise ConfigError(
            f"proxy.handoverSocket: {value!r} must be '@name', an absolute path, '' or 'disabled'"
        )
    if len(value.encode()) > _UNIX_PATH_MAX:
        raise ConfigError(
            f"proxy.handoverSocket: {value!r} is longer than the {_UNIX_PATH_MAX} bytes a unix "
            "socket address holds"
        )
    return value


def validate(config: RapproxyConfiguration) -> None:
    parse_host_port(config.healthz_bind_address, "healthzBindAddress")
    parse_host_port(config.metrics_bind_address, "metricsBindAddress")
    proxy = config.proxy
    if not 0 < proxy.tcp_port < 65536:
        raise ConfigError(f"proxy.tcpPort: {proxy.tcp_port} out of range")
    udp_ports = parse_port_range(proxy.udp_port_range, "proxy.udpPortRange")
    if proxy.tcp_port in udp_ports:
        raise ConfigError("proxy.tcpPort: must not lie inside proxy.udpPortRange")
    try:
        ipaddress.ip_address(proxy.listen_address)
    except ValueError:
        raise ConfigError(f"proxy.listenAddress: {proxy.listen_address!r} is not an IP") from None
    if not proxy.dial_timeouts:
        raise ConfigError("proxy.dialTimeouts: needs at least one attempt")
    for i, timeout in enumerate(proxy.dial_timeouts):
        _positive(timeout, f"proxy.dialTimeouts[{i}]")
    if (
        proxy.relay_engine is RelayEngine.NATIVE
        and len(proxy.dial_timeouts) > NATIVE_MAX_DIAL_ATTEMPTS
    ):
        raise ConfigError(
            f"proxy.dialTimeouts: relayEngine 'native' makes at most {NATIVE_MAX_DIAL_ATTEMPTS} "
            f"attempts, got {len(proxy.dial_timeouts)}"
        )
    _positive(proxy.idle_timeout, "proxy.idleTimeout")
    _positive(proxy.udp_idle_timeout, "proxy.udpIdleTimeout")
    if proxy.max_connections < 1:
        raise ConfigError("proxy.maxConnections: must be at least 1")
    if proxy.max_udp_flows < 1:
        raise ConfigError("proxy.maxUdpFlows: must be at least 1")
    if not 0 <= proxy.workers <= 256:
        raise ConfigError(f"proxy.workers: {proxy.workers} must be between 0 and 256")
    if not 0 <= proxy.drain_timeout < math.inf:
        raise ConfigError(f"proxy.drainTimeout: {proxy.drain_timeout} must be 0 or more seconds")
    handover_address(proxy)
    _positive(config.client_connection.request_timeout, "clientConnection.requestTimeout")
    ipt = config.iptables
    _positive(ipt.sync_period, "iptables.syncPeriod")
    _positive(ipt.retry_period, "iptables.retryPeriod")
    if ipt.min_sync_period > ipt.sync_period:
        raise ConfigError("iptables.minSyncPeriod: must not exceed iptables.syncPeriod")
    for i, cidr in enumerate(ipt.node_port_addresses):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(f"iptables.nodePortAddresses[{i}]: {cidr!r} is not a CIDR") from None
    _validate_dataplane(config.dataplane)
    rap = config.rap
    for name, value in (
        ("rap.overloadThreshold", rap.overload_threshold),
        ("rap.exitThreshold", rap.exit_threshold),
        ("rap.rttEwmaAlpha", rap.rtt_ewma_alpha),
    ):
        if not 0 < value <= 1:
            raise ConfigError(f"{name}: {value} must be in (0, 1]")
    if rap.exit_threshold > rap.overload_threshold:
        raise ConfigError("rap.exitThreshold: must not exceed rap.overloadThreshold")
    if not 0 <= rap.spill_backoff < 1:
        raise ConfigError(f"rap.spillBackoff: {rap.spill_backoff} must be in [0, 1)")
    if not 0 < rap.spill_recovery <= 1:
        raise ConfigError(f"rap.spillRecovery: {rap.spill_recovery} must be in (0, 1]")
    if not 0 <= rap.spill_margin <= 10:
        raise ConfigError(f"rap.spillMargin: {rap.spill_margin} must be in [0, 10]")
    for name, weight in (
        ("rap.latencyRise", rap.latency_rise),
        ("rap.latencyFall", rap.latency_fall),
    ):
        if not 0 < weight <= 1:
            raise ConfigError(f"{name}: {weight} must be in (0, 1]")
    _positive(rap.signal_hold, "rap.signalHold")
    for name, value in (
        ("rap.weights.cpu", rap.weights.cpu),
        ("rap.weights.memory", rap.weights.memory),
        ("rap.weights.rtt", rap.weights.rtt),
    ):
        if value < 0:
            raise ConfigError(f"{name}: {value} must not be negative")
    kind, _, argument = rap.load_source.partition(":")
    if not ((kind == "host" and not argument) or (kind in ("cgroup", "file") and argument)):
        raise ConfigError(
            f"rap.loadSource: {rap.load_source!r}: expected host, cgroup:PATH or file:PATH"
        )
    if rap.top_candidates < 1:
        raise ConfigError("rap.topCandidates: must be at least 1")
    _positive(rap.telemetry_interval, "rap.telemetryInterval")
    if rap.stale_after_periods < 1:
        raise ConfigError("rap.staleAfterPeriods: must be at least 1")
    if not 0 < rap.telemetry_port < 65536:
        raise ConfigError(f"rap.telemetryPort: {rap.telemetry_port} out of range")
    bps = config.bps
    for name, value in (
        ("bps.leaseDuration", bps.lease_duration),
        ("bps.renewDeadline", bps.renew_deadline),
        ("bps.retryPeriod", bps.retry_period),
    ):
        if value < 1:
            raise ConfigError(f"{name}: {value} must be at least 1 second")
    if not bps.retry_period < bps.renew_deadline < bps.lease_duration:
        raise ConfigError("bps: need retryPeriod < renewDeadline < leaseDuration")
    _positive(bps.activation_timeout, "bps.activationTimeout")
    if config.logging.format not in ("text", "json"):
        raise ConfigError(f"logging.format: {config.logging.format!r}: one of text, json")
    if config.logging.level not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f"logging.level: {config.logging.level!r}: one of debug, info, warning, error"
        )


def _validate_dataplane(dataplane: DataplaneSettings) -> None:
    _positive(dataplane.weight_period, "dataplane.weightPeriod")
    if not 0 <= dataplane.weight_threshold <= 1:
        raise ConfigError(
            f"dataplane.weightThreshold: {dataplane.weight_threshold} must be in [0, 1]"
        )
    if not 0 <= dataplane.kernel_sample_share < 1:
        raise ConfigError(
            f"dataplane.kernelSampleShare: {dataplane.kernel_sample_share} must be in [0, 1)"
        )
    if not 0 <= dataplane.masquerade_bit <= 31:
        raise ConfigError(f"dataplane.masqueradeBit: {dataplane.masquerade_bit} must be 0-31")
    mask = dataplane.node_mark_mask
    low = mask & -mask
    if not 0 < mask < 1 << 32 or (mask + low) & mask or mask // low < 3:
        raise ConfigError(
            f"dataplane.nodeMarkMask: {mask:#x} must be contiguous bits of a 32-bit mark,"
            " at least two of them"
        )
    if mask & (1 << dataplane.masquerade_bit):
        raise ConfigError(
            f"dataplane.nodeMarkMask: {mask:#x} holds dataplane.masqueradeBit"
            f" ({dataplane.masquerade_bit})"
        )
    for i, cidr in enumerate(dataplane.cluster_cidrs):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(f"dataplane.clusterCidrs[{i}]: {cidr!r} is not a CIDR") from None


def _positive(value: float, path: str) -> None:
    if value <= 0:
        raise ConfigError(f"{path}: {value} must be greater than 0")


# -- rendering ------------------------------------------------------------------------------------


def to_mapping(config: Any) -> dict[str, Any]:
    """A configuration as a YAML-ready mapping with camelCase keys."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out[camel(f.name)] = to_mapping(value)
        elif isinstance(value, tuple):
            out[camel(f.name)] = list(value)
        elif isinstance(value, enum.StrEnum):
            out[camel(f.name)] = value.value
        else:
            out[camel(f.name)] = value
    return out


def defaults_yaml() -> str:
    body = {"apiVersion": API_VERSION, "kind": KIND, **to_mapping(RapproxyConfiguration())}
    return yaml.safe_dump(body, sort_keys=False)


def reference_rows(
    cls: type[Any] = RapproxyConfiguration, prefix: str = ""
) -> list[tuple[str, str, str]]:
    """(field path, default, meaning) for every leaf field: the source of docs/configuration.md."""
    rows: list[tuple[str, str, str]] = []
    default = cls()
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        path = f"{prefix}.{camel(f.name)}" if prefix else camel(f.name)
        if dataclasses.is_dataclass(hint):
            rows.extend(reference_rows(hint, path))  # type: ignore[arg-type]
            continue
        value = getattr(default, f.name)
        shown = (
            ", ".join(str(v) for v in value)
            if isinstance(value, tuple)
            else value.value
            if isinstance(value, enum.StrEnum)
            else value
        )
        rows.append((path, f"`{shown}`" if shown != "" else '`""`', f.metadata.get("doc", "")))
    return rows
