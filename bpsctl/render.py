"""What bpsctl prints: tables and descriptions of BackupPodSets, built from API objects.

Pure: every function takes the raw JSON objects the API returned and `now` (epoch seconds) and
returns text, so the output can be checked exactly in a test without a cluster. Readers must
tolerate anything: a set the controller has not seen yet has no status, an old controller may
write fewer fields; a missing value prints as `-`, never as a traceback.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rapproxy.model import pod_columns

Obj = Mapping[str, Any]
ROLE_ORDER = ("primary", "hot-backup", "cold-backup")
LABEL_ROLE = "rapproxy.io/role"
WAITER = "bps-wait"
STAGE_LABELS = (
    ("promoted", "promoted (hot → primary)"),
    ("activated", "activated (cold → hot)"),
    ("replacementCreated", "replacement created"),
    ("restored", "restored"),
)


def parse_time(value: object) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def age(since: float | None, now: float) -> str:
    """kubectl's short human durations: 45s, 5m3s, 45m, 3h5m, 30h, 12d, 3y."""
    if since is None:
        return "-"
    seconds = max(0, int(now - since))
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        rest = seconds % 60
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h{rest}m" if rest else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    days = hours // 24
    return f"{days}d" if days < 365 * 2 else f"{days // 365}y"


def millis(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    if seconds < 10:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.1f} s"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns separated by three spaces, as kubectl prints them."""
    all_rows = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers))]
    lines = [
        "   ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in all_rows
    ]
    return "\n".join(lines) + "\n"


def _spec(bps: Obj) -> Mapping[str, Any]:
    spec = bps.get("spec")
    return spec if isinstance(spec, Mapping) else {}


def _status(bps: Obj) -> Mapping[str, Any]:
    status = bps.get("status")
    return status if isinstance(status, Mapping) else {}


def _int(value: object, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def desired(bps: Obj) -> tuple[int, int, int]:
    spec = _spec(bps)
    return (
        _int(spec.get("replicas"), 1),
        _int(spec.get("hotBackups")),
        _int(spec.get("coldBackups")),
    )


def _section(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, Mapping) else {}


def _meta(obj: Obj) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def last_failover_summary(bps: Obj, now: float) -> str:
    failover = _status(bps).get("lastFailover")
    if not isinstance(failover, Mapping):
        return "<none>"
    when = age(parse_time(failover.get("detectedAt")), now)
    durations = failover.get("durations")
    restored = durations.get("restored") if isinstance(durations, Mapping) else None
    took = f"restored in {millis(restored)}" if restored is not None else "in progress"
    return f"{when} ago, {took}"


def condition_status(bps: Obj, kind: str) -> str:
    for c in _status(bps).get("conditions") or []:
        if isinstance(c, Mapping) and c.get("type") == kind:
            return str(c.get("status", "-"))
    return "-"


def status_table(sets: Sequence[Obj], now: float, *, all_namespaces: bool, wide: bool) -> str:
    if not sets:
        return ""
    headers = ["NAME", "PRIMARY", "HOT", "COLD", "LAST-FAILOVER", "AGE"]
    if all_namespaces:
        headers.insert(0, "NAMESPACE")
    if wide:
        headers += ["AVAILABLE", "PROGRESSING", "GENERATION"]
    rows = []
    for bps in sorted(
        sets, key=lambda o: (_meta(o).get("namespace", ""), _meta(o).get("name", ""))
    ):
        meta = _meta(bps)
        status = _status(bps)
        want_p, want_h, want_c = desired(bps)
        row = [
            str(meta.get("name", "?")),
            f"{_int(status.get('readyReplicas'))}/{want_p}",
            f"{_int(status.get('readyHotBackups'))}/{want_h}",
            f"{_int(status.get('coldBackups'))}/{want_c}",
            last_failover_summary(bps, now),
            age(parse_time(meta.get("creationTimestamp")), now),
        ]
        if all_namespaces:
            row.insert(0, str(meta.get("namespace", "?")))
        if wide:
            observed = status.get("observedGeneration")
            row += [
                condition_status(bps, "Available"),
                condition_status(bps, "Progressing"),
                f"{_int(meta.get('generation'))} (observed {observed if observed is not None else '-'})",
            ]
        rows.append(row)
    return table(headers, rows)


def pod_role(pod: Obj) -> str:
    return str((_meta(pod).get("labels") or {}).get(LABEL_ROLE, "?"))


def _list(obj: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    return [v for v in obj.get(key) or [] if isinstance(v, Mapping)]


def pod_ready(pod: Obj) -> bool:
    """The pod's Ready condition (what Services and the BPS controller go by)."""
    return pod_columns.condition_true(pod, "Ready")


# kubectl's STATUS, READY and RESTARTS columns, as `kubectl get pods` prints them.
pod_status = pod_columns.status_column
pod_ready_count = pod_columns.ready_column
pod_restarts = pod_columns.restarts


def cold_backup_problems(pods: Sequence[Obj]) -> list[str]:
    """Cold backups that are not cold: Ready, or past their waiter, before any activation.

    A cold backup's `bps-wait` init container holds it Pending (`Init:0/1`, Ready=False) until
    the controller activates it, and the controller relabels a pod before it activates it. So a
    pod still labelled cold-backup that is Ready, or whose waiter exited 0, ran its main
    containers without an activation: whatever runs it does not run init containers as a
    kubelet does, and a failover would count on a backup that is not what it claims to be.
    """
    problems = []
    for pod in sorted(pods, key=lambda p: str(_meta(p).get("name", ""))):
        if pod_role(pod) != "cold-backup" or _meta(pod).get("deletionTimestamp"):
            continue
        name = str(_meta(pod).get("name", "?"))
        declared = any(
            c.get("name") == WAITER for c in _list(_section(pod, "spec"), "initContainers")
        )
        waiter = next(
            (
                c
                for c in _list(_section(pod, "status"), "initContainerStatuses")
                if c.get("name") == WAITER
            ),
            {},
        )
        exited = _section(_section(waiter, "state"), "terminated").get("exitCode")
        if not declared:
            problems.append(f"cold backup {name} has no {WAITER} init container: it runs hot")
        elif pod_ready(pod):
            problems.append(
                f"cold backup {name} is Ready before activation ({pod_status(pod)}): "
                f"its {WAITER} init container did not hold it"
            )
        elif exited == 0:
            problems.append(
                f"cold backup {name}: {WAITER} exited 0 but the pod is still labelled cold-backup"
            )
    return problems


def _role_rank(pod: Obj) -> tuple[int, str]:
    role = pod_role(pod)
    rank = ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER)
    return rank, str(_meta(pod).get("name", ""))


def pods_table(pods: Sequence[Obj], now: float, *, wide: bool) -> str:
    if not pods:
        return "No pods.\n"
    headers = ["ROLE", "POD", "READY", "STATUS", "RESTARTS", "NODE", "IP", "AGE"]
    if wide:
        headers += ["UID"]
    rows = []
    for pod in sorted(pods, key=_role_rank):
        meta = _meta(pod)
        status = pod.get("status") or {}
        row = [
            pod_role(pod),
            str(meta.get("name", "?")),
            pod_ready_count(pod),
            pod_status(pod),
            str(pod_restarts(pod)),
            str((pod.get("spec") or {}).get("nodeName") or "-"),
            str(status.get("podIP") or "-"),
            age(parse_time(meta.get("creationTimestamp")), now),
        ]
        if wide:
            row += [str(meta.get("uid", "-"))]
        rows.append(row)
    return table(headers, rows)


def set_summary(bps: Obj, now: float) -> str:
    meta = _meta(bps)
    status = _status(bps)
    want_p, want_h, want_c = desired(bps)
    return (
        f"BackupPodSet {meta.get('namespace', '?')}/{meta.get('name', '?')}: "
        f"primaries {_int(status.get('readyReplicas'))}/{want_p} ready, "
        f"hot {_int(status.get('readyHotBackups'))}/{want_h} ready, "
        f"cold {_int(status.get('coldBackups'))}/{want_c}; "
        f"last failover: {last_failover_summary(bps, now)}\n"
    )


def failover_timeline(failover: Mapping[str, Any]) -> str:
    """The stages of one failover, each with its time since the failure was observed."""
    lines = []
    failed = failover.get("failedPod", "?")
    where = f" on {failover['node']}" if failover.get("node") else ""
    lines.append(f"failed primary:  {failed} ({failover.get('reason', '?')}){where}")
    if failover.get("promotedPod"):
        lines.append(f"new primary:     {failover['promotedPod']}")
    durations = failover.get("durations")
    durations = durations if isinstance(durations, Mapping) else {}
    rows = [["detected", _clock(failover.get("detectedAt")), "+0 ms"]]
    for key, label in STAGE_LABELS:
        at = failover.get(f"{key}At")
        if at is None:
            continue
        rows.append([label, _clock(at), "+" + millis(durations.get(key))])
    lines.append(table(["STAGE", "AT", "SINCE FAILURE"], rows).rstrip("\n"))
    if failover.get("handlingSeconds") is not None:
        lines.append(
            f"controller handling (event → writes acknowledged): {millis(failover['handlingSeconds'])}"
        )
    return "\n".join(lines) + "\n"


def _clock(value: object) -> str:
    at = parse_time(value)
    if at is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(at, tz=datetime.UTC)
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def describe(bps: Obj, pods: Sequence[Obj], events: Sequence[Obj], now: float) -> str:
    meta = _meta(bps)
    spec = _spec(bps)
    status = _status(bps)
    want_p, want_h, want_c = desired(bps)
    out = []
    created = parse_time(meta.get("creationTimestamp"))
    out.append(f"Name:          {meta.get('name', '?')}")
    out.append(f"Namespace:     {meta.get('namespace', '?')}")
    out.append(f"Created:       {meta.get('creationTimestamp', '-')} ({age(created, now)} ago)")
    observed = status.get("observedGeneration")
    out.append(
        f"Generation:    {_int(meta.get('generation'))} "
        f"(observed {observed if observed is not None else '-'})"
    )
    out.append("Spec:")
    out.append(f"  Primaries:     {want_p}")
    out.append(f"  Hot backups:   {want_h}")
    out.append(f"  Cold backups:  {want_c}")
    activation = _section(spec, "activation")
    out.append(
        f"  Activation:    port {activation.get('port', 9901)}, "
        f"timeout {activation.get('timeoutSeconds', 5)}s"
    )
    placement = _section(spec, "placement")
    spread = placement.get("spreadRoles", True)
    out.append(f"  Placement:     {'spread roles across nodes' if spread else 'no role spreading'}")
    containers = _section(_section(spec, "template"), "spec").get("containers") or []
    images = ", ".join(
        f"{c.get('name', '?')} ({c.get('image', '?')})"
        for c in containers
        if isinstance(c, Mapping)
    )
    out.append(f"  Containers:    {images or '-'}")
    out.append("Status:")
    pod_names = _section(status, "pods")
    for label, ready_key, count_key, want, names_key in (
        ("Primaries", "readyReplicas", "replicas", want_p, "primary"),
        ("Hot backups", "readyHotBackups", "hotBackups", want_h, "hotBackup"),
        ("Cold backups", None, "coldBackups", want_c, "coldBackup"),
    ):
        names = ", ".join(pod_names.get(names_key) or []) or "-"
        if ready_key is None:
            counts = f"{_int(status.get(count_key))}/{want} waiting"
        else:
            counts = f"{_int(status.get(ready_key))}/{want} ready"
        out.append(f"  {label + ':':<15}{counts:<16}{names}")
    out.append("Conditions:")
    conditions = [c for c in status.get("conditions") or [] if isinstance(c, Mapping)]
    if conditions:
        rows = [
            [
                str(c.get("type", "?")),
                str(c.get("status", "?")),
                str(c.get("reason", "")),
                age(parse_time(c.get("lastTransitionTime")), now),
                str(c.get("message", "")),
            ]
            for c in conditions
        ]
        out.append(_indent(table(["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"], rows)))
    else:
        out.append("  <none> (the controller has not reported yet)")
    out.append("Pods:")
    out.append(_indent(pods_table(pods, now, wide=False)))
    problems = cold_backup_problems(pods)
    if problems:
        out.append("Problems:")
        out.extend(f"  {problem}" for problem in problems)
    out.append("Last failover:")
    failover = status.get("lastFailover")
    out.append(
        _indent(failover_timeline(failover)) if isinstance(failover, Mapping) else "  <none>"
    )
    out.append("Events:")
    out.append(_indent(events_table(events, now)))
    return "\n".join(line.rstrip("\n") for line in out) + "\n"


def events_table(events: Sequence[Obj], now: float) -> str:
    if not events:
        return "<none>\n"

    def when(e: Obj) -> float:
        return parse_time(e.get("lastTimestamp")) or parse_time(e.get("eventTime")) or 0.0

    def order(e: Obj) -> tuple[float, int]:
        # Timestamps have whole seconds; the resourceVersion orders events within one second.
        version = str(_meta(e).get("resourceVersion") or "0")
        return when(e), int(version) if version.isdigit() else 0

    rows = [
        [
            str(e.get("type", "")),
            str(e.get("reason", "")),
            age(when(e), now),
            str(e.get("message") or e.get("note") or ""),
        ]
        for e in sorted(events, key=order)[-20:]
    ]
    return table(["TYPE", "REASON", "AGE", "MESSAGE"], rows)


def _indent(text: str) -> str:
    return "\n".join("  " + line if line else line for line in text.rstrip("\n").split("\n"))
